"""The registries: the generic one (kdistill.registry), students, teacher kinds and adapters, and the two
walk-throughs of docs/architecture.md run as written, their printed output compared with what the page says."""

from __future__ import annotations

import contextlib
import copy
import doctest
import io
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

import kdistill
import kdistill.registry
from kdistill.cli import main
from kdistill.config import StudentConfig, TeacherConfig
from kdistill.config_recipes import TEACHER_RECIPES
from kdistill.errors import ConfigError, KdistillError, StudentError, TeacherError
from kdistill.losses import LOSSES, get_loss
from kdistill.losses import UnknownNameError as LossesUnknownNameError
from kdistill.registry import Entry, Registry, UnknownNameError, signature_params
from kdistill.students import (
    MLP,
    STUDENTS,
    build_student,
    register_student,
    register_student_family,
    student_from_spec,
)
from kdistill.teachers import (
    ADAPTERS,
    CallableTeacher,
    EnsembleTeacher,
    Outputs,
    SklearnTeacher,
    TeacherBase,
    TorchTeacher,
    as_teacher,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture(autouse=True)
def _restore_global_rng_and_registries() -> Iterator[None]:
    """Whatever a test (or a doc block that failed half-way) registers is removed afterwards."""
    registries = (STUDENTS, TEACHER_RECIPES, ADAPTERS, LOSSES)
    before = [set(registry.names()) for registry in registries]
    with torch.random.fork_rng(devices=[]):
        yield
    for registry, names in zip(registries, before, strict=True):
        for name in set(registry.names()) - names:
            del registry[name]


# ---------------------------------------------------------------------------------------------------- the generic one


def _shapes() -> Registry[Entry]:
    shapes: Registry[Entry] = Registry("shape")

    @shapes.register("square", "a square")
    def square(side: float = 1.0) -> float:
        return side * side

    @shapes.register("rectangle", "a rectangle")
    def rectangle(width: float, height: float = 1.0) -> float:
        return width * height

    return shapes


def test_register_get_list_and_mapping_behaviour() -> None:
    shapes = _shapes()
    assert list(shapes) == ["square", "rectangle"]  # registration order
    assert shapes.names() == ["rectangle", "square"]
    assert [entry.name for entry in shapes.entries()] == ["rectangle", "square"]
    assert "square" in shapes and "circle" not in shapes and 3 not in shapes
    assert len(shapes) == 2
    assert shapes["square"].description == "a square"
    assert shapes.build("rectangle", 2.0, height=3.0) == 6.0
    del shapes["square"]
    assert list(shapes) == ["rectangle"]
    with pytest.raises(ValueError, match="shape 'rectangle' is registered twice"):
        shapes.add("rectangle", lambda: 0, "again")
    with pytest.raises(ValueError, match="without ':'"):
        shapes.add("a:b", lambda: 0, "a colon")


def test_unknown_names_give_the_closest_and_every_valid_name() -> None:
    shapes = _shapes()
    with pytest.raises(UnknownNameError) as caught:
        shapes.get("sqare")
    assert caught.value.message == "unknown shape 'sqare'"
    assert caught.value.hint == "did you mean 'square'? valid names: rectangle, square"
    assert str(caught.value) == "unknown shape 'sqare'\n  hint: did you mean 'square'? valid names: rectangle, square"
    with pytest.raises(UnknownNameError) as far:
        shapes.get("hexagon")
    assert far.value.hint == "valid names: rectangle, square"  # nothing close: no guess
    with pytest.raises(KeyError):  # still a KeyError for code that catches one
        shapes["circle"]
    with pytest.raises(UnknownNameError, match="must be a string, got int"):
        shapes.get(3)  # type: ignore[arg-type]


def test_params_come_from_the_signature() -> None:
    shapes = _shapes()
    assert shapes.params("rectangle") == ["width", "height"]
    shapes.check_params("rectangle", ["height"])
    with pytest.raises(UnknownNameError) as caught:
        shapes.check_params("rectangle", ["heigth"])
    assert caught.value.message == "shape 'rectangle' takes no parameter 'heigth'"
    assert caught.value.hint == "did you mean 'height'? it takes: width, height"
    with pytest.raises(UnknownNameError, match="takes no parameter 'side'"):
        shapes.build("rectangle", 1.0, side=2.0)

    def anything(first: int, *args: Any, second: int = 0, **kwargs: Any) -> None: ...

    def positional(first: int, /, second: int, *, third: int = 0) -> None: ...

    assert signature_params(anything) is None  # **kwargs: anything goes
    assert signature_params(positional) == ["second", "third"]  # a positional-only one is no keyword
    assert signature_params(positional, skip_leading=2) == ["third"]


def test_skip_leading_common_params_and_params_of() -> None:
    built: Registry[Entry] = Registry("thing", skip_leading=2, common_params=("in_shape",))
    built.add("plain", lambda shape, classes, *, width=1: None, "plain")
    built.add("passed_on", lambda shape, classes, **params: None, "passes on", params_of=lambda: _Target)
    assert built.params("plain") == ["width", "in_shape"]
    assert built.params("passed_on") == ["alpha", "beta", "in_shape"]
    with pytest.raises(UnknownNameError, match=r"did you mean 'alpha'\? it takes: alpha, beta, in_shape"):
        built.check_params("passed_on", ["alpah"])


class _Target:
    def __init__(self, alpha: float = 1.0, beta: float = 2.0) -> None: ...


def test_a_family_stands_for_every_prefixed_name() -> None:
    models: Registry[Entry] = Registry("model", skip_leading=1)

    @models.register_family("zoo", "any zoo model by name")
    def zoo(variant: str, size: int, *, depth: int = 1) -> tuple[str, int, int]:
        return variant, size, depth

    assert "zoo:lion" in models and "zoo:" not in models and "zo:lion" not in models
    entry = models.get("zoo:lion")
    assert entry.name == "zoo:lion" and entry.description == "any zoo model by name"
    assert entry.factory(3, depth=2) == ("lion", 3, 2)  # the variant is bound first
    assert models.params("zoo:lion") == ["depth"]
    assert models.params("zoo:") == ["depth"]  # the family itself, as `kdistill list` shows it
    assert models.names() == ["zoo:"] and list(models) == []
    with pytest.raises(UnknownNameError, match="names the family 'zoo' but no member of it"):
        models.get("zoo:")
    with pytest.raises(UnknownNameError, match=r"did you mean 'zoo:'\?"):
        models.get("zoo")
    with pytest.raises(ValueError, match="registered twice"):
        models.register_family("zoo", "again")(zoo)
    del models["zoo:"]
    assert "zoo:lion" not in models


def test_the_module_docstring_example_runs() -> None:
    results = doctest.testmod(kdistill.registry, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 3 and results.failed == 0


def test_losses_share_the_registry_and_keep_their_api() -> None:
    assert LossesUnknownNameError is UnknownNameError
    from kdistill.losses.base import unknown_name

    assert unknown_name is kdistill.registry.unknown_name
    assert isinstance(LOSSES, Registry) and "kd" in LOSSES and "kd" in list(LOSSES)
    assert LOSSES["kd"].factory is type(get_loss("kd"))
    with pytest.raises(UnknownNameError, match=r"unknown method 'dkdd'\n  hint: did you mean 'dkd'\?"):
        get_loss("dkdd")


# ---------------------------------------------------------------------------------------------------- students


def test_built_in_specs_keep_their_format_and_rebuild() -> None:
    x = torch.randn(20, 64)
    module, spec = build_student("mlp", x, 10)
    assert spec == {"kind": "mlp", "in_shape": [64], "num_classes": 10, "hidden": [128, 64], "dropout": 0.0}
    rebuilt = student_from_spec(spec)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in module.parameters()]
    _, cnn_spec = build_student("cnn", x, 10, channels=(4, 4), in_shape=(1, 8, 8))
    assert cnn_spec == {"kind": "cnn", "in_shape": [1, 8, 8], "num_classes": 10, "channels": [4, 4], "kernel_size": 5}
    assert isinstance(module, MLP)
    torch.testing.assert_close(module.standardize.mean, x.mean(0))  # fitted on the training rows


def test_student_errors_name_the_closest_and_are_student_errors() -> None:
    x = torch.randn(4, 6)
    with pytest.raises(StudentError, match=r"unknown student 'mpl'\n  hint: did you mean 'mlp'\?"):
        build_student("mpl", x, 2)
    with pytest.raises(StudentError, match=r"takes no parameter 'hiden'\n  hint: did you mean 'hidden'\?"):
        build_student("mlp", x, 2, hiden=[3])
    with pytest.raises(UnknownNameError, match="student 'cnn' takes no parameter 'hidden'"):
        build_student("cnn", x, 2, hidden=[3])  # was silently ignored before
    with pytest.raises(StudentError, match=r"params \['dropout'\] were given with a ready-made Linear"):
        build_student(nn.Linear(6, 2), x, 2, dropout=0.1)
    with pytest.raises(StudentError, match=r"unknown student 'gone'"):
        student_from_spec({"kind": "gone", "in_shape": [6], "num_classes": 2})


def test_student_config_validates_params_from_the_registry() -> None:
    @register_student("probe_student", "test-only")
    def probe(in_shape: Any, num_classes: int, *, width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), num_classes))

    try:
        assert StudentConfig(kind="probe_student", params={"width": 8}).params == {"width": 8}
        with pytest.raises(ValueError, match=r"'widht'; did you mean 'width'\? valid: in_shape, width"):
            StudentConfig(kind="probe_student", params={"widht": 8})
        with pytest.raises(ValueError, match=r"unknown student kind 'probe_studnet'; did you mean 'probe_student'"):
            StudentConfig(kind="probe_studnet")
        assert StudentConfig(kind="custom", factory="m:f").kind == "custom"
    finally:
        del STUDENTS["probe_student"]
    with pytest.raises(ValueError, match="unknown student kind 'probe_student'"):
        StudentConfig(kind="probe_student")


