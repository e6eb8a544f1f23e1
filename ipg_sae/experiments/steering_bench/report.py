"""The steering benchmark's report: the leaderboard, the one-sentence answer and the plot of accuracy gain
against capability cost (:mod:`ipg_sae.experiments.steering_bench.run` computes every number)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...report import pyplot, save_figure
from .recipes import group, in_group


def _pts(v: list) -> str:
    return f"{v[0] * 100:+.1f} [{v[1] * 100:+.1f}, {v[2] * 100:+.1f}]"


def _transfer_splits(summary) -> list[str]:
    return [s for s in summary.splits if s.startswith("transfer")]


def best_on_dev(summary, candidates: list[str]) -> str:
    """The candidate with the largest chosen dev effect (``tuning.json``): the report's "best" is picked on dev,
    never on test (ties: the first in registration order)."""
    dev = {r["name"] if "name" in r else r["method"]: r["effect"] for r in summary.dev.get("rows", []) if r.get("chosen")}
    return max(candidates, key=lambda m: dev.get(m, float("-inf")))


def answer(cfg, summary) -> str:
    """Does any IPG-based recipe beat DiffMean and prompting on test, and does it transfer? (``summary``: a
    :class:`~.summary.BenchSummary`; the best IPG-based recipe is the one with the largest dev effect)"""
    test = summary.splits.get("test", {})
    ipg = [m for m in group("ipg") if m in test]
    if not ipg:
        return "No IPG-based recipe was run."
    best = best_on_dev(summary, ipg)
    parts = []
    for other in (m for m in group("practice") if m in test):
        diff = summary.comparison("test", best, other).difference
        verdict = "beats" if diff[1] > 0 else "loses to" if diff[2] < 0 else "does not separate from"
        parts.append(f"{verdict} {other} ({_pts(test[other].effect)}; difference {_pts(diff)})")
    text = (f"On test, the best IPG-based recipe is {best} ({summary.recipes[best]['label']}; chosen by its dev "
            f"effect, not its test effect): {cfg.reward} "
            f"{_pts(test[best].effect)} points against no steering; it " + ", and ".join(parts) + ".")
    for kind, t in summary.nulls.get("test", {}).items() if best == "ipg_step" else ():
        text += (f" Against its own {kind} null ({len(t['draws'])} draws, each tuned on dev) the step ranks p = "
                 f"{t['rank_p']:.2f}, difference {_pts(t['difference'])} (draws and problems resampled).")
    for split in _transfer_splits(summary):
        if best not in summary.splits[split]:
            continue
        row = summary.splits[split][best]
        carries = ("carries over" if row.effect[1] > 0 else "reverses" if row.effect[2] < 0 else
                   "does not carry over (its interval includes 0)")
        text += f" On {split} it {carries}: {_pts(row.effect)} points."
    return text


def _offtask(cost: dict) -> dict:
    return cost.get("offtask") or cost.get("generic", {})


def plot_gain_vs_cost(cfg, summary, path: Path) -> Path:
    """Accuracy effect (with its interval) against per-token KL on off-task text (generic text where a stored
    capability file has none), one panel per split."""
    plt = pyplot()
    split_names = list(summary.splits)
    fig, axes = plt.subplots(1, len(split_names), figsize=(5.4 * len(split_names), 4.2), squeeze=False)
    cap = summary.capability
    for ax, split in zip(axes[0], split_names):
        for j, (name, row) in enumerate(summary.splits[split].items()):
            if name == "unsteered":
                continue
            x = max(_offtask(cap.get(name, {})).get("kl", 0.0), 1e-4)
            e = np.array(row.effect) * 100
            color = "C3" if in_group(name, "ipg") else "C0" if in_group(name, "practice") else "grey"
            ax.errorbar([x], [e[0]], yerr=[[e[0] - e[1]], [e[2] - e[0]]], marker="o", color=color, capsize=2)
            ax.annotate(name, (x, e[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("KL per token on off-task text (nats)")
        ax.set_ylabel(f"{cfg.reward} effect vs no steering (points, on-policy)")
        ax.set_title(split)
    fig.suptitle(f"steering: {cfg.reward} gain against capability cost (red: IPG-based, blue: DiffMean and prompting, "
                 "grey: other baselines and nulls)", fontsize=9)
    # One note under both panels: per-panel notes this long overlap each other.
    fig.text(0.5, 0.005, "capability cost: KL per token to the unsteered model on off-task English; prompting costs 0 "
             "and is drawn at 1e-4", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return save_figure(fig, path)


def markdown(cfg, summary) -> str:
    """The report of a :class:`~.summary.BenchSummary`."""
    tuning = summary.dev
    lines = ["# Steering that helps? IPG-based recipes against DiffMean, prompting and the baselines", "",
             f"**Answer.** {summary.answer}", "",
             f"Each method's setting was chosen on {tuning['dev_problems']} dev problems (at most "
             f"{cfg.grid.max_settings} settings each; off-policy where the mean ESS was at least {tuning['min_ess']:g} "
             f"of G, on-policy otherwise), then run on-policy: {len(cfg.eval_seeds)} seeds x "
             f"{cfg.eval_sampling.n_samples} samples per problem, paired by problem and seed with the unsteered run. "
             f"Effects on the reward ({cfg.reward}; accuracy for correctness) in points (x100) with 95% paired "
             "bootstrap intervals over problems.", ""]
    cap = summary.capability
    for split, rows in summary.splits.items():
        base = rows["unsteered"]
        lines += [f"## {split}", "", f"Unsteered: {cfg.reward} {base.reward:.3f}, accuracy {base.accuracy * 100:.1f}%, length "
                  f"{base.length:.1f} tokens, parse failures {base.parse_failure * 100:.1f}%, degenerate "
                  f"{base.degenerate * 100:.1f}%.", "",
                  "| rank | method | chosen setting | effect (pts) | helped / hurt | accuracy | length effect (tokens) "
                  "| parse failures "
                  "| degenerate | KL/token corpus (in-domain) | KL/token generic | KL/token off-task | ppl ratio "
                  "off-task |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ranked = sorted((n for n in rows if n != "unsteered"), key=lambda n: -rows[n].effect[0])
        for rank, name in enumerate(ranked, 1):
            r, c = rows[name], cap.get(name, {})
            le = r.length_effect
            shares = f"{r.helped * 100:.0f}% / {r.hurt * 100:.0f}%" if r.helped is not None else "n/a"
            lines.append(f"| {rank} | {name} | {summary.recipes[name]['label']} | {_pts(r.effect)} | {shares} | "
                         f"{r.accuracy * 100:.1f}% | "
                         f"{le[0]:+.1f} [{le[1]:+.1f}, {le[2]:+.1f}] | {r.parse_failure * 100:.1f}% | "
                         f"{r.degenerate * 100:.1f}% | {c.get('corpus', {}).get('kl', float('nan')):.4f} | "
                         f"{c.get('generic', {}).get('kl', float('nan')):.4f} | "
                         f"{c.get('offtask', {}).get('kl', float('nan')):.4f} | "
                         f"{c.get('offtask', {}).get('ppl_ratio', float('nan')):.3f} |")
        comparisons = summary.comparisons.get(split, [])
        if comparisons:  # paired by problem: IPG-based recipes against what practitioners use
            lines += ["", "| IPG-based minus practice | difference (pts) |", "|---|---|"]
            lines += [f"| {c.label} | {_pts(c.difference)} |" for c in comparisons]
        lines.append("")
    for split, per_null in summary.nulls.items():
        lines += [f"## The step against its nulls' draws ({split})", "",
                  "Each draw tuned on dev like the step; rank p = (1 + draws at least as good) / (draws + 1); the "
                  "difference's interval resamples problems and draws (two-level bootstrap).", "",
                  "| null | draws | step effect (pts) | draws' effects (pts) | rank p | step minus null (pts) |",
                  "|---|---|---|---|---|---|"]
        for kind, t in per_null.items():
            effects = ", ".join(f"{e * 100:+.1f}" for e in t["draws"])
            lines.append(f"| {kind} | {len(t['draws'])} | {t['step'] * 100:+.1f} | {effects} | {t['rank_p']:.3f} | "
                         f"{_pts(t['difference'])} |")
        lines.append("")
    if summary.matched.get("recipes"):
        m = summary.matched
        lines += ["## Matched push", "",
                  f"Each recipe below also ran at the setting whose KL/token on off-task text matches {m['reference']}'s "
                  f"chosen setting ({m['target_kl']:.4f}) within {m['rtol'] * 100:.0f}% (`matched.json`); unmatched "
                  "ones could not reach it.", "", "| recipe | setting | KL/token (match text) | matched |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {r['label']} | {r['kl']:.4f} | {'yes' if r['matched'] else 'no'} |"
                  for name, r in m["recipes"].items()]
        lines.append("")
    lines += ["![gain vs cost](gain_vs_cost.png)", "", "## Dev choices", "",
              "Dev effects choose a setting; they are not results (the best of up to 12 noisy scores is biased "
              "upward, and on-policy dev rests on few samples). Every setting tried is in `tuning.json`.", "",
              "| method | settings tried | chosen | dev effect (pts) | estimator | ESS |", "|---|---|---|---|---|---|"]
    for method in tuning.get("chosen") or cfg.methods:  # each method, each draw of a null with draws
        rows = [r for r in tuning["rows"] if r.get("name", r["method"]) == method]
        if not rows:
            continue
        best = next(r for r in rows if r.get("chosen"))
        ess = f"{best['ess']:.2f}" if "ess" in best else "n/a"
        lines.append(f"| {method} | {len(rows)} | {best['label']} | {best['effect'] * 100:+.1f} | {best['estimator']} "
                     f"| {ess} |")
    lines.append("")
    return "\n".join(lines)
