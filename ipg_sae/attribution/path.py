r"""The path maths of IPG: quadrature on [0, 1] and per-group advantages (``docs/ipg-method.md`` §3).

IPG integrates the policy gradient of ``F(c) = sum_g A_g log pi(tau_g | x; c)`` along the
straight gate path ``c = alpha * 1``, ``alpha: 0 -> 1``:

    IPG_i(x) = (1/G) * sum_k w_k * dF/dc_i |_{c = alpha_k * 1}

* :func:`quadrature` (defined in :mod:`~ipg_sae.attribution.rules`, numpy only) gives the nodes
  ``alpha_k`` and weights ``w_k`` (summing to 1) under captum's method names: ``gausslegendre``
  (default; exact for polynomials of degree ``2 n - 1``) and ``riemann_left|right|middle|trapezoid``.
* :func:`simpson_weights` gives the composite Simpson rule of a set of panels: the rules of
  adaptive attribution, which bisects the panel with the largest error (see
  :meth:`~ipg_sae.attribution.engine.IPGEngine.attribute_group_adaptive`).
* :func:`advantages` gives ``A_g`` for one group of rewards: ``rloo`` (leave-one-out,
  unbiased; default), ``mean``, ``grpo`` (z-score; what the paper used), ``none`` (the raw
  reward) and ``correct`` (1 on rewarded samples, 0 elsewhere: the likelihood baselines). A
  group whose rewards are all equal has zero advantage under the centred kinds.

Pure functions of numbers: nothing here touches a model.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import IPGError
# The rules and names live in a numpy-only module (configs check them without torch); re-exported here.
from .rules import ADVANTAGES, METHODS, Advantage, Method, quadrature  # noqa: F401


VARIANCE_RTOL = 1e-9  # rewards closer than this, relative to their scale, are equal (float noise is no signal)


def has_variance(rewards) -> bool:
    """True when a group's rewards differ by more than float noise: a spread above ``VARIANCE_RTOL`` times
    the rewards' scale (their largest magnitude, at least 1)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.numel() < 2:
        return False
    spread = float(r.max() - r.min())
    return spread > VARIANCE_RTOL * max(1.0, float(r.abs().max()))


def advantages(rewards: torch.Tensor, kind: Advantage = "rloo") -> torch.Tensor:
    """Per-sample advantages of one group of rewards.

    Args:
        rewards: ``[G]`` rewards of the samples of one prompt.
        kind: one of :data:`ADVANTAGES` (see the module docstring).

    Returns:
        ``[G]`` float64 advantages (all zero for a centred kind when the rewards are all equal
        or ``G < 2``).
    """
    r = rewards.to(torch.float64)
    g = r.numel()
    if kind == "none":
        return r.clone()
    if kind == "correct":  # likelihood baselines: weight 1 on rewarded samples only
        return (r > 0).to(torch.float64)
    if kind not in ADVANTAGES:
        raise IPGError(f"unknown advantage {kind!r}; use one of {', '.join(ADVANTAGES)}")
    if not has_variance(r):
        return torch.zeros_like(r)
    if kind == "rloo":
        return r - (r.sum() - r) / (g - 1)
    if kind == "mean":
        return r - r.mean()
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-6)  # grpo


def simpson_weights(panels: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Composite Simpson nodes and weights on [0, 1] for a set of panels that tile it.

    Each panel ``[a, b]`` uses ``a``, its midpoint and ``b`` with weights ``(b - a) / 6 * (1, 4, 1)``;
    shared ends add up. Exact for cubics on every panel. Bisecting a panel adds two nodes (its
    quarter points) and keeps every node already evaluated: the rules are nested.

    Returns:
        ``(nodes, weights)`` sorted by node, float64.
    """
    acc: dict[float, float] = {}
    for a, b in panels:
        h = (b - a) / 6
        for x, w in ((a, h), ((a + b) / 2, 4 * h), (b, h)):
            acc[x] = acc.get(x, 0.0) + w
    nodes = np.array(sorted(acc))
    return nodes, np.array([acc[x] for x in nodes])