def test_a_student_family_member_builds_checks_params_and_rebuilds_from_its_spec() -> None:
    @register_student_family("probe_wide", "test-only")
    def wide(variant: str, in_shape: Any, num_classes: int, *, dropout: float = 0.0) -> nn.Module:
        return MLP(in_shape, num_classes, hidden=(int(variant),), dropout=dropout)

    module, spec = build_student("probe_wide:12", torch.randn(8, 5), 3)
    assert spec == {"kind": "probe_wide:12", "in_shape": [5], "num_classes": 3, "dropout": 0.0}
    rebuilt = student_from_spec(spec)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in module.parameters()]
    assert [p.shape for p in module.parameters()][:2] == [(12, 5), (12,)]
    with pytest.raises(StudentError, match=r"did you mean 'dropout'\?"):
        build_student("probe_wide:12", torch.randn(8, 5), 3, dropuot=0.1)
    assert StudentConfig(kind="probe_wide:7").kind == "probe_wide:7"


def test_a_student_builder_returning_no_module_is_a_clear_error() -> None:
    STUDENTS.add("not_a_module", lambda in_shape, num_classes: "oops", "test-only")
    try:
        with pytest.raises(StudentError, match=r"returned a str, not a torch\.nn\.Module"):
            build_student("not_a_module", torch.randn(3, 2), 2)
    finally:
        del STUDENTS["not_a_module"]


