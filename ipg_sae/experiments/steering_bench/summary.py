"""The steering benchmark's statistics: per split and recipe, the effect against the unsteered run (paired by
problem), and every IPG-based recipe against every practice recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...io import JSONFile
from ...stats import bootstrap
from .config import SteeringBenchConfig
from .recipes import group, in_group, kind_of

FORMAT = "ipg-sae-steering-bench-summary/1"
METRICS = ("reward", "accuracy", "length", "parse_failure", "degenerate")


@dataclass
class Row:
    """One recipe on one split: per-problem means (seeds pooled) and, against the unsteered run, the effect on the
    reward and on length as ``[point, lo, hi]`` (None for the unsteered run itself)."""

    reward: float
    accuracy: float
    length: float
    parse_failure: float
    degenerate: float
    effect: list[float] | None = None
    length_effect: list[float] | None = None
    helped: float | None = None  # share of problems whose mean reward (seeds pooled) rose against the unsteered run
    hurt: float | None = None  # ... and fell

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Comparison:
    """An IPG-based recipe minus a practice recipe, paired by problem: ``[point, lo, hi]``."""

    ipg: str
    practice: str
    difference: list[float]

    @property
    def label(self) -> str:  # the file's key
        return f"{self.ipg} - {self.practice}"


@dataclass
class BenchSummary(JSONFile):
    """Everything the report says (saved as ``bench/leaderboard.json``): per split, each recipe's row and the
    IPG-based-minus-practice comparisons; the dev tuning and the capability costs as stored; each recipe's chosen
    setting; the answer."""
    KIND = "steering-benchmark summary"
    FORMAT = FORMAT

    splits: dict[str, dict[str, Row]]
    dev: dict  # tuning.json
    capability: dict  # capability.json
    comparisons: dict[str, list[Comparison]]
    recipes: dict  # name -> {label, setting}
    answer: str = ""
    format: str = FORMAT
    # per split, per null with draws: the step against the draws (rank and two-level bootstrap; :func:`null_test`)
    nulls: dict = dataclasses.field(default_factory=dict)
    matched: dict = dataclasses.field(default_factory=dict)  # matched.json: push matching's target and settings

    def comparison(self, split: str, ipg: str, practice: str) -> Comparison:
        return next(c for c in self.comparisons[split] if (c.ipg, c.practice) == (ipg, practice))

    def to_json(self) -> dict:
        return {"splits": {s: {n: r.to_json() for n, r in rows.items()} for s, rows in self.splits.items()},
                "dev": self.dev, "capability": self.capability,
                "comparisons": {s: {c.label: c.difference for c in cs} for s, cs in self.comparisons.items()},
                "recipes": self.recipes, "answer": self.answer, "format": self.format, "nulls": self.nulls,
                "matched": self.matched}

    @classmethod
    def from_json(cls, doc: dict, where: str = "leaderboard") -> "BenchSummary":
        cls.check_format(doc, where)
        splits = {s: {n: Row(**r) for n, r in rows.items()} for s, rows in doc["splits"].items()}
        comparisons = {s: [Comparison(*label.split(" - ", 1), diff) for label, diff in cs.items()]
                       for s, cs in doc["comparisons"].items()}
        return cls(splits, doc["dev"], doc["capability"], comparisons, doc["recipes"], doc["answer"],
                   nulls=doc.get("nulls", {}), matched=doc.get("matched", {}))


def helped_hurt(reward: list[float], base: list[float]) -> tuple[float, float]:
    """The shares of problems (paired by position) whose mean reward rose and fell against ``base``."""
    diff = np.asarray(reward, dtype=float) - np.asarray(base, dtype=float)
    if diff.size == 0:
        return 0.0, 0.0
    return float((diff > 0).mean()), float((diff < 0).mean())


def null_test(step: list[float], draws: list[list[float]], base: list[float], n_boot: int) -> dict:
    """The step against a null's draws (each tuned on dev), per problem: the step's effect, each draw's, the rank
    p ``(1 + #draws at least as good) / (n + 1)`` (1/(n+1) at best), and the two-level bootstrap of the step minus
    the null (problems and draws resampled: :func:`ipg_sae.stats.bootstrap` with ``[draws, problems]``)."""
    step_a, draws_a, base_a = np.asarray(step, float), np.asarray(draws, float), np.asarray(base, float)
    effect = float((step_a - base_a).mean())
    effects = [float((d - base_a).mean()) for d in draws_a]
    return {"step": effect, "draws": effects, "rank_p": (1 + sum(e >= effect for e in effects)) / (len(effects) + 1),
            "difference": list(bootstrap(step_a, draws_a, n_boot=n_boot))}


def summarize(cfg: SteeringBenchConfig, evaluation: dict, cap: dict, tuning: dict,
              matched: dict | None = None) -> BenchSummary:
    """Per split and recipe: the accuracy effect against the unsteered run (paired by problem, seeds pooled),
    length, parse-failure and degenerate rates, the capability cost and the dev choice (the answer is the
    report's: :func:`.report.answer`)."""
    boot = dict(n_boot=cfg.n_bootstrap)
    splits, comparisons = {}, {}
    for split, doc in evaluation["splits"].items():
        recipes = doc["recipes"]
        base = recipes["unsteered"]
        rows = {}
        for name, r in recipes.items():
            row = Row(**{m: float(np.mean(r[m])) for m in METRICS})
            if name != "unsteered":
                row.effect = list(bootstrap(np.array(r["reward"]), np.array(base["reward"]), **boot))
                row.length_effect = list(bootstrap(np.array(r["length"]), np.array(base["length"]), **boot))
                row.helped, row.hurt = helped_hurt(r["reward"], base["reward"])
            rows[name] = row
        splits[split] = rows
        comparisons[split] = [
            Comparison(a, b, list(bootstrap(np.array(recipes[a]["reward"]), np.array(recipes[b]["reward"]), **boot)))
            for a in group("ipg") if a in recipes for b in group("practice") if b in recipes]
        comparisons[split] += [  # the step against its own nulls and comparators in the same format
            Comparison("ipg_step", b, list(bootstrap(np.array(recipes["ipg_step"]["reward"]),
                                                     np.array(recipes[b]["reward"]), **boot)))
            for b in recipes if "ipg_step" in recipes and in_group(b, "control") and "@" not in b]
        comparisons[split] += [  # at matched push: the step (as chosen) against every other recipe at its KL
            Comparison("ipg_step", b, list(bootstrap(np.array(recipes["ipg_step"]["reward"]),
                                                     np.array(recipes[b]["reward"]), **boot)))
            for b in recipes if "ipg_step" in recipes and b.endswith("@push") and kind_of(b) != "ipg_step"]
    nulls = {}
    for split, doc in evaluation["splits"].items():
        recipes = doc["recipes"]
        drawn = sorted({kind_of(n) for n in recipes if "#" in n and "@" not in n})
        if "ipg_step" in recipes and drawn:
            nulls[split] = {kind: null_test(recipes["ipg_step"]["reward"],
                                            [recipes[n]["reward"] for n in sorted(recipes)
                                             if "#" in n and "@" not in n and kind_of(n) == kind],
                                            recipes["unsteered"]["reward"], cfg.n_bootstrap) for kind in drawn}
    return BenchSummary(splits, tuning, cap, comparisons, evaluation["recipes"], nulls=nulls, matched=matched or {})
