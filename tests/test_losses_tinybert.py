"""TinyBERT's hidden-state and attention-score losses, checked against independent transcriptions: numpy from the
HF models' own hidden states and weights (not from the hooks the losses read), the authors' task_distill.py
reduction, and HF's own output_attentions probabilities."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.features import capture_features
from kdistill.losses import compose_methods, get_loss, uniform_map
from kdistill.losses.attention import TinyBERTAttention
from kdistill.losses.hidden import TinyBERTHidden
from kdistill.teachers.base import Outputs
from kdistill.teachers.hf import MASK_FEATURE, HFTeacher

transformers = pytest.importorskip("transformers")

VOCAB, HEADS = 30, 2


def _bert(layers: int, width: int, seed: int) -> Any:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=2 * width,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    return {"input_ids": ids * mask, "attention_mask": mask}


def _outputs(loss: Any, student: Any, teacher: Any, batch: dict[str, torch.Tensor]) -> tuple[Outputs, Outputs]:
    """What the engine hands the loss: the student's captured features, the HF teacher's (with the mask)."""
    with capture_features(student, loss.student_features) as captured:
        logits = student(**batch).logits
    student_out = Outputs(logits, dict(captured))
    teacher_out = HFTeacher(teacher)(batch, features=loss.teacher_features)
    return student_out, teacher_out


def _hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        return [h.double().numpy() for h in model(**batch, output_hidden_states=True).hidden_states]


def test_uniform_map_is_tinyberts() -> None:
    assert uniform_map(12, 4) == [2, 5, 8, 11]  # the authors' teacher_atts[i * 3 + 2]
    assert uniform_map(6, 3) == [1, 3, 5]
    assert uniform_map(6, 6) == list(range(6))
    with pytest.raises(MethodError, match="student layers"):
        uniform_map(2, 3)


# ---------------------------------------------------------------------------------------------------- hidden states


@pytest.mark.parametrize("reduction", ["tokens", "reference"])
def test_hidden_loss_matches_a_numpy_transcription(reduction: str) -> None:
    student, teacher = _bert(2, 8, seed=0), _bert(4, 12, seed=1)
    batch = _batch()
    loss = TinyBERTHidden(student_layers=2, teacher_layers=4, reduction=reduction, ce_weight=0.0)
    student_out, teacher_out = _outputs(loss, student, teacher, batch)
    loss.prepare(student_out, teacher_out, 3)
    projection = loss.projections[0]
    assert isinstance(projection, torch.nn.Linear) and len(loss.projections) == 1  # one shared fit_dense, 8 -> 12
    weight, bias = projection.weight.detach().double().numpy(), projection.bias.detach().double().numpy()

    s_reps, t_reps = _hidden_states(student, batch), _hidden_states(teacher, batch)
    mask = batch["attention_mask"].numpy().astype(bool)
    expected = 0.0
    # the authors' pairing: student rep i (0 = embeddings) with teacher rep i * k, k = 4 / 2
    for i in range(3):
        diff = s_reps[i] @ weight.T + bias - t_reps[2 * i]
        if reduction == "reference":
            expected += np.mean(diff**2)  # MSELoss() over the padded batch
        else:
            expected += np.sum(diff[mask] ** 2) / (mask.sum() * diff.shape[-1])
    terms = loss(student_out, teacher_out, None)
    assert terms["hidden"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_hidden_loss_ignores_padding_under_tokens_but_not_reference() -> None:
    student, teacher = _bert(2, 8, seed=0), _bert(2, 8, seed=1)
    batch = _batch()
    changed = {name: value.clone() for name, value in batch.items()}
    changed["input_ids"][2, 4:] = 7  # other ids under the padding (the mask is unchanged)
    for reduction, same in (("tokens", True), ("reference", False)):
        loss = TinyBERTHidden(student_layers=2, teacher_layers=2, layer_map=[0, 1], reduction=reduction)
        first = loss(*_outputs(loss, student, teacher, batch), None)["hidden"]
        second = loss(*_outputs(loss, student, teacher, changed), None)["hidden"]
        assert torch.isclose(first, second, rtol=1e-6).item() is same
        assert isinstance(loss.projections[0], torch.nn.Identity)  # equal widths: no map


def test_hidden_loss_is_zero_for_a_copy_and_builds_projections_per_pair() -> None:
    from kdistill.students.transformer import from_teacher

    teacher = _bert(4, 8, seed=1)
    copy = from_teacher(teacher)  # every layer: the same hidden states, embeddings included
    loss = TinyBERTHidden(student_layers=4, teacher_layers=4)
    assert loss(*_outputs(loss, copy, teacher, _batch()), None)["hidden"].item() == pytest.approx(0.0, abs=1e-10)
    cut = from_teacher(teacher, layer_map=[0, 3])  # layer 0 sees what it saw; layer 3 now sees layer 0's output
    loss = TinyBERTHidden(student_layers=2, teacher_layers=4, layer_map=[0, 3], embeddings=None)
    student_out, teacher_out = _outputs(loss, cut, teacher, _batch())
    first = loss.pairs[0]
    assert torch.allclose(student_out.features[first[0]], teacher_out.features[first[1]], atol=1e-6)
    assert loss(student_out, teacher_out, None)["hidden"].item() > 1e-7  # small: random layers barely move h
    wide = TinyBERTHidden(student_layers=2, teacher_layers=4, layer_map=[1, 3], shared_projection=False)
    wide.prepare(*_outputs(wide, _bert(2, 4, seed=3), teacher, _batch()), 3)
    assert len(list(wide.parameters())) == 2 * 3  # a Linear per pair (embeddings + 2 layers)


def test_hidden_loss_bad_settings_are_clear_errors() -> None:
    with pytest.raises(MethodError, match="out of range for a teacher of 4 layers"):
        TinyBERTHidden(student_layers=2, teacher_layers=4, layer_map=[0, 4])
    with pytest.raises(MethodError, match="has 3 entries for 2 student layers"):
        TinyBERTHidden(student_layers=2, teacher_layers=4, layer_map=[0, 1, 2])
    with pytest.raises(MethodError, match="reduction must be one of"):
        TinyBERTHidden(reduction="mean")
    loss = TinyBERTHidden(student_layers=1, teacher_layers=1, embeddings=None)
    feature = torch.randn(2, 5, 4)
    student = Outputs(torch.randn(2, 3), {"bert.encoder.layer.0": feature})
    teacher = Outputs(torch.randn(2, 3), {"bert.encoder.layer.0": feature, MASK_FEATURE: torch.ones(2, 6)})
    with pytest.raises(ShapeMismatchError, match=r"attention mask is \(2, 6\)"):
        loss(student, teacher, None)
    with pytest.raises(MethodError, match="needs the teacher feature 'attention_mask'"):
        loss(student, Outputs(torch.randn(2, 3), {"bert.encoder.layer.0": feature}), None)


# ---------------------------------------------------------------------------------------------------- attention


def _numpy_scores(model: Any, batch: dict[str, torch.Tensor], layer: int) -> np.ndarray:
    """Layer ``layer``'s pre-softmax scores from its input hidden state and its own weights, in numpy."""
    hidden = _hidden_states(model, batch)[layer]
    attention = model.bert.encoder.layer[layer].attention.self
    q = hidden @ attention.query.weight.detach().double().numpy().T + attention.query.bias.detach().double().numpy()
    k = hidden @ attention.key.weight.detach().double().numpy().T + attention.key.bias.detach().double().numpy()
    batch_size, seq, width = q.shape
    size = width // HEADS
    q = q.reshape(batch_size, seq, HEADS, size).transpose(0, 2, 1, 3)
    k = k.reshape(batch_size, seq, HEADS, size).transpose(0, 2, 1, 3)
    return q @ k.transpose(0, 1, 3, 2) / np.sqrt(size)


