"""Offline text corpora built from the Python sources on this machine: docstrings of installed packages.

No hub, no download: the text is the docstrings of modules, classes and functions in the packages named, read with
:mod:`ast` from their ``.py`` files (nothing is imported). Two views of it:

- :func:`docstring_classification`: the first paragraph of each docstring, labelled by its package (``"numpy"``,
  ``"torch"``, ...): a text-classification set for transformer students.
- :func:`docstring_sentences`: the sentences of every docstring, unlabeled: a corpus for sentence encoders.
- :func:`docstring_transfer`: unlabeled texts for a classification student's transfer set: other prose paragraphs
  of the docstrings of :func:`docstring_classification`'s *training* modules, none of them one of its rows.

Both are deterministic for a given set of installed package versions: files are read in sorted order, duplicate texts
are dropped (a text found in two packages is dropped from both), and rows go to train/val/test by a hash of their
*module*, so near-identical docstrings of one module never straddle the split. Results are cached as JSON under
``$KDISTILL_CACHE_DIR/corpus`` (default ``./.kdistill-cache/corpus``), keyed by the packages, their versions and the
builder's settings; a second call reads the file (milliseconds) instead of parsing sources again (seconds).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.errors import DataError
from kdistill.io import atomic_write_json

__all__ = [
    "DEFAULT_PACKAGES",
    "TextSplits",
    "docstring_classification",
    "docstring_records",
    "docstring_sentences",
    "docstring_transfer",
]

#: Packages every kdistill install has (scikit-learn brings scipy): six classes.
DEFAULT_PACKAGES: tuple[str, ...] = ("numpy", "scipy", "sklearn", "torch", "pydantic", "rich")
_FORMAT = 1
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")
_SECTION = re.compile(r"^\s*(Parameters|Returns|Examples?|Notes|See Also|Raises|Yields|Attributes|References)\s*$")
_GOOGLE_SECTION = re.compile(
    r"^(Args|Arguments|Keyword [Aa]rgs|Kwargs|Parameters|Params|Returns?|Yields?|Raises|Examples?|Example usage|"
    r"Notes?|Attributes|Warnings?|See [Aa]lso|References|Shape|Inputs|Outputs|Todo)\s*:"
)


@dataclass(frozen=True)
class TextSplits:
    """Texts and labels in three splits. ``labels`` index ``classes``; they are empty lists for unlabeled corpora."""

    classes: list[str]
    train: tuple[list[str], list[int]]
    val: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train[0]), "val": len(self.val[0]), "test": len(self.test[0])}


def _package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise DataError(
            f"package {package!r} is not installed, so its docstrings cannot be read",
            hint="name installed packages (python -m pip list), or install it.",
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin is None or not spec.origin.endswith(".py"):
        raise DataError(f"package {package!r} has no Python sources to read", hint="name a pure-Python package.")
    return Path(spec.origin)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version({"sklearn": "scikit-learn", "yaml": "PyYAML"}.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return f"python-{sys.version_info.major}.{sys.version_info.minor}"  # the standard library


def _sources(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    skip = {"tests", "test", "testing", "_vendor", "vendored", "__pycache__"}
    return sorted(path for path in root.rglob("*.py") if not skip.intersection(path.relative_to(root).parts[:-1]))


def docstring_records(package: str, *, cache: bool = True) -> list[tuple[str, str]]:
    """``(module, docstring)`` for every module, class and function docstring of ``package``, in a fixed order.

    ``module`` is the dotted module path (``"numpy.linalg._linalg"``); files that do not parse are skipped. Parsing
    a large package takes a while (torch: about a minute), so the records are cached per package version.
    """
    path = _cache_file("records", [package], {})
    if cache:
        try:
            return [(module, text) for module, text in json.loads(path.read_text())]
        except (OSError, ValueError):
            pass
    records = list(_parse_records(package))
    if cache:
        atomic_write_json(path, records)
    return records


def _parse_records(package: str) -> Iterator[tuple[str, str]]:
    root = _package_root(package)
    base = root.parent
    for path in _sources(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        module = ".".join(path.relative_to(base).with_suffix("").parts)
        nodes = (
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)),
        )
        for node in nodes:
            text = ast.get_docstring(node, clean=True)
            if text:
                yield module, text


def _first_paragraph(text: str) -> str:
    lines: list[str] = []
    for line in text.strip().splitlines():
        if not line.strip() or _SECTION.match(line):
            break
        lines.append(line.strip())
    return " ".join(lines)


def _sentences(text: str) -> list[str]:
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines()]
        if not lines or _SECTION.match(lines[0]) or lines[0].startswith((">>>", "..", "-", "*", "|")):
            continue
        if len(lines) > 1 and set(lines[1]) <= set("-=~"):
            continue  # a numpydoc section header
        out.extend(_SENTENCE_END.split(" ".join(lines)))
    return out


def _clean(text: str, min_chars: int, max_chars: int) -> str | None:
    text = re.sub(r"\s+", " ", text).strip()
    letters = sum(ch.isalpha() for ch in text)
    if not min_chars <= len(text) <= max_chars or letters < 0.6 * len(text):
        return None
    return text


def _hash_order(text: str) -> bytes:
    """A fixed pseudo-random sort key of ``text`` (8 bytes of its BLAKE2b digest)."""
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _split_of(module: str, val: float, test: float) -> str:
    draw = int.from_bytes(_hash_order(module), "big") / 2**64
    return "test" if draw < test else "val" if draw < test + val else "train"


def _subset(texts: list[str], labels: dict[str, set[int]], per_class: int | None) -> list[str]:
    """At most ``per_class`` texts of each label: a fixed pseudo-random subset (by text hash), in sorted order."""
    if per_class is None:
        return texts
    taken: dict[int, int] = {}
    kept: list[str] = []
    for text in sorted(texts, key=_hash_order):
        label = next(iter(labels[text]))
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            kept.append(text)
    return sorted(kept)


def _cache_file(kind: str, packages: Sequence[str], settings: dict[str, Any]) -> Path:
    from kdistill.cache import default_cache_dir

    key = json.dumps(
        {"format": _FORMAT, "kind": kind, "packages": {p: _version(p) for p in packages}, **settings}, sort_keys=True
    )
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    return default_cache_dir() / "corpus" / f"{kind}-{digest}.json"


def _cached(path: Path) -> TextSplits | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return TextSplits(data["classes"], *(tuple(data[name]) for name in ("train", "val", "test")))


def _build(kind: str, packages: Sequence[str], settings: dict[str, Any], cache: bool, collect: Any) -> TextSplits:
    packages = list(dict.fromkeys(packages))
    if not packages:
        raise DataError("no packages named", hint=f"pass packages, e.g. {list(DEFAULT_PACKAGES)}.")
    path = _cache_file(kind, packages, settings)
    if cache and (hit := _cached(path)) is not None:
        return hit
    rows: dict[str, set[int]] = {}  # text -> the packages it appears in
    module_of: dict[str, str] = {}
    for label, package in enumerate(packages):
        for module, text in docstring_records(package, cache=cache):
            for piece in collect(text):
                if (clean := _clean(piece, settings["min_chars"], settings["max_chars"])) is not None:
                    rows.setdefault(clean, set()).add(label)
                    module_of.setdefault(clean, module)
    parts: dict[str, tuple[list[str], list[int]]] = {name: ([], []) for name in ("train", "val", "test")}
    kept = _subset([text for text in sorted(rows) if len(rows[text]) == 1], rows, settings.get("max_per_class"))
    for text in kept:
        texts, ys = parts[_split_of(module_of[text], settings["val"], settings["test"])]
        texts.append(text)
        ys.append(next(iter(rows[text])))
    if not parts["train"][0]:
        raise DataError(f"no docstrings found in {packages}", hint="name packages that have Python sources.")
    classes = packages if kind == "classification" else []
    if kind != "classification":
        parts = {name: (texts, []) for name, (texts, _) in parts.items()}
    result = TextSplits(classes, parts["train"], parts["val"], parts["test"])
    if cache:
        atomic_write_json(path, {"classes": result.classes, **{n: list(getattr(result, n)) for n in parts}})
    return result


def docstring_classification(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    *,
    min_chars: int = 40,
    max_chars: int = 400,
    max_per_class: int | None = 2000,
    val: float = 0.1,
    test: float = 0.2,
    cache: bool = True,
) -> TextSplits:
    """Which package does this docstring come from? The first paragraph of each docstring (``min_chars`` to
    ``max_chars`` long, mostly letters), labelled by its position in ``packages``; split by module hash into about
    70/10/20 percent of modules. ``max_per_class`` caps each package's rows (a fixed subset) so that torch's many
    docstrings do not swamp the rest; None keeps them all. With the defaults: about 6,000 training rows."""
    settings = {
        "min_chars": min_chars,
        "max_chars": max_chars,
        "max_per_class": max_per_class,
        "val": val,
        "test": test,
    }
    return _build("classification", packages, settings, cache, lambda text: [_first_paragraph(text)])


def docstring_sentences(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    *,
    min_chars: int = 30,
    max_chars: int = 300,
    val: float = 0.1,
    test: float = 0.1,
    cache: bool = True,
) -> TextSplits:
    """Every prose sentence of every docstring (code examples and numpydoc section bodies dropped), unlabeled, split
    by module hash. A corpus for sentence encoders: tens of thousands of sentences with the default packages."""
    settings = {"min_chars": min_chars, "max_chars": max_chars, "val": val, "test": test}
    return _build("sentences", packages, settings, cache, _sentences)


def _prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of a docstring before its first section (``Parameters``, ``Returns``, ..., a numpydoc
    underlined header or a Google-style ``Args:``), without code examples, directives and lists."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        if not lines:
            continue
        if (
            _SECTION.match(lines[0])
            or _GOOGLE_SECTION.match(lines[0])
            or (len(lines) > 1 and set(lines[1]) <= set("-=~"))
        ):
            break  # the prose part ends at the first section (numpydoc's or Google's)
        if lines[0].startswith((">>>", "..", "-", "*", "|", ":")):
            continue
        out.append(" ".join(lines))
    return out


def docstring_transfer(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    *,
    max_per_package: int | None = 1000,
    min_chars: int = 40,
    max_chars: int = 400,
    max_per_class: int | None = 2000,
    val: float = 0.1,
    test: float = 0.2,
    cache: bool = True,
) -> list[str]:
    """Unlabeled texts for a transfer set (the teacher labels them): no labels, disjoint from the classification rows.

    Built from the same packages' docstrings as ``docstring_classification(packages, min_chars=..., max_chars=...,
    max_per_class=..., val=..., test=...)`` (pass the settings that built your rows), in three steps:

    1. only the modules that it puts in its **train** split (the same module hash), so no text shares a module with
       a validation or test row;
    2. every prose paragraph before a docstring's first section (the first paragraph and the ones after it; code
       examples, directives and lists dropped), cleaned as the classification rows are (``min_chars`` to
       ``max_chars`` long, mostly letters); first paragraphs that the classification set dropped (by its
       ``max_per_class`` cap, or because two packages share them) are in;
    3. minus every text of its train, val and test rows, duplicates dropped; at most ``max_per_package`` texts of
       each package (a fixed subset by text hash; None: all), so that torch does not swamp the rest.

    The texts come in a fixed pseudo-random order (by a hash of the text): the first N are a fixed subset that mixes
    the packages. Cached as the other corpora are. With the defaults: 4,162 texts on the versions measured in
    docs/transformers.md."""
    settings = {
        "max_per_package": max_per_package,
        "min_chars": min_chars,
        "max_chars": max_chars,
        "max_per_class": max_per_class,
        "val": val,
        "test": test,
    }
    packages = list(dict.fromkeys(packages))
    path = _cache_file("transfer", packages, settings)
    if cache:
        try:
            return [str(text) for text in json.loads(path.read_text())]
        except (OSError, ValueError):
            pass
    rows = docstring_classification(
        packages, min_chars=min_chars, max_chars=max_chars, max_per_class=max_per_class, val=val, test=test, cache=cache
    )
    taken = {text for split in (rows.train, rows.val, rows.test) for text in split[0]}
    kept: list[str] = []
    for package in packages:
        found: set[str] = set()
        for module, text in docstring_records(package, cache=cache):
            if _split_of(module, val, test) != "train":
                continue
            for paragraph in _prose_paragraphs(text):
                clean = _clean(paragraph, min_chars, max_chars)
                if clean is not None and clean not in taken:
                    found.add(clean)
        ordered = sorted(found - set(kept), key=_hash_order)
        kept.extend(ordered if max_per_package is None else ordered[:max_per_package])
    if not kept:
        raise DataError(
            f"no unlabeled docstrings left in {packages} besides the classification rows",
            hint="name packages with more docstrings, or raise max_per_package.",
        )
    texts = sorted(kept, key=_hash_order)
    if cache:
        atomic_write_json(path, texts)
    return texts
