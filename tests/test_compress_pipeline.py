"""The pipeline as a user runs it: the docs/compress.md example as written, then the CLI on what it saved."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kdistill
from kdistill.compress import OnnxPredictor
from kdistill.datasets import load_digits

pytest.importorskip("onnxruntime")
pytest.importorskip("torch_pruning")
pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _leave_the_global_rng_as_found():
    """These tests draw random tensors; the global generator is restored after each so no other test's draws change."""
    with torch.random.fork_rng(devices=[]):
        yield


DOC = Path(__file__).resolve().parents[1] / "docs" / "compress.md"


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    """Runs the first python block of docs/compress.md, unchanged, in a fresh folder."""
    folder = tmp_path_factory.mktemp("doc")
    namespace: dict = {}
    previous = os.getcwd()
    os.chdir(folder)
    try:
        with torch.random.fork_rng(devices=[]):
            exec(compile(_python_blocks(DOC.read_text())[0], str(DOC), "exec"), namespace)
    finally:
        os.chdir(previous)
    return folder / "runs" / "compress-digits", namespace["result"]


def test_every_stage_artefact_is_kept(doc_run):
    out, _ = doc_run
    for name in (
        "distilled/student.safetensors",
        "pruned/student.safetensors",
        "onnx/student.onnx",
        "onnx/student.int8.onnx",
        "onnx/pruned.onnx",
        "onnx/pruned.int8.onnx",
        "compress.json",
        "history.json",
        "report.json",
        "report.html",
    ):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"student", "baseline", "pruned"}
    assert all(history[name] for name in history)


def test_report_numbers_agree_with_independent_measurements(doc_run):
    out, result = doc_run
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    assert set(models) == {
        "teacher",
        "baseline",
        "student",
        "student_onnx",
        "student_int8",
        "pruned",
        "pruned_onnx",
        "pruned_int8",
    }
    x_test, y_test = load_digits(seed=0).test
    x = torch.as_tensor(x_test)
    # accuracy of the shipped INT8 file, recomputed here from the file alone
    int8_logits = OnnxPredictor(out / "onnx" / "student.int8.onnx")(x).numpy()
    assert models["student_int8"]["accuracy"] == pytest.approx(np.mean(int8_logits.argmax(1) == y_test))
    delta = models["student_int8"]["accuracy"] - models["student_onnx"]["accuracy"]
    assert models["student_int8"]["accuracy_delta"] == pytest.approx(delta)
    # the fp32 export is exact, so it scores like PyTorch; sizes are the files' sizes
    assert models["student_onnx"]["accuracy"] == models["student"]["accuracy"]
    assert models["student_int8"]["size_bytes"] == (out / "onnx" / "student.int8.onnx").stat().st_size
    assert models["student_int8"]["size_bytes"] < models["student_onnx"]["size_bytes"]
    # pruning really removed parameters, and the saved pruned student is rebuilt with its smaller widths
    assert models["pruned"]["parameters"] < 0.5 * models["student"]["parameters"]
    pruned = kdistill.load(out / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), result.pruned.model(x))
    checks = json.loads((out / "compress.json").read_text())
    assert checks["exports"]["student"]["max_abs_diff"] < 1e-4
    assert checks["quantized"]["student"]["mode"] == "dynamic"
    for name in ("teacher", "student_int8"):
        assert models[name]["latency_p95_ms"] >= models[name]["latency_ms"] > 0
        assert models[name]["threads"] == 1
    assert models["teacher"]["retention"] == 1.0
    assert set(report["diagnostics"]["reliability"]) == set(models)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdistill.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_profile_and_export_on_the_saved_run(doc_run, tmp_path):
    out, _ = doc_run
    profiled = _cli("profile", str(out), "--dataset", "digits", "--json", str(tmp_path / "p.json"), cwd=tmp_path)
    assert profiled.returncode == 0, profiled.stdout + profiled.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert {"student", "pruned", "student_onnx", "student_int8", "pruned_onnx", "pruned_int8"} <= set(report["models"])
    assert report["models"]["student_int8"]["latency_p95_ms"] > 0
    assert "student_int8" in profiled.stdout

    exported = _cli("export", str(out / "distilled"), "--dataset", "digits", "--out", "onnx-out", cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    summary = json.loads((tmp_path / "onnx-out" / "export.json").read_text())
    assert summary["export"]["max_abs_diff"] < 1e-4
    assert summary["int8"]["mode"] == "dynamic"
    assert summary["accuracy"]["pytorch"] == summary["accuracy"]["onnx_fp32"]
    assert "max |ONNX - PyTorch|" in exported.stdout


def test_cli_explains_an_empty_folder_and_the_wrong_dataset(doc_run, tmp_path, capsys):
    from kdistill.cli import main

    assert main(["profile", str(tmp_path)]) == 2
    assert "nothing to profile" in capsys.readouterr().out
    out, _ = doc_run
    assert main(["export", str(out / "distilled"), "--dataset", "mnist1d", "--out", str(tmp_path / "x")]) == 2
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "takes rows of shape (64,)" in printed
    assert "mnist1d rows have shape (40,)" in printed


def test_cli_pipeline_on_builtin_data_keeps_every_stage(tmp_path, capsys):
    from kdistill.cli import main

    out = tmp_path / "pipe"
    args = ["export", "--dataset", "digits", "--out", str(out), "--epochs", "8", "--finetune-epochs", "2"]
    assert main([*args, "--no-html", "--quiet", "--quantize", "static"]) == 0
    printed = capsys.readouterr().out
    assert "pruned_int8" in printed
    assert "saved to" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["dataset"] == "digits"
    assert report["settings"]["quantize"] == {"student": "static", "pruned": "static"}  # forced, not auto
    assert report["settings"]["epochs_run"] <= 8
    assert report["settings"]["finetune_epochs_run"] <= 2
    assert not (out / "report.html").exists()
    assert kdistill.load(out / "pruned")(torch.as_tensor(load_digits(0).test[0][:3])).shape == (3, 10)
