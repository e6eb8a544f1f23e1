"""Steering recipes: one method at one setting (:class:`Recipe`: the interventions and/or the system prompt it
steers with), and the registry of methods (:data:`KINDS`): for each, how it steers at one setting, every setting it
may try (its grid) and its group (``ipg``: built from IPG's scores; ``practice``: what practitioners use today;
``baseline``: another attribution's top k; ``null``: not tuned, mirroring another method's chosen setting).

A new recipe is one :func:`register` call: the benchmark tunes it on dev, evaluates its chosen setting on test and
transfer, costs it, compares it with its group's rivals and reports it, with no other edit (list it in
``steering_bench.methods``, or ``nulls`` for a null).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ...attribution import AttributionResult
from ...errors import IPGError
from ...nulls import LatentPool, draw_sets
from ...selection import select
from ...steering import VectorIntervention, add_vector, scale
from ...vectors import ipg_weighted_step, project_on_latents

Group = Literal["ipg", "practice", "baseline", "null"]


@dataclass
class BenchGrid:
    """The settings each method may try (at most ``max_settings`` each)."""

    ks: list[int] = field(default_factory=lambda: [4, 16, 64])
    gammas: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0, 4.0])
    etas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0])
    alphas: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32,
                                                         0.48, 0.64, 0.96])
    projected_ks: list[int] = field(default_factory=lambda: [16, 64])
    projected_alphas: list[float] = field(default_factory=lambda: [0.04, 0.08, 0.16, 0.32, 0.64, 1.28])
    instructions: list[str] = field(default_factory=lambda: [
        "Solve the problem step by step, then give the final answer as a number.",
        "Think carefully. Check your arithmetic before you give the final answer.",
        "Read the question, write the one calculation it needs, and state the result.",
        "You are a careful math tutor. Show the calculation and end with 'The answer is N.'"])
    max_settings: int = 12


@dataclass
class Recipe:
    """One method at one setting: the interventions it steers with and/or the system prompt it uses."""

    method: str
    setting: dict
    interventions: list = field(default_factory=list)
    system_prompt: str | None = None
    scope: str = "all"  # positions steered: all (the IPG control) or generated (DiffMean)

    @property
    def label(self) -> str:
        parts = [f"{k}={v if not isinstance(v, str) else _short(v)}" for k, v in self.setting.items()]
        return f"{self.method} " + ",".join(parts) if parts else self.method

    def key(self) -> dict:
        """What the recipe's samples and scores depend on (vectors by digest)."""
        return {"method": self.method, "setting": self.setting, "system_prompt": self.system_prompt,
                "scope": self.scope, "interventions": [_describe(iv) for iv in self.interventions]}


