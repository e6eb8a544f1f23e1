"""The study's statistics, from its stored per-problem estimates (``study/scores.json``) and on-policy cells:
effects with paired intervals, each null's distribution and the rank of every method in it, the curves, which
cells are confirmed on-policy, and the calibration of the off-policy estimator against the on-policy one.

:func:`summarize` computes the off-policy part once (the ``summarize`` stage saves it); the report stage adds the
on-policy part (``confirm.json``) and saves the whole :class:`StudySummary` as ``study/summary.json``
(:mod:`.results`: the typed summary, its format and its file)."""

from __future__ import annotations

import numpy as np

from ...stats import area_under_curve, bootstrap, null_rank, predicted_direction
from .config import StudyConfig
from .labels import SIGN_CONTROL, CellLabel, null_labels
from .nulls import FREQUENCY, NULLS, labels
from .results import Curve, EffectRow, FrequencyNull, NullDraws, NullRank, RewardSummary, StudySummary

__all__ = ["SIGN_CONTROL", "CellLabel", "StudySummary", "calibration", "confirmation_cells", "null_labels",
           "summarize"]


def effect_row(cfg: StudyConfig, cell: dict, base: np.ndarray) -> EffectRow:
    """A cell's effect against no steering (paired bootstrap over problems) and what it did besides."""
    x = np.array(cell["reward"])
    effect, lo, hi = bootstrap(x, base, n_boot=cfg.n_bootstrap, confidence=0.95)
    return EffectRow(value=float(x.mean()), effect=effect, lo=lo, hi=hi, accuracy=float(np.mean(cell["accuracy"])),
                     length=float(np.mean(cell["length"])),
                     parsed=float(np.mean(cell["parsed"])) if "parsed" in cell else None,
                     degenerate=float(np.mean(cell["degenerate"])) if "degenerate" in cell else None,
                     abs_log_ratio=cell.get("abs_log_ratio"), abs_log_ratio_per_token=cell.get("abs_log_ratio_per_token"),
                     first_order_change=cell.get("first_order_change"), ess_mean=float(np.mean(cell["ess"])),
                     ess_min=float(np.min(cell["ess"])), ess_flag=float(np.mean(cell["ess"])) < cfg.min_ess,
                     latents=[tuple(p) for p in cell["latents"]])


