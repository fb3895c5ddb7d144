"""Transformer students built from a teacher (DistilBERT-style layer copy) or fresh from a config: tiny models."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdistill.errors import StudentError
from kdistill.students import STUDENTS, build_student
from kdistill.students.transformer import FreshWeightsWarning, fresh_transformer, from_teacher, layer_map

transformers = pytest.importorskip("transformers")

VOCAB = 40


def _bert(cls: str = "BertForSequenceClassification", layers: int = 4, **extra: Any) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
        num_labels=3,
        **extra,
    )
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).eval()


def _gpt2(layers: int = 4) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=24, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(layers: int = 4) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=24,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(rows: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- layer_map


def test_layer_map_reproduces_distilbert_and_keeps_first_and_last() -> None:
    assert layer_map(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's initialisation
    assert layer_map(6, 3) == [0, 3, 5]
    assert layer_map(6, 2) == [0, 5]
    assert layer_map(5, 5) == [0, 1, 2, 3, 4]
    assert layer_map(6, 1) == [0]
    for teacher in range(1, 13):
        for student in range(2, teacher + 1):
            chosen = layer_map(teacher, student)
            assert chosen[0] == 0 and chosen[-1] == teacher - 1
            assert all(b > a for a, b in itertools.pairwise(chosen))
            # evenly spaced: each is the rounded ideal position i (T-1)/(S-1)
            ideal = [i * (teacher - 1) / (student - 1) for i in range(student)]
            assert all(abs(c - x) <= 0.5 for c, x in zip(chosen, ideal, strict=True))


def test_layer_map_refuses_more_layers_than_the_teacher() -> None:
    with pytest.raises(StudentError, match="7 layers cannot be built from a teacher of 6"):
        layer_map(6, 7)
    with pytest.raises(StudentError, match="positive integer"):
        layer_map(6, 0)


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ([0, 4], "out of range: the teacher has layers 0..3"),
        ([-1, 2], "out of range"),
        ([2, 1], "not strictly increasing"),
        ([1, 1], "not strictly increasing"),
        ([0, 1, 2, 3, 3], "asks for 5 layers but the teacher has 4"),
        ([], "non-empty list"),
    ],
)
def test_a_bad_layer_map_is_a_clear_error(chosen: list[int], message: str) -> None:
    with pytest.raises(StudentError, match=message):
        from_teacher(_bert(), layer_map=chosen)


def test_more_layers_than_the_teacher_is_an_error() -> None:
    with pytest.raises(StudentError, match="5 layers cannot be built from a teacher of 4"):
        from_teacher(_bert(), layers=5)
    with pytest.raises(StudentError, match="disagrees with layer_map"):
        from_teacher(_bert(), layers=3, layer_map=[0, 3])


# ---------------------------------------------------------------------------------------------------- copying


def _layer_params(model: torch.nn.Module, path: str, index: int) -> dict[str, torch.Tensor]:
    stack = model.get_submodule(path)
    return dict(stack[index].named_parameters())


@pytest.mark.parametrize(
    ("build", "stack", "outside"),
    [
        (lambda: _bert("BertForSequenceClassification"), "bert.encoder.layer", ["bert.embeddings", "classifier"]),
        (lambda: _bert("BertModel"), "encoder.layer", ["embeddings", "pooler"]),
        (_gpt2, "transformer.h", ["transformer.wte", "transformer.wpe", "transformer.ln_f"]),
        (_llama, "model.layers", ["model.embed_tokens", "model.norm", "lm_head"]),
    ],
)
def test_chosen_layers_embeddings_norm_and_head_are_copied_exactly(build: Any, stack: str, outside: list[str]) -> None:
    teacher = build()
    student = from_teacher(teacher, layer_map=[1, 3])
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert len(student.get_submodule(stack)) == 2
    for student_index, teacher_index in enumerate([1, 3]):
        mine, theirs = _layer_params(student, stack, student_index), _layer_params(teacher, stack, teacher_index)
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name
    for path in outside:
        for (name, mine_p), (_, theirs_p) in zip(
            student.get_submodule(path).state_dict().items(),
            teacher.get_submodule(path).state_dict().items(),
            strict=True,
        ):
            assert torch.equal(mine_p, theirs_p), f"{path}.{name}"
    # copies, not shared tensors: training the student leaves the teacher alone
    first = next(iter(student.parameters()))
    assert first.data_ptr() != next(iter(teacher.parameters())).data_ptr()
    assert not student.training


def test_a_full_copy_gives_the_teachers_outputs_and_fewer_layers_change_them() -> None:
    teacher = _bert()
    ids = _ids()
    with torch.no_grad():
        expected = teacher(input_ids=ids, output_hidden_states=True)
        same = from_teacher(teacher)(input_ids=ids, output_hidden_states=True)
        fewer = from_teacher(teacher, layers=2)(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(same.logits, expected.logits, atol=1e-6)
    assert torch.allclose(same.hidden_states[-1], expected.hidden_states[-1], atol=1e-5)
    assert len(fewer.hidden_states) == 3  # embeddings + 2 layers
    assert not torch.allclose(fewer.hidden_states[-1], expected.hidden_states[-1], atol=1e-2)


def test_a_one_layer_student_equals_the_teacher_cut_after_layer_zero() -> None:
    teacher = _bert("BertModel")
    ids = _ids()
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after teacher layer 0
        student_hidden = from_teacher(teacher, layers=1)(input_ids=ids).last_hidden_state
    assert torch.allclose(student_hidden, hidden, atol=1e-6)


def test_a_narrower_student_is_fresh_and_says_so() -> None:
    teacher = _bert()
    with pytest.warns(FreshWeightsWarning, match="narrower than the teacher's 16"):
        student = from_teacher(teacher, layers=2, hidden_size=8)
    assert student.config.hidden_size == 8 and student.config.num_hidden_layers == 2
    assert student.config.intermediate_size == 16  # the feed-forward width scales with the hidden width
    assert student.config.hidden_size % student.config.num_attention_heads == 0
    assert student(input_ids=_ids()).logits.shape == (3, 3)
    with pytest.raises(StudentError, match="wider than the teacher's 16"):
        from_teacher(teacher, hidden_size=32)


def test_a_narrower_llama_keeps_grouped_heads_consistent() -> None:
    with pytest.warns(FreshWeightsWarning):
        student = from_teacher(_llama(), layers=2, hidden_size=12)
    config = student.config
    assert config.hidden_size == 12 and config.num_attention_heads == 2 and config.head_dim == 6
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert student(input_ids=_ids()).logits.shape == (3, 7, VOCAB)


def test_save_pretrained_loads_back_with_the_same_logits(tmp_path: Path) -> None:
    student = from_teacher(_bert(), layers=2)
    student.save_pretrained(tmp_path / "student")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "student", local_files_only=True
    ).eval()
    assert type(loaded) is type(student) and loaded.config.num_hidden_layers == 2
    ids = _ids(rows=4, seq=9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits)


# ---------------------------------------------------------------------------------------------------- fresh + registry


def test_a_fresh_transformer_from_a_config_dict_is_seeded() -> None:
    config = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 8, "num_hidden_layers": 1}
    config |= {"num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}
    first = fresh_transformer(config, seed=3, num_labels=4)
    second = fresh_transformer(config, seed=3, num_labels=4)
    other = fresh_transformer(config, seed=4, num_labels=4)
    assert type(first).__name__ == "BertForSequenceClassification"
    params = sum(p.numel() for p in first.parameters())
    assert params < 5_000  # a tiny model
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))
    assert first(input_ids=_ids()).logits.shape == (3, 4)
    with pytest.raises(StudentError, match="needs a model_type"):
        fresh_transformer({"vocab_size": VOCAB})


def test_the_transformer_student_is_registered_with_its_params() -> None:
    assert "transformer" in STUDENTS
    expected = ["teacher", "layers", "layer_map", "hidden_size", "intermediate_size", "config", "in_shape"]
    assert STUDENTS.params("transformer") == expected
    assert "teacher" in STUDENTS["transformer"].description


def test_the_registered_student_copies_a_saved_teacher(tmp_path: Path) -> None:
    teacher = _bert()
    teacher.save_pretrained(tmp_path / "teacher")
    ids = _ids()
    module, spec = build_student("transformer", ids, 3, teacher=str(tmp_path / "teacher"), layers=2)
    assert spec is not None and spec["layers"] == 2 and spec["kind"] == "transformer"
    expected = from_teacher(teacher, layers=2)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), expected.parameters(), strict=True))
    with pytest.raises(StudentError, match="has 3 labels but the run has 5 classes"):
        build_student("transformer", ids, 5, teacher=str(tmp_path / "teacher"), layers=2)


def test_the_registered_student_builds_a_fresh_one_from_a_config() -> None:
    config = {"vocab_size": VOCAB, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}
    config |= {"intermediate_size": 16, "max_position_embeddings": 16}
    module, _ = build_student("transformer", _ids(), 6, config=config)
    assert module.config.model_type == "bert" and module.config.num_labels == 6
    assert module(input_ids=_ids()).logits.shape == (3, 6)
    with pytest.raises(StudentError, match="needs a teacher folder or a config with a vocab_size"):
        build_student("transformer", _ids(), 6)
    with pytest.raises(StudentError, match="no teacher was given"):
        build_student("transformer", _ids(), 6, config=config, layers=2)


def test_kdistill_list_students_shows_the_transformer(capsys: pytest.CaptureFixture[str]) -> None:
    from kdistill.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["list", "students"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = next(index for index, line in enumerate(lines) if line.startswith("transformer "))
    assert "teacher" in lines[at]
    assert lines[at + 1].split() == [
        "params:",
        "teacher,",
        "layers,",
        "layer_map,",
        "hidden_size,",
        "intermediate_size,",
        "config,",
        "in_shape",
    ]


# ---------------------------------------------------------------------------------------------------- end to end


def word_bert_config() -> transformers.BertConfig:
    """A tiny 4-layer, 16-wide BERT classifier (2 classes) over test_text's 14-id word tokenizer."""
    return transformers.BertConfig(
        vocab_size=14,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )


