"""The bad-input matrix: each bad config or data file fails with its own exception type and a message that says what
is wrong, before anything is trained; earlier outputs stay byte for byte as they were, and nothing is written
anywhere (not even the new run folder)."""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from kdistill.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    KdistillError,
    LabelError,
    StudentError,
    TeacherError,
)
from kdistill.run import run

GOOD = """
name: bad-input-case
out: runs/new
data:
  train: {path: data/train.csv}
  val: {path: data/val.csv}
teacher: {kind: logistic_regression}
student: {kind: mlp, params: {hidden: [8]}}
method: {name: kd, params: {temperature: 2.0}}
train: {epochs: 2, batch_size: 16}
report: {baseline: false}
logging: {console: false}
"""

EARLIER = GOOD.replace("out: runs/new", "out: runs/earlier")


@dataclass(frozen=True)
class Case:
    """``text``: the config file (GOOD with ``replace`` applied, unless given whole); ``files``: data files the case
    writes first (name -> bytes or a numpy array for .npy/.npz)."""

    id: str
    error: type[KdistillError]
    fragment: str
    replace: tuple[tuple[str, str], ...] = ()
    text: str | None = None
    overrides: tuple[str, ...] = ()
    resume: bool = False
    files: dict[str, object] = field(default_factory=dict)


def _csv(rows: list[str]) -> bytes:
    return ("a,b,c,d,label\n" + "\n".join(rows) + "\n").encode()


TRAIN_FILE = ("train: {path: data/train.csv}", "train: {path: data/case.csv}")
TRAIN_NPZ = ("train: {path: data/train.csv}", "train: {path: data/case.npz}")
TRAIN_NPY = ("train: {path: data/train.csv}", "train: {x: data/x.npy, y: data/y.npy}")

