"""The steering benchmark's statistics: per split and recipe, the effect against the unsteered run (paired by
problem), and every IPG-based recipe against every practice recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import IPGError
from ...io import read_json, write_json
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
class BenchSummary:
    """Everything the report says (saved as ``bench/leaderboard.json``): per split, each recipe's row and the
    IPG-based-minus-practice comparisons; the dev tuning and the capability costs as stored; each recipe's chosen
    setting; the answer."""

    splits: dict[str, dict[str, Row]]
    dev: dict  # tuning.json
    capability: dict  # capability.json
    comparisons: dict[str, list[Comparison]]
    recipes: dict  # name -> {label, setting}
    answer: str = ""
    format: str = FORMAT

    def comparison(self, split: str, ipg: str, practice: str) -> Comparison:
        return next(c for c in self.comparisons[split] if (c.ipg, c.practice) == (ipg, practice))

    def to_json(self) -> dict:
        return {"splits": {s: {n: r.to_json() for n, r in rows.items()} for s, rows in self.splits.items()},
                "dev": self.dev, "capability": self.capability,
                "comparisons": {s: {c.label: c.difference for c in cs} for s, cs in self.comparisons.items()},
                "recipes": self.recipes, "answer": self.answer, "format": self.format}

    @classmethod
    def from_json(cls, doc: dict, where: str = "leaderboard") -> "BenchSummary":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else None
            raise IPGError(f"{where} is not a steering-benchmark summary of this version (format {found!r}, expected "
                           f"{FORMAT!r}); rerun its report stage")
        splits = {s: {n: Row(**r) for n, r in rows.items()} for s, rows in doc["splits"].items()}
        comparisons = {s: [Comparison(*label.split(" - ", 1), diff) for label, diff in cs.items()]
                       for s, cs in doc["comparisons"].items()}
        return cls(splits, doc["dev"], doc["capability"], comparisons, doc["recipes"], doc["answer"])

    def save(self, path: Path) -> Path:
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: Path) -> "BenchSummary":
        return cls.from_json(read_json(path), str(path))


def helped_hurt(reward: list[float], base: list[float]) -> tuple[float, float]:
    """The shares of problems (paired by position) whose mean reward rose and fell against ``base``."""
    diff = np.asarray(reward, dtype=float) - np.asarray(base, dtype=float)
    if diff.size == 0:
        return 0.0, 0.0
    return float((diff > 0).mean()), float((diff < 0).mean())


def summarize(cfg: SteeringBenchConfig, evaluation: dict, cap: dict, tuning: dict) -> BenchSummary:
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
    return BenchSummary(splits, tuning, cap, comparisons, evaluation["recipes"])
