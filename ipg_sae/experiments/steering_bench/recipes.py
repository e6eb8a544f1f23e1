"""Steering recipes: one method at one setting (:class:`Recipe`: the interventions and/or the system prompt it
steers with), and the registry of methods (:data:`KINDS`): for each, how it steers at one setting, every setting it
may try (its grid) and its group (``ipg``: built from IPG's scores; ``practice``: what practitioners use today;
``baseline``: another attribution's top k; ``control``: the IPG-weighted step's format with other information --
its reward-permutation and score-shuffle nulls, other attributions' scores, DiffMean in the latent basis;
``null``: not tuned, mirroring another method's chosen setting).

A method with ``draws`` (the step's nulls) is tuned once per draw (``grid.dev_draws`` draws on dev, each its own
chosen setting, named ``method#draw``); the first ``grid.test_draws`` are run on test and transfer.

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
from ...selection import reward_permutations, select
from ...steering import VectorIntervention, add_vector, scale
from ...vectors import (ipg_weighted_step, permuted_step_scores, project_on_latents, shuffled_scores, step_scores,
                        weighted_step)
# the grid and the shipped recipes' names live torch-free (the config's --help and typos answer without torch)
from .grid import SHIPPED_METHODS, SHIPPED_NULLS, BenchGrid

Group = Literal["ipg", "practice", "baseline", "control", "null"]


@dataclass
class Recipe:
    """One method at one setting: the interventions it steers with and/or the system prompt it uses."""

    method: str
    setting: dict
    interventions: list = field(default_factory=list)
    system_prompt: str | None = None
    scope: str = "all"  # positions steered: all (the IPG control) or generated (DiffMean)
    few_shot: int | None = None  # worked examples in the prompt (None: the task's own)

    @property
    def label(self) -> str:
        parts = [f"{k}={v if not isinstance(v, str) else _short(v)}" for k, v in self.setting.items()]
        return f"{self.method} " + ",".join(parts) if parts else self.method

    def key(self) -> dict:
        """What the recipe's samples and scores depend on (vectors by digest)."""
        key = {"method": self.method, "setting": self.setting, "system_prompt": self.system_prompt,
               "scope": self.scope, "interventions": [_describe(iv) for iv in self.interventions]}
        if self.few_shot is not None:  # only where set: the keys of the recipes before it stay the same
            key["few_shot"] = self.few_shot
        return key


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
    latent_diffmean: dict | None = None  # {layer: [d_sae]}: DiffMean in the latent basis
    layer_vectors: dict = field(default_factory=dict)  # {layer: (DiffMean vector, residual norm)} at other layers
    seed: int = 0
    _orders: dict = field(default_factory=dict)

    def permutation(self, draw: int) -> torch.Tensor:
        """Draw ``draw`` of the within-group reward permutations of IPG's attributed trajectories (seeded by the
        benchmark's seed; draw ``d`` is the same whatever the number of draws)."""
        if draw not in self._orders:
            self._orders[draw] = reward_permutations(self.results["ipg"], draw + 1, self.seed)[draw]
        return self._orders[draw]


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
    draws: bool = False  # a null of the step: tuned once per draw (setting["draw"]), see the module docstring
    default: bool = True  # in the default `methods` (False: needs settings the config must give)


KINDS: dict[str, RecipeKind] = {}


def register(kind: RecipeKind) -> RecipeKind:
    """Add a steering method (or a null) to the benchmark; the order of registration is the report's order."""
    if kind.name == "unsteered" or (kind.group == "null") != (kind.mirror is not None) or \
            (kind.group != "null" and (kind.settings is None or kind.build is None)):
        raise IPGError(f"recipe {kind.name!r}: a null needs `mirrors` and `mirror`, a method `settings` and `build`")
    KINDS[kind.name] = kind
    return kind


def methods(default_only: bool = False) -> tuple[str, ...]:
    """Every tuned method, in registration order (``default_only``: those in the default ``methods``)."""
    return tuple(n for n, k in KINDS.items() if k.group != "null" and (k.default or not default_only))


def group(name: str) -> tuple[str, ...]:
    return tuple(n for n, k in KINDS.items() if k.group == name)


def kind_of(name: str) -> str:
    """The method of an evaluated name (``ipg_step_permuted#3`` -> ``ipg_step_permuted``; ``diffmean@push`` ->
    ``diffmean``)."""
    return name.split("@", 1)[0].split("#", 1)[0]


def in_group(name: str, which: str) -> bool:
    kind = KINDS.get(kind_of(name))
    return kind is not None and kind.group == which