UNSTEERED = Recipe("unsteered", {})


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _describe(iv) -> list:
    if isinstance(iv, VectorIntervention):
        digest = hashlib.sha256(iv.vector.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
        return ["vector", iv.layer, digest, iv.coef, iv.start]
    return [iv.layer, iv.latent, iv.kind, iv.value, iv.start]


@dataclass
class Ingredients:
    """What recipes are built from: each method's attribution, the DiffMean vector, the SAEs."""

    results: dict[str, AttributionResult]
    vector: torch.Tensor
    layer: int
    residual_norm: float
    saes: dict


def _vector_recipe(method: str, setting: dict, direction: torch.Tensor, coef: float, layer: int) -> Recipe:
    return Recipe(method, setting, [add_vector(layer, direction, coef)], scope="generated")


@dataclass(frozen=True)
class RecipeKind:
    name: str
    group: Group
    # Tuned methods: every setting it may try, from the grid (at most grid.max_settings), and the recipe at one.
    settings: Callable[[BenchGrid], list[dict]] | None = None
    build: Callable[[str, dict, Ingredients], Recipe] | None = None
    attribution: str | None = None  # the attribution it ranks by (ipg or a baseline's name), attributed for it
    # Nulls: the method whose chosen recipe it mirrors, and how (mirror(cfg, chosen, ingredients, pool) -> Recipe)
    mirrors: str | None = None
    mirror: Callable | None = None


KINDS: dict[str, RecipeKind] = {}


def register(kind: RecipeKind) -> RecipeKind:
    """Add a steering method (or a null) to the benchmark; the order of registration is the report's order."""
    if kind.name == "unsteered" or (kind.group == "null") != (kind.mirror is not None) or \
            (kind.group != "null" and (kind.settings is None or kind.build is None)):
        raise IPGError(f"recipe {kind.name!r}: a null needs `mirrors` and `mirror`, a method `settings` and `build`")
    KINDS[kind.name] = kind
    return kind


def methods() -> tuple[str, ...]:
    """Every tuned method, in registration order."""
    return tuple(n for n, k in KINDS.items() if k.group != "null")


def group(name: str) -> tuple[str, ...]:
    return tuple(n for n, k in KINDS.items() if k.group == name)


def recipes(cfg, method: str, ing: Ingredients) -> list[Recipe]:
    """Every setting ``method`` may try (the grid; at most ``grid.max_settings``)."""
    if method not in KINDS or KINDS[method].group == "null":
        raise IPGError(f"unknown steering method {method!r}")
    kind = KINDS[method]
    return [kind.build(method, setting, ing) for setting in kind.settings(cfg.grid)]


def null_recipes(cfg, chosen: dict[str, Recipe], ing: Ingredients, pool: LatentPool) -> list[Recipe]:
    """The nulls ``cfg.nulls`` asks for, each mirroring a chosen recipe (same size of push, no selection)."""
    return [k.mirror(cfg, chosen[k.mirrors], ing, pool) for n, k in KINDS.items() if k.group == "null" and n in cfg.nulls]


# ---- the shipped recipes -----------------------------------------------------------------------------------


def _top_k(method: str, setting: dict, ing: Ingredients) -> Recipe:
    result = ing.results[KINDS[method].attribution]
    return Recipe(method, setting, scale(select(result, setting["k"]), setting["gamma"]))


def _top_k_grid(g: BenchGrid) -> list[dict]:
    return [{"k": k, "gamma": gamma} for k in g.ks for gamma in g.gammas]


def _diffmean(method: str, setting: dict, ing: Ingredients) -> Recipe:
    norm = float(ing.vector.norm())
    return _vector_recipe(method, setting, ing.vector / norm, setting["alpha"] * ing.residual_norm, ing.layer)


def _diffmean_projected(method: str, setting: dict, ing: Ingredients) -> Recipe:
    norm = float(ing.vector.norm())
    latents = [i for layer, i in select(ing.results["ipg"], setting["k"]) if layer == ing.layer]
    projected = project_on_latents(ing.vector, ing.saes[ing.layer], latents).vector
    return _vector_recipe(method, setting, projected / norm, setting["alpha"] * ing.residual_norm, ing.layer)


def _random_direction(cfg, dm: Recipe, ing: Ingredients, pool: LatentPool) -> Recipe:
    gen = torch.Generator().manual_seed(cfg.seed)
    direction = torch.randn(ing.vector.shape, generator=gen)
    return _vector_recipe("random_direction", dict(dm.setting), direction / direction.norm(),
                          dm.interventions[0].coef, ing.layer)


def _random_latents(cfg, top: Recipe, ing: Ingredients, pool: LatentPool) -> Recipe:
    template = [(iv.layer, iv.latent) for iv in top.interventions]
    draw = draw_sets("frequency", template, 1, cfg.seed, pool)[0]
    return Recipe("random_latents", dict(top.setting), scale(draw, top.setting["gamma"]))


register(RecipeKind("ipg_topk", "ipg", _top_k_grid, _top_k, attribution="ipg"))
for _baseline in ("act", "grad_x_act", "reason_words", "ig_likelihood"):
    register(RecipeKind(_baseline, "baseline", _top_k_grid, _top_k, attribution=_baseline))
register(RecipeKind("ipg_step", "ipg", lambda g: [{"eta": eta} for eta in g.etas],
                    lambda m, s, ing: Recipe(m, s, ipg_weighted_step(ing.results["ipg"], s["eta"])), attribution="ipg"))
register(RecipeKind("diffmean", "practice", lambda g: [{"alpha": a} for a in g.alphas], _diffmean))
register(RecipeKind("diffmean_projected", "ipg", lambda g: [{"k": k, "alpha": a} for k in g.projected_ks
                                                            for a in g.projected_alphas], _diffmean_projected,
                    attribution="ipg"))
register(RecipeKind("prompting", "practice", lambda g: [{"instruction": t} for t in g.instructions],
                    lambda m, s, ing: Recipe(m, s, system_prompt=s["instruction"])))
register(RecipeKind("random_direction", "null", mirrors="diffmean", mirror=_random_direction))
register(RecipeKind("random_latents", "null", mirrors="ipg_topk", mirror=_random_latents))
