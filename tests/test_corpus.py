"""The offline docstring corpora: deterministic, cached, split by module, duplicates dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.corpus import _split_of, docstring_classification, docstring_records, docstring_sentences
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
