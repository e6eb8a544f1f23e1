r"""The faithfulness study: does the set IPG selects move the outcome more than other sets would?

For each reward (correctness: reasoning capability; length: reasoning strength), on the
offline default model and SAE:

1. ``sample``: attribution problems x ``G`` samples, scored with every reward;
2. ``sae``: the SAE (trained with :mod:`sae_training`, or loaded);
3. ``attribute``: per reward, IPG and every baseline rank the latents;
4. ``heldout``: held-out problems x ``G`` samples of the *unsteered* policy (never attributed on);
5. ``score``: every method's top-``k`` at each ``k`` of the curves, removed (gamma 0: deletion)
   and amplified (gamma > 1: insertion), and a null of random sets matched to IPG's set in
   activation frequency on the held-out data, all estimated off-policy on the held-out samples
   (:mod:`ipg_sae.faithfulness`); each cell is saved as it finishes (a killed study resumes);
6. ``confirm``: the best and the worst cells, and IPG's headline cells, sampled on-policy
   (:func:`ipg_sae.evaluation.evaluate` with ``estimator: sampling``): the estimator is checked
   against the sampler it stands for;
7. ``report``: ``report.md``, ``summary.json``, curves and null histograms.

Effects are differences from the unsteered policy on the same held-out samples, with 95%
paired bootstrap intervals over problems; each method's headline effect is also placed in the
null (percentile, one-sided rank p-value: :func:`ipg_sae.stats.null_rank`). Stages run as in the
pipeline (:mod:`ipg_sae.stages`): a rerun reuses what is done, recomputes what changed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attribution import AttributionConfig, AttributionResult, Baseline
from .attribution.path import has_variance
from .cells import CellStore, Inputs, LogprobCells
from .config import JobConfig, dump_yaml
from .digest import json_digest
from .errors import IPGError
from .evaluation import EvalConfig, evaluate
from .faithfulness import TrajectoryScorer, estimate
from .io import read_json, run_lock, write_json, write_text
from .jobs import AttributeJobConfig, SelectionConfig, check_baselines, method_dir, run_attribute
from .models import load_model
from .nulls import LatentPool, draw_sets
from .report import pyplot, save_figure
from .rewards import get_reward
from .sampling import SamplingConfig, check_fits_context, sample
from .saes import load_saes
from .selection import select
from .stages import SAE_STAGE, SAESourceConfig, Stage, model_inputs, run_stages, sae_specs
from .stats import area_under_curve, bootstrap, null_rank, predicted_direction
from .tasks import TaskConfig, build_prompts, load_problems
from .trajectories import Trajectory, load_trajectories, prompt_groups, save_trajectories

log = logging.getLogger(__name__)


@dataclass
class StudyConfig(JobConfig):
    name: str = "study"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=96))  # the problems attributed on
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n_samples=4, temperature=0.5,
                                                                            max_new_tokens=96, batch_size=32))
    sae: SAESourceConfig = field(default_factory=SAESourceConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    rewards: list[str] = field(default_factory=lambda: ["correctness", "length"])  # one study per reward
    methods: list[Baseline] = field(default_factory=lambda: ["ipg", "act", "grad_x_act", "reason_words",
                                                               "ig_likelihood"])
    attribute_prompts: int = 60  # per reward, the first prompts whose samples got different rewards (0: all)
    heldout: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=100, offset=1000))  # never attributed
    heldout_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n_samples=8, temperature=0.5, max_new_tokens=96, batch_size=32))
    k: int = 16  # the headline set size (must be one of ks)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # deletion and insertion curves
    gammas: list[float] = field(default_factory=lambda: [0.0, 2.0])  # deletion (0) and insertion (> 1)
    null_sets: int = 50  # random sets at the headline k, per gamma, for the first reward
    other_null_sets: int = 20  # the same for the other rewards (each reward's null matches its own IPG set)
    curve_null_sets: int = 3  # random sets at every other k, per gamma (the null's band on the curves)
    null_seed: int = 0
    confirm_samples: int = 4  # on-policy samples per problem for the confirmation cells
    n_bootstrap: int = 2000
    min_ess: float = 0.25
    problems_per_batch: int = 8
    scope: str = "all"

    def validate(self) -> None:
        super().validate()
        if not self.sae.load and not self.sae.train_config:
            raise IPGError("study.sae needs `load` (SAE entries) or `train_config` (a train-sae YAML)")
        for r in self.rewards:
            get_reward(r)
        if "ipg" not in self.methods:
            raise IPGError("study.methods must include ipg: the null is matched to its set")
        check_baselines([m for m in self.methods if m != "ipg"])
        if self.k not in self.ks or min(self.ks) < 1:
            raise IPGError(f"study.k ({self.k}) must be one of study.ks {self.ks} (all >= 1)")
        if sorted(self.gammas) != self.gammas or self.gammas[0] != 0.0 or not all(g > 1 for g in self.gammas[1:]):
            raise IPGError(f"study.gammas {self.gammas}: give 0 (deletion) then amplifying gammas > 1 (insertion)")
        if self.heldout_sampling.temperature <= 0 or self.heldout_sampling.top_p != 1:
            raise IPGError("study.heldout_sampling needs temperature > 0 and top_p 1 (importance weights need a "
                           "sampler with full support)")
        if self.null_sets < 1 or self.other_null_sets < 1 or self.curve_null_sets < 0:
            raise IPGError("study.null_sets and study.other_null_sets must be >= 1, study.curve_null_sets >= 0")


# ---- stages -----------------------------------------------------------------------------------


def _reward_dir(cfg: StudyConfig, reward: str) -> Path:
    return cfg.run_dir / reward


def _with_reward(trajectories: list[Trajectory], reward: str) -> list[Trajectory]:
    """The same samples scored with another reward."""
    fn = get_reward(reward)
    out = []
    for t in trajectories:
        score = fn.score(t.prompt, t.completion, t.reference, len(t.completion_ids))
        out.append(dataclasses.replace(t, reward=score.reward))
    return out


def _sample_stage(cfg: StudyConfig, task: TaskConfig, sampling: SamplingConfig, filename: str,
                  keep_mixed: int = 0) -> dict:
    """Sample once, score with every reward; with ``keep_mixed``, keep only the first prompts whose samples
    got different rewards (the ones attribution works on), per reward."""
    model, tokenizer = load_model(cfg.model)
    problems = load_problems(task)
    trajectories = sample(model, tokenizer, problems, build_prompts(tokenizer, problems, task), sampling,
                          "correctness")
    summary = {}
    for reward in cfg.rewards:
        scored = _with_reward(trajectories, reward)
        ids, groups = prompt_groups([t.prompt_id for t in scored])
        mixed = [pid for pid, idx in zip(ids, groups) if has_variance([scored[i].reward for i in idx])]
        if keep_mixed:
            if not mixed:
                raise IPGError(f"study: no attribution prompt's samples got different {reward} rewards ({len(ids)} "
                               f"prompts x {sampling.n_samples} samples), and attribution needs reward variance; "
                               "sample more problems (task.n_problems) or more per problem (sampling.n_samples), or "
                               "raise sampling.temperature")
            keep = set(mixed[:keep_mixed])
            scored = [t for t in scored if t.prompt_id in keep]
            if len(keep) < keep_mixed:
                log.warning("study: only %d prompts have samples with different %s rewards (wanted %d); sample more "
                            "problems (task.n_problems)", len(keep), reward, keep_mixed)
        save_trajectories(_reward_dir(cfg, reward) / filename, scored)
        summary[reward] = {"mean_reward": float(np.mean([t.reward for t in scored])),
                           "prompts_with_variance": len(mixed), "prompts_kept": len({t.prompt_id for t in scored})}
    summary["accuracy"] = float(np.mean([t.correct for t in trajectories]))
    summary["n"] = len(trajectories)
    return summary


def _attribute_job(cfg: StudyConfig, reward: str) -> AttributeJobConfig:
    return AttributeJobConfig(name=reward, runs_dir=str(cfg.run_dir), model=cfg.model, saes=sae_specs(cfg),
                              attribution=cfg.attribution, baselines=[m for m in cfg.methods if m != "ipg"],
                              selection=SelectionConfig(k=max(cfg.ks), n_bootstrap=0, table_size=max(cfg.ks)),
                              wandb=cfg.wandb)


def _run_attribute(cfg: StudyConfig) -> dict:
    out = {}
    for reward in cfg.rewards:
        summaries = run_attribute(_attribute_job(cfg, reward), group=cfg.name)
        out[reward] = {m: {"top": s["selection"][:8], "delta_median": s.get("delta_median"),
                           "mean_nodes": s.get("mean_nodes")} for m, s in summaries.items()}
    return out


def _attribution_files(cfg: StudyConfig) -> list[Path]:
    from .tracking import attribution_files

    return [f for r in cfg.rewards for m in cfg.methods for f in attribution_files(method_dir(_reward_dir(cfg, r), m))]


def _reward_identities(cfg: StudyConfig) -> list[dict]:
    """The rewards' names and, for user functions, the digests of their code: stored rewards go stale with them."""
    return [get_reward(r).identity for r in cfg.rewards]


