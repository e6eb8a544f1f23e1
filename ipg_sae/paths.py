r"""Where IPG's path starts: which origin (and whether integrating at all) best predicts removals.

IPG integrates the policy gradient along ``b + c (f - b)`` from the path origin ``b`` (``c = 0``)
to the model as it is (``c = 1``); ``docs/ipg-method.md`` §2a. This job compares, on the same
attributed trajectories and held-out samples, for each origin in ``origins`` (``zero``: every
latent off; ``mean``: each latent at its mean activation over the attributed tokens) the
integrated rule ``ipg`` and the local rule ``ipg_local`` (one node at ``c = 1``: the gradient
times ``f - b``, attribution patching):

1. ``sample``, ``sae``, ``attribute``, ``heldout``: as in the study (:mod:`ipg_sae.study`); each
   origin's attribution lives in ``attribution/<origin>/`` (``ipg``) and its ``baselines/``.
2. ``single`` (per latent): for the top ``top_latents`` of each method and ``random_latents``
   random latents active on the attributed data, the exact effect of moving that latent alone
   from its activation to its origin value (``c_i: 1 -> 0``, every other latent as it is):

   * on the attribution objective, ``F(1) - F(1 with c_i = 0)`` with
     ``F = (1/N) sum_x (1/G) sum_g A_g log pi(tau_g | x)`` over the attributed trajectories,
     teacher-forced (the units of the scores: a perfectly local attribution would equal it);
   * on held-out reward, the unsteered estimate minus the removed one, off-policy on the
     held-out samples (:mod:`ipg_sae.faithfulness`).

   Each method's scores are correlated with both over the pooled latents of its origin
   (Spearman, Pearson, sign agreement; percentile bootstrap over latents).
3. ``curves`` (per set): each method's top-``k`` moved towards its origin (gamma 0: deletion) and
   away from it (gamma > 1: insertion) at every ``k``, off-policy on the held-out samples, with
   paired intervals over problems and the deletion curve's area.
4. ``report``: ``paths/report.md``, ``paths/summary.json``, scatter plots and curves.

Every removal is the steering the scorer and sampler use (:func:`ipg_sae.steering.scale_about`),
cached per cell (:class:`ipg_sae.cells.LogprobCells`), so a killed job resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attribution import AttributionConfig, AttributionResult
from .attribution.path import advantages
from .cells import CellStore, Inputs, LogprobCells
from .config import JobConfig
from .errors import IPGError
from .faithfulness import TrajectoryScorer, estimate
from .io import read_json, write_json, write_text
from .jobs import AttributeJobConfig, SelectionConfig, method_dir, run_attribute
from .models import load_model
from .rewards import get_reward
from .sampling import SamplingConfig
from .saes import load_saes
from .selection import select
from .stages import (SAE_STAGE, SAESourceConfig, Stage, model_files, model_inputs, run_job_stages, sae_specs,
                     task_files)
from .stats import area_under_curve, bootstrap
from .study import contexts, reward_dir, sample_stage
from .tasks import TaskConfig
from .trajectories import Trajectory, load_trajectories, prompt_groups

log = logging.getLogger(__name__)

ORIGINS = ("zero", "mean")
PATH_METHODS = ("ipg", "ipg_local")


@dataclass
class PathsConfig(JobConfig):
    name: str = "paths"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=96))  # the problems attributed on
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n_samples=4, temperature=0.5,
                                                                            max_new_tokens=96, batch_size=32))
    sae: SAESourceConfig = field(default_factory=SAESourceConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)  # path_origin is set per origin
    reward: str = "correctness"
    attribute_prompts: int = 60  # the first prompts whose samples got different rewards
    origins: list[str] = field(default_factory=lambda: list(ORIGINS))
    methods: list[str] = field(default_factory=lambda: list(PATH_METHODS))  # ipg and/or ipg_local
    heldout: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=100, offset=1000))
    heldout_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n_samples=8, temperature=0.5, max_new_tokens=96, batch_size=32))
    top_latents: int = 64  # per method and origin: its top latents get a single-latent removal
    random_latents: int = 64  # and this many random latents active on the attributed data
    single_heldout_problems: int = 0  # held-out problems the single-latent removals are scored on (0: all)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    gammas: list[float] = field(default_factory=lambda: [0.0, 2.0])
    seed: int = 0
    n_bootstrap: int = 2000
    problems_per_batch: int = 8

    @property
    def rewards(self) -> list[str]:  # what the shared sampling stage scores with
        return [self.reward]

    def validate(self) -> None:
        super().validate()
        self.sae.validate()
        for origin in self.origins:
            if origin not in ORIGINS and not origin.endswith(".safetensors"):
                raise IPGError(f"paths.origins lists {origin!r}; use zero, mean or a .safetensors file")
        if not self.origins or len(set(self.origins)) != len(self.origins):
            raise IPGError("paths.origins must list at least one origin, each once")
        if "ipg" not in self.methods or not set(self.methods) <= set(PATH_METHODS):
            raise IPGError(f"paths.methods {self.methods}: list ipg and optionally ipg_local")
        if self.top_latents < 1 or self.random_latents < 0 or self.single_heldout_problems < 0:
            raise IPGError("paths.top_latents must be >= 1, random_latents and single_heldout_problems >= 0")
        if sorted(self.gammas) != self.gammas or self.gammas[0] != 0.0 or not all(g > 1 for g in self.gammas[1:]):
            raise IPGError(f"paths.gammas {self.gammas}: give 0 (deletion) then amplifying gammas > 1 (insertion)")
        if min(self.ks) < 1:
            raise IPGError(f"paths.ks {self.ks}: every k must be >= 1")
        if self.heldout_sampling.temperature <= 0 or self.heldout_sampling.top_p != 1:
            raise IPGError("paths.heldout_sampling needs temperature > 0 and top_p 1 (importance weights need a "
                           "sampler with full support)")


# ---- stages -----------------------------------------------------------------------------------


def origin_dir(cfg: PathsConfig, origin: str) -> Path:
    return cfg.run_dir / "attribution" / (origin if origin in ORIGINS else Path(origin).stem)


def _attribute_job(cfg: PathsConfig, origin: str) -> AttributeJobConfig:
    where = origin_dir(cfg, origin)
    return AttributeJobConfig(name=where.name, runs_dir=str(where.parent), model=cfg.model, saes=sae_specs(cfg),
                              trajectories=str(reward_dir(cfg, cfg.reward) / "trajectories.jsonl"),
                              attribution=dataclasses.replace(cfg.attribution, path_origin=origin),
                              baselines=[m for m in cfg.methods if m != "ipg"],
                              selection=SelectionConfig(k=max(cfg.ks), n_bootstrap=0, table_size=max(cfg.ks)),
                              wandb=cfg.wandb)


def _run_attribute(cfg: PathsConfig) -> dict:
    out = {}
    for origin in cfg.origins:
        summaries = run_attribute(_attribute_job(cfg, origin), group=cfg.name)
        out[origin] = {m: {"top": s["selection"][:8], "delta_median": s.get("delta_median")}
                       for m, s in summaries.items()}
    return out


def _attribution_dirs(cfg: PathsConfig) -> list[Path]:
    return [method_dir(origin_dir(cfg, o), m) for o in cfg.origins for m in cfg.methods]


def _attribution_files(cfg: PathsConfig) -> list[Path]:
    from .tracking import attribution_files

    return [f for d in _attribution_dirs(cfg) for f in attribution_files(d)]


def origin_files(cfg: PathsConfig) -> list[Path]:
    """The user's origin files: their contents are in the attribute stage's key (rewritten at the same path, the
    comparison reruns from there)."""
    return [Path(o) for o in cfg.origins if o not in ORIGINS]


STAGES = [
    Stage("sample", lambda c: sample_stage(c, c.task, c.sampling, "trajectories.jsonl", c.attribute_prompts),
          outputs=lambda c: [reward_dir(c, c.reward) / "trajectories.jsonl"],
          fields=("model", "task", "sampling", "reward", "attribute_prompts"),
          files=lambda c: [*model_files(c), *task_files(c.task)],
          identity=lambda c: (model_inputs(c), get_reward(c.reward).identity)),
    SAE_STAGE,
    Stage("attribute", _run_attribute, outputs=_attribution_files, fields=("attribution", "origins", "methods", "ks"),
          files=origin_files),
    Stage("heldout", lambda c: sample_stage(c, c.heldout, c.heldout_sampling, "heldout.jsonl"),
          outputs=lambda c: [reward_dir(c, c.reward) / "heldout.jsonl"], fields=("heldout", "heldout_sampling"),
          files=lambda c: task_files(c.heldout)),
    Stage("single", lambda c: single_latent_effects(c), outputs=lambda c: [c.run_dir / "paths" / "single.json"],
          fields=("top_latents", "random_latents", "single_heldout_problems", "seed", "problems_per_batch")),
    Stage("curves", lambda c: set_curves(c), outputs=lambda c: [c.run_dir / "paths" / "curves.json"],
          fields=("ks", "gammas")),
    Stage("report", lambda c: report(c),
          outputs=lambda c: [c.run_dir / "paths" / f for f in ("report.md", "summary.json")], fields=("n_bootstrap",)),
]


def run_paths(cfg: PathsConfig) -> dict:
    """Run (or resume) every stage of the path comparison; return each stage's summary."""
    return run_job_stages(cfg, STAGES, "paths_config.yaml", contexts(cfg))