@pytest.mark.parametrize("reduction", ["tokens", "reference"])
def test_attention_loss_matches_a_numpy_transcription(reduction: str) -> None:
    student, teacher = _bert(2, 8, seed=0), _bert(4, 12, seed=1)
    batch = _batch()
    loss = TinyBERTAttention(student_layers=2, teacher_layers=4, heads=HEADS, reduction=reduction, ce_weight=0.0)
    terms = loss(*_outputs(loss, student, teacher, batch), None)
    mask = batch["attention_mask"].numpy()
    additive = (1.0 - mask[:, None, None, :]) * -10000.0  # the BERT extended mask the authors add
    expected = 0.0
    for s_layer, t_layer in enumerate([1, 3]):  # teacher_atts[i * k + k - 1], k = 2
        s_att, t_att = _numpy_scores(student, batch, s_layer), _numpy_scores(teacher, batch, t_layer)
        if reduction == "reference":
            s_att, t_att = s_att + additive, t_att + additive
            s_att = np.where(s_att <= -1e2, 0.0, s_att)
            t_att = np.where(t_att <= -1e2, 0.0, t_att)
            expected += np.mean((s_att - t_att) ** 2)
        else:
            real = mask.astype(bool)
            total, count = 0.0, 0
            for row in range(len(real)):
                keep = np.flatnonzero(real[row])
                block = (s_att[row] - t_att[row])[:, keep][:, :, keep]
                total, count = total + np.sum(block**2), count + block.size
            expected += total / count
    assert terms["attention"].item() == pytest.approx(expected, rel=1e-5)


