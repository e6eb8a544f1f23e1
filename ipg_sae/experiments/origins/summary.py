"""The origin comparison's statistics: how well each method's scores agree with single-latent removals
(Spearman, Pearson, sign agreement, bootstrapped over latents), the set-level curves' effects, and the answer."""

from __future__ import annotations

import numpy as np

from ...stats import area_under_curve, bootstrap
from .config import PathsConfig



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