def _texts(rows: int, seed: int) -> tuple[list[str], list[int]]:
    from test_text import word_texts

    return word_texts(rows, seed)


def test_distill_takes_raw_strings_a_tokenizer_and_a_transformer_student(tmp_path: Path) -> None:
    import kdistill
    from test_text import save_word_tokenizer

    folder = save_word_tokenizer(tmp_path / "tok")
    config = word_bert_config()
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(config).eval()
    result = kdistill.distill(
        teacher,
        "transformer",
        _texts(96, 0),
        val=_texts(32, 1),
        test=_texts(32, 2),
        student_params={"layers": 2},
        tokenizer=folder,
        method={"kd": 1.0, "tinybert_hidden": 0.5},
        method_params={"tinybert_hidden": {"student_layers": 2, "teacher_layers": 4, "layer_map": [0, 3]}},
        epochs=2,
        lr=1e-3,
        batch_size=32,
        cache_dir=tmp_path / "cache",
        profile=False,
        verbose=False,
    )
    student = result.student
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    history = result.history
    assert any("tinybert_hidden/hidden" in key for key in history[-1])
    models = result.report.models
    assert set(models) >= {"teacher", "student", "baseline"}
    for name in ("student", "baseline"):
        assert 0.0 <= models[name]["accuracy"] <= 1.0 and "agreement" in models[name]
    assert models["student"]["parameters"] < models["teacher"]["parameters"]


