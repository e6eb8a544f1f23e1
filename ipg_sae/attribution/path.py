r"""The path maths of IPG: quadrature on [0, 1] and per-group advantages (``docs/ipg-method.md`` §3).

IPG integrates the policy gradient of ``F(c) = sum_g A_g log pi(tau_g | x; c)`` along the
straight gate path ``c = alpha * 1``, ``alpha: 0 -> 1``:

    IPG_i(x) = (1/G) * sum_k w_k * dF/dc_i |_{c = alpha_k * 1}

* :func:`quadrature` gives the nodes ``alpha_k`` and weights ``w_k`` (summing to 1) under
  captum's method names: ``gausslegendre`` (default; exact for polynomials of degree
  ``2 n - 1``) and ``riemann_left|right|middle|trapezoid``.
* :func:`advantages` gives ``A_g`` for one group of rewards: ``rloo`` (leave-one-out,
  unbiased; default), ``mean``, ``grpo`` (z-score; what the paper used), ``none`` (the raw
  reward) and ``correct`` (1 on rewarded samples, 0 elsewhere: the likelihood baselines). A
  group whose rewards are all equal has zero advantage under the centred kinds.

Pure functions of numbers: nothing here touches a model.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from ..errors import IPGError

Method = Literal["gausslegendre", "clenshaw_curtis", "riemann_left", "riemann_right", "riemann_middle",
                 "riemann_trapezoid"]
Advantage = Literal["rloo", "mean", "grpo", "none", "correct"]

METHODS: tuple[str, ...] = get_args(Method)
ADVANTAGES: tuple[str, ...] = get_args(Advantage)


def quadrature(n_steps: int, method: Method = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes and weights on [0, 1].

    Args:
        n_steps: number of nodes (at least 1; at least 2 for ``riemann_trapezoid``).
        method: one of :data:`METHODS`.

    Returns:
        ``(nodes, weights)``: float64 arrays of length ``n_steps``, nodes in [0, 1], weights
        summing to 1.
    """
    k = np.arange(n_steps, dtype=np.float64)
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return (x + 1) / 2, w / 2
    if method == "clenshaw_curtis":
        if n_steps < 2:
            raise IPGError("clenshaw_curtis needs n_steps >= 2 (its nodes include both ends of the path)")
        return clenshaw_curtis(n_steps)
    if method == "riemann_left":
        return k / n_steps, np.full(n_steps, 1 / n_steps)
    if method == "riemann_right":
        return (k + 1) / n_steps, np.full(n_steps, 1 / n_steps)
    if method == "riemann_middle":
        return (k + 0.5) / n_steps, np.full(n_steps, 1 / n_steps)
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise IPGError("riemann_trapezoid needs n_steps >= 2")
        w = np.full(n_steps, 1 / (n_steps - 1))
        w[0] = w[-1] = 0.5 / (n_steps - 1)
        return k / (n_steps - 1), w
    raise IPGError(f"unknown quadrature method {method!r}; use one of {', '.join(METHODS)}")


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
    if g < 2 or torch.all(r == r[0]):
        return torch.zeros_like(r)
    if kind == "rloo":
        return r - (r.sum() - r) / (g - 1)
    if kind == "mean":
        return r - r.mean()
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-6)  # grpo


def clenshaw_curtis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Clenshaw-Curtis nodes ``u_j = (1 - cos(pi j / (n - 1))) / 2``, ``j = 0..n-1``, and weights on [0, 1].

    Exact for polynomials of degree ``n - 1`` (``n`` when ``n`` is odd). The rules with
    ``n = 2^m + 1`` points are nested: each contains every node of the ones before it, which
    is what lets adaptive attribution reuse its earlier node passes.
    """
    N = n - 1
    j = np.arange(n)
    theta = np.pi * j / N
    w = np.zeros(n)
    for i, t in enumerate(theta):
        total = 1.0
        for k in range(1, N // 2 + 1):
            b = 1.0 if 2 * k == N else 2.0
            total -= b * np.cos(2 * k * t) / (4 * k * k - 1)
        w[i] = (1.0 if i in (0, N) else 2.0) * total / N
    return (1 - np.cos(theta)) / 2, w / 2


def nested_levels(max_nodes: int, power: float = 1.0, first: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """The nested Clenshaw-Curtis rules with ``2^m + 1`` points, ``first <= 2^m + 1 <= max_nodes``, on the path.

    With ``power`` ``p`` the rule integrates in ``u`` with ``alpha = u^p``
    (``int_0^1 f(alpha) d alpha = int_0^1 f(u^p) p u^(p-1) du``), which puts more nodes near
    ``alpha = 0``, where removing every latent moves the model furthest. Nodes with weight 0
    (``u = 0`` when ``p > 1``) are dropped. Every level holds the nodes of the levels before
    it, bit for bit, so an adaptive run evaluates each node once.

    Returns:
        ``[(alpha_nodes, weights), ...]`` from coarse to fine.
    """
    if power < 1:
        raise IPGError(f"attribution.path_power is {power}; use 1 (straight) or more (nodes packed near alpha = 0)")
    sizes = [n for n in (2 ** m + 1 for m in range(1, 12)) if first <= n <= max_nodes]
    if not sizes:
        raise IPGError(f"attribution.max_nodes is {max_nodes}; adaptive quadrature needs at least {first} nodes")
    levels = []
    for n in sizes:
        u, w = clenshaw_curtis(n)
        alpha, weight = u ** power, w * power * u ** (power - 1) if power != 1 else w
        keep = weight != 0
        levels.append((alpha[keep], weight[keep]))
    return levels
