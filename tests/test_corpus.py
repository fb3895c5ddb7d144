"""The offline docstring corpora: deterministic, cached, split by module, duplicates dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.corpus import (
    _prose_paragraphs,
    _split_of,
    docstring_classification,
    docstring_records,
    docstring_sentences,
    docstring_transfer,
)
from kdistill.errors import DataError

PACKAGES = ("unittest", "logging")  # small standard-library packages: fast to parse


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))


def test_classification_rows_are_labelled_by_their_package_and_split_by_module() -> None:
    data = docstring_classification(PACKAGES, max_per_class=None, cache=False)
    assert data.classes == list(PACKAGES)
    texts = {text: label for split in (data.train, data.val, data.test) for text, label in zip(*split, strict=True)}
    records = {pkg: [text for _, text in docstring_records(pkg, cache=False)] for pkg in PACKAGES}
    for text, label in list(texts.items())[:50]:
        assert any(text in " ".join(doc.split()) for doc in records[PACKAGES[label]])
    seen = [set(split[0]) for split in (data.train, data.val, data.test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert all(40 <= len(text) <= 400 for text in texts)


def test_split_follows_a_hash_of_the_module_so_one_module_never_straddles() -> None:
    splits = {_split_of(f"pkg.module{i}", 0.1, 0.2) for i in range(200)}
    assert splits == {"train", "val", "test"}
    assert _split_of("pkg.a", 0.1, 0.2) == _split_of("pkg.a", 0.1, 0.2)


def test_second_build_reads_the_cache_and_gives_the_same_rows(tmp_path: Path) -> None:
    first = docstring_sentences(PACKAGES)
    files = sorted((tmp_path / "cache" / "corpus").glob("*.json"))
    assert {f.name.split("-")[0] for f in files} == {"records", "sentences"}
    assert docstring_sentences(PACKAGES) == first == docstring_sentences(PACKAGES, cache=False)
    assert first.classes == [] and first.train[1] == []


def test_max_per_class_caps_each_label() -> None:
    data = docstring_classification(PACKAGES, max_per_class=20, cache=False)
    labels = data.train[1] + data.val[1] + data.test[1]
    assert [labels.count(i) for i in range(2)] == [20, 20]


def test_a_missing_package_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="'no_such_pkg_xyz' is not installed"):
        docstring_classification(["no_such_pkg_xyz"])


def test_transfer_texts_are_disjoint_from_the_classification_rows_and_come_from_its_training_modules() -> None:
    rows = docstring_classification(PACKAGES, max_per_class=20, cache=False)
    texts = docstring_transfer(PACKAGES, max_per_class=20, max_per_package=None, cache=False)
    assert texts and len(set(texts)) == len(texts)
    labelled = {text for split in (rows.train, rows.val, rows.test) for text in split[0]}
    assert not set(texts) & labelled
    # every text is a paragraph of a docstring of a module that the classification set puts in its train split
    train_docs = " ".join(
        " ".join(doc.split())
        for package in PACKAGES
        for module, doc in docstring_records(package, cache=False)
        if _split_of(module, 0.1, 0.2) == "train"
    )
    other_docs = " ".join(
        " ".join(doc.split())
        for package in PACKAGES
        for module, doc in docstring_records(package, cache=False)
        if _split_of(module, 0.1, 0.2) != "train"
    )
    assert all(text in train_docs for text in texts)
    assert sum(text in other_docs for text in texts) < len(texts)  # not simply every paragraph of the packages
    assert all(40 <= len(text) <= 400 for text in texts)
    # the first paragraphs that the cap of 20 per class left out are among them
    capped = set(docstring_classification(PACKAGES, max_per_class=None, cache=False).train[0]) - labelled
    assert capped and capped <= set(texts)


def test_transfer_texts_are_deterministic_cached_and_capped_per_package(tmp_path: Path) -> None:
    first = docstring_transfer(PACKAGES, max_per_package=30)
    assert any(path.name.startswith("transfer-") for path in (tmp_path / "cache" / "corpus").glob("*.json"))
    assert (
        docstring_transfer(PACKAGES, max_per_package=30)
        == first
        == docstring_transfer(PACKAGES, max_per_package=30, cache=False)
    )
    assert len(first) == 60  # both packages have more than 30
    assert first != sorted(first)  # a fixed pseudo-random order: any first N mixes the packages
    assert all(isinstance(text, str) for text in first)


def test_prose_paragraphs_stop_at_the_first_section_and_skip_code() -> None:
    doc = "Summary line.\n\nMore prose here.\n\n>>> code()\n\nArgs:\n    x: a value.\n\nAfter the section."
    assert _prose_paragraphs(doc) == ["Summary line.", "More prose here."]
    numpy_style = "Summary.\n\nParameters\n----------\nx : int\n\nTail prose."
    assert _prose_paragraphs(numpy_style) == ["Summary."]
