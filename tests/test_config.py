"""Run configs: every example validates, overrides parse as YAML, errors name the field, the CLI runs a config end to
end (JSONL and TensorBoard logs included), several methods combine by weight, and bf16 autocast trains."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdistill.cli import main
from kdistill.config import MethodTerm, load_config
from kdistill.errors import ConfigError
from kdistill.pipeline import build_loss
from kdistill.run import run, validate
from kdistill.teachers import Outputs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _kdistill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdistill.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_every_example_validates(example: Path) -> None:
    config = validate(example)
    assert config.base == example.parent
    assert config.train.epochs > 0


def test_there_are_examples_of_each_kind() -> None:
    kinds = {load_config(path).teacher.kind for path in EXAMPLES}
    assert {"random_forest", "cnn", "sklearn", "logistic_regression"} <= kinds
    assert any(len(load_config(path).method) > 1 for path in EXAMPLES)


def test_overrides_are_parsed_as_yaml_and_reach_nested_fields() -> None:
    config = load_config(
        ROOT / "examples" / "digits_rf_mlp.yaml",
        [
            "train.epochs=3",
            "train.optimizer.lr=1e-2",
            "student.params.hidden=[16, 8]",
            "method.params.temperature=2",
            "report.baseline=false",
            "device.num_threads=1",
        ],
    )
    assert config.train.epochs == 3
    assert config.train.optimizer.lr == pytest.approx(0.01)
    assert config.student.params["hidden"] == [16, 8]
    assert config.method[0].params == {"temperature": 2, "soft_weight": 0.5}
    assert config.report.baseline is False
    assert config.device.num_threads == 1


def test_all_errors_are_reported_at_once_with_paths_and_suggestions(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "data: {dataset: mnist1}\nteacher: {kind: randomforest}\nmethod: [{name: kd}, {name: cee}]\n"
        "train: {epochs: -1, optimizer: {name: adam}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    expected = [
        r"data\.dataset: unknown dataset 'mnist1'; did you mean 'mnist1d'\?",
        r"teacher\.kind: unknown teacher kind 'randomforest'; did you mean 'random_forest'\?",
        r"method\[1\]\.name: unknown method 'cee'; did you mean 'ce'\?",
        r"train\.epochs: Input should be greater than 0 \(got -1\)",
        r"train\.optimizer\.name: 'adam' is not allowed; did you mean 'adamw'\?",
    ]
    assert "5 errors" in lines[0]
    for pattern in expected:
        assert any(re.search(pattern, line) for line in lines), pattern


def test_weighted_methods_sum_their_terms() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    terms_of_config = [
        MethodTerm(name="kd", weight=0.7, params={"temperature": 2.0, "soft_weight": 1.0}),
        MethodTerm(name="ce", weight=0.3),
    ]
    combined = build_loss(terms_of_config)
    terms = combined(Outputs(student), Outputs(teacher), target)
    soft = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean") * 4
    hard = F.cross_entropy(student, target)
    torch.testing.assert_close(terms["loss"], 0.7 * soft + 0.3 * hard)
    torch.testing.assert_close(terms["ce/ce"], hard)
    torch.testing.assert_close(terms["kd/kd"], soft)
    assert combined.needs_teacher


def test_list_and_validate_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "teachers"]) == 0
    listed = capsys.readouterr().out
    for kind in ("random_forest", "logistic_regression", "cnn", "sklearn", "torch", "saved"):
        assert kind in listed
    assert main(["validate", str(ROOT / "examples" / "custom_models.yaml")]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", str(ROOT / "examples" / "iris_csv.yaml"), "--set", "method=kdd"]) == 2
    assert "did you mean 'kd'?" in capsys.readouterr().out


def test_run_from_the_cli_end_to_end_with_logs(tmp_path: Path) -> None:
    out = tmp_path / "iris"
    done = _kdistill(
        "run",
        str(ROOT / "examples" / "iris_csv.yaml"),
        "--set",
        f"out={out}",
        "--set",
        "train.epochs=12",
        "--set",
        "logging.tensorboard=true",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "retention" in done.stdout
    assert "running iris-csv: teacher logistic_regression -> student mlp, method 1*kd, 12 epochs" in done.stdout
    assert "student epoch 12/12" in done.stderr  # the per-epoch console lines
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [float(e) for e in range(12)]
    assert all(line["phase"] == "student" for line in lines)
    assert list((out / "tensorboard" / "student").glob("events.out.tfevents.*"))
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["train"]["epochs"] == 12

    import kdistill

    student = kdistill.load(out)
    report = json.loads((out / "report.json").read_text())
    x = torch.tensor([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])
    assert student(x).argmax(1).tolist() == [0, 2]  # a setosa and a virginica from the iris data set
    assert report["models"]["student"]["accuracy"] >= 0.8


def test_bf16_autocast_trains_on_the_cpu(tmp_path: Path) -> None:
    overrides = [f"out={tmp_path / 'bf16'}", "device.type=cpu", "device.precision=bf16", "train.epochs=8"]
    overrides += ["report.enabled=false"]
    outcome = run(ROOT / "examples" / "iris_csv.yaml", overrides=overrides, verbose=False)
    assert outcome.result is not None
    history = outcome.result.history
    assert all(p.dtype == torch.float32 for p in outcome.result.student.parameters())  # autocast, not a cast
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.6


def test_the_python_examples_in_the_docs_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 2
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/config.md python block {index}", "exec"), {})
    assert (tmp_path / "runs" / "docs-example" / "report.json").exists()
    assert (tmp_path / "runs" / "from-python" / "checkpoint-student.safetensors").exists()


def test_the_examples_the_docs_name_exist() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    for command in re.findall(r"kdistill (?:validate|run) (examples/\S+\.yaml)", text):
        assert (ROOT / command).is_file(), command


TORCH_TEACHER = """
from torch import nn

