r"""The statistics every effect is reported with; nothing else in the package computes them.

* :func:`bootstrap` — the mean of per-problem outcomes (or a paired difference of two
  conditions) with a percentile bootstrap interval over problems. A paired difference resamples
  problem indices once per replicate and uses the same resample for both conditions. A
  condition with several random draws (``[n_draws, n_problems]``) resamples draws too (a
  two-level bootstrap); with one draw this is the plain problem bootstrap.
* :func:`null_rank` — where an effect falls among the effects of comparison sets (a null): its
  percentile in the predicted direction, and the rank p-value ``(1 + #{null >= effect}) / (1 + n)``.
  This is a rank against random sets, not a permutation test of the reward.
* :func:`predicted_direction` — the direction-of-effect rule: scaling a selected set by
  ``gamma < 1`` (removing it) should lower the outcome it was selected for, ``gamma > 1``
  (amplifying it) should raise it, and ``gamma = 1`` is the unsteered model (no prediction).
* :func:`area_under_curve` — the mean effect over a deletion or insertion curve's k values.
* :func:`effective_sample_size` — ``(sum w)^2 / sum w^2`` of a group of importance weights.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def bootstrap(x: np.ndarray, y: np.ndarray | None = None, n_boot: int = 2000, confidence: float = 0.95,
              seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``x`` (minus mean of ``y``) over problems, with a percentile bootstrap interval.

    ``x`` and ``y`` are per-problem outcomes ``[n_problems]``, or ``[n_draws, n_problems]`` when a
    condition has several random draws (each replicate then also resamples draws). ``y`` is
    paired with ``x``: both use the same resampled problem indices in every replicate.
    """
    x = np.atleast_2d(np.asarray(x, dtype=float))
    n = x.shape[1]
    if y is not None:
        y = np.atleast_2d(np.asarray(y, dtype=float))
        if y.shape[1] != n:
            raise ValueError(f"paired bootstrap needs the same problems: {n} vs {y.shape[1]}")
    if n == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    # A resample of problem indices is the same as multinomial counts over problems.
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float) / n  # [B, n]
    stat = _replicates(x, counts, rng)
    point = float(x.mean())
    if y is not None:
        stat = stat - _replicates(y, counts, rng)
        point -= float(y.mean())
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(stat, [alpha, 1.0 - alpha])
    return point, float(lo), float(hi)


def _replicates(x: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    draws = x.shape[0]
    if draws == 1:
        per_problem = np.broadcast_to(x[0], counts.shape)
    else:  # resample draws too: weights = multinomial counts over draws
        weights = rng.multinomial(draws, np.full(draws, 1.0 / draws), size=counts.shape[0]) / draws  # [B, D]
        per_problem = weights @ x  # [B, n]
    return (per_problem * counts).sum(axis=1)


def predicted_direction(gamma: float, metric_direction: int = 1) -> int:
    """+1 when scaling a selected set by ``gamma`` should raise the metric, -1 when it should lower it, 0 at
    ``gamma = 1`` (the unsteered model). ``metric_direction`` is -1 for a metric the reward wants lower."""
    if gamma == 1.0:
        return 0
    return metric_direction * (1 if gamma > 1 else -1)


def null_rank(effect: float, null: Sequence[float], direction: int) -> tuple[float, float]:
    """The effect's percentile among the ``null`` effects (in the predicted ``direction``) and its rank p-value.

    ``direction`` +1: a larger effect is the predicted one; -1: a smaller one. The p-value counts null
    sets at least as extreme, with the usual +1 (the evaluated set is one more draw under the
    hypothesis that it is no different from the null's sets). It ranks the set against random sets;
    it is not a permutation test of the reward.
    """
    null = np.asarray(null, dtype=float) * direction
    e = effect * direction
    percentile = float((null < e).mean() * 100 + (null == e).mean() * 50)
    p = float((1 + (null >= e).sum()) / (1 + len(null)))
    return percentile, p


def area_under_curve(values: Sequence[float], base: float) -> float:
    """Mean of ``value - base`` over the curve's k values: the area under it, per step of the k list."""
    return float(np.mean(np.asarray(values, dtype=float) - base))


def effective_sample_size(weights) -> float:
    """``(sum w)^2 / sum w^2`` of one group of importance weights (a numpy array, a list or a torch tensor,
    computed in the weights' own library so that the result does not depend on a conversion)."""
    w = np.asarray(weights, dtype=float) if isinstance(weights, (list, tuple)) else weights
    squares = (w * w).sum()
    return float(w.sum() ** 2 / squares) if float(squares) > 0 else math.nan