def recipes(cfg, method: str, ing: Ingredients) -> list[Recipe]:
    """Every setting ``method`` may try (the grid; at most ``grid.max_settings``; per draw for a method with
    draws: ``grid.dev_draws`` x its settings)."""
    if method not in KINDS or KINDS[method].group == "null":
        raise IPGError(f"unknown steering method {method!r}")
    kind = KINDS[method]
    if kind.draws:
        return [kind.build(method, {"draw": d, **setting}, ing) for d in range(cfg.grid.dev_draws)
                for setting in kind.settings(cfg.grid)]
    return [kind.build(method, setting, ing) for setting in kind.settings(cfg.grid)]


def tuned_name(recipe: Recipe) -> str:
    """The name a tuned recipe's choice is filed under: the method, or ``method#draw`` for a method with draws."""
    return f"{recipe.method}#{recipe.setting['draw']}" if "draw" in recipe.setting else recipe.method


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


# ---- the step's controls and the stronger practice baselines (issue 37) ---------------------------------------


def _etas(g: BenchGrid) -> list[dict]:
    return [{"eta": eta} for eta in g.etas]


def _step_of(attribution: str) -> Callable:
    return lambda m, s, ing: Recipe(m, s, weighted_step(step_scores(ing.results[attribution]), s["eta"],
                                                         attribution))


def _permuted_step(method: str, setting: dict, ing: Ingredients) -> Recipe:
    scores = permuted_step_scores(ing.results["ipg"], ing.permutation(setting["draw"]))
    return Recipe(method, setting, weighted_step(scores, setting["eta"], "reward-permuted IPG"))


def _shuffled_step(method: str, setting: dict, ing: Ingredients) -> Recipe:
    scores = shuffled_scores(step_scores(ing.results["ipg"]), ing.seed * 1000 + setting["draw"])
    return Recipe(method, setting, weighted_step(scores, setting["eta"], "shuffled IPG"))


def _latent_diffmean_step(method: str, setting: dict, ing: Ingredients) -> Recipe:
    if not ing.latent_diffmean:
        raise IPGError("diffmean_latent_step needs DiffMean in the latent basis (the bench's vectors stage)")
    return Recipe(method, setting, weighted_step(ing.latent_diffmean, setting["eta"], "latent DiffMean"))


def _diffmean_all(method: str, setting: dict, ing: Ingredients) -> Recipe:
    recipe = _diffmean(method, setting, ing)
    recipe.scope = "all"
    return recipe


def _diffmean_layer(method: str, setting: dict, ing: Ingredients) -> Recipe:
    layer = setting["layer"]
    if layer not in ing.layer_vectors:
        raise IPGError(f"no DiffMean vector at layer {layer}: add it to steering_bench.grid.diffmean_layers")
    vector, residual_norm = ing.layer_vectors[layer]
    return _vector_recipe(method, setting, vector / float(vector.norm()), setting["alpha"] * residual_norm, layer)


def _prompting_shots(method: str, setting: dict, ing: Ingredients) -> Recipe:
    return Recipe(method, setting, system_prompt=setting["instruction"], few_shot=setting["shots"])


register(RecipeKind("ipg_step_permuted", "control", _etas, _permuted_step, attribution="ipg", draws=True))
register(RecipeKind("ipg_step_shuffled", "control", _etas, _shuffled_step, attribution="ipg", draws=True))
register(RecipeKind("grad_x_act_step", "control", _etas, _step_of("grad_x_act"), attribution="grad_x_act"))
register(RecipeKind("act_step", "control", _etas, _step_of("act"), attribution="act"))
register(RecipeKind("diffmean_latent_step", "control", _etas, _latent_diffmean_step))
register(RecipeKind("diffmean_all", "practice", lambda g: [{"alpha": a} for a in g.alphas], _diffmean_all))
register(RecipeKind("diffmean_layer", "practice", lambda g: [{"layer": layer, "alpha": a} for layer in g.diffmean_layers
                                                             for a in g.layer_alphas], _diffmean_layer,
                    default=False))
register(RecipeKind("prompting_shots", "practice", lambda g: [{"instruction": t, "shots": n}
                                                              for t in g.instructions[:g.shot_instructions]
                                                              for n in g.shots], _prompting_shots))
register(RecipeKind("random_direction", "null", mirrors="diffmean", mirror=_random_direction))
register(RecipeKind("random_latents", "null", mirrors="ipg_topk", mirror=_random_latents))


# The shipped recipes' names are listed torch-free in grid.py (the config's defaults); they must be the ones
# registered above, so that the two lists cannot drift apart.
if methods(default_only=True) != SHIPPED_METHODS or group("null") != SHIPPED_NULLS:
    raise ImportError(f"the registered recipes (methods {methods(default_only=True)}, nulls {group('null')}) differ "
                      f"from grid.py's SHIPPED_METHODS / SHIPPED_NULLS; list the same names, in the same order")