# ---- single-latent removals -------------------------------------------------------------------


def _results(cfg: PathsConfig, origin: str) -> dict[str, AttributionResult]:
    return {m: AttributionResult.load(method_dir(origin_dir(cfg, origin), m)) for m in cfg.methods}


def origin_of(result: AttributionResult) -> dict[tuple[int, int], float]:
    """The path origin of a result as ``{(layer, latent): value}`` (non-zero values only)."""
    out = {}
    for layer, values in result.origin.items():
        for i in torch.nonzero(values).flatten().tolist():
            out[(layer, i)] = float(values[i])
    return out


def tested_latents(cfg: PathsConfig, results: dict[str, AttributionResult]) -> tuple[list, dict[str, list]]:
    """The pooled latents of one origin (each method's top latents, then random active ones, in that order,
    each once) and which of them each group contributed."""
    groups: dict[str, list] = {m: select(r, cfg.top_latents) for m, r in results.items()}
    active = [(layer, i) for layer, mask in results["ipg"].active.items()
              for i in torch.nonzero(mask.any(0)).flatten().tolist()]
    rng = np.random.default_rng(cfg.seed)
    picks = rng.choice(len(active), size=min(cfg.random_latents, len(active)), replace=False)
    groups["random"] = [active[j] for j in sorted(picks.tolist())]
    pooled = list(dict.fromkeys(p for members in groups.values() for p in members))
    return pooled, groups