STAGES = [
    Stage("sample", lambda c: (c.model, model_inputs(c), c.task, c.sampling, _reward_identities(c), c.attribute_prompts),
          lambda c: _sample_stage(c, c.task, c.sampling, "trajectories.jsonl", c.attribute_prompts),
          outputs=lambda c: [_reward_dir(c, r) / "trajectories.jsonl" for r in c.rewards]),
    SAE_STAGE,
    Stage("attribute", lambda c: (c.attribution, c.methods, c.ks), _run_attribute, outputs=_attribution_files),
    Stage("heldout", lambda c: (c.heldout, c.heldout_sampling, _reward_identities(c)),
          lambda c: _sample_stage(c, c.heldout, c.heldout_sampling, "heldout.jsonl"),
          outputs=lambda c: [_reward_dir(c, r) / "heldout.jsonl" for r in c.rewards]),
    Stage("score", lambda c: (c.k, c.ks, c.gammas, c.null_sets, c.other_null_sets, c.curve_null_sets, c.null_seed,
                              c.n_bootstrap, c.min_ess, c.scope), lambda c: score(c),
          outputs=lambda c: [c.run_dir / "study" / "scores.json"]),
    Stage("confirm", lambda c: (c.confirm_samples,), lambda c: confirm(c),
          outputs=lambda c: [c.run_dir / "study" / "confirm.json"]),
    Stage("report", lambda c: (), lambda c: report(c),
          outputs=lambda c: [c.run_dir / "study" / f for f in ("report.md", "summary.json")]),
]


