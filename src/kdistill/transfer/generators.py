"""Transfer-set generators: new input rows drawn from the training rows, for the teacher to label.

Every generator is a small object with three methods and no hidden randomness:

- ``fit(x, y=None, *, seed=0, feature_names=None)`` learns what sampling needs from the training rows ``x``
  (rows, *features) (and labels ``y`` (rows,), when the generator uses them); returns the generator;
- ``sample(rows, generator)`` draws a pool of ``rows`` new rows, (rows, *features), all randomness from the
  ``torch.Generator`` (pool mode: the teacher labels the pool once, through the cache);
- ``transform(x, generator)`` draws one new row per row of a batch ``x`` (live mode: every epoch sees new rows, the
  teacher labels them as they come).

The same seed gives the same rows. Generated rows carry no label: only the teacher's outputs supervise them.

- :class:`Munge`: Bucila, Caruana & Niculescu-Mizil, "Model Compression", KDD 2006 (tabular rows);
- :class:`Mixup`: convex combinations of two rows (Zhang et al., "mixup", ICLR 2018), any row shape;
- :class:`Jitter`: Gaussian noise, random amplitude scaling and circular shifts (vectors and series);
- :class:`ClassGaussian`: a Gaussian (or a Gaussian mixture) per class, fitted on the labelled rows.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdistill.errors import ConfigError, DataError

__all__ = ["ClassGaussian", "Jitter", "Mixup", "Munge", "TransferGenerator"]

_CHUNK = 1024  # rows per block of the nearest-neighbour distance matrix


class TransferGenerator:
    """Base class. Subclasses implement :meth:`fit` (calling ``super().fit``) and :meth:`transform`; :meth:`sample`
    defaults to :meth:`transform` of ``rows`` training rows drawn uniformly with replacement."""

    name = "generator"
    x_: torch.Tensor | None = None

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        seed: int = 0,
        feature_names: Sequence[str] | None = None,
    ) -> TransferGenerator:
        """Learn from the training rows ``x`` (rows, *features) float; ``y`` (rows,) labels or None."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise DataError(
                f"transfer generator {self.name!r} draws rows of float features, got "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}",
                hint="generated rows need a numeric feature tensor (rows, *features); token ids cannot be noised.",
            )
        if len(x) < 2:
            raise DataError(
                f"transfer generator {self.name!r} needs at least 2 rows to fit, got {len(x)}",
                hint="pass more training rows.",
            )
        self.x_ = x.detach().float().cpu()
        return self

    def _fitted(self) -> torch.Tensor:
        if self.x_ is None:
            raise ConfigError(
                f"transfer generator {self.name!r} is not fitted", hint="call fit(x, y) before sample or transform."
            )
        return self.x_

    def sample(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """``rows`` new rows (rows, *features): :meth:`transform` of training rows drawn with replacement."""
        x = self._fitted()
        picked = torch.randint(len(x), (rows,), generator=generator)
        return self.transform(x[picked], generator)

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One new row per row of ``x`` (batch, *features), the same shape out."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict[str, Any]:
        """The constructor's parameters (what a config's ``transfer.params`` holds)."""
        return {}


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``generator`` (for the Beta draws torch cannot take a generator for)."""
    return np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}", hint=f"pass a probability, e.g. {name}=0.5.")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{name} must be a positive number, got {value!r}", hint=f"e.g. {name}=1.0.")
    return float(value)


def _check_non_negative(name: str, value: float) -> float:
    if not value >= 0 or not math.isfinite(value):
        raise ConfigError(f"{name} must be >= 0, got {value!r}", hint=f"pass {name}=0 to turn it off.")
    return float(value)


class Munge(TransferGenerator):
    r"""MUNGE (Bucila, Caruana & Niculescu-Mizil 2006, Algorithm 1): each row and its nearest neighbour swap
    attributes.

    For a row :math:`e` and a neighbour :math:`e'` (the nearest one; with ``neighbours=k`` one of the k nearest,
    drawn uniformly), each attribute :math:`a` is, with probability ``p``, replaced in both rows:

    .. math::
        \sigma_a = |e_a - e'_a| / s,\qquad e_a \leftarrow \mathcal{N}(e'_a, \sigma_a),\qquad
        e'_a \leftarrow \mathcal{N}(e_a, \sigma_a)

    for a continuous attribute, and by the other row's value (a swap, no noise) for a ``categorical`` one, so a
    category never takes a value the data do not have. Distances, as in the paper: Euclidean over the continuous
    columns, each scaled linearly to [0, 1] by its range over the fitted rows, and Hamming over the categorical
    ones (their squares summed: squared Euclidean plus the number of categorical columns that differ). A pool of
    n rows is ceil(n / 2) such pairs, each row of the training set starting about as many pairs (the paper's passes
    over the data).

    Departure, named: the paper walks the rows one after the other and modifies both rows in place, so later pairs
    start from already modified values; here every pair starts from the original rows (a vectorised pass). Each
    modified row is one draw from the same per-attribute distribution; only the chains of repeated modifications of
    one row within a pass are left out. ``transform`` (live mode) returns only the :math:`e` side of each pair.

    Args:
        p: probability that an attribute is swapped or perturbed, in [0, 1].
        s: the noise's divisor, > 0 (larger: less noise around the neighbour's value).
        neighbours: k, draw the partner among the k nearest rows (1: the paper's nearest neighbour).
        categorical: the categorical columns, by position or by name (names need the training rows as a
            DataFrame, or ``feature_names`` at ``fit``).
    """

    name = "munge"

    def __init__(
        self, p: float = 0.5, s: float = 10.0, neighbours: int = 1, categorical: Sequence[int | str] = ()
    ) -> None:
        self.p = _check_probability("p", p)
        self.s = _check_positive("s", s)
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ConfigError(f"neighbours must be a whole number >= 1, got {neighbours!r}", hint="1 is the paper's.")
        self.neighbours = neighbours
        self.categorical = tuple(categorical)
        self.neighbours_: torch.Tensor | None = None
        self.categorical_mask_: torch.Tensor | None = None
        self.scale_: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"p": self.p, "s": self.s, "neighbours": self.neighbours, "categorical": list(self.categorical)}

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        seed: int = 0,
        feature_names: Sequence[str] | None = None,
    ) -> Munge:
        super().fit(x, y, seed=seed, feature_names=feature_names)
        flat = self._fitted().reshape(len(x), -1)
        if self.neighbours > len(flat) - 1:
            raise DataError(
                f"MUNGE asks for {self.neighbours} neighbours per row, but there are only {len(flat)} rows "
                f"({len(flat) - 1} other rows per row)",
                hint=f"pass neighbours <= {len(flat) - 1}, or more rows.",
            )
        self.categorical_mask_ = _categorical_mask(self.categorical, flat.shape[1], feature_names)
        spread = flat.amax(dim=0) - flat.amin(dim=0)  # the paper scales continuous attributes to [0, 1]
        self.scale_ = torch.where(spread > 0, spread, torch.ones_like(spread))
        self.neighbours_ = _nearest(flat, flat, self.neighbours, self._distance, exclude_self=True)
        return self

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(len(a), len(b)) squared Euclidean distance over range-scaled continuous columns + categorical mismatches."""
        assert self.categorical_mask_ is not None and self.scale_ is not None
        continuous = ~self.categorical_mask_
        scaled_a, scaled_b = a[:, continuous] / self.scale_[continuous], b[:, continuous] / self.scale_[continuous]
        distance = torch.cdist(scaled_a, scaled_b).square()
        if bool(self.categorical_mask_.any()):
            cat_a, cat_b = a[:, self.categorical_mask_], b[:, self.categorical_mask_]
            distance = distance + (cat_a[:, None, :] != cat_b[None, :, :]).sum(-1)
        return distance

    def _swap(
        self, e: torch.Tensor, partner: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both modified rows of each pair (pairs, features): attributes chosen with probability p swap (categorical)
        or are drawn around the other row's value with sd |e_a - e'_a| / s (continuous)."""
        assert self.categorical_mask_ is not None
        chosen = torch.rand(e.shape, generator=generator) < self.p
        sd = (e - partner).abs() / self.s
        noise_e = torch.randn(e.shape, generator=generator) * sd
        noise_partner = torch.randn(e.shape, generator=generator) * sd
        categorical = self.categorical_mask_.expand_as(e)
        new_e = torch.where(categorical, partner, partner + noise_e)
        new_partner = torch.where(categorical, e, e + noise_partner)
        return torch.where(chosen, new_e, e), torch.where(chosen, new_partner, partner)

    def _partners(self, neighbours: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(neighbours.shape[1], (len(neighbours),), generator=generator)
        return neighbours[torch.arange(len(neighbours)), pick]

    def sample(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        x = self._fitted()
        assert self.neighbours_ is not None
        flat = x.reshape(len(x), -1)
        pairs = math.ceil(rows / 2)
        passes = math.ceil(pairs / len(flat))
        starts = torch.cat([torch.randperm(len(flat), generator=generator) for _ in range(passes)])[:pairs]
        partners = self._partners(self.neighbours_[starts], generator)
        new_e, new_partner = self._swap(flat[starts], flat[partners], generator)
        out = torch.stack([new_e, new_partner], dim=1).reshape(-1, flat.shape[1])[:rows]
        return out.reshape(rows, *x.shape[1:])

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        fitted = self._fitted()
        flat, fitted_flat = x.detach().float().cpu().reshape(len(x), -1), fitted.reshape(len(fitted), -1)
        neighbours = _nearest(flat, fitted_flat, self.neighbours, self._distance, exclude_self=True, zero_is_self=True)
        new_e, _ = self._swap(flat, fitted_flat[self._partners(neighbours, generator)], generator)
        return new_e.reshape(x.shape).to(x.device, x.dtype)


def _categorical_mask(
    categorical: Sequence[int | str], features: int, feature_names: Sequence[str] | None
) -> torch.Tensor:
    """(features,) bool, True at the categorical columns; an unknown name or an out-of-range position is an error."""
    mask = torch.zeros(features, dtype=torch.bool)
    names = None if feature_names is None else [str(name) for name in feature_names]
    for column in categorical:
        if isinstance(column, str):
            if names is None:
                raise DataError(
                    f"categorical column {column!r} is named, but the training rows have no column names",
                    hint="pass the training rows as a DataFrame with named columns, or give column positions (ints).",
                )
            if column not in names:
                close = difflib.get_close_matches(column, names, n=1)
                raise DataError(
                    f"categorical column {column!r} does not exist; the columns are {names[:20]}",
                    hint=(f"did you mean {close[0]!r}? " if close else "") + "name columns the training rows have.",
                )
            mask[names.index(column)] = True
        elif isinstance(column, (int, np.integer)) and not isinstance(column, bool):
            if not -features <= int(column) < features:
                raise DataError(
                    f"categorical column {int(column)} does not exist: the rows have {features} columns",
                    hint=f"give positions 0..{features - 1}.",
                )
            mask[int(column)] = True
        else:
            raise DataError(
                f"a categorical column is a position (int) or a name (str), got {column!r}",
                hint="e.g. categorical=[0, 3] or categorical=['colour'].",
            )
    return mask


def _nearest(
    queries: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    distance: Any,
    *,
    exclude_self: bool,
    zero_is_self: bool = False,
) -> torch.Tensor:
    """(len(queries), k) positions in ``rows`` of each query's k nearest rows, in blocks of :data:`_CHUNK` queries.
    ``exclude_self``: a query is not its own neighbour (its own position when the queries are the rows; with
    ``zero_is_self``, any row at distance 0, for batches drawn from the rows)."""
    found = []
    for first in range(0, len(queries), _CHUNK):
        block = distance(queries[first : first + _CHUNK], rows)
        if exclude_self and not zero_is_self:
            positions = torch.arange(first, first + len(block))
            block[torch.arange(len(block)), positions] = float("inf")
        elif exclude_self:
            block = block.masked_fill(block <= 0, float("inf"))
        found.append(block.topk(k, dim=1, largest=False).indices)
    return torch.cat(found)


class Mixup(TransferGenerator):
    r"""Convex combinations of two rows: :math:`\tilde x = \lambda x_i + (1 - \lambda) x_j`, with
    :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` drawn per row (Zhang et al. 2018; as a transfer set the
    teacher labels :math:`\tilde x`, so no label mixing is needed). Any row shape: vectors, signals, images.

    ``sample`` pairs training rows drawn uniformly with replacement; ``transform`` pairs each row of a batch with
    another row of the same batch (a random permutation).

    Args:
        alpha: the Beta distribution's parameter, > 0 (1: λ uniform in [0, 1]; small: rows stay near one end).
    """

    name = "mixup"

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _check_positive("alpha", alpha)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def _mix(self, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        lam = torch.as_tensor(_numpy_rng(generator).beta(self.alpha, self.alpha, size=len(a)), dtype=a.dtype)
        lam = lam.to(a.device).reshape(-1, *([1] * (a.ndim - 1)))
        return lam * a + (1.0 - lam) * b

    def sample(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        x = self._fitted()
        first = torch.randint(len(x), (rows,), generator=generator)
        second = torch.randint(len(x), (rows,), generator=generator)
        return self._mix(x[first], x[second], generator)

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        return self._mix(x, x[order], generator)


class Jitter(TransferGenerator):
    r"""Label-preserving perturbations of a row, for vectors and series:

    .. math::
        \tilde x = \mathrm{roll}(c \cdot x, \delta) + \epsilon,\qquad c \sim U(1 - r, 1 + r),\quad
        \delta \sim U\{-m, \dots, m\},\quad \epsilon_f \sim \mathcal{N}(0, (\nu\,\sigma_f)^2)

    where :math:`\sigma_f` is feature f's standard deviation over the fitted rows, ``noise`` is ν, ``scale`` is r and
    ``shift`` is m (a circular shift along the last axis, for signals; 0 for tabular vectors).

    Args:
        noise: the noise's standard deviation in units of each feature's, >= 0.
        scale: the amplitude's relative range r, in [0, 1).
        shift: the largest circular shift m along the last axis, in steps, >= 0.
    """

    name = "jitter"

    def __init__(self, noise: float = 0.1, scale: float = 0.0, shift: int = 0) -> None:
        self.noise = _check_non_negative("noise", noise)
        self.scale = _check_non_negative("scale", scale)
        if self.scale >= 1:
            raise ConfigError(f"scale must be in [0, 1), got {scale!r}", hint="e.g. scale=0.1 (amplitudes x0.9-1.1).")
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ConfigError(f"shift must be a whole number >= 0, got {shift!r}", hint="0 for tabular rows.")
        self.shift = shift
        self.std_: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"noise": self.noise, "scale": self.scale, "shift": self.shift}

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        seed: int = 0,
        feature_names: Sequence[str] | None = None,
    ) -> Jitter:
        super().fit(x, y, seed=seed, feature_names=feature_names)
        self.std_ = self._fitted().std(dim=0)
        return self

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        std = self.std_ if self.std_ is not None else x.detach().float().cpu().std(dim=0)
        out = x.detach().float().cpu()
        rows = len(out)
        if self.scale > 0:
            factor = 1.0 + self.scale * (2.0 * torch.rand(rows, generator=generator) - 1.0)
            out = out * factor.reshape(-1, *([1] * (out.ndim - 1)))
        if self.shift > 0:
            length = out.shape[-1]
            offsets = torch.randint(-self.shift, self.shift + 1, (rows,), generator=generator)
            positions = (torch.arange(length)[None, :] - offsets[:, None]) % length  # (rows, length)
            index = positions.reshape(rows, *([1] * (out.ndim - 2)), length).expand_as(out)
            out = out.gather(-1, index)
        if self.noise > 0:
            out = out + torch.randn(out.shape, generator=generator) * (self.noise * std)
        return out.to(x.device, x.dtype)


class ClassGaussian(TransferGenerator):
    r"""A Gaussian per class (``components=1``) or a Gaussian mixture per class, fitted on the labelled rows; a
    sampled row's class is drawn with the training rows' class frequencies. Rows of any shape are flattened.

    With one component, each class c gets its mean :math:`\mu_c` and the covariance shrunk toward its diagonal
    (few labelled rows make the sample covariance :math:`S_c` singular):

    .. math::
        \Sigma_c = (1 - \rho)\,S_c + \rho\,\mathrm{diag}(S_c) + \epsilon I,\qquad \tilde x = \mu_c + L_c z,\quad
        L_c L_c^\top = \Sigma_c,\ z \sim \mathcal{N}(0, I)

    with ρ = ``shrinkage`` and ε = 1e-6 × the mean variance. With ``components=K`` > 1, scikit-learn's
    ``GaussianMixture`` (full covariances, ``reg_covar`` added to their diagonals, seeded from ``fit``'s seed) is
    fitted per class with min(K, rows of the class) components, and rows are drawn from its weights, means and
    covariances with the torch generator. Without labels (or with float targets, a regression), one group holds
    every row.

    Args:
        components: Gaussians per class, >= 1.
        shrinkage: ρ in [0, 1] (one component only).
        reg_covar: added to the mixture's covariance diagonals (several components), > 0.
    """

    name = "class_gaussian"

    def __init__(self, components: int = 1, shrinkage: float = 0.1, reg_covar: float = 1e-3) -> None:
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ConfigError(f"components must be a whole number >= 1, got {components!r}", hint="1: one Gaussian.")
        self.components = components
        self.shrinkage = _check_probability("shrinkage", shrinkage)
        self.reg_covar = _check_positive("reg_covar", reg_covar)
        self.groups_: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (weights, means, cholesky)
        self.group_weights_: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"components": self.components, "shrinkage": self.shrinkage, "reg_covar": self.reg_covar}

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        seed: int = 0,
        feature_names: Sequence[str] | None = None,
    ) -> ClassGaussian:
        super().fit(x, y, seed=seed, feature_names=feature_names)
        flat = self._fitted().reshape(len(x), -1).double()
        if y is None or y.is_floating_point():
            groups = [flat]
        else:
            if len(y) != len(flat):
                raise DataError(f"ClassGaussian got {len(flat)} rows but {len(y)} labels", hint="pass one per row.")
            labels = y.cpu()
            groups = [flat[labels == value] for value in torch.unique(labels)]
        self.groups_ = [self._fit_group(group, seed) for group in groups]
        self.group_weights_ = torch.tensor([len(group) for group in groups], dtype=torch.float64)
        return self

    def _fit_group(self, rows: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.components == 1 or len(rows) < 2:
            mean = rows.mean(0)
            centred = rows - mean
            sample_cov = centred.T @ centred / max(1, len(rows) - 1)
            cov = (1 - self.shrinkage) * sample_cov + self.shrinkage * torch.diag(torch.diagonal(sample_cov))
            eps = 1e-6 * max(float(torch.diagonal(sample_cov).mean()), 1e-12)
            cov = cov + eps * torch.eye(len(mean), dtype=cov.dtype)
            return torch.ones(1, dtype=torch.float64), mean[None], _cholesky(cov)[None]
        from sklearn.mixture import GaussianMixture

        mixture = GaussianMixture(
            n_components=min(self.components, len(rows)),
            covariance_type="full",
            reg_covar=self.reg_covar,
            random_state=seed,
        ).fit(rows.numpy())
        weights = torch.as_tensor(mixture.weights_, dtype=torch.float64)
        means = torch.as_tensor(mixture.means_, dtype=torch.float64)
        chol = torch.stack([_cholesky(torch.as_tensor(cov)) for cov in mixture.covariances_])
        return weights, means, chol

    def sample(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        x = self._fitted()
        assert self.group_weights_ is not None
        group_of = torch.multinomial(self.group_weights_, rows, replacement=True, generator=generator)
        features = x.reshape(len(x), -1).shape[1]
        out = torch.empty(rows, features, dtype=torch.float64)
        for group, (weights, means, chol) in enumerate(self.groups_):
            where = (group_of == group).nonzero().flatten()
            if not len(where):
                continue
            component = torch.multinomial(weights, len(where), replacement=True, generator=generator)
            z = torch.randn(len(where), features, generator=generator, dtype=torch.float64)
            out[where] = means[component] + torch.einsum("rij,rj->ri", chol[component], z)
        return out.float().reshape(rows, *x.shape[1:])

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``len(x)`` rows drawn from the fitted Gaussians (the batch's own values are not used)."""
        return self.sample(len(x), generator).to(x.device, x.dtype)


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of a covariance, with growing jitter on its diagonal until it is positive definite."""
    jitter = 0.0
    scale = max(float(torch.diagonal(cov).mean()), 1e-12)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(len(cov), dtype=cov.dtype))
        if int(info) == 0:
            return factor
        jitter = scale * 1e-6 if jitter == 0.0 else jitter * 10
    raise DataError(
        "a class covariance is not positive definite even with jitter",
        hint="raise shrinkage (ClassGaussian(shrinkage=0.5)) or check for constant features.",
    )