CASES = [
    # ---- the YAML itself
    Case("yaml-syntax", ConfigError, "not valid YAML at line", text="data: {dataset: digits\nteacher: x\n"),
    Case("yaml-python-tag", ConfigError, "no !tags", text="data: !!python/object/apply:os.system ['touch pwned']\n"),
    Case("yaml-custom-tag", ConfigError, "no !tags", text="teacher: !import_call {key: os.getcwd}\n"),
    Case("yaml-duplicate-key", ConfigError, "'teacher' appears twice", replace=(("method:", "teacher: {}\nmethod:"),)),
    Case("yaml-empty", ConfigError, "is empty", text="# nothing\n"),
    Case("yaml-not-a-mapping", ConfigError, "must hold a mapping", text="- data\n- teacher\n"),
    # ---- fields and names
    Case("unknown-section", ConfigError, "trian: unknown key; did you mean 'train'?", replace=(("train:", "trian:"),)),
    Case(
        "unknown-nested-key",
        ConfigError,
        "train.optimiser: unknown key; did you mean 'optimizer'?",
        overrides=("train.optimiser.lr=0.1",),
    ),
    Case(
        "unknown-method",
        ConfigError,
        "method[0].name: unknown method 'kdd'; did you mean 'kd'?",
        overrides=("method=kdd",),
    ),
    Case(
        "method-param-typo",
        ConfigError,
        "did you mean 'temperature'?",
        replace=(("{temperature: 2.0}", "{temprature: 2.0}"),),
    ),
    Case("method-param-value", ConfigError, "temperature must be > 0", overrides=("method.0.params.temperature=-1",)),
    Case(
        "negative-lr",
        ConfigError,
        "train.optimizer.lr: Input should be greater than 0",
        overrides=("train.optimizer.lr=-0.1",),
    ),
    Case(
        "batch-size-type",
        ConfigError,
        "train.batch_size: Input should be a valid integer",
        overrides=("train.batch_size=big",),
    ),
    Case(
        "teacher-kind-typo",
        ConfigError,
        "did you mean 'logistic_regression'?",
        overrides=("teacher.kind=logistic_regresion",),
    ),
    Case(
        "teacher-param-typo",
        ConfigError,
        "did you mean 'n_estimators'?",
        overrides=("teacher.kind=random_forest", "teacher.params.n_estimator=5"),
    ),
    Case(
        "teacher-param-value",
        TeacherError,
        "failed to build",
        overrides=("teacher.kind=random_forest", "teacher.params.n_estimators=-5"),
    ),
    Case("student-param-value", StudentError, "cannot be built", overrides=("student.params.hidden=[-4]",)),
    Case("student-kind-typo", ConfigError, "did you mean 'mlp'?", overrides=("student.kind=mpl",)),
    Case("student-param-typo", ConfigError, "did you mean 'hidden'?", overrides=("student.params.hiden=[4]",)),
    Case(
        "precision-typo",
        ConfigError,
        "device.precision: 'fp8' is not allowed; did you mean 'fp32'?",
        overrides=("device.precision=fp8",),
    ),
    Case("fp16-on-cpu", ConfigError, "fp16 needs CUDA", overrides=("device.type=cpu", "device.precision=fp16")),
    Case("dataset-and-files", ConfigError, "give one of dataset", overrides=("data.dataset=digits",)),
    # ---- references to the user's code and files
    Case(
        "factory-missing-module",
        ConfigError,
        "cannot import module 'no_such_module'",
        overrides=("student.kind=custom", "student.params={}", "student.factory=no_such_module:Net"),
    ),
    Case(
        "factory-missing-attribute",
        ConfigError,
        "no attribute 'TinyNett'\n  hint: did you mean 'TinyNet'?",
        overrides=("student.kind=custom", "student.params={}", "student.factory=case_models:TinyNett"),
        files={"case_models.py": b"from torch import nn\nclass TinyNet(nn.Linear):\n    pass\n"},
    ),
    Case(
        "factory-not-a-reference",
        ConfigError,
        "not a module:attribute",
        overrides=("teacher.kind=sklearn", "teacher.factory=os.system"),
    ),
    Case("data-file-missing", ConfigError, "data.val.path: no file at", overrides=("data.val.path=data/nope.csv",)),
    Case("override-without-equals", ConfigError, "is not key=value", overrides=("train.epochs",)),
    Case("override-into-a-value", ConfigError, "which has no keys to set", overrides=("name.first=x",)),
    # ---- the run folder
    Case("folder-holds-a-run", ConfigError, "already holds a run", overrides=("out=runs/earlier",)),
    Case(
        "resume-changed-config",
        CheckpointError,
        "train.epochs: 2 -> 3",
        overrides=("out=runs/earlier", "train.epochs=3"),
        resume=True,
    ),
    Case("resume-nothing-there", CheckpointError, "nothing to resume", resume=True),
    Case(
        "resume-corrupt-checkpoint",
        CheckpointError,
        "not a readable kdistill checkpoint",
        overrides=("out=runs/corrupt",),
        resume=True,
    ),
    Case(
        "resume-pickle-checkpoint",
        CheckpointError,
        "not a readable kdistill checkpoint",
        overrides=("out=runs/pickled",),
        resume=True,
    ),
    # ---- data
    Case(
        "nan-in-x",
        DataError,
        "has NaN or inf in 1 row(s), first at row 2",
        replace=(TRAIN_NPZ,),
        files={"case.npz": "nan"},
    ),
    Case(
        "x-y-lengths",
        DataError,
        "X has 30 rows but y has 29",
        replace=(TRAIN_NPY,),
        files={"x.npy": "x30", "y.npy": "y29"},
    ),
    Case("npz-missing-y", DataError, "has no array 'y'", replace=(TRAIN_NPZ,), files={"case.npz": "no-y"}),
    Case(
        "npy-object-array",
        DataError,
        "without unpickling",
        replace=(TRAIN_NPY,),
        files={"x.npy": "object", "y.npy": "y30"},
    ),
    Case("x-is-1d", DataError, "is 1-D", replace=(TRAIN_NPY,), files={"x.npy": "x1d", "y.npy": "y30"}),
    Case(
        "csv-not-a-number",
        DataError,
        "line 3, column 'b': 'abc' is not a number",
        replace=(TRAIN_FILE,),
        files={"case.csv": _csv(["1,2,3,4,0", "1,abc,3,4,1"])},
    ),
    Case(
        "csv-no-label-column",
        DataError,
        "no column 'lable'",
        replace=(TRAIN_FILE,),
        overrides=("data.train.label_column=lable",),
        files={"case.csv": _csv(["1,2,3,4,0"])},
    ),
    Case("csv-header-only", DataError, "has no data rows", replace=(TRAIN_FILE,), files={"case.csv": _csv([])[:-1]}),
    Case(
        "csv-ragged-row",
        DataError,
        "line 3 has 4 fields",
        replace=(TRAIN_FILE,),
        files={"case.csv": _csv(["1,2,3,4,0", "1,2,3,4"])},
    ),
    Case(
        "negative-label",
        LabelError,
        "negative labels",
        replace=(TRAIN_FILE,),
        files={"case.csv": _csv(["1,2,3,4,0", "1,2,3,4,-1"])},
    ),
    Case(
        "val-label-unseen",
        LabelError,
        "labels the teacher never saw: [7]",
        replace=(("val: {path: data/val.csv}", "val: {path: data/case.csv}"),),
        files={"case.csv": _csv(["5,3,1,0.2,0", "6,3,5,2,7"])},
    ),
]