def objective_weights(trajectories: list[Trajectory], advantage: str) -> torch.Tensor:
    """Per trajectory, ``A_g / (G N)``: ``sum_g w_g log pi(tau_g)`` is the attribution objective in the units of
    the scores (mean over the ``N`` prompts of ``(1/G) sum_g A_g log pi``)."""
    _, groups = prompt_groups([t.prompt_id for t in trajectories])
    w = torch.zeros(len(trajectories), dtype=torch.float64)
    for idx in groups:
        a = advantages(torch.tensor([trajectories[i].reward for i in idx], dtype=torch.float64), advantage)
        w[idx] = a / (len(idx) * len(groups))
    return w


def single_latent_effects(cfg: PathsConfig, progress: bool = True) -> dict:
    """Every tested latent's exact removal effect on the attribution objective and on held-out reward, per
    origin; written to ``paths/single.json``."""
    from tqdm.auto import tqdm

    model, _ = load_model(cfg.model)
    saes = load_saes(sae_specs(cfg), model)
    inputs = Inputs.of(model, saes)
    scope = cfg.attribution.scope
    attributed = load_trajectories(reward_dir(cfg, cfg.reward) / "trajectories.jsonl")
    heldout = load_trajectories(reward_dir(cfg, cfg.reward) / "heldout.jsonl")
    ids, groups = prompt_groups([t.prompt_id for t in heldout])
    if cfg.single_heldout_problems:
        keep = {i for g in groups[:cfg.single_heldout_problems] for i in g}
        heldout = [t for j, t in enumerate(heldout) if j in keep]
        ids, groups = prompt_groups([t.prompt_id for t in heldout])
    store = cfg.run_dir / "paths" / "cells"
    objective = LogprobCells(CellStore(store / "objective"), TrajectoryScorer(
        model, attributed, 1.0, saes=saes, problems_per_batch=cfg.problems_per_batch, scope=scope,
        exclude_first=cfg.attribution.exclude_first), inputs, attributed, 1.0, scope)
    held = LogprobCells(CellStore(store / "heldout"), TrajectoryScorer(
        model, heldout, cfg.heldout_sampling.temperature, saes=saes, problems_per_batch=cfg.problems_per_batch,
        scope=scope), inputs, heldout, cfg.heldout_sampling.temperature, scope)
    weights = objective_weights(attributed, cfg.attribution.advantage)
    rewards = torch.tensor([t.reward for t in heldout], dtype=torch.float64)
    obj_base = objective.logprobs([], 1.0)
    held_base = held.logprobs([], 1.0)
    held_base_value = estimate(held_base, held_base, rewards, groups).per_prompt
    out = {"heldout_problems": len(groups), "attributed_trajectories": len(attributed), "origins": {}}
    for origin in cfg.origins:
        results = _results(cfg, origin)
        about = origin_of(results["ipg"])
        pooled, members = tested_latents(cfg, results)
        rows = []
        for layer, latent in tqdm(pooled, desc=f"single-latent removals ({origin})", unit="latent",
                                  disable=not progress):
            pair = [(layer, latent)]
            logp = objective.logprobs(pair, 0.0, origin=about, name=f"objective {origin} {layer}:{latent}")
            logp_held = held.logprobs(pair, 0.0, origin=about, name=f"heldout {origin} {layer}:{latent}")
            removed = estimate(held_base, logp_held, rewards, groups).per_prompt
            rows.append({"layer": layer, "latent": latent, "origin_value": about.get((layer, latent), 0.0),
                         "objective": float((weights * (obj_base - logp)).sum()),
                         "heldout": float((held_base_value - removed).mean()),
                         "heldout_per_problem": (held_base_value - removed).tolist(),
                         "scores": {m: float(r.score[layer][latent]) for m, r in results.items()}})
        out["origins"][origin] = {"latents": rows, "members": {g: [list(p) for p in ps] for g, ps in members.items()}}
    write_json(cfg.run_dir / "paths" / "single.json", out)
    return {o: len(v["latents"]) for o, v in out["origins"].items()}


