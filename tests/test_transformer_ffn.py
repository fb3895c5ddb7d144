"""A transformer student with a narrower feed-forward layer (``intermediate_size``): the units kept are the teacher's
most important by weight magnitude, checked against an independent transcription (numpy norms, top-k), and the
student computes exactly what the teacher's chosen layers compute with the other units' outputs zeroed, for BERT,
GPT-2 and Llama."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdistill.errors import StudentError
from kdistill.students import build_student
from kdistill.students.transformer import from_teacher

transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, INNER, KEEP = 40, 16, 32, 12


def _bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=INNER, max_position_embeddings=24, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2() -> Any:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=4, n_head=2, n_positions=24, bos_token_id=0, eos_token_id=0
    )  # n_inner None: 4 x 16 = 64 units
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama() -> Any:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=INNER, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=24, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


# Per family: the feed-forward weights of a layer as (weight, axis of the units), written out by hand from each
# model's code, and how to silence unit set `dropped` in the teacher (zero its slice of the output projection).
def _bert_ffn(layer: Any) -> list[tuple[torch.Tensor, int]]:
    return [(layer.intermediate.dense.weight, 0), (layer.output.dense.weight, 1)]  # Linear: (out, in)


def _gpt2_ffn(layer: Any) -> list[tuple[torch.Tensor, int]]:
    return [(layer.mlp.c_fc.weight, 1), (layer.mlp.c_proj.weight, 0)]  # Conv1D: (in, out)


def _llama_ffn(layer: Any) -> list[tuple[torch.Tensor, int]]:
    mlp = layer.mlp
    return [(mlp.gate_proj.weight, 0), (mlp.up_proj.weight, 0), (mlp.down_proj.weight, 1)]


FAMILIES = [
    (_bert, "bert.encoder.layer", _bert_ffn, "intermediate_size"),
    (_gpt2, "transformer.h", _gpt2_ffn, "n_inner"),
    (_llama, "model.layers", _llama_ffn, "intermediate_size"),
]


def _stack(model: Any, path: str) -> Any:
    for name in path.split("."):
        model = getattr(model, name)
    return model


def _expected_kept(layer: Any, family_ffn: Any, keep: int) -> np.ndarray:
    """The ``keep`` units with the largest product of their weight slices' L2 norms, ascending (numpy)."""
    score = np.ones(family_ffn(layer)[0][0].shape[family_ffn(layer)[0][1]])
    for weight, axis in family_ffn(layer):
        matrix = np.moveaxis(weight.detach().double().numpy(), axis, 0)
        score *= np.sqrt((matrix**2).sum(axis=1))
    return np.sort(np.argsort(-score, kind="stable")[:keep])


@pytest.mark.parametrize(("build", "path", "ffn", "field"), FAMILIES, ids=["bert", "gpt2", "llama"])
def test_the_student_is_the_teacher_with_the_least_important_units_silenced(
    build: Any, path: str, ffn: Any, field: str
) -> None:
    teacher = build()
    chosen = [0, 3]
    student = from_teacher(teacher, layer_map=chosen, intermediate_size=KEEP)
    assert getattr(student.config, field) == KEEP
    silenced = from_teacher(teacher, layer_map=chosen)  # the full feed-forward, to silence by hand
    for index, teacher_index in enumerate(chosen):
        source = _stack(teacher, path)[teacher_index]
        kept = _expected_kept(source, ffn, KEEP)
        for (narrow, axis), (full, _) in zip(ffn(_stack(student, path)[index]), ffn(source), strict=True):
            expected = np.take(full.detach().numpy(), kept, axis=axis)
            np.testing.assert_array_equal(narrow.detach().numpy(), expected)
        units = ffn(source)[0][0].shape[ffn(source)[0][1]]
        dropped = torch.tensor(sorted(set(range(units)) - set(kept.tolist())))
        weight, axis = ffn(_stack(silenced, path)[index])[-1]  # the output projection
        with torch.no_grad():
            weight.index_fill_(axis, dropped, 0.0)
    with torch.no_grad():
        got, want = student(input_ids=_ids()).logits, silenced(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in silenced.parameters())


def test_keeping_every_unit_is_the_plain_copy_and_the_narrow_student_saves_and_loads(tmp_path: Path) -> None:
    teacher = _bert()
    whole = from_teacher(teacher, layers=2, intermediate_size=INNER)
    plain = from_teacher(teacher, layers=2)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), plain.parameters(), strict=True))
    narrow = from_teacher(teacher, layers=2, intermediate_size=KEEP)
    narrow.save_pretrained(tmp_path / "narrow")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "narrow").eval()
    assert loaded.config.intermediate_size == KEEP
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, narrow.eval()(input_ids=_ids()).logits)


def test_the_registered_student_takes_intermediate_size(tmp_path: Path) -> None:
    teacher = _bert()
    teacher.save_pretrained(tmp_path / "teacher")
    module, _ = build_student("transformer", _ids(), 3, teacher=str(tmp_path / "teacher"), layers=2,
                              intermediate_size=KEEP)  # fmt: skip
    expected = from_teacher(teacher, layers=2, intermediate_size=KEEP)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), expected.parameters(), strict=True))
    with pytest.raises(StudentError, match="no teacher was given"):
        build_student("transformer", _ids(), 3, config={"vocab_size": VOCAB}, intermediate_size=KEEP)


def test_a_narrower_hidden_size_takes_the_given_feed_forward_width() -> None:
    with pytest.warns(UserWarning, match="fresh"):
        student = from_teacher(_bert(), layers=2, hidden_size=8, intermediate_size=10)
    assert student.config.hidden_size == 8 and student.config.intermediate_size == 10


@pytest.mark.parametrize(
    ("size", "message"),
    [(INNER + 1, "wider than the teacher's feed-forward width 32"), (0, "intermediate_size"), (-3, "intermediate")],
)
def test_a_bad_intermediate_size_is_a_clear_error(size: int, message: str) -> None:
    with pytest.raises(StudentError, match=message):
        from_teacher(_bert(), layers=2, intermediate_size=size)


def test_a_tensor_that_is_not_one_narrower_dimension_is_a_clear_error() -> None:
    from kdistill.students.transformer import prune_feed_forward

    teacher = {"layers.0.w": torch.zeros(2, 3)}
    for shape in ((2, 3, 1), (1, 2)):  # another rank; two dimensions that differ
        with pytest.raises(StudentError, match=rf"cannot narrow layers.0.w from \(2, 3\) to {re.escape(str(shape))}"):
            prune_feed_forward(teacher, {"layers.0.w": torch.zeros(shape)}, "layers")
    with pytest.raises(StudentError, match="not one feed-forward dimension of a layer"):  # outside the layer stack
        prune_feed_forward({"embeddings.w": torch.zeros(2, 3)}, {"embeddings.w": torch.zeros(2, 1)}, "layers")
