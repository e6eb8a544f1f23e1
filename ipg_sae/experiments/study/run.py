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
6. ``summarize``: effects with paired intervals, each null's distribution and the ranks in it, the curves (the
   off-policy part of the typed :class:`~.results.StudySummary`, computed once, saved to
   ``study/offpolicy_summary.json``);
7. ``confirm``: the best and the worst cells, and IPG's headline cells, sampled on-policy
   (:func:`ipg_sae.evaluation.evaluate` with ``estimator: sampling``): the estimator is checked
   against the sampler it stands for;
8. ``report``: ``report.md``, ``summary.json`` (the whole summary, with the on-policy part), curves and null
   histograms.

Effects are differences from the unsteered policy on the same held-out samples, with 95%
paired bootstrap intervals over problems; each method's headline effect is also placed in the
null (percentile, one-sided rank p-value: :func:`ipg_sae.stats.null_rank`). Stages run as in the
pipeline (:mod:`ipg_sae.experiments.stages`): a rerun reuses what is done, recomputes what changed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from ...attribution import AttributionResult
from ...cells import BASE
from ...digest import json_digest
from ...errors import IPGError
from ...evaluation import EvalConfig, PerProblem, degenerate_flags, evaluate, unsteered_trajectories
from ...io import read_json, write_json, write_text
from ...jobs import method_dir
from ...models import load_model
from ...nulls import LatentPool, draw_sets, set_policy_change
from ...panel import OffPolicyPanel
from ...provenance import PROVENANCE_FILE, write_provenance
from ...rewards import get_reward
from ...sampling import eos_ids
from ...saes import load_saes
from ...selection import select
from ...stats import bootstrap, predicted_direction
from ...tasks import build_prompts, load_problems
from ...trajectories import Trajectory, load_trajectories, prompt_groups
from ..common import (HELDOUT_STAGE, attribute, attribution_sampling_stage, check_splits_disjoint, contexts,
                      reward_dir)
from ..stages import SAE_STAGE, Stage, run_job_stages, sae_specs
from .config import StudyConfig, splits
from .report import answer, markdown, plot_calibration, plot_curves, plot_null, plot_push, slug
from .nulls import FREQUENCY, FREQUENCY_LABEL, NULLS
from .results import StudySummary
from .summary import SIGN_CONTROL, CellLabel, calibration, confirmation_cells, summarize

log = logging.getLogger(__name__)


# ---- stages -----------------------------------------------------------------------------------


def _run_attribute(cfg: StudyConfig) -> dict:
    out = {}
    for reward in cfg.rewards:
        summaries = attribute(cfg, reward_dir(cfg, reward), [m for m in cfg.methods if m != "ipg"], max(cfg.ks),
                              table_size=max(cfg.ks))
        write_provenance(reward_dir(cfg, reward), cfg.task, sae_specs(cfg), get_reward(reward).identity)
        out[reward] = {m: {"top": s["selection"][:8], "delta_median": s.get("delta_median"),
                           "mean_nodes": s.get("mean_nodes")} for m, s in summaries.items()}
    return out


def _attribution_files(cfg: StudyConfig) -> list[Path]:
    from ...tracking import attribution_files

    files = []
    for r in cfg.rewards:
        files += [f for m in cfg.methods for f in attribution_files(method_dir(reward_dir(cfg, r), m))]
        files.append(reward_dir(cfg, r) / PROVENANCE_FILE)
    return files