# ---- set-level curves -------------------------------------------------------------------------


def set_curves(cfg: PathsConfig, progress: bool = True) -> dict:
    """Each (origin, method)'s top-k moved towards and away from its origin, off-policy on all held-out samples;
    per-problem estimates written to ``paths/curves.json``."""
    from tqdm.auto import tqdm

    model, _ = load_model(cfg.model)
    saes = load_saes(sae_specs(cfg), model)
    heldout = load_trajectories(reward_dir(cfg, cfg.reward) / "heldout.jsonl")
    ids, groups = prompt_groups([t.prompt_id for t in heldout])
    scorer = TrajectoryScorer(model, heldout, cfg.heldout_sampling.temperature, saes=saes,
                              problems_per_batch=cfg.problems_per_batch, scope=cfg.attribution.scope)
    cells = LogprobCells(CellStore(cfg.run_dir / "paths" / "cells" / "curves"), scorer, Inputs.of(model, saes),
                         heldout, cfg.heldout_sampling.temperature, cfg.attribution.scope)
    rewards = torch.tensor([t.reward for t in heldout], dtype=torch.float64)
    base_logp = cells.logprobs([], 1.0)
    plan = []
    for origin in cfg.origins:
        results = _results(cfg, origin)
        about = origin_of(results["ipg"])
        for method, result in results.items():
            ranked = select(result, max(cfg.ks))
            plan += [(origin, method, k, gamma, ranked[:k], about) for k in cfg.ks for gamma in cfg.gammas]
    curves: dict = {}
    for origin, method, k, gamma, latents, about in tqdm(plan, desc="path curves", unit="cell", disable=not progress):
        logp = cells.logprobs(latents, gamma, origin=about, name=f"{origin}/{method}|k{k} x{gamma:g}")
        est = estimate(base_logp, logp, rewards, groups)
        curves.setdefault(origin, {}).setdefault(method, {}).setdefault(str(gamma), {})[str(k)] = {
            "reward": est.per_prompt.tolist(), "ess": float(np.mean(est.ess)), "latents": [list(p) for p in latents]}
    base = [float(rewards[g].mean()) for g in groups]
    write_json(cfg.run_dir / "paths" / "curves.json", {"problem_ids": ids, "base": base, "curves": curves})
    return {"cells": len(plan)}