def build(features: int = 4, classes: int = 3) -> nn.Module:
    return nn.Linear(features, classes)
"""


def test_teachers_from_a_torch_factory_with_weights_and_from_a_saved_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "linear_teacher.py").write_text(TORCH_TEACHER)
    train = np.loadtxt(tmp_path / "examples" / "data" / "iris_train.csv", delimiter=",", skiprows=1)
    test = np.loadtxt(tmp_path / "examples" / "data" / "iris_test.csv", delimiter=",", skiprows=1)
    reference = LogisticRegression(max_iter=1000).fit(train[:, :4], train[:, 4].astype(int))
    weights = {"weight": torch.tensor(np.ascontiguousarray(reference.coef_), dtype=torch.float32)}
    weights["bias"] = torch.tensor(reference.intercept_, dtype=torch.float32)
    save_file(weights, str(tmp_path / "examples" / "linear.safetensors"))

    config = tmp_path / "examples" / "iris_csv.yaml"
    before = sorted(path for path in (tmp_path / "examples").rglob("*"))
    torch_teacher = ["teacher.kind=torch", "teacher.params={}", "teacher.factory=linear_teacher:build"]
    torch_teacher += ["teacher.path=linear.safetensors", "train.epochs=20", "out=runs/linear"]
    first = run(config, overrides=torch_teacher, verbose=False)
    report = json.loads((first.folder / "report.json").read_text())
    expected = reference.score(test[:, :4], test[:, 4].astype(int))  # the same linear model, scored by sklearn
    assert report["models"]["teacher"]["accuracy"] == pytest.approx(expected, abs=1e-6)

    saved_teacher = ["teacher.kind=saved", "teacher.params={}", f"teacher.path={first.folder.resolve()}"]
    second = run(config, overrides=[*saved_teacher, "train.epochs=5", "out=runs/second"], verbose=False)
    report = json.loads((second.folder / "report.json").read_text())
    assert report["models"]["teacher"]["accuracy"] == pytest.approx(first.result.report.models["student"]["accuracy"])
    # the runs wrote only into their own folders: not even a __pycache__ next to the user's module
    assert sorted(path for path in (tmp_path / "examples").rglob("*")) == before


def test_compression_steps_export_and_quantize_the_trained_student(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime

    steps = "compression=[{name: onnx, params: {tolerance: 0.0001}}, {name: quantize, params: {mode: dynamic}}]"
    outcome = run(
        ROOT / "examples" / "iris_csv.yaml",
        overrides=[f"out={tmp_path / 'c'}", "train.epochs=5", "report.enabled=false", steps],
        verbose=False,
    )
    folder = outcome.folder
    summary = json.loads((folder / "compression.json").read_text())
    assert summary["onnx"]["max_abs_diff"] <= 1e-4
    assert summary["quantize"]["mode"] == "dynamic"
    rows = np.loadtxt(ROOT / "examples" / "data" / "iris_test.csv", delimiter=",", skiprows=1)[:, :4]
    session = onnxruntime.InferenceSession(str(folder / "student.onnx"))
    onnx_logits = session.run(None, {session.get_inputs()[0].name: rows.astype(np.float32)})[0]
    assert outcome.result is not None
    torch_logits = outcome.result.student(torch.tensor(rows, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    assert (folder / "student.int8.onnx").is_file()


def test_compression_steps_are_checked_up_front(tmp_path: Path) -> None:
    config = ROOT / "examples" / "iris_csv.yaml"
    with pytest.raises(ConfigError, match=r"compression\[0\]: step 'quantize' needs a 'onnx' step before it"):
        validate(config, ["compression=[{name: quantize}]"])
    with pytest.raises(ConfigError, match=r"unknown compression step 'onxx'.*\n.*did you mean 'onnx'\?"):
        validate(config, ["compression=[{name: onxx}]"])
    with pytest.raises(ConfigError, match=r"takes no parameter 'tolerence'.*\n.*did you mean 'tolerance'\?"):
        validate(config, ["compression=[{name: onnx, params: {tolerence: 0.1}}]"])
