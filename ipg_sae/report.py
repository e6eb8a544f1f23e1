"""Plots and a Markdown report of a steering evaluation, stating only what the intervals support.

Plots (matplotlib, Agg backend, PNG; logged to W&B through :class:`ipg_sae.tracking.Tracker`):

* accuracy and generated length against gamma, with intervals, for the set under test, the
  mean of the random draws (each draw also shown faintly) and each baseline set, over the
  unsteered value and its interval;
* the distribution of attribution scores (a histogram of any array, or several overlaid);
* the top latents as horizontal bars of their score, labelled with an example context.

``write_report(run_dir, ...)`` writes ``<run_dir>/report.md``: the setup (problems, seeds,
samples, sets, intervals), a table of every condition with its interval and its paired
difference from no steering, and a plain verdict per gamma on whether the target set beats
random sets of the same size and layers: "beats" means the interval of the paired
difference excludes 0 in the direction the reward predicts, and nothing weaker is called a
win. Intervals are not corrected for the number of gammas and sets compared, and the report
says so.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import IPGError
from .io import atomic_path, write_text

if TYPE_CHECKING:
    from .evaluation import EvalMeta

_CONTEXT_KEYS = ("context", "contexts", "example", "examples", "top_context", "example_contexts", "top_contexts")
_COLORS = {"target": "C3", "random_mean": "C7", "random": "C7"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed; safe on headless machines
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return path


# ---- plots -----------------------------------------------------------------------------------


_METRIC_LABELS = {"accuracy": "pass@1 accuracy", "length": "mean generated length (tokens)", "reward": "mean reward"}


def plot_gamma_sweep(rows: list[dict], metric: str, path: str | Path, title: str | None = None) -> Path:
    """``metric`` against gamma with intervals: target, random mean (draws faint), baselines, and no steering."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = next((r for r in rows if r["condition"] == "none"), None)
    if base is not None:
        ax.axhline(base[metric], color="black", lw=1, label="no steering")
        ax.axhspan(base[f"{metric}_lo"], base[f"{metric}_hi"], color="black", alpha=0.08)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")  # gamma = 1 is the clean model
    series = _series(rows)
    width = _gamma_spacing(rows) * 0.03
    for j, (name, condition, pts) in enumerate(series):
        g = np.array([p["gamma"] for p in pts], dtype=float) + (j - len(series) / 2) * width  # dodge error bars
        y = np.array([p[metric] for p in pts], dtype=float)
        err = np.abs(np.array([[p[f"{metric}_lo"] for p in pts], [p[f"{metric}_hi"] for p in pts]]) - y)
        if condition == "random":
            ax.plot(g, y, "o", color=_COLORS["random"], alpha=0.3, ms=3)
            continue
        ax.errorbar(g, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.5 if condition == "target" else 1,
                    color=_COLORS.get(condition), label=name)
    ax.set_xlabel("gamma (scale on the selected latents)")
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{_METRIC_LABELS.get(metric, metric)} vs gamma")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _series(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    out: dict[str, tuple[str, list[dict]]] = {}
    for r in rows:
        if r["condition"] == "none":
            continue
        out.setdefault(r["set"], (r["condition"], []))[1].append(r)
    order = {"target": 0, "random_mean": 1, "baseline": 2, "random": 3}
    items = [(name, cond, sorted(pts, key=lambda p: p["gamma"])) for name, (cond, pts) in out.items()]
    return sorted(items, key=lambda s: order.get(s[1], 9))


def _gamma_spacing(rows: list[dict]) -> float:
    gammas = sorted({float(r["gamma"]) for r in rows if r.get("gamma") is not None})
    return (gammas[-1] - gammas[0]) if len(gammas) > 1 else 1.0


def plot_score_histogram(scores: Any, path: str | Path, title: str = "attribution scores", bins: int = 60,
                         log: bool = True) -> Path:
    """Histogram of ``scores`` (an array of any shape, or ``{name: array}`` overlaid); non-finite values dropped."""
    plt = pyplot()
    groups = scores if isinstance(scores, dict) else {"scores": scores}
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, values in groups.items():
        v = _finite(values)
        if v.size:
            ax.hist(v, bins=bins, alpha=0.6 if len(groups) > 1 else 0.9, label=f"{name} (n={v.size})", log=log)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("score")
    ax.set_ylabel("latents" + (" (log)" if log else ""))
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _finite(values: Any) -> np.ndarray:
    v = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=float)
    v = np.asarray(v, dtype=float).reshape(-1)
    return v[np.isfinite(v)]


