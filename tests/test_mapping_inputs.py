"""Inputs as a mapping of tensors (a tokenizer's input_ids and attention_mask) through distill(), YAML and the report.

The model is called as ``model(**batch)``; integer dtypes are kept; batches are cut to their longest row (dynamic
padding), which must change no number a padded batch gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.config import load_config
from kdistill.data import as_split, take_rows, trim_padding
from kdistill.errors import DataError, StudentError
from kdistill.run import run
from kdistill.teachers import as_teacher, teacher_logits

VOCAB, CLASSES = 50, 3

BAG = """
import torch
from torch import nn


class Bag(nn.Module):
    '''Mean of token embeddings over the attention mask, then a linear layer: (batch, seq) ids -> (batch, 3).'''

    def __init__(self, seed: int = 0, width: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, width)
        self.head = nn.Linear(width, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)
"""


def _tokens(rows: int, seed: int, longest: int = 12) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Right-padded rows of 2..longest tokens; the label is which third of the vocabulary the first token is in."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, longest + 1, rows)
    ids = rng.integers(1, VOCAB, (rows, longest))
    mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # padding id 0
    return {"input_ids": ids, "attention_mask": mask}, (ids[:, 0] * CLASSES // VOCAB).astype(np.int64)


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "bag.py").write_text(BAG)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import bag

    importlib.reload(bag)
    return bag


def _hf_classifier(seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def test_a_mapping_keeps_integer_dtypes_and_checks_its_rows() -> None:
    x, y = _tokens(10, 0)
    split = as_split((x, y))
    assert isinstance(split.x, dict) and split.x["input_ids"].dtype == torch.int64 and len(split) == 10
    with pytest.raises(DataError, match="different numbers of rows"):
        as_split(({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:5]}, y))


def test_trimming_a_batch_to_its_longest_row_changes_no_teacher_output() -> None:
    teacher = as_teacher(_hf_classifier(0))
    x, _ = _tokens(40, 1, longest=12)
    x["attention_mask"][:, 9:] = 0  # no row is longer than 9: every batch can drop 3 columns
    x["input_ids"][:, 9:] = 0
    inputs = as_split((x, np.zeros(40, dtype=np.int64))).x
    assert trim_padding(inputs)["input_ids"].shape == (40, 9)
    batched = teacher_logits(teacher, inputs, batch_size=7)
    full = teacher(inputs).logits  # one batch, padded to 12: the attention mask hides the padding
    torch.testing.assert_close(batched, full, atol=1e-5, rtol=1e-5)


def test_distill_trains_a_student_on_token_mappings_and_reports_it(models, tmp_path: Path) -> None:
    teacher = _hf_classifier(0)
    train, val, test = _tokens(256, 2), _tokens(64, 3), _tokens(64, 4)
    result = kdistill.distill(
        teacher,
        models.Bag(seed=1),
        train,
        val=val,
        test=test,
        epochs=3,
        batch_size=32,
        verbose=False,
        profile=True,
        cache_dir=tmp_path / "cache",
    )
    report = result.report
    assert report is not None
    student = report.models["student"]
    # the report's agreement is the student's argmax against the teacher's, recomputed here on the test rows
    test_x = as_split(test).x
    with torch.no_grad():
        ours = result.student(**test_x).argmax(1)
        theirs = teacher(**test_x).logits.argmax(1)
    assert student["agreement"] == pytest.approx(float((ours == theirs).float().mean()))
    assert student["latency_ms"] > 0 and report.models["teacher"]["parameters"] > student["parameters"]
    entries = list((tmp_path / "cache").iterdir())
    assert entries  # the teacher's logits went through the cache, keyed by the mapping's content


def test_a_yaml_run_reads_named_inputs_and_matches_the_api(models, tmp_path: Path) -> None:
    (x, y), (xv, yv) = _tokens(128, 5), _tokens(32, 6)
    np.savez(tmp_path / "train.npz", **{f"x.{k}": v for k, v in x.items()}, y=y)
    np.savez(tmp_path / "val.npz", **{f"x.{k}": v for k, v in xv.items()}, y=yv)
    (tmp_path / "run.yaml").write_text(
        """
name: tokens
data: {train: {path: train.npz}, val: {path: val.npz}}
teacher: {kind: torch, factory: "bag:Bag", params: {seed: 0, width: 16}}
student: {kind: custom, factory: "bag:Bag", params: {seed: 1}}
method: {name: kd, params: {temperature: 2.0, soft_weight: 0.7}}
train: {epochs: 2, batch_size: 32, optimizer: {name: sgd, lr: 0.1}, schedule: {name: constant}}
device: {type: cpu}
report: {enabled: false, baseline: false}
"""
    )
    outcome = run(load_config(tmp_path / "run.yaml", [f"out={tmp_path / 'out'}"]), verbose=False)
    assert outcome.result is not None
    api = kdistill.distill(
        models.Bag(seed=0, width=16),
        models.Bag(seed=1),
        (x, y),
        val=(xv, yv),
        epochs=2,
        batch_size=32,
        temperature=2.0,
        soft_weight=0.7,
        verbose=False,
        settings={"train": {"optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "constant"}}},
        report=False,
        baseline=False,
    )
    for name, value in api.student.state_dict().items():
        assert torch.equal(value, outcome.result.student.state_dict()[name]), name


def test_mapping_errors_name_the_problem(models) -> None:
    teacher = models.Bag(seed=0)
    x, y = _tokens(32, 7)
    with pytest.raises(DataError, match=r"val X has inputs \['input_ids'\] but train X has \['attention_mask', "):
        kdistill.distill(teacher, models.Bag(seed=1), (x, y), val=({"input_ids": x["input_ids"]}, y), verbose=False)
    with pytest.raises(StudentError, match="student 'mlp' reads rows of features, but the inputs are a mapping"):
        kdistill.distill(teacher, "mlp", (x, y), verbose=False)
    rows = take_rows(as_split((x, y)).x, torch.tensor([3, 1]))
    assert torch.equal(rows["input_ids"][0], torch.as_tensor(x["input_ids"][3]))