def _array_file(kind: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = np.arange(30) % 3
    if kind == "nan":
        x[2, 1] = np.nan
        return {"x": x, "y": y}
    if kind == "no-y":
        return {"x": x}
    return {"x30": {"": x}, "y29": {"": y[:29]}, "y30": {"": y}, "x1d": {"": x[:, 0]}}[kind]  # type: ignore[return-value]


def _write_case_file(path: Path, content: object) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "object":
        np.save(path, np.array([{"a": 1}] * 30, dtype=object), allow_pickle=True)
    elif path.suffix == ".npz":
        np.savez(path, **_array_file(str(content)))
    else:
        np.save(path, _array_file(str(content))[""])


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


class _Bomb:
    """Unpickling this would create a file: the pickle 'checkpoint' must be refused without being unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path("PICKLE_RAN"), "x"))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with good data files, an earlier finished run, and two run folders with broken checkpoints."""
    root = tmp_path_factory.mktemp("workspace")
    examples = Path(__file__).resolve().parent.parent / "examples" / "data"
    (root / "data").mkdir()
    shutil.copy(examples / "iris_train.csv", root / "data" / "train.csv")
    shutil.copy(examples / "iris_test.csv", root / "data" / "val.csv")
    (root / "earlier.yaml").write_text(EARLIER)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run(root / "earlier.yaml", verbose=False)
    for name in ("corrupt", "pickled"):
        shutil.copytree(root / "runs" / "earlier", root / "runs" / name)
        (root / "runs" / name / "student.safetensors").unlink()
    checkpoint = root / "runs" / "corrupt" / "checkpoint-student.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    (root / "runs" / "pickled" / "checkpoint-student.safetensors").write_bytes(pickle.dumps(_Bomb()))
    return root


def test_the_matrix_has_at_least_20_distinct_cases() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(
    case: Case, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    for name, content in case.files.items():
        _write_case_file((workspace if name.endswith(".py") else workspace / "data") / name, content)
    config = workspace / "case.yaml"
    text = case.text if case.text is not None else GOOD
    for old, new in case.replace:
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    before = _snapshot(workspace)

    with pytest.raises(case.error) as caught:
        run(config, overrides=case.overrides, resume=case.resume, verbose=False)

    assert case.fragment in str(caught.value), str(caught.value)
    assert caught.value.hint, "every error says how to fix it"
    assert _snapshot(workspace) == before  # earlier outputs untouched, nothing new anywhere
    assert not (workspace / "runs" / "new").exists()
    assert not (workspace / "PICKLE_RAN").exists()
    assert not (workspace / "pwned").exists()


def test_no_code_path_unpickles() -> None:
    """Safe loading, checked on the source: no pickle.load, every torch.load with weights_only=True, every np.load
    with allow_pickle=False."""
    source = Path(__file__).resolve().parent.parent / "src" / "kdistill"
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)