def plot_top_latents(features: list[dict], path: str | Path, n: int = 20, score_key: str = "mean",
                     context_key: str | None = None, title: str | None = None) -> Path:
    """Horizontal bars of the first ``n`` features' ``score_key``, labelled ``L<layer>:<latent>  <context>``."""
    if not features:
        raise IPGError("no features to plot; the feature table is empty")
    if score_key not in features[0]:
        raise IPGError(f"feature table has no column {score_key!r}; columns: {', '.join(features[0])}")
    plt = pyplot()
    top = _ranked(features)[:n]
    key = context_key or next((k for k in _CONTEXT_KEYS if k in top[0]), None)
    labels = [f"L{f['layer']}:{f['latent']}" + (f"  {_context_text(f.get(key))}" if key else "") for f in top]
    values = [float(f[score_key]) for f in top]
    fig, ax = plt.subplots(figsize=(8.5, 0.35 * len(top) + 1.2))
    y = np.arange(len(top))[::-1]  # rank 1 on top
    ax.barh(y, values, color=["C3" if v >= 0 else "C0" for v in values])
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel(score_key)
    ax.set_title(title or f"top {len(top)} latents by {score_key}")
    return save_figure(fig, path)


def _ranked(features: list[dict]) -> list[dict]:
    if all(str(f.get("rank", "")).strip() not in ("", "None") for f in features):
        return sorted(features, key=lambda f: float(f["rank"]))
    return list(features)


def _context_text(value: Any, width: int = 60) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, dict):
        value = value.get("text", value.get("context", ""))
    text = re.sub(r"\s+", " ", str(value or "")).strip()
    # Control characters (byte-level tokens) have no glyph: show their escape instead.
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    text = text.replace("$", r"\$")  # matplotlib would read $...$ as mathtext
    return (text[:width - 1] + "…") if len(text) > width else text


# ---- the report --------------------------------------------------------------------------------


def write_report(run_dir: str | Path, result=None, features: list[dict] | None = None, scores: Any = None,
                 tracker=None, title: str | None = None) -> Path:
    """Write ``<run_dir>/report.md`` (plots under ``<run_dir>/plots/``) and log the plots to ``tracker``.

    ``result`` is an :class:`ipg_sae.evaluation.EvalResult` (default: loaded from
    ``<run_dir>/eval``); ``features`` the feature table rows (default: ``<run_dir>/features.csv``
    when present); ``scores`` attribution scores for the histogram (an array or ``{name: array}``).
    """
    from .evaluation import EvalResult

    run_dir = Path(run_dir)
    if result is None:
        result = EvalResult.load(run_dir / "eval")
    if features is None and (run_dir / "features.csv").is_file():
        features = _read_csv(run_dir / "features.csv")
    plots = _make_plots(run_dir, result, features, scores)
    meta = result.meta
    parts = [f"# {title or 'Steering evaluation: ' + run_dir.name}", "", _setup(meta), "", _verdict_section(result),
             "", _results_table(result.rows, meta), ""]
    parts += [f"![{name}](plots/{path.name})" for name, path in plots.items()]
    if features:
        parts += ["", _features_section(features)]
    parts += ["", "## Files", "",
              "- `eval/rows.csv`: the table above, unrounded; `eval/comparisons.csv`: every paired comparison.",
              "- `eval/samples.csv`: one row per sample (cell, problem, seed, correct, reward, length, degenerate "
              "flags): everything above is recomputed from it by `ipg_sae.evaluation.summarize_samples`.",
              "- `eval/cells/*.jsonl`: the sampled trajectories of each (set, gamma, seed) cell.", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(parts))
    if tracker is not None:
        for name, png in plots.items():
            tracker.image(f"report/{name}", png)
        cols = list(result.rows[0]) if result.rows else []
        tracker.table("eval/rows", cols, [[r.get(c) for c in cols] for r in result.rows])
        if scores is not None and not isinstance(scores, dict):
            tracker.histogram("report/attribution_score_values", _finite(scores))
    return path


def _make_plots(run_dir: Path, result, features, scores) -> dict[str, Path]:
    plots = {}
    out = run_dir / "plots"
    for metric in ("accuracy", "length"):
        plots[f"{metric}_vs_gamma"] = plot_gamma_sweep(result.rows, metric, out / f"{metric}_vs_gamma.png")
    if result.meta.primary_metric == "reward":
        plots["reward_vs_gamma"] = plot_gamma_sweep(result.rows, "reward", out / "reward_vs_gamma.png")
    if scores is not None:
        plots["attribution_scores"] = plot_score_histogram(scores, out / "attribution_scores.png")
    if features:
        key = "mean" if "mean" in features[0] else next((k for k in ("score", "t") if k in features[0]), None)
        if key is not None:
            plots["top_latents"] = plot_top_latents(features, out / "top_latents.png", score_key=key)
    return plots


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---- text ------------------------------------------------------------------------------------


