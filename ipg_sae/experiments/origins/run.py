r"""Where IPG's path starts: which origin (and whether integrating at all) best predicts removals.

IPG integrates the policy gradient along ``b + c (f - b)`` from the path origin ``b`` (``c = 0``)
to the model as it is (``c = 1``); ``docs/ipg-method.md`` §2a. This job compares, on the same
attributed trajectories and held-out samples, for each origin in ``origins`` (``zero``: every
latent off; ``mean``: each latent at its mean activation over the attributed tokens) the
integrated rule ``ipg`` and the local rule ``ipg_local`` (one node at ``c = 1``: the gradient
times ``f - b``, attribution patching):

1. ``sample``, ``sae``, ``attribute``, ``heldout``: the shared stages (:mod:`ipg_sae.experiments.common`); each
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
from pathlib import Path

import numpy as np
import torch

from ...attribution import AttributionResult
from ...attribution.path import advantages
from ...cells import Inputs
from ...io import read_json, write_json, write_text
from ...jobs import method_dir
from ...models import load_model
from ...panel import OffPolicyPanel
from ...saes import load_saes
from ...selection import select
from ...trajectories import Trajectory, load_trajectories, prompt_groups
from ..common import (HELDOUT_STAGE, attribute, attribution_sampling_stage, check_splits_disjoint, contexts,
                      reward_dir)
from ..stages import SAE_STAGE, Stage, run_job_stages, sae_specs
from .config import ORIGINS, PathsConfig, splits
from .report import markdown, plot_curves, plot_scatter
from .summary import OriginsSummary, summarize

log = logging.getLogger(__name__)


# ---- stages -----------------------------------------------------------------------------------


def origin_dir(cfg: PathsConfig, origin: str) -> Path:
    return cfg.run_dir / "attribution" / (origin if origin in ORIGINS else Path(origin).stem)


def _run_attribute(cfg: PathsConfig) -> dict:
    out = {}
    for origin in cfg.origins:
        summaries = attribute(cfg, origin_dir(cfg, origin), [m for m in cfg.methods if m != "ipg"], max(cfg.ks),
                              trajectories=reward_dir(cfg, cfg.reward) / "trajectories.jsonl",
                              attribution=dataclasses.replace(cfg.attribution, path_origin=origin),
                              table_size=max(cfg.ks))
        out[origin] = {m: {"top": s["selection"][:8], "delta_median": s.get("delta_median")}
                       for m, s in summaries.items()}
    return out


def _attribution_dirs(cfg: PathsConfig) -> list[Path]:
    return [method_dir(origin_dir(cfg, o), m) for o in cfg.origins for m in cfg.methods]


def _attribution_files(cfg: PathsConfig) -> list[Path]:
    from ...tracking import attribution_files

    return [f for d in _attribution_dirs(cfg) for f in attribution_files(d)]


def origin_files(cfg: PathsConfig) -> list[Path]:
    """The user's origin files: their contents are in the attribute stage's key (rewritten at the same path, the
    comparison reruns from there)."""
    return [Path(o) for o in cfg.origins if o not in ORIGINS]


STAGES = [
    attribution_sampling_stage("reward", outputs=lambda c: [reward_dir(c, c.reward) / "trajectories.jsonl"]),
    SAE_STAGE,
    Stage("attribute", _run_attribute, outputs=_attribution_files, fields=("attribution", "origins", "methods", "ks"),
          files=origin_files),
    HELDOUT_STAGE,
    Stage("single", lambda c: single_latent_effects(c), outputs=lambda c: [c.run_dir / "paths" / "single.json"],
          fields=("top_latents", "random_latents", "single_heldout_problems", "seed", "problems_per_batch")),
    Stage("curves", lambda c: set_curves(c), outputs=lambda c: [c.run_dir / "paths" / "curves.json"],
          fields=("ks", "gammas")),
    Stage("report", lambda c: report(c),
          outputs=lambda c: [c.run_dir / "paths" / f for f in ("report.md", "summary.json")], fields=("n_bootstrap",)),
]


def run_paths(cfg: PathsConfig) -> dict:
    """Run (or resume) every stage of the path comparison; return each stage's summary."""
    check_splits_disjoint(splits(cfg), on_load=False)  # splits not checked on load (a hub dataset): now
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
    scope = cfg.attribution.scope
    attributed = load_trajectories(reward_dir(cfg, cfg.reward) / "trajectories.jsonl")
    heldout = load_trajectories(reward_dir(cfg, cfg.reward) / "heldout.jsonl")
    ids, groups = prompt_groups([t.prompt_id for t in heldout])
    if cfg.single_heldout_problems:
        keep = {i for g in groups[:cfg.single_heldout_problems] for i in g}
        heldout = [t for j, t in enumerate(heldout) if j in keep]
        ids, groups = prompt_groups([t.prompt_id for t in heldout])
    store, inputs = cfg.run_dir / "paths" / "cells", Inputs.of(model, saes)
    objective = OffPolicyPanel.build(model, saes, attributed, 1.0, store / "objective", scope=scope,
                                     problems_per_batch=cfg.problems_per_batch,
                                     exclude_first=cfg.attribution.exclude_first, inputs=inputs)
    held = OffPolicyPanel.build(model, saes, heldout, cfg.heldout_sampling.temperature, store / "heldout",
                                scope=scope, problems_per_batch=cfg.problems_per_batch, inputs=inputs)
    weights = objective_weights(attributed, cfg.attribution.advantage)
    rewards = torch.tensor([t.reward for t in heldout], dtype=torch.float64)
    held_base_value = held.estimate(held.base, rewards).per_prompt
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
            removed = held.estimate(logp_held, rewards).per_prompt
            rows.append({"layer": layer, "latent": latent, "origin_value": about.get((layer, latent), 0.0),
                         "objective": float((weights * (objective.base - logp)).sum()),
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
    panel = OffPolicyPanel.build(model, saes, heldout, cfg.heldout_sampling.temperature,
                                 cfg.run_dir / "paths" / "cells" / "curves", scope=cfg.attribution.scope,
                                 problems_per_batch=cfg.problems_per_batch)
    rewards = torch.tensor([t.reward for t in heldout], dtype=torch.float64)
    plan = []
    for origin in cfg.origins:
        results = _results(cfg, origin)
        about = origin_of(results["ipg"])
        for method, result in results.items():
            ranked = select(result, max(cfg.ks))
            plan += [(origin, method, k, gamma, ranked[:k], about) for k in cfg.ks for gamma in cfg.gammas]
    curves: dict = {}
    for origin, method, k, gamma, latents, about in tqdm(plan, desc="path curves", unit="cell", disable=not progress):
        est = panel.effect(latents, gamma, rewards, origin=about, name=f"{origin}/{method}|k{k} x{gamma:g}")
        curves.setdefault(origin, {}).setdefault(method, {}).setdefault(str(gamma), {})[str(k)] = {
            "reward": est.per_prompt.tolist(), "ess": float(np.mean(est.ess)), "latents": [list(p) for p in latents]}
    base = [float(rewards[g].mean()) for g in panel.groups]
    write_json(cfg.run_dir / "paths" / "curves.json", {"problem_ids": panel.problem_ids, "base": base,
                                                      "curves": curves})
    return {"cells": len(plan)}


def report(cfg: PathsConfig) -> dict:
    """``paths/report.md``, ``paths/summary.json`` and the plots."""
    out = cfg.run_dir / "paths"
    single, curves = read_json(out / "single.json"), read_json(out / "curves.json")
    summary = summarize(cfg, single, curves)
    plots = [plot_scatter(cfg, single, summary, out / "single_latent.png"), plot_curves(cfg, summary, out / "curves.png")]
    summary.save(out / "summary.json")
    write_text(out / "report.md", markdown(cfg, summary, single))
    log_to_wandb(cfg, summary, plots)
    return {"answer": summary.answer, "report": str(out / "report.md"), "plots": [str(p) for p in plots]}


def log_to_wandb(cfg: PathsConfig, summary: OriginsSummary, plots: list[Path]) -> None:
    """The report as one W&B run: the per-latent agreement table, the plots, the answer and each agreement's
    Spearman in the summary, with the lineage from the SAE and every origin's attributions."""
    from ...tracking import Tracker, use_inputs

    with Tracker(cfg.wandb, cfg.run_dir, cfg.name, "paths") as tracker:
        use_inputs(tracker, saes=sae_specs(cfg), attribution_dirs=_attribution_dirs(cfg))
        for plot in plots:
            tracker.image(f"paths/{Path(plot).stem}", plot)
        rows, metrics = [], {"paths/answer": summary.answer}
        for origin, methods in summary.per_latent.items():
            for method, sides in methods.items():
                for side, entry in sides.items():
                    rows.append([origin, method, side, entry.n, *entry.spearman, entry.pearson[0], entry.sign[0]])
                    metrics[f"paths/{origin}/{method}/{side}/spearman"] = entry.spearman[0]
        tracker.table("paths/per_latent", ["origin", "method", "target", "n", "spearman", "lo", "hi", "pearson",
                                           "sign_agreement"], rows)
        tracker.summary(metrics)