# ---------------------------------------------------------------------------------------------------- teachers


def test_teacher_kind_params_and_needs_come_from_the_registry() -> None:
    assert TEACHER_RECIPES.params("cnn") == [
        "channels",
        "kernel_size",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "patience",
    ]
    from sklearn.ensemble import RandomForestClassifier

    assert set(TEACHER_RECIPES.params("random_forest") or []) == set(RandomForestClassifier().get_params())
    assert TEACHER_RECIPES.params("sklearn") is None and TEACHER_RECIPES.params("saved") == []
    assert TEACHER_RECIPES["torch"].needs == ("factory",)
    with pytest.raises(ValueError, match=r"'epoch'; did you mean 'epochs'\?"):
        TeacherConfig(kind="cnn", params={"epoch": 3})
    with pytest.raises(ValueError, match="unknown param for teacher kind 'saved': 'anything'"):
        TeacherConfig(kind="saved", path="x", params={"anything": 1})
    with pytest.raises(ConfigError, match="unknown teacher kind 'randomforest'"):
        TEACHER_RECIPES.get("randomforest")


def test_every_adapter_is_registered_with_a_dispatch_rule() -> None:
    assert set(ADAPTERS) == {"sklearn", "torch", "hf", "onnx", "file", "callable", "ensemble"}
    assert ADAPTERS["file"].accepts is None  # it needs the rows: never picked automatically
    assert ADAPTERS["hf"].order < ADAPTERS["torch"].order  # a transformers model is a module too
    for entry in ADAPTERS.entries():
        assert issubclass(entry.factory, TeacherBase), entry.name
    assert ADAPTERS.params("ensemble") == ["weights", "combine"]
    with pytest.raises(TeacherError, match="did you mean 'onnx'"):
        ADAPTERS.get("onxx")


