"""The faithfulness study's report: its plots, its Markdown and its one-sentence answers.

Pure rendering of a :class:`~ipg_sae.experiments.study.results.StudySummary` (one reward's part: a
:class:`~ipg_sae.experiments.study.results.RewardSummary`; ``cfg`` is the study's config, for the settings the
words name); :func:`ipg_sae.experiments.study.run.report` loads the summary, calls these and logs to W&B.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...report import pyplot, save_figure
from ...stats import predicted_direction
from .nulls import FREQUENCY, NULLS, colors
from .results import ConfirmedCell, RewardSummary, StudySummary

METRIC = {"correctness": ("accuracy", "{:.1%}", 100, "pts"), "length": ("mean length", "{:.1f}", 1, "tokens")}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def fmt(reward: str, x: float, signed: bool = False) -> str:
    name, fmt, scale_, unit = METRIC.get(reward, ("reward", "{:.3f}", 1, ""))
    if signed:
        return f"{x * scale_:+.1f} {unit}".strip()
    return fmt.format(x)


def method_color(cfg, method: str) -> str:
    """IPG in red on every plot; each other method its own colour, the same on the curves and the nulls."""
    if method == "ipg":
        return "C3"
    others = [m for m in cfg.methods if m != "ipg"]
    return [c for c in (f"C{i}" for i in range(10)) if c != "C3"][others.index(method) % 9]


def plot_curves(cfg, reward: str, res: RewardSummary, path: Path) -> Path:
    """Estimated reward against k, deletion (gamma 0) and insertion side by side, with the null's 5-95% band."""
    plt = pyplot()
    gammas = list(cfg.gammas)
    fig, axes = plt.subplots(1, len(gammas), figsize=(5.2 * len(gammas), 4.0), squeeze=False)
    base = res.base["reward"]
    for ax, gamma in zip(axes[0], gammas):
        band = res.frequency[gamma].band or {}
        ks = [k for k in cfg.ks if band.get(k)]
        if ks:
            ax.fill_between(ks, [base + band[k][0] for k in ks], [base + band[k][1] for k in ks],
                            color="grey", alpha=0.25, label="matched random sets (5-95%)")
        ax.axhline(base, color="black", lw=1, label="no steering")
        for j, method in enumerate(cfg.methods):
            c = res.curves[method][gamma]
            if c.values is None:  # a summary from before the curves' points were kept
                continue
            y = np.array(c.values)
            err = np.abs(np.array([c.lo, c.hi]) - y)
            ax.errorbar(np.array(c.ks) * (1 + 0.04 * (j - len(cfg.methods) / 2)), y, yerr=err, marker="o", ms=4,
                        capsize=2, lw=2 if method == "ipg" else 1, label=method, color=method_color(cfg, method))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (top latents of each method)")
        ax.set_ylabel(METRIC.get(reward, ("reward",))[0] + " (off-policy estimate)")
        ax.set_title(("deletion" if gamma < 1 else "insertion") + f": gamma {gamma:g}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{reward}: held-out estimate vs k", fontsize=10)
    return save_figure(fig, path)


def plot_null(cfg, reward: str, res: RewardSummary, path: Path) -> Path:
    """The null's effects at the headline k (histogram) with each method's effect marked."""
    plt = pyplot()
    gammas = list(cfg.gammas)
    fig, axes = plt.subplots(1, len(gammas), figsize=(5.2 * len(gammas), 3.6), squeeze=False)
    _, _, scale_, unit = METRIC.get(reward, ("reward", "", 1, ""))
    for ax, gamma in zip(axes[0], gammas):
        effects = np.array(res.nulls[gamma][FREQUENCY].effects if FREQUENCY in res.nulls[gamma] else []) * scale_
        ax.hist(effects, bins=20, color="grey", alpha=0.6, label=f"{len(effects)} matched random sets")
        for method in cfg.methods:
            e = res.methods[method][gamma].effect * scale_
            ax.axvline(e, color=method_color(cfg, method), lw=2 if method == "ipg" else 1, label=method)
        ax.set_xlabel(f"effect vs no steering ({unit})")
        ax.set_title(("deletion" if gamma < 1 else "insertion") + f", k {cfg.k}, gamma {gamma:g}")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