def _setup(meta: EvalMeta) -> str:
    n, seeds, g = meta.n_problems, meta.seeds, meta.n_samples
    sets = meta.sets
    randoms = meta.random_sets
    named = [s for s in sets if s not in randoms]
    sampling = f"temperature {meta.sampling['temperature']}, at most {meta.sampling['max_new_tokens']} new tokens"
    if meta.estimator == "importance":
        samples = (f"- Held-out problems: **{n}** ({_ids(meta.problem_ids)}); **{meta.samples_per_problem}** "
                   f"unsteered samples per problem ({sampling}), shared by every condition.")
    else:
        samples = (f"- Held-out problems: **{n}** ({_ids(meta.problem_ids)}); seeds {seeds} x {g} sample(s) each = "
                   f"**{n * len(seeds) * g}** samples per condition ({sampling}).")
    null = {"frequency": "matched to the target's activation frequencies on these samples",
            "uniform": "drawn uniformly among the latents active in the attribution"}.get(meta.null or "", "")
    lines = ["## Setup", "",
             f"- Model: `{meta.model.get('name') or 'unnamed'}`; reward `{meta.reward}` "
             f"(primary metric: {meta.primary_metric}).",
             samples,
             f"- Steering: the set's latents scaled by gamma in {meta.gammas} ({meta.scope} positions, padding "
             "and each row's first token excluded); gamma = 1 is the unsteered model.",
             "- Sets: " + "; ".join(f"`{s}` ({len(sets[s])} latents, layers {_layers(sets[s])})" for s in named)
             + (f"; random control: {len(randoms)} draw(s) with the same size and layers as `{meta.target}`."
                if randoms else "; no random control."),
             f"- Intervals: {meta.confidence:.0%} percentile bootstrap over problems ({meta.n_bootstrap} "
             "replicates). Differences are paired (the same resampled problems for both conditions, common seeds); "
             "the random control's replicates also resample draws. No correction for the number of gammas and sets "
             "compared."]
    if meta.estimator == "importance":
        flagged = meta.ess_flagged
        lines.append("- Estimator: **importance** (off-policy). Every steered condition is scored on the unsteered "
                     "samples: each sample is weighted by how much more (or less) likely the steered policy makes it, "
                     "self-normalised per problem (`ipg_sae.faithfulness`). ESS is the effective sample size as a "
                     f"fraction of the samples; {len(flagged)} condition(s) below {meta.min_ess or 0:.2f} are "
                     "marked (low)" + (f": {', '.join(flagged[:6])}" if flagged else "") + ". Random sets are "
                     + null + ".")
    return "\n".join(lines)


def _ids(ids: list[str]) -> str:
    return f"`{ids[0]}` .. `{ids[-1]}`" if len(ids) > 1 else (f"`{ids[0]}`" if ids else "none")


def _layers(sel: list) -> str:
    return ",".join(str(l) for l in sorted({int(p[0]) for p in sel}))


def _verdict_section(result) -> str:
    meta = result.meta
    metric, target = meta.primary_metric, meta.target
    comps = [c for c in result.comparisons if c["against"] == "random" and c["metric"] == metric]
    lines = ["## Does the target set beat random sets?", ""]
    if not comps:
        lines.append(f"No comparison with random sets was run (no `{target}` set or no random draws).")
        return "\n".join(lines)
    fmt = _formatter(metric)
    metric = _metric_name(meta, metric)
    lines.append(f"Paired difference in {metric} between `{target}` and the mean of {len(meta.random_sets)} random "
                 f"set(s), at each gamma ({meta.confidence:.0%} interval):")
    lines.append("")
    for c in sorted(comps, key=lambda c: c["gamma"]):
        lines.append(f"- gamma {c['gamma']:g}: {fmt(c['delta'], True)} [{fmt(c['lo'], True)}, {fmt(c['hi'], True)}]"
                     f" -> {_verdict_text(c['verdict'], metric)}")
    wins = [c["gamma"] for c in comps if c["verdict"] == "stronger"]
    losses = [c["gamma"] for c in comps if c["verdict"] == "weaker"]
    scale = f"{meta.n_problems} problems x {len(meta.seeds)} seed(s)"
    lines.append("")
    if wins:
        lines.append(f"**At this scale ({scale}), `{target}` beats random sets at gamma "
                     f"{', '.join(f'{g:g}' for g in wins)}**: the interval of the difference excludes 0 in the direction "
                     f"the reward predicts ({_direction_text(meta)}).")
    else:
        lines.append(f"**At this scale ({scale}), `{target}` does not beat random sets at any gamma**: no interval of "
                     "the difference excludes 0 in the predicted direction. This is no evidence of an effect, not "
                     "evidence of no effect; more problems and seeds narrow the intervals.")
    if losses:
        lines.append(f"At gamma {', '.join(f'{g:g}' for g in losses)} random sets move {metric} *more* than `{target}`.")
    if len(comps) > 1:
        lines.append(f"With {len(comps)} gammas compared, each interval has a {1 - meta.confidence:.0%} chance of "
                     "excluding 0 when there is no effect, so an isolated exclusion is weak evidence.")
    if meta.n_problems < 30:
        lines.append(f"Only {meta.n_problems} problems: percentile bootstrap intervals are too narrow at this size; "
                     "read them as descriptive, not as evidence.")
    return "\n".join(lines)


