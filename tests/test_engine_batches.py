"""Batches and data sources: the in-memory path and the streaming one draw the same rows; ranks split every global
batch without overlap; mapping inputs keep their dtypes; partly labelled rows carry a mask; micro-batches' weights
add up to the batch's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from kdistill.data import as_inputs, as_split
from kdistill.engine import UNLABELLED, InMemorySource, StreamingSource, micro_batches
from kdistill.errors import DataError

ROWS, BATCH = 23, 8  # three global batches: 8, 8, 7


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(ROWS * 3, dtype=torch.float32).reshape(ROWS, 3)
    return x, torch.arange(ROWS) % 4


class Rows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style data set that counts the rows it was asked for (it is never read whole)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.reads = x, y, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.x[i], self.y[i]


class Stream(IterableDataset[dict[str, torch.Tensor]]):
    """An iterable of token rows, replayable, with its own per-epoch order (``set_epoch``)."""

    def __init__(self) -> None:
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(ROWS):
            yield {"input_ids": torch.tensor([i, i + 1], dtype=torch.int64), "labels": torch.tensor(i % 4)}


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(5)


def test_in_memory_batches_are_the_shuffled_rows_split_over_ranks() -> None:
    x, y = _data()
    source = InMemorySource(x, y)
    order = torch.randperm(ROWS, generator=_generator())  # the permutation the source must draw
    single = list(source.batches(0, batch_size=BATCH, generator=_generator()))
    assert [b.index.tolist() for b in single] == [order[i : i + BATCH].tolist() for i in range(0, ROWS, BATCH)]
    for batch in single:
        assert torch.equal(batch.inputs, x[batch.index])  # type: ignore[arg-type]
        assert batch.target is not None
        assert torch.equal(batch.target, y[batch.index])
        assert batch.weight == 1.0
    ranks = [list(source.batches(0, batch_size=BATCH, rank=r, world_size=3, generator=_generator())) for r in range(3)]
    for step, whole in enumerate(single):  # the ranks' slices, in rank order, are the global batch
        assert torch.cat([ranks[r][step].index for r in range(3)]).tolist() == whole.index.tolist()
        # weights: len(slice) * ranks / len(batch), so that the ranks' average is the batch's mean
        expected = [len(ranks[r][step]) * 3 / len(whole) for r in range(3)]
        assert [ranks[r][step].weight for r in range(3)] == pytest.approx(expected)
        assert sum(ranks[r][step].weight for r in range(3)) == pytest.approx(3.0)
    resumed = list(source.batches(0, batch_size=BATCH, generator=_generator(), start=2))
    assert [b.index.tolist() for b in resumed] == [single[2].index.tolist()]


def test_a_rank_with_nothing_left_takes_part_with_weight_zero() -> None:
    x, y = _data()
    source = InMemorySource(x[:9], y[:9])  # batches of 8 and 1 over 2 ranks: rank 1 has no row of the last one
    last = list(source.batches(0, batch_size=8, rank=1, world_size=2, generator=_generator()))[-1]
    first = list(source.batches(0, batch_size=8, rank=0, world_size=2, generator=_generator()))[-1]
    assert (len(last), last.weight) == (1, 0.0)
    assert (first.index.tolist(), first.weight) == (last.index.tolist(), 2.0)


def test_streaming_map_style_reads_the_same_batches_and_only_its_rows() -> None:
    x, y = _data()
    memory = InMemorySource(x, y)
    dataset = Rows(x, y)
    streaming = StreamingSource(dataset)
    for rank in range(2):
        a = list(memory.batches(1, batch_size=BATCH, rank=rank, world_size=2, generator=_generator()))
        b = list(streaming.batches(1, batch_size=BATCH, rank=rank, world_size=2, generator=_generator()))
        assert len(a) == len(b)
        for left, right in zip(a, b, strict=True):
            assert torch.equal(left.index, right.index)
            assert torch.equal(left.inputs, right.inputs)  # type: ignore[arg-type]
            assert left.target is not None and right.target is not None
            assert torch.equal(left.target, right.target)
            assert left.weight == right.weight
    assert dataset.reads == ROWS  # each rank read its own half, never the whole set
    dataset.reads = 0
    list(streaming.batches(0, batch_size=BATCH, generator=_generator(), start=2))
    assert dataset.reads == ROWS - 2 * BATCH  # a resumed epoch does not read the batches it skips


def test_streaming_iterable_keeps_int64_mappings_and_shards_each_batch() -> None:
    stream = Stream()
    source = StreamingSource(stream, rows=ROWS)
    batches = [list(source.batches(3, batch_size=BATCH, rank=r, world_size=2)) for r in range(2)]
    assert stream.epoch == 3  # set_epoch was called
    assert len(batches[0]) == len(batches[1]) == 3  # every rank takes part in every step
    first = batches[0][0]
    assert isinstance(first.inputs, dict)
    assert first.inputs["input_ids"].dtype == torch.int64
    assert first.index.tolist() == [0, 1, 2, 3]  # positions in the stream, its own order
    assert torch.equal(first.inputs["input_ids"][:, 0], first.index)
    assert first.target is not None
    assert first.target.tolist() == [0, 1, 2, 3]
    seen = sorted(int(i) for rank in batches for batch in rank for i in batch.index)
    assert seen == list(range(ROWS))
    with pytest.raises(DataError, match="no len"):
        StreamingSource(iter(range(3)))


def test_partly_labelled_rows_carry_a_mask_and_the_unlabelled_value() -> None:
    x, y = _data()
    labelled = torch.arange(ROWS) % 3 != 0
    source = InMemorySource(x, y, label_mask=labelled)
    (batch,) = list(source.batches(0, batch_size=ROWS, generator=_generator()))
    assert batch.label_mask is not None and batch.target is not None
    assert torch.equal(batch.label_mask, labelled[batch.index])
    assert torch.equal(batch.target[batch.label_mask], y[batch.index][batch.label_mask])
    assert bool((batch.target[~batch.label_mask] == UNLABELLED).all())

    class Some(Dataset[tuple[torch.Tensor, int | None]]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int | None]:
            return torch.zeros(2), (None if i == 1 else i)

    (streamed,) = list(StreamingSource(Some(), shuffle=False).batches(0, batch_size=4))
    assert streamed.target is not None and streamed.label_mask is not None
    assert streamed.target.tolist() == [0, UNLABELLED, 2, 3]
    assert streamed.label_mask.tolist() == [True, False, True, True]


def test_micro_batches_split_rows_and_weights() -> None:
    x, y = _data()
    (batch,) = list(InMemorySource(x[:10], y[:10]).batches(0, batch_size=10, generator=_generator()))
    parts = micro_batches(batch, 3)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert torch.cat([p.index for p in parts]).tolist() == batch.index.tolist()
    assert [p.weight for p in parts] == pytest.approx([0.4, 0.3, 0.3])
    assert [len(p) for p in micro_batches(batch, 20)] == [1] * 10  # never an empty micro-batch
    assert micro_batches(batch, 1) == [batch]


def test_as_inputs_keeps_integer_dtypes_of_a_mapping_and_floats_plain_arrays() -> None:
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    mask = np.ones((4, 3), dtype=np.int32)
    inputs = as_inputs({"input_ids": ids, "attention_mask": mask, "scale": np.ones(4)})
    assert isinstance(inputs, dict)
    assert (inputs["input_ids"].dtype, inputs["attention_mask"].dtype, inputs["scale"].dtype) == (
        torch.int64,
        torch.int32,
        torch.float32,
    )
    assert as_inputs(ids).dtype == torch.float32  # type: ignore[union-attr]
    with pytest.raises(DataError, match=r"different numbers of rows: \{'input_ids': 4, 'attention_mask': 3\}"):
        as_inputs({"input_ids": ids, "attention_mask": mask[:3]})
    with pytest.raises(DataError, match=r"X\['scale'\] has NaN or inf in 1 row\(s\), first at row 2"):
        as_inputs({"input_ids": ids, "scale": np.array([0.0, 1.0, np.nan, 2.0])})
    split = as_split(({"input_ids": ids}, np.zeros(4, dtype=np.int64)))  # a split keeps a mapping as it is
    assert isinstance(split.x, dict) and split.x["input_ids"].dtype == torch.int64 and len(split) == 4


def test_a_used_up_generator_is_a_clear_error_in_the_next_epoch() -> None:
    from torch import nn

    from kdistill.engine import TrainConfig, fit
    from kdistill.losses import get_loss

    rows = ((torch.zeros(3), 0) for _ in range(8))  # a generator: one pass only
    with pytest.raises(DataError, match="yielded no batch in epoch 1"):
        fit(nn.Linear(3, 2), get_loss("ce"), StreamingSource(rows, rows=8), config=TrainConfig(epochs=2, verbose=False))