NULL_COLOR = colors()  # each registered null's color (:mod:`.nulls`)


def plot_push(cfg, reward: str, res: RewardSummary, path: Path) -> Path:
    """Each set's off-policy effect at the headline k against how far it moved the held-out samples'
    log-probabilities (mean |log pi'/pi| per sample): every null's sets, each method's set and the sign control. Is
    IPG's effect beyond what sets that move the policy as far do, or on the trend of size?"""
    plt = pyplot()
    gammas = list(cfg.gammas)
    fig, axes = plt.subplots(1, len(gammas), figsize=(5.2 * len(gammas), 4.0), squeeze=False)
    _, _, scale_, unit = METRIC.get(reward, ("reward", "", 1, ""))
    for ax, gamma in zip(axes[0], gammas):
        for kind, null in res.nulls[gamma].items():
            pts = [(x, e * scale_) for x, e in zip(null.abs_log_ratios, null.effects) if x is not None]
            if pts:
                ax.scatter(*zip(*pts), s=14, alpha=0.75, color=NULL_COLOR.get(kind, "C4"),
                           label=f"{kind} null ({len(pts)})")
        for method in cfg.methods:
            row = res.methods[method][gamma]
            if row.abs_log_ratio is not None:
                ax.scatter(row.abs_log_ratio, row.effect * scale_, marker="*" if method == "ipg" else "D",
                           s=160 if method == "ipg" else 40, color=method_color(cfg, method), edgecolor="black",
                           linewidth=0.5, zorder=3, label=method)
        control = res.sign_control.get(gamma)
        if control and control.abs_log_ratio is not None:
            ax.scatter(control.abs_log_ratio, control.effect * scale_, marker="v", s=50, color="C2",
                       edgecolor="black", linewidth=0.5, zorder=3, label=f"IPG bottom {cfg.k}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("mean |log pi'/pi| per held-out sample")
        ax.set_ylabel(f"effect vs no steering ({unit}, off-policy)" if unit else "effect vs no steering (off-policy)")
        ax.set_title(("removal" if gamma < 1 else "amplification") + f", k {cfg.k}, gamma {gamma:g}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{reward}: each set's effect against how far it moves the policy", fontsize=10)
    return save_figure(fig, path)


WHY_COLOR = {"ipg headline": "C3", "best baseline": "C0", "sign control": "C2",
             **{f"{kind} null": null.color for kind, null in NULLS.items()}}


def plot_calibration(confirmation: list[ConfirmedCell], path: Path) -> Path:
    """Per reward, each confirmed cell's on-policy effect (95% interval) against its off-policy estimate, coloured by
    why it was confirmed, with the line on = off: how far the screen can be trusted, and where IPG sits."""
    plt = pyplot()
    rewards = list(dict.fromkeys(c.reward for c in confirmation))
    fig, axes = plt.subplots(1, len(rewards), figsize=(5.0 * len(rewards), 4.4), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        cells = [c for c in confirmation if c.reward == reward]
        _, _, scale_, unit = METRIC.get(reward, ("reward", "", 1, ""))
        seen = set()
        for c in cells:
            on = np.array(c.on_policy_effect) * scale_
            marker = "o" if c.gamma < 1 else "^"
            label = c.why if c.why not in seen else None
            seen.add(c.why)
            ax.errorbar(c.off_policy_effect * scale_, on[0], yerr=[[on[0] - on[1]], [on[2] - on[0]]], fmt=marker,
                        ms=6 if c.why == "ipg headline" else 4, capsize=2, color=WHY_COLOR.get(c.why, "C4"),
                        label=label)
        xs = [c.off_policy_effect * scale_ for c in cells] + [c.on_policy_effect[i] * scale_ for c in cells
                                                             for i in (1, 2)]
        lo, hi = min(xs + [0.0]), max(xs + [0.0])
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="on = off")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        unit = f" ({unit})" if unit else ""
        ax.set_xlabel(f"off-policy estimate of the effect{unit}")
        ax.set_ylabel(f"on-policy effect, 95% CI{unit}")
        ax.set_title(f"{reward}\no removal (gamma 0), ^ amplification", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def answer(cfg, reward: str, res: RewardSummary) -> str:
    """One sentence: does IPG's set beat the matched null, with the interval, and which method did best."""
    parts = []
    for gamma in cfg.gammas:
        row = res.methods["ipg"][gamma]
        kind = "removing" if gamma < 1 else f"amplifying (x{gamma:g})"
        beats = row.p_value < 0.05 and predicted_direction(gamma) * row.effect > 0
        parts.append(f"{kind} IPG's top {cfg.k} latents changed {METRIC.get(reward, ('reward',))[0]} by "
                     f"{fmt(reward, row.effect, True)} [{fmt(reward, row.lo, True)}, "
                     f"{fmt(reward, row.hi, True)}], {row.null_percentile:.0f}th percentile of "
                     f"{res.frequency[gamma].n} matched random sets (p = {row.p_value:.2f}: "
                     f"{'beats' if beats else 'does not beat'} the null)")
        for kind, name in ((kind, null.description) for kind, null in NULLS.items()):
            if kind in (row.nulls or {}):
                rank = row.nulls[kind]
                parts[-1] += (f"; against {res.nulls[gamma][kind].n} {name}: {rank.percentile:.0f}th "
                              f"percentile (p = {rank.p_value:.2f})")
    best = max(cfg.methods, key=lambda m: sum(predicted_direction(g) * res.methods[m][g].effect for g in cfg.gammas))
    return "; ".join(parts) + f". The method whose sets moved it most in the predicted directions: {best}."


def share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def controls_markdown(cfg, reward: str, res: RewardSummary) -> list[str]:
    """IPG's headline set against each null, with how hard each pushed the policy, and the sign control."""
    lines = ["", f"Controls at k {cfg.k}: what each null holds fixed is in `ipg_sae/nulls.py`; the push columns "
             "show how far each set moves the samples' log-probabilities (mean |log pi'/pi| per sample and per "
             "token) and the ESS, so a reader can see whether the null pushed as hard as IPG's set; first-order is the "
             "set's change of the policy to first order, mean |sum_i d log pi/d gamma_i| per sample (what the policy "
             "null matches); parsed and "
             "degenerate (repetitive, empty or unparsed, as `evaluate` counts it) are weighted estimates, so a "
             "fall in the reward can be told from broken output.", "",
             "| set | gamma | n | effect (null: mean) | IPG percentile | p | mean abs log ratio (per token) | first-order "
             "| ESS | parsed | degenerate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for gamma in cfg.gammas:
        ipg = res.methods["ipg"][gamma]
        lines.append(f"| IPG top {cfg.k} | {gamma:g} | 1 | {fmt(reward, ipg.effect, True)} | | | "
                     f"{_push_columns(ipg, ipg.ess_mean)} |")
        for kind, null in res.nulls[gamma].items():
            rank = ipg.nulls[kind]
            lines.append(f"| {kind} null | {gamma:g} | {null.n} | {fmt(reward, float(np.mean(null.effects)), True)} "
                         f"| {rank.percentile:.0f} | {rank.p_value:.3f} | {_push_columns(null, null.mean_ess)} |")
        control = res.sign_control.get(gamma)
        if control:
            verdict = "opposite sign, as predicted" if control.as_predicted else "not the opposite sign"
            lines.append(f"| IPG bottom {cfg.k} (sign control) | {gamma:g} | 1 | "
                         f"{fmt(reward, control.effect, True)} [{fmt(reward, control.lo, True)}, "
                         f"{fmt(reward, control.hi, True)}] ({verdict}) | | | {_push_columns(control, control.ess_mean)} |")
    return lines + [""]


def _push_columns(row, ess: float) -> str:
    """The controls table's last five columns for one row (an ``EffectRow`` or a ``NullDraws``): realised push (per
    token), first-order change, ESS, parsed and degenerate rates."""
    return (f"{num(row.abs_log_ratio)} ({num(row.abs_log_ratio_per_token, 4)}) | "
            f"{num(row.first_order_change)} | {ess:.2f} | {share(row.parsed)} | {share(row.degenerate)}")


def num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(cfg, summary: StudySummary) -> str:
    """``study/report.md``: per reward the answer, the effects, the curves' areas and the controls; then the
    on-policy effects, when the study was confirmed."""
    lines = [f"# Faithfulness study: `{cfg.name}`", "",
             f"Held-out problems: {summary.problems} x {summary.samples_per_problem} unsteered samples (temperature "
             f"{cfg.heldout_sampling.temperature}); every cell is an off-policy estimate on those samples "
             "(self-normalised importance weights, `ipg_sae.faithfulness`). Effects are against no steering on the "
             "same samples, with 95% paired bootstrap intervals over problems. The null: random sets matched to "
             f"IPG's set in activation frequency on the held-out data ({cfg.null_sets} sets at k {cfg.k} for "
             f"{cfg.rewards[0]}, {cfg.other_null_sets} for the other rewards, {cfg.curve_null_sets} at each other k). Percentile and one-sided rank p-value (among the random sets; not a permutation test) are in the "
             "predicted direction (removal lowers the reward, amplification raises it). Intervals are not "
             "corrected for the number of cells.", ""]
    for reward, res in summary.rewards.items():
        lines += [f"## Reward: {reward}", "", f"**{res.answer}**", "",
                  f"No steering: {METRIC.get(reward, ('reward',))[0]} {fmt(reward, res.base['reward'])} "
                  f"(accuracy {res.base['accuracy']:.1%}, mean length {res.base['length']:.1f}).", "",
                  "| method | gamma | effect [95% CI] | vs null mean [95% CI] | null percentile | p | ESS (mean, min) |",
                  "|---|---|---|---|---|---|---|"]
        for method, rows in res.methods.items():
            for gamma, r in rows.items():
                flag = " (low)" if r.ess_flag else ""
                lines.append(f"| {method} | {gamma:g} | {fmt(reward, r.effect, True)} "
                             f"[{fmt(reward, r.lo, True)}, {fmt(reward, r.hi, True)}] | "
                             f"{fmt(reward, r.vs_null, True)} [{fmt(reward, r.vs_null_lo, True)}, "
                             f"{fmt(reward, r.vs_null_hi, True)}] | {r.null_percentile:.0f} | "
                             f"{r.p_value:.3f} | {r.ess_mean:.2f}, {r.ess_min:.2f}{flag} |")
        lines += ["", "Area under the curve (mean effect over k = " + ", ".join(map(str, cfg.ks)) + "):", "",
                  "| method | " + " | ".join(("deletion" if g < 1 else f"insertion x{g:g}") for g in cfg.gammas) + " |",
                  "|---|" + "---|" * len(cfg.gammas)]
        for method, curves in res.curves.items():
            lines.append(f"| {method} | " + " | ".join(fmt(reward, curves[g].auc, True) for g in cfg.gammas) + " |")
        lines += controls_markdown(cfg, reward, res)
        lines += ["", f"![curves](curves_{slug(reward)}.png)", "", f"![null](null_{slug(reward)}.png)", "",
                  f"![effect against push](push_{slug(reward)}.png)", ""]
    if summary.confirmation:
        lines += on_policy_markdown(summary)
    return "\n".join(lines)


def on_policy_markdown(summary: StudySummary) -> list[str]:
    """The on-policy effects, per reward with its calibration, and the regeneration check of the held-out samples."""
    lines = ["## On-policy effects", "",
             f"Each cell sampled under its steering at {summary.confirm_samples_per_problem or '?'} samples per "
             "problem (seeds x samples), paired by problem and seed with an unsteered run of the same seeds; the "
             "effect is steered minus unsteered, with a 95% paired bootstrap interval over problems. Beside it, "
             "the off-policy estimate of the same effect and the difference (paired by problem).", ""]
    confirmation = summary.confirmation
    for reward in dict.fromkeys(c.reward for c in confirmation):
        unsteered = (summary.unsteered_on_policy or {}).get(reward, {})
        lines += [f"### {reward}", "", f"Unsteered on-policy: {METRIC.get(reward, ('reward',))[0]} "
                  f"{fmt(reward, unsteered['reward'])}." if unsteered else "", "",
                  "| cell | gamma | why | on-policy effect [95% CI] | off-policy effect | on - off [95% CI] | parsed "
                  "| degenerate |", "|---|---|---|---|---|---|---|---|"]
        for c in (c for c in confirmation if c.reward == reward):
            e, d = c.on_policy_effect, c.on_minus_off
            lines.append(f"| {c.set} | {c.gamma:g} | {c.why} | {fmt(reward, e[0], True)} "
                         f"[{fmt(reward, e[1], True)}, {fmt(reward, e[2], True)}] | "
                         f"{fmt(reward, c.off_policy_effect, True)} | {fmt(reward, d[0], True)} "
                         f"[{fmt(reward, d[1], True)}, {fmt(reward, d[2], True)}] | {share(c.parsed)} | "
                         f"{share(c.degenerate)} |")
        contrasts = summary.contrasts if reward == confirmation[0].reward else None
        if contrasts:
            lines += ["", "IPG's headline set against the other confirmed cells at the same gamma, on-policy, paired "
                      "by problem (a null's row: the mean of its confirmed sets; the interval covers problems and "
                      "samples, not the draw of those few sets; rank: IPG's place among them in the predicted "
                      "direction, 1 = first):", "", "| gamma | against | sets | IPG minus [95% CI] | IPG's rank |",
                      "|---|---|---|---|---|"]
            for c in contrasts:
                d = c.ipg_minus
                lines.append(f"| {c.gamma:g} | {c.against} | {c.sets} | {fmt(reward, d[0], True)} "
                             f"[{fmt(reward, d[1], True)}, {fmt(reward, d[2], True)}] | {c.rank} of {c.sets + 1} |")
        cal = (summary.calibration or {}).get(reward)
        if cal is not None and cal.slope is not None:
            lines += ["", f"Calibration over the {cal.cells} cells: on-policy effect = {cal.slope:.2f} x "
                      f"off-policy effect {fmt(reward, cal.intercept, True)} (correlation {cal.correlation:.2f})."]
        lines.append("")
    lines += ["![on-policy effect against the off-policy estimate](calibration.png)", ""]
    check = summary.regeneration
    if check:
        gap = check.unsteered_minus_heldout_accuracy
        lines += ["### The held-out samples, regenerated", "",
                  f"The evaluation path (the on-policy sampler) regenerated {check.token_identical} of the "
                  f"{check.samples} held-out samples (seed {check.heldout_seed}) token for token "
                  f"(accuracy {check.stored_accuracy:.1%} stored, {check.regenerated_accuracy:.1%} regenerated). "
                  f"The on-policy unsteered run (other seeds) minus the held-out samples, paired by problem: "
                  f"{gap[0] * 100:+.1f} pts [{gap[1] * 100:+.1f}, {gap[2] * 100:+.1f}]; the on-policy unsteered "
                  "accuracy seed by seed: " + ", ".join(f"{a:.1%} (seed {s})" for s, a in
                                                       check.unsteered_accuracy_by_seed.items()) + ".", ""]
    return lines
