"""The origin comparison's statistics: how well each method's scores agree with single-latent removals
(Spearman, Pearson, sign agreement, bootstrapped over latents), the set-level curves' effects, and the answer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...io import JSONFile
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


FORMAT = "ipg-sae-origins-summary/1"
SIDES = ("objective", "heldout")


@dataclass
class Agreement:
    """A method's scores against the removal effects on one side, over the pooled latents: each statistic as
    ``[point, lo, hi]`` (95% percentile bootstrap over latents)."""

    n: int
    spearman: list[float]
    pearson: list[float]
    sign: list[float]


@dataclass
class CurveRow:
    k: int
    value: float  # held-out accuracy with the top k moved
    effect: float  # minus no steering, with its paired interval over problems
    lo: float
    hi: float
    ess: float


@dataclass
class Curve:
    rows: list[CurveRow]
    auc: float  # the mean effect over k


@dataclass
class OriginsSummary(JSONFile):
    """Everything the report says (saved as ``paths/summary.json``): per origin and method, the agreement with
    single-latent removals on each side, and the set curves per gamma (a float here; a string key in the file)."""
    KIND = "summary of an origin comparison"
    FORMAT = FORMAT

    answer: str
    per_latent: dict[str, dict[str, dict[str, Agreement]]]  # origin -> method -> side
    sets: dict[str, dict[str, dict[float, Curve]]]  # origin -> method -> gamma
    base: float  # held-out accuracy without steering
    heldout_problems: int
    single_heldout_problems: int
    top_latents: int
    random_latents: int
    origins: list[str]
    methods: list[str]
    format: str = FORMAT

    def to_json(self) -> dict:
        doc = dataclasses.asdict(self)
        doc["sets"] = {o: {m: {str(g): dataclasses.asdict(c) for g, c in by_gamma.items()}
                           for m, by_gamma in methods.items()} for o, methods in self.sets.items()}
        return doc

    @classmethod
    def from_json(cls, doc: dict, where: str = "summary") -> "OriginsSummary":
        cls.check_format(doc, where)
        fields = {k: v for k, v in doc.items() if k not in ("per_latent", "sets")}
        per_latent = {o: {m: {side: Agreement(**a) for side, a in sides.items()} for m, sides in methods.items()}
                      for o, methods in doc["per_latent"].items()}
        sets = {o: {m: {float(g): Curve([CurveRow(**r) for r in c["rows"]], c["auc"]) for g, c in by_gamma.items()}
                    for m, by_gamma in methods.items()} for o, methods in doc["sets"].items()}
        return cls(per_latent=per_latent, sets=sets, **fields)


def summarize(cfg: PathsConfig, single: dict, curves: dict) -> OriginsSummary:
    """Per origin and method: agreement with single-latent removals (objective and held-out), and the set-level
    effects with paired intervals and the deletion curve's area; the answer."""
    base = np.array(curves["base"])
    per_latent: dict = {}
    for origin, doc in single["origins"].items():
        rows = doc["latents"]
        effects = {side: np.array([r[side] for r in rows]) for side in SIDES}
        for method in cfg.methods:
            scores = np.array([r["scores"][method] for r in rows])
            per_latent.setdefault(origin, {})[method] = {
                side: Agreement(**agreement(scores, y, cfg.n_bootstrap, cfg.seed)) for side, y in effects.items()}
    sets: dict = {}
    for origin, methods in curves["curves"].items():
        for method, by_gamma in methods.items():
            entry = sets.setdefault(origin, {}).setdefault(method, {})
            for gamma, by_k in by_gamma.items():
                rows = []
                for k in map(str, cfg.ks):
                    x = np.array(by_k[k]["reward"])
                    effect, lo, hi = bootstrap(x, base, n_boot=cfg.n_bootstrap)
                    rows.append(CurveRow(int(k), float(x.mean()), effect, lo, hi, by_k[k]["ess"]))
                entry[float(gamma)] = Curve(rows, area_under_curve([r.value for r in rows], float(base.mean())))
    summary = OriginsSummary("", per_latent, sets, float(base.mean()), len(curves["base"]), single["heldout_problems"],
                             cfg.top_latents, cfg.random_latents, list(cfg.origins), list(cfg.methods))
    summary.answer = answer(summary)
    return summary


def answer(summary: OriginsSummary) -> str:
    """The answer in two sentences: which path predicts single-latent removals best, which deletes steepest."""
    per = [(o, m, v["objective"].spearman[0], v["heldout"].spearman[0])
           for o, ms in summary.per_latent.items() for m, v in ms.items()]
    best_obj = max(per, key=lambda t: np.nan_to_num(t[2], nan=-2))
    best_held = max(per, key=lambda t: np.nan_to_num(t[3], nan=-2))
    dele = [(o, m, v[0.0].auc) for o, ms in summary.sets.items() for m, v in ms.items() if 0.0 in v]
    steepest = min(dele, key=lambda t: t[2]) if dele else None
    text = (f"Single-latent removals are best predicted by {best_obj[1]} from the {best_obj[0]} origin on the "
            f"attribution objective (Spearman {best_obj[2]:.2f}) and by {best_held[1]} from the {best_held[0]} origin "
            f"on held-out reward (Spearman {best_held[3]:.2f}).")
    if steepest:
        text += (f" The steepest deletion curve on held-out problems is {steepest[1]} from the {steepest[0]} origin "
                 f"(mean effect over k {steepest[2] * 100:+.1f} points).")
    return text