def test_as_teacher_dispatches_through_the_registry(forest: Any) -> None:
    module = nn.Linear(64, 10)
    assert isinstance(as_teacher(module), TorchTeacher)
    assert isinstance(as_teacher(forest), SklearnTeacher)
    assert isinstance(as_teacher([module, module]), EnsembleTeacher)
    assert isinstance(as_teacher(lambda rows: np.ones((len(rows), 3)) / 3), CallableTeacher)
    adapter = as_teacher(module)
    assert as_teacher(adapter) is adapter
    with pytest.raises(TeacherError, match=r"'scores\.npy' is not the path of an \.onnx file"):
        as_teacher("scores.npy")
    with pytest.raises(TeacherError, match="cannot use a int as a teacher"):
        as_teacher(3)


def test_adapters_measure_their_model_independently_of_the_profile_code(forest: Any) -> None:
    sklearn_teacher = as_teacher(forest)
    assert sklearn_teacher.size_bytes() == len(pickle.dumps(forest, protocol=pickle.HIGHEST_PROTOCOL))
    trees = sum(tree.tree_.node_count for tree in forest.estimators_)
    assert sklearn_teacher.parameter_count() is not None and sklearn_teacher.parameter_count() > trees
    module = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    torch_teacher = as_teacher(module)
    state = {name: tensor.contiguous() for name, tensor in module.state_dict().items()}
    assert torch_teacher.size_bytes() == len(safetensors_save(state))
    assert torch_teacher.parameter_count() == 64 * 16 + 16 + 16 * 10 + 10
    ensemble = as_teacher([module, forest])
    assert ensemble.size_bytes() == torch_teacher.size_bytes() + sklearn_teacher.size_bytes()
    assert ensemble.parameter_count() == torch_teacher.parameter_count() + sklearn_teacher.parameter_count()
    black_box = as_teacher(lambda rows: np.full((len(rows), 2), 0.5))
    assert black_box.size_bytes() is None and black_box.parameter_count() is None
    assert as_teacher([module, black_box]).size_bytes() is None  # one unknown member: the total is unknown


class _CoreOnly:
    """Follows the protocol's core members only (written before size_bytes existed)."""

    classes = None
    members = ("kept",)

    @property
    def num_classes(self) -> int:
        return 3

    def fingerprint(self) -> str:
        return "core-only"

    def __call__(self, x: torch.Tensor, *, features: Any = ()) -> Outputs:
        return Outputs(torch.zeros(len(x), 3))


def test_an_object_with_the_core_protocol_gets_size_defaults() -> None:
    teacher = as_teacher(_CoreOnly())
    assert teacher.size_bytes() is None and teacher.parameter_count() is None
    assert teacher.fingerprint() == "core-only" and teacher.num_classes == 3
    assert teacher(torch.zeros(2, 4)).logits.shape == (2, 3)
    assert teacher.members == ("kept",)  # type: ignore[attr-defined]
    assert not isinstance(teacher, CallableTeacher)
    copied = copy.deepcopy(teacher)
    assert type(copied) is type(teacher) and copied.fingerprint() == "core-only"


def test_kdistill_list_teachers_reads_both_registries() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", "list", "teachers"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    kinds, adapters = done.stdout.split("\n\n", 1)
    for name in TEACHER_RECIPES:
        assert re.search(rf"^{name} +{re.escape(TEACHER_RECIPES[name].description)}$", kinds, flags=re.M), name
    for name in ADAPTERS:
        assert re.search(rf"^{name} +{re.escape(ADAPTERS[name].description)}$", adapters, flags=re.M), name
    assert "params: channels, kernel_size, epochs, batch_size, lr, weight_decay, patience" in kinds
    assert "params: weights, combine" in adapters


