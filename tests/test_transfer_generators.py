"""The transfer-set generators against independent computations: MUNGE's swaps, neighbours and noise scale (Bucila
et al. 2006, Algorithm 1), mixup's Beta mixing, jitter's shifts and noise, the per-class Gaussian's moments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kdistill.errors import ConfigError, DataError
from kdistill.transfer import GENERATORS, ClassGaussian, Jitter, Mixup, Munge, Transfer, as_transfer


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nearest_numpy(x: np.ndarray) -> np.ndarray:
    """Each row's nearest other row, by Euclidean distance over columns scaled to [0, 1] (the paper's)."""
    spread = x.max(axis=0) - x.min(axis=0)
    scaled = (x - x.min(axis=0)) / np.where(spread > 0, spread, 1.0)
    distance = ((scaled[:, None, :] - scaled[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    return distance.argmin(1)


def test_munge_p1_and_no_noise_swaps_each_row_with_its_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32) * np.array([1.0, 10.0, 0.1], dtype=np.float32)
    munge = Munge(p=1.0, s=1e12).fit(torch.from_numpy(x))
    out = munge.sample(400, _gen()).numpy()
    nearest = _nearest_numpy(x.astype(np.float64))
    for pair in range(0, 400, 2):
        e_side, partner_side = out[pair], out[pair + 1]
        start = int(np.argmin(np.abs(x - partner_side).sum(1)))  # the partner side holds the start row's values
        np.testing.assert_allclose(partner_side, x[start], rtol=0, atol=1e-5)
        np.testing.assert_allclose(e_side, x[nearest[start]], rtol=0, atol=1e-5)


def test_munge_noise_is_centred_on_the_neighbour_with_sd_of_the_gap_over_s() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # each row's only neighbour is the other
    s = 4.0
    out = Munge(p=1.0, s=s).fit(x).sample(40_000, _gen(1))
    e_side = out[0::2]  # a pair's first row: its start row's attributes drawn around the neighbour's
    gap = np.array([1.0, 3.0])
    for start, neighbour in ((0, 1), (1, 0)):
        rows = e_side[(e_side - x[neighbour]).abs().sum(1) < (e_side - x[start]).abs().sum(1)].numpy()
        np.testing.assert_allclose(rows.mean(0), x[neighbour].numpy(), atol=0.02)
        np.testing.assert_allclose(rows.std(0), gap / s, rtol=0.05)


def test_munge_changes_each_attribute_with_probability_p() -> None:
    x = torch.randn(200, 10, generator=_gen(2))
    out = Munge(p=0.3, s=10.0).fit(x).sample(20_000, _gen(3))
    untouched = (out[:, None, :] == x[None, :, :]).any(1).float().mean()  # an attribute kept as it was
    assert abs(float(untouched) - 0.7) < 0.01


def test_munge_swaps_categorical_columns_without_noise() -> None:
    rng = np.random.default_rng(4)
    x = np.column_stack([rng.normal(size=60), rng.integers(0, 3, size=60), rng.normal(size=60)]).astype(np.float32)
    frame = pd.DataFrame(x, columns=["a", "colour", "b"])
    munge = Munge(p=0.8, s=2.0, categorical=["colour"])
    out = munge.fit(torch.from_numpy(x), feature_names=list(frame.columns)).sample(3000, _gen())
    assert set(out[:, 1].unique().tolist()) <= {0.0, 1.0, 2.0}
    assert len(set(out[:, 0].tolist()) - set(x[:, 0].tolist())) > 1000  # continuous columns are noised
    by_position = Munge(p=0.8, s=2.0, categorical=[1]).fit(torch.from_numpy(x)).sample(3000, _gen())
    torch.testing.assert_close(by_position, out)


def test_munge_distance_counts_categorical_mismatches() -> None:
    x = torch.tensor([[0.0, 0.0], [0.1, 5.0], [0.5, 0.0], [9.0, 0.0]])
    munge = Munge(p=1.0, s=1e12, categorical=[1]).fit(x)
    assert munge.neighbours_ is not None
    # row 0's closest continuous value is row 1's, but row 1 differs in the category: row 2 is nearer
    assert int(munge.neighbours_[0, 0]) == 2


def test_munge_is_seeded() -> None:
    x = torch.randn(30, 4, generator=_gen(5))
    munge = Munge(neighbours=3).fit(x)
    torch.testing.assert_close(munge.sample(100, _gen(7)), munge.sample(100, _gen(7)))
    assert not torch.equal(munge.sample(100, _gen(7)), munge.sample(100, _gen(8)))


def test_munge_live_transform_never_pairs_a_row_with_itself() -> None:
    x = torch.tensor([[0.0], [1.0], [10.0]])
    out = Munge(p=1.0, s=1e12).fit(x).transform(x, _gen())
    torch.testing.assert_close(out, torch.tensor([[1.0], [0.0], [1.0]]))


def test_munge_bad_input_is_named() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(DataError, match="asks for 5 neighbours per row, but there are only 5 rows"):
        Munge(neighbours=5).fit(x)
    with pytest.raises(DataError, match=r"(?s)categorical column 'colr' does not exist.*did you mean 'colour'"):
        Munge(categorical=["colr"]).fit(x, feature_names=["a", "colour", "b"])
    with pytest.raises(DataError, match="categorical column 7 does not exist: the rows have 3 columns"):
        Munge(categorical=[7]).fit(x)
    with pytest.raises(DataError, match="no column names"):
        Munge(categorical=["colour"]).fit(x)
    with pytest.raises(ConfigError, match=r"p must be in \[0, 1\], got 1.5"):
        Munge(p=1.5)


def test_mixup_rows_are_convex_pairs_with_beta_weights() -> None:
    x = torch.eye(50)
    alpha = 2.0
    out = Mixup(alpha=alpha).fit(x).sample(20_000, _gen(9))
    assert bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(len(out)))
    nonzero = (out > 0).sum(1)
    assert int(nonzero.max()) <= 2
    pairs = out[nonzero == 2]
    products = pairs.topk(2, dim=1).values.prod(1)  # lambda * (1 - lambda), whichever row came first
    expected = 0.25 - 1.0 / (4.0 * (2.0 * alpha + 1.0))  # E[l(1-l)] for l ~ Beta(a, a)
    assert abs(float(products.mean()) - expected) < 0.005


def test_mixup_keeps_image_shapes_and_mixes_within_the_batch() -> None:
    x = torch.rand(16, 1, 8, 8, generator=_gen())
    out = Mixup().transform(x, _gen())
    assert out.shape == x.shape
    assert float(out.min()) >= float(x.min()) - 1e-6 and float(out.max()) <= float(x.max()) + 1e-6


def test_jitter_shift_rolls_rows_by_at_most_shift_steps() -> None:
    x = torch.arange(20.0).repeat(30, 1)
    out = Jitter(noise=0.0, shift=3).fit(x + torch.randn(30, 20, generator=_gen())).transform(x, _gen(1))
    offsets = set()
    for row in out:
        matches = [d for d in range(-3, 4) if torch.equal(row, torch.roll(x[0], d))]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 3


def test_jitter_noise_is_scaled_by_each_features_std() -> None:
    x = torch.randn(5000, 2, generator=_gen(2)) * torch.tensor([1.0, 20.0])
    jitter = Jitter(noise=0.25).fit(x)
    delta = jitter.transform(x, _gen(3)) - x
    np.testing.assert_allclose(delta.std(0).numpy(), 0.25 * x.std(0).numpy(), rtol=0.05)


def test_class_gaussian_matches_each_class_mean_covariance_and_frequency() -> None:
    rng = np.random.default_rng(6)
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])
    a = rng.multivariate_normal([0.0, 0.0], cov, size=3000)
    b = rng.multivariate_normal([8.0, -4.0], 0.25 * np.eye(2), size=1000)
    x = torch.tensor(np.vstack([a, b]), dtype=torch.float32)
    y = torch.tensor([0] * 3000 + [1] * 1000)
    out = ClassGaussian(shrinkage=0.0).fit(x, y).sample(40_000, _gen(4)).numpy()
    first = out[out[:, 0] < 4.0]
    assert abs(len(first) / len(out) - 0.75) < 0.01
    np.testing.assert_allclose(first.mean(0), a.mean(0), atol=0.03)
    np.testing.assert_allclose(np.cov(first.T), np.cov(a.T), atol=0.05)
    second = out[out[:, 0] >= 4.0]
    np.testing.assert_allclose(np.cov(second.T), np.cov(b.T), atol=0.02)


def test_class_gaussian_shrinkage_pulls_the_covariance_to_its_diagonal() -> None:
    rng = np.random.default_rng(7)
    x = torch.tensor(rng.multivariate_normal([0, 0], [[1.0, 0.9], [0.9, 1.0]], size=4000), dtype=torch.float32)
    out = ClassGaussian(shrinkage=0.5).fit(x, None).sample(40_000, _gen()).numpy()
    assert abs(np.cov(out.T)[0, 1] - 0.5 * np.cov(x.numpy().T)[0, 1]) < 0.03


def test_class_gaussian_mixture_covers_both_modes_of_a_class() -> None:
    rng = np.random.default_rng(8)
    x = np.vstack([rng.normal(-5, 0.5, size=(500, 1)), rng.normal(5, 0.5, size=(500, 1))]).astype(np.float32)
    out = ClassGaussian(components=2).fit(torch.from_numpy(x), torch.zeros(1000, dtype=torch.long)).sample(5000, _gen())
    assert abs(float((out > 0).float().mean()) - 0.5) < 0.03
    assert float((out.abs() < 2).float().mean()) < 0.01  # one Gaussian would put mass between the modes


def test_registry_and_mappings_build_each_generator() -> None:
    assert set(GENERATORS) == {"munge", "mixup", "jitter", "class_gaussian"}
    transfer = as_transfer({"kind": "munge", "mode": "pool", "rows": 500, "params": {"p": 0.25, "s": 3.0}})
    assert isinstance(transfer, Transfer) and isinstance(transfer.generator, Munge)
    assert transfer.generator.p == 0.25 and transfer.rows == 500
    assert isinstance(as_transfer("mixup").generator, Mixup)  # type: ignore[union-attr]
    with pytest.raises(KeyError, match="did you mean 'munge'"):
        as_transfer("mung")
    with pytest.raises(KeyError, match="takes no parameter 'pp'"):
        as_transfer({"kind": "munge", "params": {"pp": 0.5}})
    with pytest.raises(ConfigError, match="transfer mode must be 'pool' or 'live'"):
        Transfer(Munge(), mode="stream")  # type: ignore[arg-type]
