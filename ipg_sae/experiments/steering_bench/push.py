"""Comparisons at matched push (issue 37): beside each recipe's best dev setting, the setting of the same recipe
whose realised KL per token on off-task text matches the reference recipe's (the IPG-weighted step's chosen
setting), so that "recipe A beats recipe B" is not "A pushes harder".

Each tuned kind with a push knob (:data:`KNOBS`: ``eta`` for the weighted steps, ``gamma`` for top-k scaling,
``alpha`` for DiffMean) is moved along the line from its neutral value (no intervention: ``eta`` 0, ``gamma`` 1,
``alpha`` 0) through its chosen value: ``knob = neutral + t (chosen - neutral)``, ``t`` found by bracketing and
bisection (:func:`match_push`) until the realised KL is within ``match_rtol`` of the target. Prompting has no
push (its KL is 0 by construction) and the untuned nulls mirror a chosen setting: neither is matched. The
matching reads the off-task text and the chosen settings only (never test), and each matched recipe is then run
on-policy on test and transfer like the chosen ones, named ``method@push``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...errors import IPGError
from .recipes import KINDS, Recipe, kind_of

KNOBS = {"eta": 0.0, "gamma": 1.0, "alpha": 0.0}  # push knob -> its neutral value
SUFFIX = "@push"


@dataclass
class Match:
    t: float  # the multiple of the chosen displacement from neutral
    kl: float  # realised KL per token at t
    matched: bool  # within the tolerance of the target
    evaluations: int


def match_push(kl_of: Callable[[float], float], target: float, rtol: float = 0.1, t_max: float = 64.0,
               max_evaluations: int = 40) -> Match:
    """The ``t`` at which ``kl_of(t)`` (0 at ``t = 0``, growing with ``t``) is within ``rtol`` of ``target``: from
    ``t = 1`` double or halve to bracket the target, then bisect (in log t). Unreachable targets (the KL saturates
    below it by ``t_max``) give the closest ``t`` tried, ``matched`` False."""
    if target <= 0:
        raise IPGError(f"the target KL is {target}; push matching needs a reference recipe that moves the model")
    seen: dict[float, float] = {}

    def kl(t: float) -> float:
        if t not in seen:
            seen[t] = float(kl_of(t))
        return seen[t]

    def close(t: float) -> bool:
        return abs(kl(t) - target) <= rtol * target

    lo, hi = 0.0, None
    t = 1.0
    while len(seen) < max_evaluations:
        if close(t):
            return Match(t, kl(t), True, len(seen))
        if kl(t) < target:
            lo = t
            if hi is None:
                if t >= t_max:
                    break
                t = min(2 * t, t_max)
                continue
        else:
            hi = t
        t = (lo * hi) ** 0.5 if lo > 0 else hi / 2
    best = min(seen, key=lambda s: abs(seen[s] - target))
    return Match(best, seen[best], abs(seen[best] - target) <= rtol * target, len(seen))


def knob(recipe: Recipe) -> str | None:
    """The push knob of a recipe's setting (None: prompting, or a kind without one)."""
    return next((k for k in KNOBS if k in recipe.setting), None) if recipe.interventions else None


def at_multiple(recipe: Recipe, t: float, ing) -> Recipe:
    """``recipe``'s kind at ``knob = neutral + t (chosen - neutral)`` (the other settings kept)."""
    name = knob(recipe)
    neutral = KNOBS[name]
    setting = {**recipe.setting, name: float(f"{neutral + t * (recipe.setting[name] - neutral):.4g}")}
    return KINDS[kind_of(recipe.method)].build(recipe.method, setting, ing)


def matched_recipes(chosen: dict[str, Recipe], reference: str, ing, cost: Callable[[Recipe], float],
                    rtol: float, methods: list[str] | None = None) -> dict:
    """Per chosen recipe with a push knob (the reference too, as a check): the setting whose ``cost`` (KL per token
    on the matching text) is within ``rtol`` of the reference's; ``matched.json``'s contents."""
    if reference not in chosen:
        raise IPGError(f"steering_bench.match_reference {reference!r} is not a tuned method of this run; add it to "
                       "methods or name another")
    target = cost(chosen[reference])
    out = {"reference": reference, "target_kl": target, "rtol": rtol, "recipes": {}}
    for name, recipe in chosen.items():
        if knob(recipe) is None or (methods and kind_of(name) not in methods and name != reference):
            continue
        m = match_push(lambda t: cost(at_multiple(recipe, t, ing)), target, rtol)
        final = at_multiple(recipe, m.t, ing)  # the setting as stored (rounded): its own KL
        kl = cost(final)
        out["recipes"][name + SUFFIX] = {"method": recipe.method, "setting": final.setting, "label": final.label,
                                         "t": m.t, "kl": kl, "matched": abs(kl - target) <= rtol * target,
                                         "chosen_kl": cost(recipe)}
    return out