def run_study(cfg: StudyConfig) -> dict:
    """Run (or resume) every stage of the study; return each stage's summary."""
    check_fits_context(cfg.model, [(cfg.task, cfg.sampling.max_new_tokens, "sampling.max_new_tokens"),
                                   (cfg.heldout, cfg.heldout_sampling.max_new_tokens,
                                    "heldout_sampling.max_new_tokens")])
    with run_lock(cfg.run_dir):
        write_text(cfg.run_dir / "study_config.yaml", dump_yaml(cfg))
        return run_stages(cfg, STAGES)


# ---- scoring: every cell, off-policy --------------------------------------------------------


def _cells(cfg: StudyConfig, model, saes, heldout: list[Trajectory]) -> LogprobCells:
    """Off-policy cells on the held-out samples, each saved to ``study/cells/`` as it finishes."""
    scorer = TrajectoryScorer(model, heldout, cfg.heldout_sampling.temperature, saes=saes,
                              problems_per_batch=cfg.problems_per_batch, scope=cfg.scope)
    return LogprobCells(CellStore(cfg.run_dir / "study" / "cells"), scorer, Inputs.of(model, saes), heldout,
                        cfg.heldout_sampling.temperature, cfg.scope)


def _rankings(cfg: StudyConfig, reward: str) -> dict[str, list[tuple[int, int]]]:
    out = {}
    for method in cfg.methods:
        result = AttributionResult.load(method_dir(_reward_dir(cfg, reward), method))
        out[method] = select(result, max(cfg.ks))
    return out