def _verdict_text(verdict: str, metric: str) -> str:
    return {"stronger": f"**target moves {metric} more than random** (in the predicted direction)",
            "weaker": f"random moves {metric} more than the target",
            "higher": "target higher", "lower": "target lower"}.get(verdict, "no detectable difference")


def _direction_text(meta: EvalMeta) -> str:
    up = "higher" if meta.primary_direction > 0 else "lower"
    down = "lower" if meta.primary_direction > 0 else "higher"
    return f"{_metric_name(meta, meta.primary_metric)} {up} for gamma > 1, {down} for gamma < 1"


def _metric_name(meta: EvalMeta, metric: str) -> str:
    """A metric as the report names it: a user reward by the name it was configured with."""
    return f"reward `{meta.reward}`" if metric == "reward" else metric


def _formatter(metric: str):
    def fmt(x: float, signed: bool = False) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "n/a"
        if metric == "accuracy":
            return f"{100 * x:+.1f} pts" if signed else f"{100 * x:.1f}%"
        if metric == "reward":  # a user reward has any scale: three significant digits, not one decimal
            return f"{x:+.3g}" if signed else f"{x:.3g}"
        return f"{x:+.1f}" if signed else f"{x:.1f}"
    return fmt


def _table_metrics(meta: EvalMeta) -> list[str]:
    """The report's columns: the configured reward first when it is neither accuracy nor length."""
    return (["reward"] if meta.primary_metric == "reward" else []) + ["accuracy", "length"]


def _results_table(rows: list[dict], meta: EvalMeta) -> str:
    metrics = _table_metrics(meta)
    head = "| set | gamma | " + "".join(f"{_metric_name(meta, m)} [CI] | Δ {m} vs none [CI] | " for m in metrics) + \
        "degenerate | problems | seeds | samples |"
    ess = any("ess" in r for r in rows)
    if ess:
        head += " ESS |"
    lines = ["## Results", "", f"Values are means over problems; brackets are {meta.confidence:.0%} intervals.",
             "Degenerate = a repeated n-gram loop, an empty completion, or no parseable answer.", "", head,
             "|" + "---|" * (6 + 2 * len(metrics) + ess)]
    shared = meta.estimator == "importance"  # every condition reweights the same unsteered samples
    for r in rows:
        delta = r["condition"] != "none"
        n_samples = f"{r['n_problems'] * meta.samples_per_problem} shared" if shared else r["n_samples"]
        lines.append(
            f"| {r['set']} | {'-' if r['gamma'] is None else format(r['gamma'], 'g')} | "
            + "".join(_metric_cells(r, m, delta) for m in metrics)
            + f"{_pct(r['degenerate'])} | {r['n_problems']} | {r['n_seeds']} | {n_samples} |"
            + (f" {r['ess']:.2f}{' (low)' if r.get('ess_flag') else ''} |" if "ess" in r else (" |" if ess else "")))
    return "\n".join(lines)


def _metric_cells(r: dict, metric: str, delta: bool) -> str:
    """``value [lo, hi] | delta [lo, hi] |`` of one metric in one row (``- |`` for the unsteered row's delta)."""
    f = _formatter(metric)
    cells = f"{f(r[metric])} [{f(r[metric + '_lo'])}, {f(r[metric + '_hi'])}] | "
    if not delta:
        return cells + "- | "
    return cells + f"{f(r[metric + '_delta'], True)} [{f(r[metric + '_delta_lo'], True)}, {f(r[metric + '_delta_hi'], True)}] | "


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _features_section(features: list[dict], n: int = 10) -> str:
    top = _ranked(features)[:n]
    key = next((k for k in _CONTEXT_KEYS if k in top[0]), None)
    score = "mean" if "mean" in top[0] else None
    lines = ["## Top latents", "", "| rank | layer | latent |" + (f" {score} |" if score else "")
             + (" example context |" if key else ""),
             "|---|---|---|" + ("---|" if score else "") + ("---|" if key else "")]
    for i, f in enumerate(top, 1):
        cells = [str(f.get("rank", i)), str(f["layer"]), str(f["latent"])]
        if score:
            cells.append(f"{float(f[score]):.4g}")
        if key:
            cells.append(_context_text(f.get(key), 80).replace("|", "\\|").replace("\\$", "$"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