def test_a_transformer_student_exports_to_onnx_with_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from kdistill.compress import OnnxPredictor, export_onnx
    from kdistill.compress.quantize import quantize_onnx

    student = from_teacher(_bert(layers=4), layers=2)
    ids = _ids(rows=16, seq=12, seed=3)
    mask = torch.ones_like(ids)
    mask[3, 7:] = 0
    mask[9, 2:] = 0
    exported = export_onnx(student, {"input_ids": ids * mask, "attention_mask": mask}, tmp_path / "student.onnx")
    assert exported.max_abs_diff < 1e-4 and exported.checked_rows == 16
    assert not student.training  # the export's wrapper did not switch the student to train mode
    predictor = OnnxPredictor(exported.path)
    assert predictor.input_names == ["input_ids", "attention_mask"]
    for rows, seq in ((1, 5), (7, 12), (3, 20)):  # batch and sequence sizes never seen at export
        batch = {"input_ids": _ids(rows=rows, seq=seq, seed=rows), "attention_mask": torch.ones(rows, seq)}
        with torch.no_grad():
            expected = student(**{k: v.long() for k, v in batch.items()}).logits
        assert torch.allclose(predictor(batch), expected, atol=1e-4)
    int8 = quantize_onnx(exported.path, tmp_path / "student.int8.onnx", mode="dynamic")
    quantized = OnnxPredictor(int8.path)({"input_ids": ids * mask, "attention_mask": mask})
    assert torch.isfinite(quantized).all() and quantized.shape == (16, 3)