def score(cfg: StudyConfig, progress: bool = True) -> dict:
    """Estimate every cell of the study off-policy; write ``study/scores.json`` (per-problem estimates)."""
    from tqdm.auto import tqdm

    model, _ = load_model(cfg.model)
    saes = load_saes(sae_specs(cfg), model)
    heldout = {r: load_trajectories(_reward_dir(cfg, r) / "heldout.jsonl") for r in cfg.rewards}
    samples = heldout[cfg.rewards[0]]  # the same samples under every reward
    cells = _cells(cfg, model, saes, samples)
    base_logp = cells.logprobs([], 1.0)
    frequencies = cells.scorer.activation_frequencies()
    pool = LatentPool.of(saes, frequencies=frequencies)
    problem_ids, groups = prompt_groups([t.prompt_id for t in samples])
    values = {"accuracy": torch.tensor([float(t.correct) for t in samples], dtype=torch.float64),
              "length": torch.tensor([float(len(t.completion_ids)) for t in samples], dtype=torch.float64),
              **{f"reward:{r}": torch.tensor([t.reward for t in ts], dtype=torch.float64)
                 for r, ts in heldout.items()}}
    plan = []  # (reward, label, latents, gamma): what to estimate
    for reward in cfg.rewards:
        ranking = _rankings(cfg, reward)
        for method, ranked in ranking.items():
            for k in cfg.ks:
                plan += [(reward, f"{method}|k{k}", ranked[:k], gamma) for gamma in cfg.gammas]
        headline = cfg.null_sets if reward == cfg.rewards[0] else cfg.other_null_sets
        for k in cfg.ks:
            n = headline if k == cfg.k else cfg.curve_null_sets
            for d, draw in enumerate(draw_sets("frequency", ranking["ipg"][:k], n, cfg.null_seed + k, pool)):
                plan += [(reward, f"null{d}|k{k}", draw, gamma) for gamma in cfg.gammas]
    estimates: dict = {}
    for reward, label, latents, gamma in tqdm(plan, desc="study cells", unit="cell", disable=not progress):
        logp = cells.logprobs(latents, gamma, name=f"{label} x{gamma:g}")
        metrics = {"accuracy": values["accuracy"], "length": values["length"], "reward": values[f"reward:{reward}"]}
        est = {name: estimate(base_logp, logp, v, groups) for name, v in metrics.items()}
        estimates.setdefault(reward, {}).setdefault(label, {})[str(gamma)] = {
            "latents": [list(p) for p in latents], "ess": est["reward"].ess.tolist(),
            "log_ratio_sd": est["reward"].log_ratio_sd, **{name: e.per_prompt.tolist() for name, e in est.items()}}
    base = {reward: {"accuracy": [float(values["accuracy"][g].mean()) for g in groups],
                     "length": [float(values["length"][g].mean()) for g in groups],
                     "reward": [float(values[f"reward:{reward}"][g].mean()) for g in groups]}
            for reward in cfg.rewards}
    out = {"problem_ids": problem_ids, "samples_per_problem": len(samples) // max(1, len(groups)), "base": base,
           "cells": estimates, "frequencies": {str(layer): f.tolist() for layer, f in frequencies.items()}}
    write_json(cfg.run_dir / "study" / "scores.json", out)
    return {"cells": len(plan), "distinct_cells": len({(json_digest(sorted(map(list, l))), g) for _, _, l, g in plan}),
            "problems": len(problem_ids)}


# ---- statistics ----------------------------------------------------------------------------