# ---- statistics and the report ----------------------------------------------------------------


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson on average ranks); nan when either side is constant."""
    from scipy.stats import rankdata

    return pearson(rankdata(x), rankdata(y))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def sign_agreement(x: np.ndarray, y: np.ndarray) -> float:
    """Share of latents (with both sides non-zero) whose score and effect have the same sign."""
    both = (np.asarray(x) != 0) & (np.asarray(y) != 0)
    return float(np.mean(np.sign(x[both]) == np.sign(y[both]))) if both.any() else float("nan")


def agreement(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Spearman, Pearson and sign agreement of scores ``x`` with effects ``y``, each with a 95% percentile
    bootstrap interval over latents."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    stats = {"spearman": rank_correlation, "pearson": pearson, "sign": sign_agreement}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), size=(n_boot, len(x)))
    out = {"n": int(len(x))}
    for name, fn in stats.items():
        reps = np.array([fn(x[d], y[d]) for d in draws])
        reps = reps[np.isfinite(reps)]
        lo, hi = (np.quantile(reps, [0.025, 0.975]) if len(reps) else (np.nan, np.nan))
        out[name] = [fn(x, y), float(lo), float(hi)]
    return out


def summarize(cfg: PathsConfig, single: dict, curves: dict) -> dict:
    """Per origin and method: agreement with single-latent removals (objective and held-out), and the set-level
    effects with paired intervals and the deletion curve's area."""
    base = np.array(curves["base"])
    out: dict = {"per_latent": {}, "sets": {}, "base": float(base.mean())}
    for origin, doc in single["origins"].items():
        rows = doc["latents"]
        effects = {side: np.array([r[side] for r in rows]) for side in ("objective", "heldout")}
        for method in cfg.methods:
            scores = np.array([r["scores"][method] for r in rows])
            out["per_latent"].setdefault(origin, {})[method] = {
                side: agreement(scores, y, cfg.n_bootstrap, cfg.seed) for side, y in effects.items()}
    for origin, methods in curves["curves"].items():
        for method, by_gamma in methods.items():
            entry = out["sets"].setdefault(origin, {}).setdefault(method, {})
            for gamma, by_k in by_gamma.items():
                rows = []
                for k in map(str, cfg.ks):
                    x = np.array(by_k[k]["reward"])
                    effect, lo, hi = bootstrap(x, base, n_boot=cfg.n_bootstrap)
                    rows.append({"k": int(k), "value": float(x.mean()), "effect": effect, "lo": lo, "hi": hi,
                                 "ess": by_k[k]["ess"]})
                entry[gamma] = {"rows": rows, "auc": area_under_curve([r["value"] for r in rows], float(base.mean()))}
    return out


