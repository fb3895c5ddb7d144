"""Outputs (mask, typed top-k, optional logits) and the loss preparation that skips work the base class needs not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kdistill.errors import MethodError
from kdistill.losses import KDLoss, prepare_loss
from kdistill.teachers import Outputs, TopK
from kdistill.teachers.base import TOPK_EMPTY_REST


def test_topk_only_outputs_have_no_logits_and_say_what_to_use() -> None:
    topk = TopK.from_logits(torch.randn(3, 5), 2)
    outputs = Outputs(topk=topk, index=torch.arange(3))
    assert not Outputs(None, topk=topk).has_logits  # None counts as omitted
    assert not outputs.has_logits and Outputs(torch.zeros(3, 5)).has_logits
    with pytest.raises(MethodError, match="kd_topk") as raised:
        _ = outputs.logits
    assert "fp32" in str(raised.value.hint)
    with pytest.raises(MethodError, match="logits or topk"):
        Outputs(None)
    assert "logits=None" in repr(outputs) and "k=2" in repr(outputs)
    moved = outputs.replace(index=torch.tensor([2, 0, 1]))  # dataclasses.replace would read the missing logits
    assert moved.topk is topk and moved.index.tolist() == [2, 0, 1] and not moved.has_logits
    with pytest.raises(dataclasses.FrozenInstanceError):
        outputs.logits = torch.zeros(3, 5)  # type: ignore[misc]


def test_an_integer_attention_mask_becomes_bool() -> None:
    outputs = Outputs(torch.zeros(2, 3, 4), mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert outputs.mask is not None and outputs.mask.dtype == torch.bool
    assert outputs.mask.tolist() == [[True, True, False], [True, False, False]]


def test_topk_matches_the_dense_logits_it_encodes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    topk = TopK.from_logits(logits, 3)
    order = logits.argsort(dim=-1, descending=True)
    assert torch.equal(topk.indices, order[..., :3])
    assert torch.equal(topk.values, logits.gather(-1, order[..., :3]))
    rest = torch.logsumexp(logits.gather(-1, order[..., 3:]), dim=-1)
    torch.testing.assert_close(topk.rest, rest)
    assert bool((TopK.from_logits(logits, 7).rest == TOPK_EMPTY_REST).all())  # nothing left: the empty bucket


def test_prepare_loss_runs_no_dry_batch_for_the_base_class_no_op() -> None:
    calls: list[int] = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return self.linear(x)

    class Prepared(KDLoss):
        seen: list[int] = []  # noqa: RUF012

        def prepare(self, student: Outputs, teacher: Outputs | None, rows: int) -> None:
            self.seen.append(rows)

    x, logits = torch.randn(10, 4), torch.randn(10, 3)
    assert prepare_loss(KDLoss(), Counting(), x, logits, None) == []
    assert calls == []
    loss = Prepared()
    prepare_loss(loss, Counting(), x, logits, None, batch_size=4)
    assert calls == [4] and loss.seen == [10]


def test_static_targets_serve_token_level_logits_and_topk_rows() -> None:
    from kdistill.losses import KDTopKLoss, StaticTargets

    torch.manual_seed(1)
    logits = torch.randn(6, 4, 9)
    index = torch.tensor([5, 0, 2])
    dense = StaticTargets.build(KDLoss(), logits, torch.randint(0, 9, (6, 4)))
    assert not dense.packed  # kd packs (rows, classes) targets only
    assert torch.equal(dense.select(index).logits, logits[index])
    topk = TopK.from_logits(logits, 3)
    served = StaticTargets.build(KDTopKLoss(), topk, None).select(index)
    assert served.topk is not None and served.topk.values.shape == (3, 4, 3)
    assert torch.equal(served.topk.indices, topk.indices[index])