def summarize(cfg: StudyConfig, scores: dict) -> dict:
    """Effects with paired intervals, the null, percentiles, p-values and curve areas, per reward."""
    boot = dict(n_boot=cfg.n_bootstrap, confidence=0.95)
    out = {}
    for reward, cells in scores["cells"].items():
        base = {m: np.array(v) for m, v in scores["base"][reward].items()}
        res = {"base": {m: float(v.mean()) for m, v in base.items()}, "methods": {}, "null": {}, "curves": {}}
        for gamma in map(str, cfg.gammas):
            null_effects = {}
            for k in cfg.ks:
                draws = [cells[label][gamma] for label in cells if label.startswith("null") and label.endswith(f"|k{k}")]
                null_effects[k] = [float(np.mean(d["reward"]) - base["reward"].mean()) for d in draws]
            headline_draws = np.array([cells[label][gamma]["reward"] for label in cells
                                       if label.startswith("null") and label.endswith(f"|k{cfg.k}")])
            res["null"][gamma] = {"k": cfg.k, "n": len(null_effects[cfg.k]), "effects": null_effects[cfg.k],
                                  "band": {str(k): [float(np.quantile(e, 0.05)), float(np.quantile(e, 0.95))]
                                           if e else None for k, e in null_effects.items()},
                                  "mean_ess": float(np.mean([cells[label][gamma]["ess"] for label in cells
                                                             if label.startswith("null")]))}
            for method in cfg.methods:
                entry = res["methods"].setdefault(method, {})
                curve = []
                for k in cfg.ks:
                    cell = cells[f"{method}|k{k}"][gamma]
                    x = np.array(cell["reward"])
                    effect, lo, hi = bootstrap(x, base["reward"], **boot)
                    row = {"value": float(x.mean()), "effect": effect, "lo": lo, "hi": hi,
                           "accuracy": float(np.mean(cell["accuracy"])), "length": float(np.mean(cell["length"])),
                           "ess_mean": float(np.mean(cell["ess"])), "ess_min": float(np.min(cell["ess"])),
                           "ess_flag": float(np.mean(cell["ess"])) < cfg.min_ess, "latents": cell["latents"]}
                    if k == cfg.k:
                        pct, p = null_rank(effect, null_effects[k], predicted_direction(float(gamma)))
                        vs, vs_lo, vs_hi = bootstrap(x, headline_draws, **boot)  # against the null's mean
                        row.update(null_percentile=pct, p_value=p, vs_null=vs, vs_null_lo=vs_lo, vs_null_hi=vs_hi)
                        entry[gamma] = row
                    curve.append(row)
                res["curves"].setdefault(method, {})[gamma] = {
                    "ks": cfg.ks, "values": [r["value"] for r in curve], "lo": [r["lo"] + res["base"]["reward"]
                                                                               for r in curve],
                    "hi": [r["hi"] + res["base"]["reward"] for r in curve],
                    "auc": area_under_curve([r["value"] for r in curve], res["base"]["reward"])}
        out[reward] = res
    return out


def confirmation_cells(cfg: StudyConfig, summary: dict) -> list[dict]:
    """The best and the worst headline cells of the first reward (by effect in the predicted direction), and
    IPG's headline cells at every gamma: the cells sampled on-policy to check the estimator."""
    reward = cfg.rewards[0]
    res = summary[reward]["methods"]
    cands = [(m, g, res[m][g]) for m in res for g in res[m]]
    ranked = sorted(cands, key=lambda c: predicted_direction(float(c[1])) * c[2]["effect"])
    chosen = [ranked[-1], ranked[0]] + [c for c in cands if c[0] == "ipg"]
    out, seen = [], set()
    for method, gamma, row in chosen:
        if (method, gamma) not in seen:
            seen.add((method, gamma))
            out.append({"reward": reward, "method": method, "gamma": float(gamma), "latents": row["latents"],
                        "why": "best" if (method, gamma) == ranked[-1][:2] else
                        "worst" if (method, gamma) == ranked[0][:2] else "ipg headline"})
    return out


def confirm(cfg: StudyConfig) -> dict:
    """On-policy sampling of the confirmation cells; agreement with the off-policy estimates."""
    scores = read_json(cfg.run_dir / "study" / "scores.json")
    summary = summarize(cfg, scores)
    model, tokenizer = load_model(cfg.model)
    saes = load_saes(sae_specs(cfg), model)
    problems = load_problems(cfg.heldout)
    prompts = build_prompts(tokenizer, problems, cfg.heldout)
    sampling = dataclasses.replace(cfg.heldout_sampling, n_samples=cfg.confirm_samples)
    results = []
    for cell in confirmation_cells(cfg, summary):
        name = f"{cell['method']}-k{cfg.k}"
        ev = EvalConfig(estimator="sampling", gammas=[cell["gamma"]], seeds=[1], k=None, target=name,
                        n_random_sets=0, sampling=sampling, reward=cell["reward"], task=cfg.heldout,
                        n_bootstrap=cfg.n_bootstrap)
        result = evaluate(model, tokenizer, saes, problems, prompts, {name: [tuple(p) for p in cell["latents"]]}, ev,
                          out_dir=cfg.run_dir / "study" / "confirm" / cell["reward"], progress=True)
        on = {r["problem_id"]: [] for r in result.samples if r["set"] == name}
        for r in result.samples:
            if r["set"] == name:
                on[r["problem_id"]].append(float(r["reward"]))
        on_policy = np.array([np.mean(on[pid]) for pid in scores["problem_ids"]])
        off = np.array(scores["cells"][cell["reward"]][f"{cell['method']}|k{cfg.k}"][str(cell["gamma"])]["reward"])
        boot = dict(n_boot=cfg.n_bootstrap, confidence=0.95)
        diff, lo, hi = bootstrap(off, on_policy, **boot)  # paired by problem
        results.append({**cell, "on_policy": list(bootstrap(on_policy, **boot)), "off_policy": list(bootstrap(off, **boot)),
                        "off_minus_on": [diff, lo, hi], "agree": bool(lo <= 0 <= hi),
                        "on_policy_samples": int(sum(map(len, on.values())))})
        log.info("confirm %s x%g (%s): off-policy %.3f, on-policy %.3f, difference %.3f [%.3f, %.3f]",
                 name, cell["gamma"], cell["why"], off.mean(), on_policy.mean(), diff, lo, hi)
    write_json(cfg.run_dir / "study" / "confirm.json", {"cells": results})
    return {"cells": len(results), "agree": sum(r["agree"] for r in results)}


