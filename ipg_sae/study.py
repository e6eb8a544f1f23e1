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
from .cells import BASE, CellStore, Inputs, LogprobCells
from .config import JobConfig
from .digest import json_digest
from .errors import IPGError
from .evaluation import EvalConfig, PerProblem, degenerate_flags, evaluate, unsteered_trajectories
from .faithfulness import TrajectoryScorer, estimate
from .io import read_json, write_json, write_text
from .jobs import AttributeJobConfig, SelectionConfig, check_baselines, method_dir, run_attribute
from .models import load_model
from .nulls import LatentPool, draw_sets, set_policy_change
from .provenance import PROVENANCE_FILE, write_provenance
from .rewards import get_reward
from .sampling import SamplingConfig, eos_ids, sample
from .saes import load_saes
from .selection import permuted_rankings, select
from .stages import (SAE_STAGE, SAESourceConfig, Stage, model_files, model_inputs, run_job_stages, sae_specs,
                     task_files)
from .stats import area_under_curve, bootstrap, null_rank, predicted_direction
from .study_report import answer, markdown, plot_calibration, plot_curves, plot_null, plot_push, slug
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
    push_null_sets: int = 20  # push-matched random sets at the headline k, per gamma (first reward; other_null_sets
    # after, as the other nulls) (nulls.push_matched_sets)
    policy_null_sets: int = 20  # policy-change-matched random sets, the same way (nulls.policy_matched_sets)
    permutation_sets: int = 50  # reward-permutation null sets at k, per gamma (first reward; other_null_sets after)
    sign_control: bool = True  # IPG's bottom k (most negative scores) beside its top k
    null_seed: int = 0
    confirm_samples: int = 4  # on-policy samples per problem and seed for the confirmation cells
    confirm_seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # x confirm_samples = 16 per problem
    confirm_null_sets: int = 5  # sets of each new null (push, permutation) confirmed on-policy, per gamma
    confirm_other_rewards: bool = True  # also sample each other reward's IPG set and sign control on-policy
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
        if min(self.push_null_sets, self.policy_null_sets, self.permutation_sets) < 0:
            raise IPGError("study.push_null_sets, study.policy_null_sets and study.permutation_sets must be >= 0 (0: "
                           "that null is not drawn)")


# ---- stages -----------------------------------------------------------------------------------


def reward_dir(cfg: StudyConfig, reward: str) -> Path:
    return cfg.run_dir / reward


def _with_reward(trajectories: list[Trajectory], reward: str) -> list[Trajectory]:
    """The same samples scored with another reward."""
    fn = get_reward(reward)
    out = []
    for t in trajectories:
        score = fn.score(t.prompt, t.completion, t.reference, len(t.completion_ids))
        out.append(dataclasses.replace(t, reward=score.reward))
    return out


