"""``kdistill run`` trains both sentence students from the YAML examples through the one pipeline (with a tiny
teacher and corpus swapped in by --set, as a user would), and ``kdistill export --sentence`` turns the transformer
student the run saved into ONNX + INT8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.run import validate
from kdistill.sentence_export import save_sentence_transformer
from kdistill.teachers import SentenceEncoder
from sentence_cases import SENTENCES, tiny_bert, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "sentence").glob("*.yaml"))
SRC = str(ROOT / "src")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sentence_cli")
    tokenizer = tiny_tokenizer(folder / "vocab")
    encoder = SentenceEncoder(tiny_bert(tokenizer.vocab_size, layers=2))
    save_sentence_transformer(encoder, tokenizer, folder / "teacher", max_length=32)
    extra = [f"{sentence} And return the values." for sentence in SENTENCES]
    (folder / "sentences.txt").write_text("\n".join([*SENTENCES, *extra, "", "   "]) + "\n")
    return folder


def _kdistill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r}); from kdistill.cli import main; "
               "sys.exit(main())", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_examples_validate_and_bad_keys_are_named() -> None:
    assert [path.name for path in EXAMPLES] == ["static.yaml", "transformer.yaml"]
    configs = [validate(path) for path in EXAMPLES]
    assert [(config.task, config.teacher.kind, config.student.kind) for config in configs] == [
        ("embedding", "sentence", "static"),
        ("embedding", "sentence", "transformer"),
    ]
    with pytest.raises(ConfigError, match=r"data\.sentences\.trian: unknown key; did you mean 'train'"):
        load_config(EXAMPLES[0], ["data.sentences.trian=5"])
    with pytest.raises(ConfigError, match="give one of dataset"):
        load_config(EXAMPLES[0], ["data.dataset=digits"])


def _overrides(workspace: Path, out: Path) -> list[str]:
    return [
        "--set", f"teacher.path={workspace / 'teacher'}",
        "--set", f"data.sentences.source={workspace / 'sentences.txt'}",
        "--set", f"out={out}",
        "--set", f"cache.dir={workspace / 'cache'}",
        "--set", "train.epochs=3",
    ]  # fmt: skip


def test_static_example_runs_and_saves_a_model2vec_folder(workspace: Path) -> None:
    model2vec = pytest.importorskip("model2vec")
    out = workspace / "static"
    result = _kdistill(
        "run", str(EXAMPLES[0]), *_overrides(workspace, out), "--set", "student.params.pca_dims=8", "--quiet",
        cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Spearman" in result.stdout and "sent/s @64" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 3 and report["settings"]["epochs_run"] == 3
    student = report["models"]["student"]
    assert {"spearman", "spearman_hard", "recall_at_10", "sentences_per_s_batch_1", "speedup_batch_64"} <= set(student)
    loaded = model2vec.StaticModel.from_pretrained(out / "model")
    assert loaded.encode(SENTENCES[:2], use_multiprocessing=False).shape == (2, 8)


def test_transformer_example_runs_and_exports_to_onnx(workspace: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = workspace / "transformer"
    result = _kdistill(
        "run", str(EXAMPLES[1]), *_overrides(workspace, out), "--set", "student.params.layer_map=[1]",
        "--set", "student.params.intermediate_size=32", "--set", "train.batch_size=8",
        "--set", "report.profile=false", cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recall@10" in result.stdout
    assert (out / "model" / "modules.json").exists() and (out / "cache").exists() is False
    assert json.loads((out / "model" / "config.json").read_text())["intermediate_size"] == 32  # of the tiny's 64
    exported = _kdistill("export", "--sentence", str(out / "model"), "--out", str(out / "onnx"), cwd=workspace)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    summary = json.loads((out / "onnx" / "export.json").read_text())
    assert summary["max_abs_diff"] < 1e-4 and summary["int8_min_cosine"] > 0.9
    assert Path(summary["int8"]).stat().st_size > 0 and np.isfinite(summary["onnx_bytes"])


def test_a_missing_corpus_file_is_a_clear_error(workspace: Path) -> None:
    result = _kdistill(
        "run", str(EXAMPLES[0]), "--set", f"teacher.path={workspace / 'teacher'}",
        "--set", "data.sentences.source=nope.txt", cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 2
    assert "data.sentences.source: 'nope.txt' is neither 'docstrings' nor a file" in result.stdout