# ---- the report ----------------------------------------------------------------------------

_METRIC = {"correctness": ("accuracy", "{:.1%}", 100, "pts"), "length": ("mean length", "{:.1f}", 1, "tokens")}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _fmt(reward: str, x: float, signed: bool = False) -> str:
    name, fmt, scale_, unit = _METRIC.get(reward, ("reward", "{:.3f}", 1, ""))
    if signed:
        return f"{x * scale_:+.1f} {unit}".strip()
    return fmt.format(x)


def _method_color(cfg: StudyConfig, method: str) -> str:
    """IPG in red on every plot; each other method its own colour, the same on the curves and the nulls."""
    if method == "ipg":
        return "C3"
    others = [m for m in cfg.methods if m != "ipg"]
    return [c for c in (f"C{i}" for i in range(10)) if c != "C3"][others.index(method) % 9]


def plot_curves(cfg: StudyConfig, reward: str, res: dict, path: Path) -> Path:
    """Estimated reward against k, deletion (gamma 0) and insertion side by side, with the null's 5-95% band."""
    plt = pyplot()
    gammas = [str(g) for g in cfg.gammas]
    fig, axes = plt.subplots(1, len(gammas), figsize=(5.2 * len(gammas), 4.0), squeeze=False)
    base = res["base"]["reward"]
    for ax, gamma in zip(axes[0], gammas):
        band = res["null"][gamma]["band"]
        ks = [k for k in cfg.ks if band.get(str(k))]
        if ks:
            ax.fill_between(ks, [base + band[str(k)][0] for k in ks], [base + band[str(k)][1] for k in ks],
                            color="grey", alpha=0.25, label="matched random sets (5-95%)")
        ax.axhline(base, color="black", lw=1, label="no steering")
        for j, method in enumerate(cfg.methods):
            c = res["curves"][method][gamma]
            y = np.array(c["values"])
            err = np.abs(np.array([c["lo"], c["hi"]]) - y)
            ax.errorbar(np.array(c["ks"]) * (1 + 0.04 * (j - len(cfg.methods) / 2)), y, yerr=err, marker="o", ms=4,
                        capsize=2, lw=2 if method == "ipg" else 1, label=method, color=_method_color(cfg, method))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (top latents of each method)")
        ax.set_ylabel(_METRIC.get(reward, ("reward",))[0] + " (off-policy estimate)")
        ax.set_title(("deletion" if float(gamma) < 1 else "insertion") + f": gamma {float(gamma):g}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{reward}: held-out estimate vs k", fontsize=10)
    return save_figure(fig, path)