# ---------------------------------------------------------------------------------------------------- the docs page

DOC = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"
EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "transformers_text.yaml"  # reads the docs' .npz files


def _doc_teacher(folder: Path) -> None:
    """A tiny stand-in for the fine-tuned MiniLM: 6 layers and 12 heads like it, 24 wide, with a word tokenizer."""
    from test_text import save_word_tokenizer

    config = transformers.BertConfig(
        vocab_size=14,
        hidden_size=24,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=48,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    save_word_tokenizer(folder)


def test_the_docs_page_runs_as_written_at_a_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import io
    import re
    from types import SimpleNamespace

    pytest.importorskip("onnxruntime")
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 6
    assert 'teacher_folder = "minilm-docstrings"' in blocks[0]
    assert "docstring_transfer()" in blocks[5]
    monkeypatch.chdir(tmp_path)
    import kdistill.corpus

    unlabeled = _texts(20, 4)[0]  # the tiny stand-in for docstring_transfer()'s texts
    monkeypatch.setattr(kdistill.corpus, "docstring_transfer", lambda *args, **kwargs: list(unlabeled))
    _doc_teacher(tmp_path / "minilm-docstrings")
    data = SimpleNamespace(train=_texts(64, 0), val=_texts(32, 1), test=_texts(64, 2), classes=["a", "b"])
    namespace: dict[str, Any] = {"data": data, "teacher_folder": "minilm-docstrings"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks[1:]:  # the first block builds the real corpus; the tiny one stands in for it
            exec(compile(block, str(DOC), "exec"), namespace)
    assert printed.getvalue().splitlines() == [
        "[0, 2, 4, 7, 9, 11] [0, 3, 5] [0, 5]",
        "BertForSequenceClassification 3",
        "True True",
        "3 ['baseline', 'student', 'teacher']",
        "True True",
        "True True",
    ]
    with np.load(tmp_path / "unlabeled.npz") as saved:  # what a config's data.unlabeled reads
        assert {"x.input_ids", "x.attention_mask"} <= set(saved.files)
        assert saved["x.input_ids"].shape[0] == 20
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained("student-3-layers")
    assert reloaded.config.num_hidden_layers == 3
    # the config file, as written in the docs and in configs/
    config_text = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)[0]
    assert EXAMPLE.read_text() == config_text
    (tmp_path / "distil-docstrings.yaml").write_text(config_text)
    from kdistill.run import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run(tmp_path / "distil-docstrings.yaml", verbose=False)
    assert outcome.result is not None
    student = outcome.result.student
    assert type(student).__name__ == "BertForSequenceClassification" and student.config.num_hidden_layers == 3
    assert outcome.result.report is not None and "student" in outcome.result.report.models
    assert (outcome.folder / "student.onnx").exists() and (outcome.folder / "student.int8.onnx").exists()