STAGES = [
    attribution_sampling_stage("rewards"),
    SAE_STAGE,
    Stage("attribute", _run_attribute, outputs=_attribution_files, fields=("attribution", "methods", "ks")),
    HELDOUT_STAGE,
    Stage("score", lambda c: score(c), outputs=lambda c: [c.run_dir / "study" / "scores.json"],
          fields=("k", "ks", "gammas", "null_sets", "other_null_sets", "curve_null_sets", "null_seed", "n_bootstrap",
                  "min_ess", "scope", "push_null_sets", "permutation_sets", "sign_control", "policy_null_sets",
                  "null_counts", "problems_per_batch")),
    Stage("summarize", lambda c: summarize_stage(c), outputs=lambda c: [_offpolicy_summary(c)]),
    Stage("confirm", lambda c: confirm(c), outputs=lambda c: [c.run_dir / "study" / "confirm.json"],
          fields=("confirm_samples", "confirm_seeds", "confirm_null_sets", "confirm_other_rewards")),
    Stage("report", lambda c: report(c),
          outputs=lambda c: [c.run_dir / "study" / f for f in ("report.md", "summary.json")]),
]


def run_study(cfg: StudyConfig) -> dict:
    """Run (or resume) every stage of the study; return each stage's summary."""
    check_splits_disjoint(splits(cfg), on_load=False)  # splits not checked on load (a hub dataset): now
    return run_job_stages(cfg, STAGES, "study_config.yaml", contexts(cfg))


# ---- scoring: every cell, off-policy --------------------------------------------------------


def _panel(cfg: StudyConfig, model, saes, heldout: list[Trajectory]) -> OffPolicyPanel:
    """The off-policy panel on the held-out samples, each cell saved to ``study/cells/`` as it finishes."""
    return OffPolicyPanel.build(model, saes, heldout, cfg.heldout_sampling.temperature, cfg.run_dir / "study" / "cells",
                                scope=cfg.scope, problems_per_batch=cfg.problems_per_batch)