def plot_null(cfg: StudyConfig, reward: str, res: dict, path: Path) -> Path:
    """The null's effects at the headline k (histogram) with each method's effect marked."""
    plt = pyplot()
    gammas = [str(g) for g in cfg.gammas]
    fig, axes = plt.subplots(1, len(gammas), figsize=(5.2 * len(gammas), 3.6), squeeze=False)
    _, _, scale_, unit = _METRIC.get(reward, ("reward", "", 1, ""))
    for ax, gamma in zip(axes[0], gammas):
        effects = np.array(res["null"][gamma]["effects"]) * scale_
        ax.hist(effects, bins=20, color="grey", alpha=0.6, label=f"{len(effects)} matched random sets")
        for method in cfg.methods:
            e = res["methods"][method][gamma]["effect"] * scale_
            ax.axvline(e, color=_method_color(cfg, method), lw=2 if method == "ipg" else 1, label=method)
        ax.set_xlabel(f"effect vs no steering ({unit})")
        ax.set_title(("deletion" if float(gamma) < 1 else "insertion") + f", k {cfg.k}, gamma {float(gamma):g}")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def report(cfg: StudyConfig) -> dict:
    """``study/report.md``, ``study/summary.json`` and the plots; logged to W&B."""
    from .tracking import Tracker

    out = cfg.run_dir / "study"
    scores = read_json(out / "scores.json")
    summary = summarize(cfg, scores)
    confirmation = read_json(out / "confirm.json")["cells"] if (out / "confirm.json").is_file() else []
    plots = {}
    for reward, res in summary.items():
        plots[f"curves_{_slug(reward)}"] = plot_curves(cfg, reward, res, out / f"curves_{_slug(reward)}.png")
        plots[f"null_{_slug(reward)}"] = plot_null(cfg, reward, res, out / f"null_{_slug(reward)}.png")
    compact = {reward: {"base": res["base"], "null_size": {g: n["n"] for g, n in res["null"].items()},
                        "null_mean_ess": {g: n["mean_ess"] for g, n in res["null"].items()},
                        "methods": {m: {g: {k: v for k, v in row.items() if k != "latents"} for g, row in rows.items()}
                                    for m, rows in res["methods"].items()},
                        "auc": {m: {g: c["auc"] for g, c in curves.items()} for m, curves in res["curves"].items()}}
               for reward, res in summary.items()}
    doc = {"k": cfg.k, "ks": cfg.ks, "gammas": cfg.gammas, "problems": len(scores["problem_ids"]),
           "samples_per_problem": scores["samples_per_problem"], "null_sets": cfg.null_sets,
           "curve_null_sets": cfg.curve_null_sets, "rewards": compact, "confirmation": confirmation,
           "answer": {reward: answer(cfg, reward, summary[reward]) for reward in summary}}
    write_json(out / "summary.json", doc)
    write_text(out / "report.md", _markdown(cfg, summary, confirmation, doc))
    with Tracker(cfg.wandb, cfg.run_dir, cfg.name, "study") as tracker:
        for key, path in plots.items():
            tracker.image(f"study/{key}", path)
        for reward, res in summary.items():
            for gamma, null in res["null"].items():
                tracker.histogram(f"study/null_{reward}_gamma{gamma}", np.array(null["effects"]))
            rows = [[reward, m, float(g), r["effect"], r["lo"], r["hi"], r.get("null_percentile"), r.get("p_value"),
                     r["ess_mean"]] for m, rs in res["methods"].items() for g, r in rs.items()]
            tracker.table(f"study/{reward}", ["reward", "method", "gamma", "effect", "lo", "hi", "null_percentile",
                                              "p_value", "ess"], rows)
    return {"answer": doc["answer"], "report": str(out / "report.md")}


def answer(cfg: StudyConfig, reward: str, res: dict) -> str:
    """One sentence: does IPG's set beat the matched null, with the interval, and which method did best."""
    parts = []
    for gamma in map(str, cfg.gammas):
        row = res["methods"]["ipg"][gamma]
        kind = "removing" if float(gamma) < 1 else f"amplifying (x{float(gamma):g})"
        beats = row["p_value"] < 0.05 and predicted_direction(float(gamma)) * row["effect"] > 0
        parts.append(f"{kind} IPG's top {cfg.k} latents changed {_METRIC.get(reward, ('reward',))[0]} by "
                     f"{_fmt(reward, row['effect'], True)} [{_fmt(reward, row['lo'], True)}, "
                     f"{_fmt(reward, row['hi'], True)}], {row['null_percentile']:.0f}th percentile of "
                     f"{res['null'][gamma]['n']} matched random sets (p = {row['p_value']:.2f}: "
                     f"{'beats' if beats else 'does not beat'} the null)")
    best = max(cfg.methods, key=lambda m: sum(predicted_direction(float(g)) * res["methods"][m][g]["effect"]
                                              for g in map(str, cfg.gammas)))
    return "; ".join(parts) + f". The method whose sets moved it most in the predicted directions: {best}."