# ---------------------------------------------------------------------------------------------------- the docs


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


_PIECE = re.compile(r"```python\n(?P<code>.*?)```|```text\n(?P<text>.*?)```|prints `(?P<inline>[^`]*)`", re.DOTALL)


def _steps(section: str) -> list[tuple[str, list[str]]]:
    """Each python block with the output the page says it prints (the text blocks and `prints` after it)."""
    steps: list[tuple[str, list[str]]] = []
    for match in _PIECE.finditer(section):
        if match["code"] is not None:
            steps.append((match["code"], []))
        else:
            steps[-1][1].extend((match["text"] or match["inline"] + "\n").splitlines())
    return steps


def _matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line, where an expected ``...`` line stands for any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(_matches(expected[1:], actual[skip:]) for skip in range(len(actual) + 1))
    return bool(actual) and actual[0].rstrip() == expected[0].rstrip() and _matches(expected[1:], actual[1:])


def _run_walk_through(title: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__doc_example__"}
    steps = _steps(_section(title))
    assert len(steps) >= 2
    for position, (code, expected) in enumerate(steps):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{DOC.name} {title!r} block {position}", "exec"), namespace)
        actual = printed.getvalue().splitlines()
        assert expected, f"block {position} of {title!r} says nothing about what it prints"
        assert _matches(expected, actual), f"block {position} printed:\n" + "\n".join(actual)
    return namespace


def test_docs_adding_a_student_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    namespace = _run_walk_through("Adding a student", monkeypatch, tmp_path)
    assert "my_linear" not in STUDENTS and "wide:48" not in STUDENTS  # the page cleans up after itself
    result = namespace["result"]
    assert result.spec["kind"] == "wide:48"
    assert len(result.history) == 5  # it trained five epochs, with the family member as the model
    assert result.report.models["student"]["accuracy"] > 0.5


def test_a_registered_student_trains_saves_and_reloads(forest: Any, digits: Any, tmp_path: Path) -> None:
    @register_student("probe_linear", "test-only: one linear layer")
    def probe(in_shape: Any, num_classes: int, *, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), num_classes, bias=bias))

    try:
        result = kdistill.distill(
            forest, "probe_linear", digits["train"], epochs=2, baseline=False, report=False, verbose=False
        )
        assert result.spec == {"kind": "probe_linear", "in_shape": [64], "num_classes": 10, "bias": True}
        result.save(tmp_path / "saved")
        loaded = kdistill.load(tmp_path / "saved")
        x = torch.as_tensor(digits["test"][0][:5], dtype=torch.float32)
        torch.testing.assert_close(loaded(x), result.student(x))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["list", "students"]) == 0
        assert re.search(
            r"^probe_linear +test-only: one linear layer\n +params: bias, in_shape$", printed.getvalue(), re.M
        )
    finally:
        del STUDENTS["probe_linear"]


def test_docs_adding_a_teacher_kind_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    namespace = _run_walk_through("Adding a teacher kind", monkeypatch, tmp_path)
    assert "knn" not in TEACHER_RECIPES
    outcome = namespace["outcome"]
    assert outcome.folder.is_dir() and (outcome.folder / "report.json").is_file()
    assert outcome.result.report.models["student"]["accuracy"] > 0.5


def test_errors_are_kdistill_errors() -> None:
    for error in (STUDENTS.unknown("x"), TEACHER_RECIPES.unknown("x"), ADAPTERS.unknown("x"), LOSSES.unknown("x")):
        assert isinstance(error, KdistillError) and isinstance(error, KeyError)
    assert isinstance(STUDENTS.unknown("x"), StudentError)
    assert isinstance(TEACHER_RECIPES.unknown("x"), ConfigError)
    assert isinstance(ADAPTERS.unknown("x"), TeacherError)


def test_docs_adding_a_task_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kdistill.tasks import TASKS

    namespace = _run_walk_through("Adding a task", monkeypatch, tmp_path)
    assert "teacher_regression" not in TASKS  # the page cleans up after itself
    result = namespace["result"]
    assert result.baseline is None and result.report.settings["task"] == "teacher_regression"
    assert "val_rmse" in result.history[0]
