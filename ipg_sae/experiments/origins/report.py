"""The path comparison's report: tables, the answer, a scatter of scores against single-latent removals and the
deletion / insertion curves (:mod:`ipg_sae.experiments.origins.run` computes every number)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...report import pyplot, save_figure

SIDES = {"objective": "attribution objective", "heldout": "held-out accuracy"}


def _ci(v: list) -> str:
    point, lo, hi = v
    return "n/a" if not np.isfinite(point) else f"{point:.2f} [{lo:.2f}, {hi:.2f}]"


def plot_scatter(cfg, single: dict, summary, path: Path) -> Path:
    """Per origin (rows) and side (columns): every tested latent's score against its removal effect, per method."""
    plt = pyplot()
    origins = list(single["origins"])
    fig, axes = plt.subplots(len(origins), 2, figsize=(10, 3.8 * len(origins)), squeeze=False)
    for row, origin in enumerate(origins):
        latents = single["origins"][origin]["latents"]
        for col, side in enumerate(SIDES):
            ax = axes[row][col]
            y = np.array([r[side] for r in latents]) * (100 if side == "heldout" else 1)
            for j, method in enumerate(cfg.methods):
                x = np.array([r["scores"][method] for r in latents])
                x = x / (np.abs(x).max() or 1.0)
                rho = summary.per_latent[origin][method][side].spearman[0]
                ax.scatter(x, y, s=10, alpha=0.6, color=f"C{3 if method == 'ipg' else j}",
                           label=f"{method} (Spearman {rho:.2f})")
            ax.axhline(0, color="black", lw=0.5)
            ax.axvline(0, color="black", lw=0.5)
            ax.set_xlabel("score / max |score|")
            ax.set_ylabel(f"removal effect on {SIDES[side]}" + (" (pts)" if side == "heldout" else ""))
            ax.set_title(f"{origin} origin: {SIDES[side]}")
            ax.legend(fontsize=7)
    fig.suptitle("does a latent's score predict what removing it alone does?", fontsize=10)
    return save_figure(fig, path)


def plot_curves(cfg, summary, path: Path) -> Path:
    """Held-out accuracy against k, deletion and insertion, one line per (origin, method), with intervals."""
    plt = pyplot()
    gammas = [float(g) for g in cfg.gammas]
    fig, axes = plt.subplots(1, len(gammas), figsize=(5.2 * len(gammas), 4.0), squeeze=False)
    base = summary.base * 100
    styles = {"zero": "-", "mean": "--"}
    for ax, gamma in zip(axes[0], gammas):
        ax.axhline(base, color="black", lw=1, label="no steering")
        n = 0
        for origin, methods in summary.sets.items():
            for method, by_gamma in methods.items():
                rows = by_gamma[gamma].rows
                ks = np.array([r.k for r in rows]) * (1 + 0.03 * (n - 1.5))
                y = np.array([r.value for r in rows]) * 100
                err = np.abs(np.array([[r.lo for r in rows], [r.hi for r in rows]]) * 100 + base - y)
                ax.errorbar(ks, y, yerr=err, marker="o", ms=4, capsize=2, ls=styles.get(origin, ":"),
                            color="C3" if method == "ipg" else "C0", label=f"{method}, {origin} origin")
                n += 1
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (top latents, moved to / away from the origin)")
        ax.set_ylabel("held-out accuracy, % (off-policy estimate)")
        ax.set_title(("deletion" if float(gamma) < 1 else "insertion") + f": gamma {float(gamma):g}")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def markdown(cfg, summary, single: dict) -> str:
    """The report of an :class:`~.summary.OriginsSummary` (``single``: the single-latent removals' counts)."""
    lines = ["# Where IPG's path starts", "", f"**Answer.** {summary.answer}", "",
             f"Origins: {', '.join(cfg.origins)}; methods: `ipg` (the integrated path, adaptive quadrature) and "
             "`ipg_local` (one node at c = 1: the gradient times the distance to the origin). Removing a latent moves "
             "it alone to its origin value (0, or its mean activation over the attributed tokens).", "",
             "## Per latent: scores against single-latent removals", "",
             f"Latents: each method's top {cfg.top_latents} and {cfg.random_latents} random latents active on the "
             f"attributed data, pooled per origin. Objective: the exact change of the attribution objective over the "
             f"{single['attributed_trajectories']} attributed trajectories (the scores' units). Held-out: the "
             f"off-policy change of accuracy on {single['heldout_problems']} held-out problems. Intervals: 95% "
             "bootstrap over latents.", "",
             "| origin | method | latents | Spearman (objective) | Pearson (objective) | sign agreement (objective) "
             "| Spearman (held-out) | Pearson (held-out) | sign agreement (held-out) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for origin, methods in summary.per_latent.items():
        for method, sides in methods.items():
            o, h = sides["objective"], sides["heldout"]
            lines.append(f"| {origin} | {method} | {o.n} | {_ci(o.spearman)} | {_ci(o.pearson)} | "
                         f"{_ci(o.sign)} | {_ci(h.spearman)} | {_ci(h.pearson)} | {_ci(h.sign)} |")
    lines += ["", "![single-latent removals](single_latent.png)", "", "## Per set: deletion and insertion curves", "",
              f"Held-out accuracy without steering {summary.base * 100:.1f}% ({summary.heldout_problems} problems); "
              "effects in points with 95% paired bootstrap intervals over problems; AUC is the mean effect over k.",
              "", "| origin | method | gamma | " + " | ".join(f"k {k}" for k in cfg.ks) + " | AUC |",
              "|---|---|---|" + "---|" * len(cfg.ks) + "---|"]
    for origin, methods in summary.sets.items():
        for method, by_gamma in methods.items():
            for gamma, entry in by_gamma.items():
                cells = " | ".join(f"{r.effect * 100:+.1f} [{r.lo * 100:+.1f}, {r.hi * 100:+.1f}]" for r in entry.rows)
                lines.append(f"| {origin} | {method} | {gamma:g} | {cells} | {entry.auc * 100:+.1f} |")
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)
