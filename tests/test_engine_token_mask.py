"""The engine hands per-token losses the batch's attention mask: padded positions reach neither the loss nor the
gradient, whatever the teacher's logits hold there."""

from __future__ import annotations

import torch
from torch import nn

from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.losses import get_loss

VOCAB, ROWS, SEQ = 9, 48, 6


class TokenStudent(nn.Module):
    """(batch, seq) ids -> (batch, seq, vocab) logits; takes (and ignores) the attention mask, as causal LMs do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table(input_ids)


def _data(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    lengths = torch.randint(2, SEQ + 1, (ROWS,), generator=generator)
    mask = (torch.arange(SEQ).unsqueeze(0) < lengths.unsqueeze(1)).long()
    teacher = torch.randn(ROWS, SEQ, VOCAB, generator=generator)
    padding = torch.randn(ROWS, SEQ, VOCAB, generator=torch.Generator().manual_seed(seed)) * 10
    teacher = torch.where(mask.bool().unsqueeze(-1), teacher, padding)  # what padded positions hold differs by seed
    return {"input_ids": ids, "attention_mask": mask}, teacher


def _train(inputs: dict[str, torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
    student = TokenStudent()
    config = TrainConfig(epochs=3, batch_size=16, lr=0.1, verbose=False)
    fit(student, get_loss("kd", temperature=1.0), TransferSet(inputs, None, teacher), config=config)
    return student.table.weight.detach().clone()


def test_padded_positions_do_not_train_the_student() -> None:
    inputs, teacher_a = _data(seed=1)
    _, teacher_b = _data(seed=2)
    assert not torch.equal(teacher_a, teacher_b)
    assert torch.equal(_train(inputs, teacher_a), _train(inputs, teacher_b))
    # without the mask the padded positions would count: the same two runs then train different weights
    unmasked = {"input_ids": inputs["input_ids"]}
    assert not torch.equal(_train(unmasked, teacher_a), _train(unmasked, teacher_b))