def sample_stage(cfg: StudyConfig, task: TaskConfig, sampling: SamplingConfig, filename: str,
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
        save_trajectories(reward_dir(cfg, reward) / filename, scored)
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
        write_provenance(reward_dir(cfg, reward), cfg.task, sae_specs(cfg), get_reward(reward).identity)
        out[reward] = {m: {"top": s["selection"][:8], "delta_median": s.get("delta_median"),
                           "mean_nodes": s.get("mean_nodes")} for m, s in summaries.items()}
    return out


def _attribution_files(cfg: StudyConfig) -> list[Path]:
    from .tracking import attribution_files

    files = []
    for r in cfg.rewards:
        files += [f for m in cfg.methods for f in attribution_files(method_dir(reward_dir(cfg, r), m))]
        files.append(reward_dir(cfg, r) / PROVENANCE_FILE)
    return files


def _reward_identities(cfg: StudyConfig) -> list[dict]:
    """The rewards' names and, for user functions, the digests of their code: stored rewards go stale with them."""
    return [get_reward(r).identity for r in cfg.rewards]


STAGES = [
    Stage("sample", lambda c: sample_stage(c, c.task, c.sampling, "trajectories.jsonl", c.attribute_prompts),
          outputs=lambda c: [reward_dir(c, r) / "trajectories.jsonl" for r in c.rewards],
          fields=("model", "task", "sampling", "rewards", "attribute_prompts"),
          files=lambda c: [*model_files(c), *task_files(c.task)],
          identity=lambda c: (model_inputs(c), _reward_identities(c))),
    SAE_STAGE,
    Stage("attribute", _run_attribute, outputs=_attribution_files, fields=("attribution", "methods", "ks")),
    Stage("heldout", lambda c: sample_stage(c, c.heldout, c.heldout_sampling, "heldout.jsonl"),
          outputs=lambda c: [reward_dir(c, r) / "heldout.jsonl" for r in c.rewards],
          fields=("heldout", "heldout_sampling"), files=lambda c: task_files(c.heldout)),
    Stage("score", lambda c: score(c), outputs=lambda c: [c.run_dir / "study" / "scores.json"],
          fields=("k", "ks", "gammas", "null_sets", "other_null_sets", "curve_null_sets", "null_seed", "n_bootstrap",
                  "min_ess", "scope", "push_null_sets", "permutation_sets", "sign_control", "policy_null_sets",
                  "problems_per_batch")),
    Stage("confirm", lambda c: confirm(c), outputs=lambda c: [c.run_dir / "study" / "confirm.json"],
          fields=("confirm_samples", "confirm_seeds", "confirm_null_sets", "confirm_other_rewards")),
    Stage("report", lambda c: report(c),
          outputs=lambda c: [c.run_dir / "study" / f for f in ("report.md", "summary.json")]),
]


def run_study(cfg: StudyConfig) -> dict:
    """Run (or resume) every stage of the study; return each stage's summary."""
    return run_job_stages(cfg, STAGES, "study_config.yaml", contexts(cfg))


def contexts(cfg) -> list:
    """The (task, max_new_tokens, field) pairs a job with attribution and held-out sampling checks first."""
    return [(cfg.task, cfg.sampling.max_new_tokens, "sampling.max_new_tokens"),
            (cfg.heldout, cfg.heldout_sampling.max_new_tokens, "heldout_sampling.max_new_tokens")]


# ---- scoring: every cell, off-policy --------------------------------------------------------


def _cells(cfg: StudyConfig, model, saes, heldout: list[Trajectory]) -> LogprobCells:
    """Off-policy cells on the held-out samples, each saved to ``study/cells/`` as it finishes."""
    scorer = TrajectoryScorer(model, heldout, cfg.heldout_sampling.temperature, saes=saes,
                              problems_per_batch=cfg.problems_per_batch, scope=cfg.scope)
    return LogprobCells(CellStore(cfg.run_dir / "study" / "cells"), scorer, Inputs.of(model, saes), heldout,
                        cfg.heldout_sampling.temperature, cfg.scope)


def _control_sets(cfg: StudyConfig, reward: str, ranking: dict, pool: LatentPool,
                  n_permutations: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """The controls at the headline k: IPG's bottom k (the sign control), push-matched and policy-change-matched
    random sets and the reward-permutation null (IPG's selection on shuffled rewards); after the first reward, each
    null at most ``n_permutations`` sets."""
    out = []
    ipg = AttributionResult.load(method_dir(reward_dir(cfg, reward), "ipg"))
    if cfg.sign_control:
        out.append((f"ipg_bottom|k{cfg.k}", select(ipg, cfg.k, bottom=True)))
    first = reward == cfg.rewards[0]
    for kind, sets, seed in (("push", cfg.push_null_sets, 7919), ("policy", cfg.policy_null_sets, 7927)):
        n = sets if first else min(sets, n_permutations)
        if n:
            draws = draw_sets(kind, ranking["ipg"][:cfg.k], n, cfg.null_seed + seed, pool)
            out += [(f"{NULL_KINDS[kind]}{d}|k{cfg.k}", draw) for d, draw in enumerate(draws)]
    n = cfg.permutation_sets if first else min(cfg.permutation_sets, n_permutations)
    if n:
        try:
            draws = permuted_rankings(ipg, cfg.k, n, seed=cfg.null_seed)
        except IPGError as e:  # e.g. a trajectory at exactly its group's baseline (a non-binary reward)
            log.warning("study: no reward-permutation null for %s: %s", reward, e)
            draws = []
        out += [(f"perm{d}|k{cfg.k}", draw) for d, draw in enumerate(draws)]
    return out


def _rankings(cfg: StudyConfig, reward: str) -> dict[str, list[tuple[int, int]]]:
    out = {}
    for method in cfg.methods:
        result = AttributionResult.load(method_dir(reward_dir(cfg, reward), method))
        out[method] = select(result, max(cfg.ks))
    return out


def score(cfg: StudyConfig, progress: bool = True) -> dict:
    """Estimate every cell of the study off-policy; write ``study/scores.json`` (per-problem estimates)."""
    from tqdm.auto import tqdm

    model, tokenizer = load_model(cfg.model)
    saes = load_saes(sae_specs(cfg), model)
    heldout = {r: load_trajectories(reward_dir(cfg, r) / "heldout.jsonl") for r in cfg.rewards}
    samples = heldout[cfg.rewards[0]]  # the same samples under every reward
    cells = _cells(cfg, model, saes, samples)
    base_logp = cells.logprobs([], 1.0)
    frequencies = cells.scorer.activation_frequencies()
    pool = LatentPool.of(saes, frequencies=frequencies, push=cells.scorer.latent_push(),
                         policy_per_sample=cells.policy_change(progress))
    problem_ids, groups = prompt_groups([t.prompt_id for t in samples])
    stops = eos_ids(model, tokenizer)
    flags = [degenerate_flags(t, EvalConfig(), stops) for t in samples]
    values = {"accuracy": torch.tensor([float(t.correct) for t in samples], dtype=torch.float64),
              "length": torch.tensor([float(len(t.completion_ids)) for t in samples], dtype=torch.float64),
              # formatting, as evaluate counts it: unparsed, and degenerate (repetitive, empty or unparsed)
              **{flag: torch.tensor([float(f[flag]) for f in flags], dtype=torch.float64)
                 for flag in ("parsed", "degenerate")},
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
        plan += [(reward, label, latents, gamma) for label, latents in _control_sets(cfg, reward, ranking, pool,
                                                                                     headline) for gamma in cfg.gammas]
    estimates: dict = {}
    for reward, label, latents, gamma in tqdm(plan, desc="study cells", unit="cell", disable=not progress):
        logp = cells.logprobs(latents, gamma, name=f"{label} x{gamma:g}")
        metrics = {"accuracy": values["accuracy"], "length": values["length"], "reward": values[f"reward:{reward}"]}
        metrics.update(parsed=values["parsed"], degenerate=values["degenerate"])
        est = {name: estimate(base_logp, logp, v, groups) for name, v in metrics.items()}
        shift = (logp - base_logp).abs()  # how far the set moves each sample's log-probability: the realised push
        estimates.setdefault(reward, {}).setdefault(label, {})[str(gamma)] = {
            "latents": [list(p) for p in latents], "ess": est["reward"].ess.tolist(),
            "log_ratio_sd": est["reward"].log_ratio_sd, "abs_log_ratio": float(shift.mean()),
            "abs_log_ratio_per_token": float((shift / values["length"].clamp(min=1)).mean()),
            "first_order_change": set_policy_change(latents, pool),  # what the policy null matches, to first order
            **{name: e.per_prompt.tolist() for name, e in est.items()}}
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


NULL_KINDS = {"frequency": "null", "push": "push", "policy": "policy", "permutation": "perm"}  # kind -> label prefix


def _null_labels(cells: dict, kind: str, k: int | None) -> list[str]:
    """The labels of one null's cells at ``k`` (at every k when None), in draw order (the order they were scored)."""
    pattern = re.compile(rf"{NULL_KINDS[kind]}\d+\|k{k if k is not None else '[0-9]+'}")
    return [label for label in cells if pattern.fullmatch(label)]


def _effect_row(cfg: StudyConfig, cell: dict, base: np.ndarray) -> dict:
    """A cell's effect against no steering (paired bootstrap over problems) and what it did besides."""
    x = np.array(cell["reward"])
    effect, lo, hi = bootstrap(x, base, n_boot=cfg.n_bootstrap, confidence=0.95)
    return {"value": float(x.mean()), "effect": effect, "lo": lo, "hi": hi,
            "accuracy": float(np.mean(cell["accuracy"])), "length": float(np.mean(cell["length"])),
            "parsed": float(np.mean(cell["parsed"])) if "parsed" in cell else None,
            "degenerate": float(np.mean(cell["degenerate"])) if "degenerate" in cell else None,
            "abs_log_ratio": cell.get("abs_log_ratio"), "abs_log_ratio_per_token": cell.get("abs_log_ratio_per_token"),
            "first_order_change": cell.get("first_order_change"),
            "ess_mean": float(np.mean(cell["ess"])), "ess_min": float(np.min(cell["ess"])),
            "ess_flag": float(np.mean(cell["ess"])) < cfg.min_ess, "latents": cell["latents"]}


def summarize(cfg: StudyConfig, scores: dict) -> dict:
    """Effects with paired intervals, the nulls, percentiles, p-values and curve areas, per reward."""
    boot = dict(n_boot=cfg.n_bootstrap, confidence=0.95)
    out = {}
    for reward, cells in scores["cells"].items():
        base = {m: np.array(v) for m, v in scores["base"][reward].items()}
        res = {"base": {m: float(v.mean()) for m, v in base.items()}, "methods": {}, "null": {}, "curves": {},
               "nulls": {}, "sign_control": {}}
        for gamma in map(str, cfg.gammas):
            direction = predicted_direction(float(gamma))
            null_effects = {}
            for k in cfg.ks:
                draws = [cells[label][gamma] for label in _null_labels(cells, "frequency", k)]
                null_effects[k] = [float(np.mean(d["reward"]) - base["reward"].mean()) for d in draws]
            headline_draws = np.array([cells[label][gamma]["reward"]
                                       for label in _null_labels(cells, "frequency", cfg.k)])
            res["null"][gamma] = {"k": cfg.k, "n": len(null_effects[cfg.k]), "effects": null_effects[cfg.k],
                                  "band": {str(k): [float(np.quantile(e, 0.05)), float(np.quantile(e, 0.95))]
                                           if e else None for k, e in null_effects.items()},
                                  "mean_ess": float(np.mean([cells[label][gamma]["ess"]
                                                             for label in _null_labels(cells, "frequency", None)]))}
            res["nulls"][gamma] = {}
            for kind in NULL_KINDS:
                draws = [cells[label][gamma] for label in _null_labels(cells, kind, cfg.k)]
                if draws:
                    res["nulls"][gamma][kind] = {
                        "n": len(draws), "effects": [float(np.mean(d["reward"]) - base["reward"].mean()) for d in draws],
                        "abs_log_ratios": [d.get("abs_log_ratio") for d in draws],  # each set's realised push
                        "mean_ess": float(np.mean([np.mean(d["ess"]) for d in draws])),
                        **{m: float(np.mean([np.mean(d[m]) for d in draws])) if all(m in d for d in draws) else None
                           for m in ("abs_log_ratio", "abs_log_ratio_per_token", "first_order_change", "parsed",
                                     "degenerate")}}
            control = cells.get(f"ipg_bottom|k{cfg.k}", {}).get(gamma)
            if control is not None:
                row = _effect_row(cfg, control, base["reward"])
                row["as_predicted"] = bool(-direction * row["effect"] > 0)  # the opposite of the top set's
                res["sign_control"][gamma] = row
            for method in cfg.methods:
                entry = res["methods"].setdefault(method, {})
                curve = []
                for k in cfg.ks:
                    cell = cells[f"{method}|k{k}"][gamma]
                    row = _effect_row(cfg, cell, base["reward"])
                    if k == cfg.k:
                        pct, p = null_rank(row["effect"], null_effects[k], direction)
                        vs, vs_lo, vs_hi = bootstrap(np.array(cell["reward"]), headline_draws, **boot)
                        row.update(null_percentile=pct, p_value=p, vs_null=vs, vs_null_lo=vs_lo, vs_null_hi=vs_hi)
                        row["nulls"] = {kind: dict(zip(("percentile", "p_value"),
                                                       null_rank(row["effect"], null["effects"], direction)))
                                        for kind, null in res["nulls"][gamma].items()}
                        entry[gamma] = row
                    curve.append(row)
                res["curves"].setdefault(method, {})[gamma] = {
                    "ks": cfg.ks, "values": [r["value"] for r in curve], "lo": [r["lo"] + res["base"]["reward"]
                                                                               for r in curve],
                    "hi": [r["hi"] + res["base"]["reward"] for r in curve],
                    "auc": area_under_curve([r["value"] for r in curve], res["base"]["reward"])}
        out[reward] = res
    return out


def confirmation_cells(cfg: StudyConfig, summary: dict, scores: dict) -> list[dict]:
    """The cells sampled on-policy, at every gamma: for the first reward IPG's headline set, the best baseline's,
    the sign control and the first ``confirm_null_sets`` sets of the push, policy and permutation nulls; for each other
    reward (``confirm_other_rewards``) IPG's headline set and the sign control. Each with its off-policy estimate,
    per problem."""
    out = []
    for reward in cfg.rewards if cfg.confirm_other_rewards else cfg.rewards[:1]:
        headline = reward == cfg.rewards[0]
        res, cells = summary[reward], scores["cells"][reward]
        base = np.array(scores["base"][reward]["reward"])
        for gamma in map(str, cfg.gammas):
            chosen = [("ipg", f"ipg|k{cfg.k}", "ipg headline")]
            baselines = [m for m in res["methods"] if m != "ipg"]
            if baselines and headline:
                best = max(baselines,
                           key=lambda m: predicted_direction(float(gamma)) * res["methods"][m][gamma]["effect"])
                chosen.append((best, f"{best}|k{cfg.k}", "best baseline"))
            if f"ipg_bottom|k{cfg.k}" in cells:
                chosen.append(("ipg_bottom", f"ipg_bottom|k{cfg.k}", "sign control"))
            for kind in ("push", "policy", "permutation") if headline else ():
                labels = _null_labels(cells, kind, cfg.k)[:cfg.confirm_null_sets]
                chosen += [(label.split("|")[0], label, f"{kind} null") for label in labels]
            for name, label, why in chosen:
                off = np.array(cells[label][gamma]["reward"])
                out.append({"reward": reward, "set": f"{name}-k{cfg.k}", "gamma": float(gamma), "why": why,
                            "latents": cells[label][gamma]["latents"],
                            "off_policy_effect": float(off.mean() - base.mean()),
                            "off_policy_per_problem": (off - base).tolist()})
    return out


def confirm(cfg: StudyConfig) -> dict:
    """On-policy effects of the confirmation cells: each sampled under its steering with the same seeds as an
    unsteered run (``confirm_seeds`` x ``confirm_samples`` per problem), the effect paired by problem (and,
    with the loop sampler, by each sample's random stream); beside each, its off-policy estimate and, per reward,
    the calibration across cells (on-policy effect against off-policy effect). Also checks that the evaluation
    path regenerates the held-out samples token for token (:func:`regeneration_check`)."""
    scores = read_json(cfg.run_dir / "study" / "scores.json")
    summary = summarize(cfg, scores)
    model, tokenizer = load_model(cfg.model)
    saes = load_saes(sae_specs(cfg), model)
    problems = load_problems(cfg.heldout)
    prompts = build_prompts(tokenizer, problems, cfg.heldout)
    cells = confirmation_cells(cfg, summary, scores)
    results, calibrations, unsteered, tables, bases = [], {}, {}, {}, {}
    for reward in dict.fromkeys(c["reward"] for c in cells):
        mine = [c for c in cells if c["reward"] == reward]
        tables[reward] = table = _sample_cells(cfg, model, tokenizer, saes, problems, prompts, reward, mine,
                                               scores["problem_ids"])
        bases[reward] = base = _per_problem(table, BASE, None)
        unsteered[reward] = {m: float(v.mean()) for m, v in base.items()}
        results += [_on_policy_effect(cfg, c, table, base) for c in mine]
        calibrations[reward] = calibration([r for r in results if r["reward"] == reward])
    first = cfg.rewards[0]
    regeneration = regeneration_check(cfg, model, tokenizer, problems, prompts, scores["problem_ids"], bases[first])
    regeneration["unsteered_accuracy_by_seed"] = _accuracy_by_seed(tables[first])
    doc = {"cells": results, "unsteered": unsteered, "calibration": calibrations, "regeneration": regeneration,
           "contrasts": on_policy_contrasts(cfg, [c for c in cells if c["reward"] == first], tables[first]),
           "seeds": list(cfg.confirm_seeds), "samples_per_problem": cfg.confirm_samples * len(cfg.confirm_seeds)}
    write_json(cfg.run_dir / "study" / "confirm.json", doc)
    return {"cells": len(results), "agree": sum(r["agree"] for r in results),
            "calibration": calibrations, "token_identical": regeneration["token_identical"]}


def _sample_cells(cfg: StudyConfig, model, tokenizer, saes, problems, prompts, reward: str, cells: list[dict],
                  problem_ids: list[str]) -> PerProblem:
    """Sample one reward's confirmation cells and their unsteered run on-policy; the per-problem table."""
    sampling = dataclasses.replace(cfg.heldout_sampling, n_samples=cfg.confirm_samples)
    sets = {c["set"]: [tuple(p) for p in c["latents"]] for c in cells}  # a null's sets serve every gamma
    ev = EvalConfig(estimator="sampling", gammas=sorted({c["gamma"] for c in cells}), seeds=list(cfg.confirm_seeds),
                    k=None, target=cells[0]["set"], n_random_sets=0, sampling=sampling, reward=reward,
                    task=cfg.heldout, n_bootstrap=cfg.n_bootstrap)
    result = evaluate(model, tokenizer, saes, problems, prompts, sets, ev, progress=True,
                      out_dir=cfg.run_dir / "study" / "confirm" / slug(reward))
    return PerProblem(result.samples, problem_ids)  # in the order of the off-policy estimates


def _accuracy_by_seed(table: PerProblem) -> dict[str, float]:
    """The unsteered on-policy accuracy seed by seed: how far two samplings of one policy differ."""
    seeds: dict[str, list[float]] = {}
    for r in table.rows([BASE], None):
        seeds.setdefault(str(r["seed"]), []).append(float(r["correct"]))
    return {s: float(np.mean(v)) for s, v in seeds.items()}


def on_policy_contrasts(cfg: StudyConfig, cells: list[dict], table: PerProblem) -> list[dict]:
    """On-policy, per gamma: IPG's headline set minus each other group of confirmed cells (the best baseline, the
    sign control, the mean of each null's confirmed sets: push, policy, permutation), paired by problem. The
    interval covers the problems and samples, not the draw of the few null sets confirmed; ``rank`` is IPG's
    place among them (1: moved the reward most in the predicted direction)."""
    boot = dict(n_boot=cfg.n_bootstrap, confidence=0.95)
    out = []
    for gamma in sorted({c["gamma"] for c in cells}):
        here = [c for c in cells if c["gamma"] == gamma]
        ipg = next(c for c in here if c["why"] == "ipg headline")
        mine = _per_problem(table, ipg["set"], gamma)["reward"]
        groups: dict[str, list[np.ndarray]] = {}
        for c in here:
            if c is not ipg:
                groups.setdefault(c["why"], []).append(_per_problem(table, c["set"], gamma)["reward"])
        for why, values in groups.items():
            sign = predicted_direction(gamma)
            rank = 1 + sum(sign * v.mean() > sign * mine.mean() for v in values)
            out.append({"gamma": gamma, "against": why, "sets": len(values), "rank": int(rank),
                        "ipg_minus": list(bootstrap(mine, np.mean(values, axis=0), **boot))})
    return out


def _on_policy_effect(cfg: StudyConfig, c: dict, table: PerProblem, base: dict[str, np.ndarray]) -> dict:
    """One cell's on-policy effect (steered minus unsteered, paired by problem) beside its off-policy estimate."""
    boot = dict(n_boot=cfg.n_bootstrap, confidence=0.95)
    on = _per_problem(table, c["set"], c["gamma"])
    effect = bootstrap(on["reward"], base["reward"], **boot)
    gap = bootstrap(on["reward"] - base["reward"], np.array(c["off_policy_per_problem"]), **boot)
    log.info("confirm %s x%g (%s, %s): on-policy effect %.3f [%.3f, %.3f], off-policy %.3f", c["set"], c["gamma"],
             c["why"], c["reward"], *effect, c["off_policy_effect"])
    return {**{k: v for k, v in c.items() if k != "off_policy_per_problem"}, "on_policy_effect": list(effect),
            "on_minus_off": list(gap), "agree": bool(gap[1] <= 0 <= gap[2]), "on_policy_value": float(on["reward"].mean()),
            "accuracy": float(on["correct"].mean()), "length": float(on["length"].mean()),
            "parsed": float(on["parsed"].mean()), "degenerate": float(on["degenerate"].mean()),
            "samples": int(on["n"].sum())}


def regeneration_check(cfg: StudyConfig, model, tokenizer, problems, prompts, problem_ids: list[str],
                       unsteered: dict[str, np.ndarray]) -> dict:
    """Are the held-out samples (the heldout stage, which every off-policy estimate rests on) what the evaluation
    path draws with the same settings? Regenerates them through :func:`ipg_sae.evaluation.unsteered_trajectories`
    and compares token ids sample by sample; then the on-policy unsteered run (other seeds) against the held-out
    samples, paired by problem: the gap a reader sees between the two unsteered accuracies, with its interval."""
    stored = load_trajectories(reward_dir(cfg, cfg.rewards[0]) / "heldout.jsonl")
    s = cfg.heldout_sampling
    ev = EvalConfig(estimator="sampling", gammas=[0.0], seeds=[s.seed], n_random_sets=0, sampling=s,
                    reward=cfg.rewards[0], task=cfg.heldout, n_bootstrap=cfg.n_bootstrap)
    again = {(t.prompt_id, t.sample_index): t for t in unsteered_trajectories(
        model, tokenizer, problems, prompts, ev, s.seed, out_dir=cfg.run_dir / "study" / "confirm" / "regenerated")}
    tokens = lambda t: (t.prompt_ids, t.completion_ids)  # noqa: E731
    same = [(t.prompt_id, t.sample_index) in again and tokens(again[(t.prompt_id, t.sample_index)]) == tokens(t)
            for t in stored]
    differs = [t.id for t, ok in zip(stored, same) if not ok]
    ids, groups = prompt_groups([t.prompt_id for t in stored])
    order = {pid: j for j, pid in enumerate(ids)}
    held = np.array([np.mean([stored[i].correct for i in groups[order[pid]]]) for pid in problem_ids])
    gap = bootstrap(unsteered["correct"], held, n_boot=cfg.n_bootstrap, confidence=0.95)
    out = {"samples": len(stored), "token_identical": sum(same), "differing": differs[:10],
           "stored_accuracy": float(np.mean([t.correct for t in stored])),
           "regenerated_accuracy": float(np.mean([t.correct for t in again.values()])),
           "heldout_seed": s.seed, "unsteered_minus_heldout_accuracy": list(gap)}
    log.info("confirm: the evaluation path regenerates %d of %d held-out samples token for token; on-policy unsteered "
             "accuracy minus held-out %.3f [%.3f, %.3f]", sum(same), len(stored), *gap)
    return out


def _per_problem(table: PerProblem, name: str, gamma: float | None) -> dict[str, np.ndarray]:
    """One cell's per-problem means of the confirmation's metrics; ``n``: its samples per problem."""
    rows = table.rows([name], gamma)
    if not rows:
        raise IPGError("the on-policy confirmation produced no samples for a cell; rerun the confirm stage")
    out = {k: table.matrix(k, [name], gamma)[0] for k in ("reward", "correct", "length", "parsed", "degenerate")}
    out["n"] = np.bincount([table.index[r["problem_id"]] for r in rows], minlength=len(table.index)).astype(float)
    return out


def calibration(results: list[dict]) -> dict:
    """Across the confirmed cells: the on-policy effect regressed on the off-policy one (slope, intercept) and
    their correlation (None with fewer than three cells)."""
    off = np.array([r["off_policy_effect"] for r in results])
    on = np.array([r["on_policy_effect"][0] for r in results])
    if len(results) < 3 or off.std() == 0 or on.std() == 0:
        return {"slope": None, "intercept": None, "correlation": None, "cells": len(results)}
    slope, intercept = np.polyfit(off, on, 1)
    return {"slope": float(slope), "intercept": float(intercept), "correlation": float(np.corrcoef(off, on)[0, 1]),
            "cells": len(results)}


# ---- the report ----------------------------------------------------------------------------

def report(cfg: StudyConfig) -> dict:
    """``study/report.md``, ``study/summary.json`` and the plots; logged to W&B."""
    from .tracking import Tracker

    out = cfg.run_dir / "study"
    scores = read_json(out / "scores.json")
    summary = summarize(cfg, scores)
    confirmed = read_json(out / "confirm.json") if (out / "confirm.json").is_file() else {}
    confirmation = confirmed.get("cells", [])
    plots = {}
    for reward, res in summary.items():
        plots[f"curves_{slug(reward)}"] = plot_curves(cfg, reward, res, out / f"curves_{slug(reward)}.png")
        plots[f"null_{slug(reward)}"] = plot_null(cfg, reward, res, out / f"null_{slug(reward)}.png")
        plots[f"push_{slug(reward)}"] = plot_push(cfg, reward, res, out / f"push_{slug(reward)}.png")
    if confirmation:
        plots["calibration"] = plot_calibration(confirmation, out / "calibration.png")
    compact = {reward: {"base": res["base"], "null_size": {g: n["n"] for g, n in res["null"].items()},
                        "null_mean_ess": {g: n["mean_ess"] for g, n in res["null"].items()},
                        "methods": {m: {g: {k: v for k, v in row.items() if k != "latents"} for g, row in rows.items()}
                                    for m, rows in res["methods"].items()},
                        "nulls": res["nulls"],
                        "sign_control": {g: {k: v for k, v in row.items() if k != "latents"}
                                         for g, row in res["sign_control"].items()},
                        "auc": {m: {g: c["auc"] for g, c in curves.items()} for m, curves in res["curves"].items()}}
               for reward, res in summary.items()}
    doc = {"k": cfg.k, "ks": cfg.ks, "gammas": cfg.gammas, "problems": len(scores["problem_ids"]),
           "samples_per_problem": scores["samples_per_problem"], "null_sets": cfg.null_sets,
           "curve_null_sets": cfg.curve_null_sets, "rewards": compact, "confirmation": confirmation,
           "answer": {reward: answer(cfg, reward, summary[reward]) for reward in summary},
           "calibration": confirmed.get("calibration"), "confirm_samples_per_problem": confirmed.get("samples_per_problem"),
           "unsteered_on_policy": confirmed.get("unsteered"), "regeneration": confirmed.get("regeneration"),
           "contrasts": confirmed.get("contrasts")}
    write_json(out / "summary.json", doc)
    write_text(out / "report.md", markdown(cfg, summary, confirmation, doc))
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
        if confirmation:
            tracker.table("study/on_policy", ["reward", "set", "gamma", "why", "on_policy_effect", "lo", "hi",
                                              "off_policy_effect", "parsed", "degenerate"],
                          [[c["reward"], c["set"], c["gamma"], c["why"], *c["on_policy_effect"], c["off_policy_effect"],
                            c["parsed"], c["degenerate"]] for c in confirmation])
    return {"answer": doc["answer"], "report": str(out / "report.md")}