def summarize(cfg: StudyConfig, scores: dict) -> StudySummary:
    """Effects with paired intervals, the nulls, percentiles, p-values and curve areas, per reward: the off-policy
    part of the study's summary (no confirmation yet)."""
    boot = dict(n_boot=cfg.n_bootstrap, confidence=0.95)
    rewards = {}
    for reward, cells in scores["cells"].items():
        base = {m: np.array(v) for m, v in scores["base"][reward].items()}
        res = RewardSummary(base={m: float(v.mean()) for m, v in base.items()})
        for g in cfg.gammas:
            gamma = str(g)  # scores.json's key
            direction = predicted_direction(g)
            null_effects = {}
            for k in cfg.ks:
                draws = [cells[label][gamma] for label in null_labels(cells, FREQUENCY, k)]
                null_effects[k] = [float(np.mean(d["reward"]) - base["reward"].mean()) for d in draws]
            headline_draws = np.array([cells[label][gamma]["reward"]
                                       for label in null_labels(cells, FREQUENCY, cfg.k)])
            res.frequency[g] = FrequencyNull(
                n=len(null_effects[cfg.k]),
                band={k: (float(np.quantile(e, 0.05)), float(np.quantile(e, 0.95))) if e else None
                      for k, e in null_effects.items()},
                mean_ess=float(np.mean([cells[label][gamma]["ess"] for label in null_labels(cells, FREQUENCY, None)])))
            res.nulls[g] = {}
            for kind in labels():
                draws = [cells[label][gamma] for label in null_labels(cells, kind, cfg.k)]
                if draws:
                    res.nulls[g][kind] = NullDraws(
                        n=len(draws), effects=[float(np.mean(d["reward"]) - base["reward"].mean()) for d in draws],
                        abs_log_ratios=[d.get("abs_log_ratio") for d in draws],  # each set's realised push
                        mean_ess=float(np.mean([np.mean(d["ess"]) for d in draws])),
                        **{m: float(np.mean([np.mean(d[m]) for d in draws])) if all(m in d for d in draws) else None
                           for m in ("abs_log_ratio", "abs_log_ratio_per_token", "first_order_change", "parsed",
                                     "degenerate")})
            control = cells.get(str(CellLabel(SIGN_CONTROL, cfg.k)), {}).get(gamma)
            if control is not None:
                row = effect_row(cfg, control, base["reward"])
                row.as_predicted = bool(-direction * row.effect > 0)  # the opposite of the top set's
                res.sign_control[g] = row
            for method in cfg.methods:
                entry = res.methods.setdefault(method, {})
                curve = []
                for k in cfg.ks:
                    cell = cells[str(CellLabel(method, k))][gamma]
                    row = effect_row(cfg, cell, base["reward"])
                    if k == cfg.k:
                        row.null_percentile, row.p_value = null_rank(row.effect, null_effects[k], direction)
                        row.vs_null, row.vs_null_lo, row.vs_null_hi = bootstrap(np.array(cell["reward"]),
                                                                                headline_draws, **boot)
                        row.nulls = {kind: NullRank(*null_rank(row.effect, null.effects, direction))
                                     for kind, null in res.nulls[g].items()}
                        entry[g] = row
                    curve.append(row)
                res.curves.setdefault(method, {})[g] = Curve(
                    auc=area_under_curve([r.value for r in curve], res.base["reward"]), ks=list(cfg.ks),
                    values=[r.value for r in curve], lo=[r.lo + res.base["reward"] for r in curve],
                    hi=[r.hi + res.base["reward"] for r in curve])
        rewards[reward] = res
    return StudySummary(k=cfg.k, ks=list(cfg.ks), gammas=list(cfg.gammas), problems=len(scores["problem_ids"]),
                        samples_per_problem=scores["samples_per_problem"], null_sets=cfg.null_sets,
                        curve_null_sets=cfg.curve_null_sets, rewards=rewards)


def confirmation_cells(cfg: StudyConfig, summary: StudySummary, scores: dict) -> list[dict]:
    """The cells sampled on-policy, at every gamma: for the first reward IPG's headline set, the best baseline's,
    the sign control and the first ``confirm_null_sets`` sets of the push, policy and permutation nulls; for each other
    reward (``confirm_other_rewards``) IPG's headline set and the sign control. Each with its off-policy estimate,
    per problem."""
    out = []
    for reward in cfg.rewards if cfg.confirm_other_rewards else cfg.rewards[:1]:
        headline = reward == cfg.rewards[0]
        res, cells = summary.rewards[reward], scores["cells"][reward]
        base = np.array(scores["base"][reward]["reward"])
        for g in cfg.gammas:
            gamma = str(g)  # scores.json's key
            chosen = [("ipg", str(CellLabel("ipg", cfg.k)), "ipg headline")]
            baselines = [m for m in res.methods if m != "ipg"]
            if baselines and headline:
                best = max(baselines, key=lambda m: predicted_direction(g) * res.methods[m][g].effect)
                chosen.append((best, str(CellLabel(best, cfg.k)), "best baseline"))
            if str(CellLabel(SIGN_CONTROL, cfg.k)) in cells:
                chosen.append((SIGN_CONTROL, str(CellLabel(SIGN_CONTROL, cfg.k)), "sign control"))
            for kind in [name for name, null in NULLS.items() if null.confirmed] if headline else ():
                labels = null_labels(cells, kind, cfg.k)[:cfg.confirm_null_sets]
                chosen += [(CellLabel.parse(label).set, label, f"{kind} null") for label in labels]
            for name, label, why in chosen:
                off = np.array(cells[label][gamma]["reward"])
                out.append({"reward": reward, "set": f"{name}-k{cfg.k}", "gamma": float(gamma), "why": why,
                            "latents": cells[label][gamma]["latents"],
                            "off_policy_effect": float(off.mean() - base.mean()),
                            "off_policy_per_problem": (off - base).tolist()})
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
