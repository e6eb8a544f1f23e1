r"""Integrated Policy Gradient (IPG) over SAE latents, and the baselines it is judged against.

The specification is ``docs/ipg-method.md``. One module per concept, in the order data flows:

* :mod:`~ipg_sae.attribution.path`: quadrature nodes and weights on [0, 1], advantages (the maths);
* :mod:`~ipg_sae.attribution.config`: :class:`AttributionConfig` and the method names;
* :mod:`~ipg_sae.attribution.engine`: :class:`IPGEngine`, the passes over one prompt's group;
* :mod:`~ipg_sae.attribution.baselines`: ``act``, ``reason_words``, ``grad_x_act``, ``ig_likelihood``, ``random``;
* :mod:`~ipg_sae.attribution.result`: :class:`AttributionResult`, its files and its tensor keys;
* :mod:`~ipg_sae.attribution.accumulate`: checkpoints, resume and shard merging;
* :mod:`~ipg_sae.attribution.run`: the driver, :func:`attribute` and :func:`run_attribution`.

Typical use::

    from ipg_sae.attribution import attribute
    result = attribute(model, {15: sae}, trajectories, n_steps=16, tokenizer=tokenizer)
    result.attributions[15]  # [prompts, d_sae]
    result.delta             # per-trajectory relative completeness gap
"""

from ..lazy import lazy_exports
from .config import GRADIENT_METHODS, METHOD_NAMES, REASON_WORDS, AttributionConfig, Baseline
from .rules import ADVANTAGES, METHODS, Advantage, Method, quadrature

# The torch modules load on first use (PEP 562), so that importing the config above, e.g. to build a
# command's flags for `ipg-sae CMD --help`, does not import torch; `from ipg_sae.attribution import X`
# works for every name as before.
_LAZY = {"CleanPass": "engine", "GroupAttribution": "engine", "IPGEngine": "engine", "NodeGrads": "engine",
         "advantages": "path", "RESULT_FILE": "result", "SIDECAR_FILE": "result", "AttributionResult": "result",
         "IPGWarning": "run", "attribute": "run", "run_attribution": "run"}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "ADVANTAGES", "METHODS", "METHOD_NAMES", "GRADIENT_METHODS", "REASON_WORDS", "RESULT_FILE", "SIDECAR_FILE",
    "Advantage", "Baseline", "Method", "AttributionConfig", "AttributionResult", "CleanPass", "GroupAttribution",
    "IPGEngine", "IPGWarning", "NodeGrads", "advantages", "attribute", "quadrature",
    "run_attribution",
]