def _control_sets(cfg: StudyConfig, reward: str, ranking: dict, pool: LatentPool,
                  n_others: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """The controls at the headline k: IPG's bottom k (the sign control), then every registered null
    (:mod:`.nulls`: push-matched, policy-change-matched, reward-permutation, ...), each from its own random stream;
    after the first reward, each null at most ``n_others`` sets."""
    out = []
    ipg = AttributionResult.load(method_dir(reward_dir(cfg, reward), "ipg"))
    if cfg.sign_control:
        out.append((str(CellLabel(SIGN_CONTROL, cfg.k)), select(ipg, cfg.k, bottom=True)))
    first = reward == cfg.rewards[0]
    for null in NULLS.values():
        n = null.sets(cfg) if first else min(null.sets(cfg), n_others)
        if n:
            draws = null.draw(ranking["ipg"][:cfg.k], cfg.k, n, cfg.null_seed + null.seed_offset, pool, ipg)
            out += [(str(CellLabel(null.label, cfg.k, d)), draw) for d, draw in enumerate(draws)]
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
    panel = _panel(cfg, model, saes, samples)
    base_logp, problem_ids, groups = panel.base, panel.problem_ids, panel.groups
    frequencies = panel.scorer.activation_frequencies()
    pool = LatentPool.of(saes, frequencies=frequencies, push=panel.scorer.latent_push(),
                         policy_per_sample=panel.cells.policy_change(progress))
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
                plan += [(reward, str(CellLabel(method, k)), ranked[:k], gamma) for gamma in cfg.gammas]
        headline = cfg.null_sets if reward == cfg.rewards[0] else cfg.other_null_sets
        for k in cfg.ks:
            n = headline if k == cfg.k else cfg.curve_null_sets
            for d, draw in enumerate(draw_sets(FREQUENCY, ranking["ipg"][:k], n, cfg.null_seed + k, pool)):
                plan += [(reward, str(CellLabel(FREQUENCY_LABEL, k, d)), draw, gamma) for gamma in cfg.gammas]
        plan += [(reward, label, latents, gamma) for label, latents in _control_sets(cfg, reward, ranking, pool,
                                                                                     headline) for gamma in cfg.gammas]
    estimates: dict = {}
    for reward, label, latents, gamma in tqdm(plan, desc="study cells", unit="cell", disable=not progress):
        logp = panel.logprobs(latents, gamma, name=f"{label} x{gamma:g}")
        metrics = {"accuracy": values["accuracy"], "length": values["length"], "reward": values[f"reward:{reward}"]}
        metrics.update(parsed=values["parsed"], degenerate=values["degenerate"])
        est = {name: panel.estimate(logp, v) for name, v in metrics.items()}
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


def _offpolicy_summary(cfg: StudyConfig) -> Path:
    return cfg.run_dir / "study" / "offpolicy_summary.json"


def summarize_stage(cfg: StudyConfig) -> dict:
    """The study's statistics from ``scores.json``, once: the off-policy part of its summary, which the confirm
    stage chooses its cells from and the report stage completes."""
    summary = summarize(cfg, read_json(cfg.run_dir / "study" / "scores.json"))
    summary.save(_offpolicy_summary(cfg))
    return {"rewards": list(summary.rewards)}


def confirm(cfg: StudyConfig) -> dict:
    """On-policy effects of the confirmation cells: each sampled under its steering with the same seeds as an
    unsteered run (``confirm_seeds`` x ``confirm_samples`` per problem), the effect paired by problem (and,
    with the loop sampler, by each sample's random stream); beside each, its off-policy estimate and, per reward,
    the calibration across cells (on-policy effect against off-policy effect). Also checks that the evaluation
    path regenerates the held-out samples token for token (:func:`regeneration_check`)."""
    scores = read_json(cfg.run_dir / "study" / "scores.json")
    summary = StudySummary.load(_offpolicy_summary(cfg))
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


# ---- the report ----------------------------------------------------------------------------

def report(cfg: StudyConfig) -> dict:
    """``study/report.md``, ``study/summary.json`` (the :class:`~.results.StudySummary`) and the plots; logged to
    W&B."""
    from ...tracking import Tracker

    out = cfg.run_dir / "study"
    confirmed = read_json(out / "confirm.json") if (out / "confirm.json").is_file() else {}
    summary = StudySummary.load(_offpolicy_summary(cfg)).with_confirmation(confirmed)
    for reward, res in summary.rewards.items():
        res.answer = answer(cfg, reward, res)
    plots = {}
    for reward, res in summary.rewards.items():
        plots[f"curves_{slug(reward)}"] = plot_curves(cfg, reward, res, out / f"curves_{slug(reward)}.png")
        plots[f"null_{slug(reward)}"] = plot_null(cfg, reward, res, out / f"null_{slug(reward)}.png")
        plots[f"push_{slug(reward)}"] = plot_push(cfg, reward, res, out / f"push_{slug(reward)}.png")
    if summary.confirmation:
        plots["calibration"] = plot_calibration(summary.confirmation, out / "calibration.png")
    summary.save(out / "summary.json")
    write_text(out / "report.md", markdown(cfg, summary))
    with Tracker(cfg.wandb, cfg.run_dir, cfg.name, "study") as tracker:
        for key, path in plots.items():
            tracker.image(f"study/{key}", path)
        for reward, res in summary.rewards.items():
            for gamma, null in res.nulls.items():
                if FREQUENCY in null:
                    tracker.histogram(f"study/null_{reward}_gamma{gamma}", np.array(null[FREQUENCY].effects))
            rows = [[reward, m, g, r.effect, r.lo, r.hi, r.null_percentile, r.p_value, r.ess_mean]
                    for m, rs in res.methods.items() for g, r in rs.items()]
            tracker.table(f"study/{reward}", ["reward", "method", "gamma", "effect", "lo", "hi", "null_percentile",
                                              "p_value", "ess"], rows)
        if summary.confirmation:
            tracker.table("study/on_policy", ["reward", "set", "gamma", "why", "on_policy_effect", "lo", "hi",
                                              "off_policy_effect", "parsed", "degenerate"],
                          [[c.reward, c.set, c.gamma, c.why, *c.on_policy_effect, c.off_policy_effect, c.parsed,
                            c.degenerate] for c in summary.confirmation])
    return {"answer": {reward: res.answer for reward, res in summary.rewards.items()}, "report": str(out / "report.md")}