def _markdown(cfg: StudyConfig, summary: dict, confirmation: list, doc: dict) -> str:
    lines = [f"# Faithfulness study: `{cfg.name}`", "",
             f"Held-out problems: {doc['problems']} x {doc['samples_per_problem']} unsteered samples (temperature "
             f"{cfg.heldout_sampling.temperature}); every cell is an off-policy estimate on those samples "
             "(self-normalised importance weights, `ipg_sae.faithfulness`). Effects are against no steering on the "
             "same samples, with 95% paired bootstrap intervals over problems. The null: random sets matched to "
             f"IPG's set in activation frequency on the held-out data ({cfg.null_sets} sets at k {cfg.k} for "
             f"{cfg.rewards[0]}, {cfg.other_null_sets} for the other rewards, {cfg.curve_null_sets} at each other k). Percentile and one-sided rank p-value (among the random sets; not a permutation test) are in the "
             "predicted direction (removal lowers the reward, amplification raises it). Intervals are not "
             "corrected for the number of cells.", ""]
    for reward, res in summary.items():
        lines += [f"## Reward: {reward}", "", f"**{doc['answer'][reward]}**", "",
                  f"No steering: {_METRIC.get(reward, ('reward',))[0]} {_fmt(reward, res['base']['reward'])} "
                  f"(accuracy {res['base']['accuracy']:.1%}, mean length {res['base']['length']:.1f}).", "",
                  "| method | gamma | effect [95% CI] | vs null mean [95% CI] | null percentile | p | ESS (mean, min) |",
                  "|---|---|---|---|---|---|---|"]
        for method, rows in res["methods"].items():
            for gamma, r in rows.items():
                flag = " (low)" if r["ess_flag"] else ""
                lines.append(f"| {method} | {float(gamma):g} | {_fmt(reward, r['effect'], True)} "
                             f"[{_fmt(reward, r['lo'], True)}, {_fmt(reward, r['hi'], True)}] | "
                             f"{_fmt(reward, r['vs_null'], True)} [{_fmt(reward, r['vs_null_lo'], True)}, "
                             f"{_fmt(reward, r['vs_null_hi'], True)}] | {r['null_percentile']:.0f} | "
                             f"{r['p_value']:.3f} | {r['ess_mean']:.2f}, {r['ess_min']:.2f}{flag} |")
        lines += ["", "Area under the curve (mean effect over k = " + ", ".join(map(str, cfg.ks)) + "):", "",
                  "| method | " + " | ".join(("deletion" if g < 1 else f"insertion x{g:g}") for g in cfg.gammas) + " |",
                  "|---|" + "---|" * len(cfg.gammas)]
        for method, curves in res["curves"].items():
            lines.append(f"| {method} | " + " | ".join(_fmt(reward, curves[str(g)]["auc"], True) for g in cfg.gammas)
                         + " |")
        lines += ["", f"![curves](curves_{_slug(reward)}.png)", "", f"![null](null_{_slug(reward)}.png)", ""]
    if confirmation:
        lines += ["## On-policy confirmation", "",
                  "The same cells sampled under their steering (a fresh seed), against the off-policy estimate:", "",
                  "| cell | why | off-policy [95% CI] | on-policy [95% CI] | off - on [95% CI] | agree |",
                  "|---|---|---|---|---|---|"]
        for c in confirmation:
            r = c["reward"]
            off, on, d = c["off_policy"], c["on_policy"], c["off_minus_on"]
            lines.append(f"| {c['method']} k{cfg.k} x{c['gamma']:g} ({r}) | {c['why']} | {_fmt(r, off[0])} "
                         f"[{_fmt(r, off[1])}, {_fmt(r, off[2])}] | {_fmt(r, on[0])} [{_fmt(r, on[1])}, "
                         f"{_fmt(r, on[2])}] | {_fmt(r, d[0], True)} [{_fmt(r, d[1], True)}, {_fmt(r, d[2], True)}] "
                         f"| {'yes' if c['agree'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)
