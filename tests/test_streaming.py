"""A training set read batch by batch through distill() and YAML: never loaded whole, the teacher live per batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

import kdistill
from kdistill.config import load_config
from kdistill.errors import ConfigError, DataError, LabelError
from kdistill.run import run

ROWS, FEATURES, CLASSES = 600, 10, 3


def _row(index: int) -> tuple[np.ndarray, int]:
    """Row ``index`` of a synthetic set, made on demand (float64, as numpy gives it)."""
    x = np.random.default_rng(index).normal(size=FEATURES)
    return x, int(np.argmax(x[:CLASSES]))


class Rows(Dataset):
    """A map-style Dataset that counts the rows it is asked for."""

    def __init__(self, rows: int = ROWS) -> None:
        self.rows, self.reads = rows, 0

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        self.reads += 1
        return _row(index)


class Stream(IterableDataset):
    def __iter__(self):
        return (_row(i) for i in range(ROWS))


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES)).eval()


def _in_memory(rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
    pairs = [_row(i) for i in range(rows)]
    return np.stack([x for x, _ in pairs]), np.array([y for _, y in pairs])


COMMON: dict = {"epochs": 2, "batch_size": 64, "verbose": False, "profile": False, "hidden": (16,)}


def test_a_streamed_dataset_trains_as_the_same_rows_in_memory_do() -> None:
    data = Rows()
    val = _in_memory(200)
    streamed = kdistill.distill(_teacher(), "mlp", data, val=val, stream=True, **COMMON)
    # every epoch reads each row once (student and baseline: 2 epochs each), plus the 600-row sample: nothing more
    assert data.reads == ROWS + 2 * 2 * ROWS
    loaded = kdistill.distill(_teacher(), "mlp", _in_memory(), val=val, **COMMON)
    # the same rows, order and seed: the same weights, up to the teacher's logits computed in other batch sizes
    for name, value in loaded.student.state_dict().items():
        torch.testing.assert_close(streamed.student.state_dict()[name], value, atol=1e-5, rtol=1e-4)
    assert streamed.report is not None and streamed.report.settings["train_rows"] == ROWS


def test_an_iterable_streams_and_needs_its_length() -> None:
    result = kdistill.distill(_teacher(), "mlp", Stream(), stream_rows=ROWS, val=_in_memory(100), **COMMON)
    assert len(result.history) == 2 and result.history[-1]["train_loss"] > 0
    with pytest.raises(DataError, match=r"streams from a Stream without len\(\)(.|\n)*stream_rows=N"):
        kdistill.distill(_teacher(), "mlp", Stream(), **COMMON)


def test_what_a_stream_cannot_do_is_refused_before_training() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _in_memory(100)
    named = LogisticRegression(max_iter=200).fit(x, np.array(["a", "b", "c"])[y])
    with pytest.raises(LabelError, match=r"train is streamed(.|\n)*classes are \['a', 'b', 'c'\], not 0..2"):
        kdistill.distill(named, "mlp", Rows(), stream=True, **COMMON)
    indexed = LogisticRegression(max_iter=200).fit(x, y)
    with pytest.raises(ConfigError, match="cannot be streamed: out-of-fold soft targets"):
        kdistill.distill(indexed, "mlp", Rows(), stream=True, soft_targets="oof", **COMMON)


MODULE = """
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class Rows(Dataset):
    def __len__(self):
        return 300

    def __getitem__(self, index):
        x = np.random.default_rng(index).normal(size=10)
        return x, int(np.argmax(x[:3]))


def rows():
    return Rows()


def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
"""

CONFIG = """
name: streamed
data: {train: {factory: "streamed_data:rows", stream: true}}
teacher: {kind: torch, factory: "streamed_data:teacher"}
student: {kind: mlp, params: {hidden: [16]}}
train: {epochs: 2, batch_size: 64}
device: {type: cpu}
report: {enabled: false, baseline: false}
"""


def test_a_yaml_run_streams_a_dataset_from_a_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "streamed_data.py").write_text(MODULE)
    (tmp_path / "run.yaml").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    outcome = run(load_config(tmp_path / "run.yaml", [f"out={tmp_path / 'out'}"]), verbose=False)
    assert outcome.result is not None and len(outcome.result.history) == 2
    (tmp_path / "bad.yaml").write_text(
        CONFIG.replace('{factory: "streamed_data:rows", stream: true}', "{path: a.npz, stream: true}")
    )
    with pytest.raises(ConfigError, match="stream: true reads a Dataset from factory"):
        load_config(tmp_path / "bad.yaml")