def answer(cfg: PathsConfig, summary: dict) -> str:
    """The answer in two sentences: which path predicts single-latent removals best, which deletes steepest."""
    per = [(o, m, v["objective"]["spearman"][0], v["heldout"]["spearman"][0])
           for o, ms in summary["per_latent"].items() for m, v in ms.items()]
    best_obj = max(per, key=lambda t: np.nan_to_num(t[2], nan=-2))
    best_held = max(per, key=lambda t: np.nan_to_num(t[3], nan=-2))
    dele = [(o, m, v["0.0"]["auc"]) for o, ms in summary["sets"].items() for m, v in ms.items() if "0.0" in v]
    steepest = min(dele, key=lambda t: t[2]) if dele else None
    text = (f"Single-latent removals are best predicted by {best_obj[1]} from the {best_obj[0]} origin on the "
            f"attribution objective (Spearman {best_obj[2]:.2f}) and by {best_held[1]} from the {best_held[0]} origin "
            f"on held-out reward (Spearman {best_held[3]:.2f}).")
    if steepest:
        text += (f" The steepest deletion curve on held-out problems is {steepest[1]} from the {steepest[0]} origin "
                 f"(mean effect over k {steepest[2] * 100:+.1f} points).")
    return text


def report(cfg: PathsConfig) -> dict:
    """``paths/report.md``, ``paths/summary.json`` and the plots."""
    from .paths_report import markdown, plot_curves, plot_scatter

    out = cfg.run_dir / "paths"
    single, curves = read_json(out / "single.json"), read_json(out / "curves.json")
    summary = summarize(cfg, single, curves)
    plots = [plot_scatter(cfg, single, summary, out / "single_latent.png"), plot_curves(cfg, summary, out / "curves.png")]
    doc = {"answer": answer(cfg, summary), **summary, "heldout_problems": len(curves["base"]),
           "single_heldout_problems": single["heldout_problems"], "top_latents": cfg.top_latents,
           "random_latents": cfg.random_latents, "origins": cfg.origins, "methods": cfg.methods}
    write_json(out / "summary.json", doc)
    write_text(out / "report.md", markdown(cfg, doc, single))
    log_to_wandb(cfg, doc, plots)
    return {"answer": doc["answer"], "report": str(out / "report.md"), "plots": [str(p) for p in plots]}


def log_to_wandb(cfg: PathsConfig, doc: dict, plots: list[Path]) -> None:
    """The report as one W&B run: the per-latent agreement table, the plots, the answer and each agreement's
    Spearman in the summary, with the lineage from the SAE and every origin's attributions."""
    from .tracking import Tracker, use_inputs

    with Tracker(cfg.wandb, cfg.run_dir, cfg.name, "paths") as tracker:
        use_inputs(tracker, saes=sae_specs(cfg), attribution_dirs=_attribution_dirs(cfg))
        for plot in plots:
            tracker.image(f"paths/{Path(plot).stem}", plot)
        rows, metrics = [], {"paths/answer": doc["answer"]}
        for origin, methods in doc["per_latent"].items():
            for method, sides in methods.items():
                for side, entry in sides.items():
                    rows.append([origin, method, side, entry["n"], *entry["spearman"], entry["pearson"][0],
                                 entry["sign"][0]])
                    metrics[f"paths/{origin}/{method}/{side}/spearman"] = entry["spearman"][0]
        tracker.table("paths/per_latent", ["origin", "method", "target", "n", "spearman", "lo", "hi", "pearson",
                                           "sign_agreement"], rows)
        tracker.summary(metrics)
