"""Shipping a transformer student from the command line: the example config (a `hf` teacher, KD + TinyBERT losses),
`kdistill export` and `kdistill profile` on its run folder and on a save_pretrained folder, the HTML report, and the
clear errors of the wrong rows (each through the CLI; the long paths in a subprocess, as a user runs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]


def _kdistill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "KDISTILL_CACHE_DIR": str(cwd / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def test_the_text_classifier_example_runs_then_exports_profiles_and_renders(tmp_path: Path) -> None:
    for name in ("prepare.py", "text_classifier.yaml"):
        shutil.copy(ROOT / "examples" / "text_classifier" / name, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "KDISTILL_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "prepare.py", "--tiny"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "text" / "teacher" / "config.json").is_file()
    _kdistill("run", "text_classifier.yaml", "--quiet", cwd=tmp_path)
    run = tmp_path / "runs" / "text-classifier"
    history = json.loads((run / "history.json").read_text())["student"]
    terms = set(history[-1])
    assert {"train_kd/kd", "train_tinybert_hidden/hidden", "train_tinybert_attention/attention"} <= terms
    assert all(np.isfinite(epoch["train_tinybert_attention/attention"]) for epoch in history)
    report = json.loads((run / "report.json").read_text())
    assert (run / "student.onnx").is_file() and (run / "student.int8.onnx").is_file()

    # kdistill export on the run folder: ONNX checked against PyTorch, accuracy of all three on the test rows
    _kdistill("export", "runs/text-classifier", "--data", "text/test.npz", "--out", "exported", cwd=tmp_path)
    summary = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert summary["export"]["max_abs_diff"] < 1e-4
    assert set(summary["accuracy"]) == {"pytorch", "onnx_fp32", "onnx_int8"}
    student_accuracy = report["models"]["student"]["accuracy"]
    assert summary["accuracy"]["pytorch"] == pytest.approx(student_accuracy)  # the same student, the same rows
    assert summary["accuracy"]["onnx_fp32"] == pytest.approx(student_accuracy)

    # kdistill profile on the run folder: the saved student and its two ONNX files, timed on the same rows
    _kdistill("profile", "runs/text-classifier", "--data", "text/test.npz", cwd=tmp_path)
    profiled = json.loads((run / "profile.json").read_text())["models"]
    assert set(profiled) == {"student", "student_onnx", "student_int8"}
    assert profiled["student"]["accuracy"] == pytest.approx(student_accuracy)
    assert all(row["latency_ms"] > 0 and row["parameters"] > 0 for row in profiled.values())

    # the HTML report of the run shows the transformer student
    pytest.importorskip("matplotlib")
    from kdistill.report_html import write_html_report_from_folder

    page = write_html_report_from_folder(run).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 1  # training curves
    for name in ("teacher", "student", "baseline", "transformer", "tinybert_attention"):
        assert name in page


def _word_student(folder: Path) -> tuple[torch.nn.Module, Path]:
    """A 2-layer student of a tiny 4-layer BERT (word tokenizer), saved with save_pretrained, and an .npz of
    tokenized rows with labels."""
    from kdistill.students.transformer import from_teacher
    from kdistill.text import tokenize
    from test_text import save_word_tokenizer
    from test_transformer_student import _texts, word_bert_config

    config = word_bert_config()
    torch.manual_seed(0)
    student = from_teacher(transformers.BertForSequenceClassification(config).eval(), layers=2)
    student.save_pretrained(folder)
    save_word_tokenizer(folder)
    texts, labels = _texts(40, 3)
    inputs = tokenize(texts, folder, model=student)
    rows = folder.parent / "rows.npz"
    np.savez(rows, y=np.asarray(labels), **{f"x.{key}": value.numpy() for key, value in inputs.items()})
    return student, rows


def test_a_save_pretrained_student_exports_and_profiles_through_the_cli(tmp_path: Path) -> None:
    student, rows = _word_student(tmp_path / "student")
    _kdistill("export", "student", "--data", "rows.npz", "--out", "student", cwd=tmp_path)
    summary = json.loads((tmp_path / "student" / "export.json").read_text())
    assert summary["export"]["max_abs_diff"] < 1e-4
    with np.load(rows) as archive:
        inputs = {key.removeprefix("x."): torch.from_numpy(archive[key]) for key in archive.files if key != "y"}
        labels = torch.from_numpy(archive["y"])
    with torch.no_grad():
        expected = float((student(**inputs).logits.argmax(1) == labels).float().mean())
    assert summary["accuracy"]["pytorch"] == pytest.approx(expected)
    assert summary["accuracy"]["onnx_fp32"] == pytest.approx(expected)
    # the folder now holds the save_pretrained student and its ONNX files: profile measures all three
    _kdistill("profile", "student", "--data", "rows.npz", cwd=tmp_path)
    profiled = json.loads((tmp_path / "student" / "profile.json").read_text())["models"]
    assert set(profiled) == {"student", "student_onnx", "student_int8"}
    assert profiled["student"]["accuracy"] == pytest.approx(expected)
    assert profiled["student_onnx"]["parameters"] == profiled["student"]["parameters"]


def test_the_wrong_rows_for_a_transformer_student_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, rows = _word_student(tmp_path / "student")
    with np.load(rows) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["x.input_ids"] = arrays["x.input_ids"] + 100  # ids past the student's 14-token vocabulary
    np.savez(tmp_path / "other.npz", **arrays)
    np.savez(tmp_path / "features.npz", x=np.zeros((8, 5), dtype=np.float32), y=np.zeros(8, dtype=np.int64))
    folder, out = str(tmp_path / "student"), str(tmp_path / "o")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [
            (["export", folder, "--data", str(tmp_path / "other.npz"), "--out", out], "vocabulary 14"),
            (["export", folder, "--data", str(tmp_path / "features.npz"), "--out", out], "takes token"),
            (["export", folder, "--data", str(rows), "--quantize", "static", "--out", out], "token ids"),
            (["export", folder, "--data", str(tmp_path / "missing.npz"), "--out", out], "no .npz"),
            (["export", "--data", str(rows), "--out", out], "without a saved student"),
            (["profile", folder, "--data", str(rows), "--teacher"], "--teacher"),
        ]
        for args, message in cases:
            assert main(args) == 2, args
            printed = capsys.readouterr()
            assert message in " ".join((printed.out + printed.err).split()), args


def test_a_config_names_the_hf_teacher_kind(capsys: pytest.CaptureFixture[str]) -> None:
    from kdistill.config import load_config

    assert main(["list", "teachers"]) == 0
    assert "hf" in capsys.readouterr().out
    example = ROOT / "examples" / "text_classifier" / "text_classifier.yaml"
    config = load_config(example)
    assert config.teacher.kind == "hf" and [term.name for term in config.method] == [
        "kd",
        "tinybert_hidden",
        "tinybert_attention",
    ]
    with pytest.raises(Exception, match="teacher kind 'hf' needs path"):
        load_config(example, ["teacher.path=null"])


def test_the_hf_teacher_refuses_token_ids_its_model_has_no_row_or_position_for() -> None:
    """Rows tokenized elsewhere (a config's .npz) reach the teacher without kdistill.text's checks: ids past the
    embeddings, or rows longer than the positions, are named there instead of failing inside the model."""
    from kdistill.errors import ShapeMismatchError
    from kdistill.teachers import HFTeacher

    config = transformers.BertConfig(
        vocab_size=14,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
        num_labels=2,
    )
    teacher = HFTeacher.from_config(config)
    ids = torch.randint(0, 14, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    assert teacher({"input_ids": ids, "attention_mask": mask}).logits.shape == (3, 2)
    with pytest.raises(ShapeMismatchError, match="token id 20 is outside BertForSequenceClassification's 14 embedding"):
        teacher({"input_ids": ids.index_fill(1, torch.tensor([2]), 20), "attention_mask": mask})
    long = torch.randint(0, 14, (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ShapeMismatchError, match=r"rows of 12 tokens are longer than .* 8 positions"):
        teacher({"input_ids": long, "attention_mask": torch.ones_like(long)})
