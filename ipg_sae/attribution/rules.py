"""The quadrature rules on [0, 1] and the names of the rules and advantages (``docs/ipg-method.md`` §3).

Numpy only, apart from :mod:`~ipg_sae.attribution.path` (which re-exports every name here), so that
:class:`~ipg_sae.attribution.config.AttributionConfig` checks its ``method`` and ``advantage`` without
importing torch (``ipg-sae CMD --help`` and a config's typo answer at once).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from ..errors import IPGError

Method = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
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