def test_probability_option_matches_hfs_output_attentions() -> None:
    student, teacher = _bert(2, 8, seed=0), _bert(2, 12, seed=1)
    batch = _batch()
    loss = TinyBERTAttention(
        student_layers=2, teacher_layers=2, layer_map=[0, 1], heads=HEADS, scores="probabilities", ce_weight=0.0
    )
    terms = loss(*_outputs(loss, student, teacher, batch), None)
    with torch.no_grad():
        s_att = student(**batch, output_attentions=True).attentions
        t_att = teacher(**batch, output_attentions=True).attentions
    real = batch["attention_mask"].bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]
    expected = sum(((s - t) ** 2)[pairs.expand_as(s)].mean() for s, t in zip(s_att, t_att, strict=True))
    assert terms["attention"].item() == pytest.approx(float(expected), rel=1e-5)


def test_attention_loss_refuses_different_head_counts_and_bad_settings() -> None:
    with pytest.raises(MethodError, match="scores must be one of"):
        TinyBERTAttention(scores="softmax")
    with pytest.raises(MethodError, match="heads must be a positive integer"):
        TinyBERTAttention(heads=0)
    loss = TinyBERTAttention(student_layers=1, teacher_layers=1, heads=3)
    with pytest.raises(ShapeMismatchError, match="does not split into 3 heads"):
        loss(*_outputs(loss, _bert(1, 8, seed=0), _bert(1, 8, seed=1), _batch()), None)


# ---------------------------------------------------------------------------------------------------- composed


def test_composed_with_kd_weights_each_term_and_counts_ce_once() -> None:
    student, teacher = _bert(2, 8, seed=0), _bert(4, 8, seed=1)
    batch = _batch()
    params = {
        "tinybert_hidden": {"student_layers": 2, "teacher_layers": 4},
        "tinybert_attention": {"student_layers": 2, "teacher_layers": 4, "heads": HEADS},
    }
    weights = {"kd": 1.0, "tinybert_hidden": 0.5, "tinybert_attention": 2.0}
    loss = compose_methods(weights, params)
    student_out, teacher_out = _outputs(loss, student, teacher, batch)
    loss.prepare(student_out, teacher_out, 3)
    target = torch.tensor([0, 1, 2])
    terms = loss(student_out, teacher_out, target)
    assert "tinybert_hidden/ce" not in terms and "tinybert_attention/ce" not in terms
    kd_alone = get_loss("kd")(student_out, teacher_out, target)["loss"]
    expected = kd_alone + 0.5 * terms["tinybert_hidden/hidden"] + 2.0 * terms["tinybert_attention/attention"]
    assert torch.allclose(terms["loss"], expected)
    terms["loss"].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
