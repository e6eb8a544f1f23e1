"""The steering benchmark's statistics: per split and recipe, the effect against the unsteered run (paired by
problem), and every IPG-based recipe against every practice recipe."""

from __future__ import annotations

import numpy as np

from ...stats import bootstrap
from .config import SteeringBenchConfig
from .recipes import group

def summarize(cfg: SteeringBenchConfig, evaluation: dict, cap: dict, tuning: dict) -> dict:
    """Per split and recipe: the accuracy effect against the unsteered run (paired by problem, seeds pooled),
    length, parse-failure and degenerate rates, the capability cost and the dev choice."""
    out = {"splits": {}, "dev": tuning, "capability": cap}
    for split, doc in evaluation["splits"].items():
        base = doc["recipes"]["unsteered"]
        rows = {}
        for name, r in doc["recipes"].items():
            row = {m: float(np.mean(r[m])) for m in ("reward", "accuracy", "length", "parse_failure", "degenerate")}
            if name != "unsteered":
                row["effect"] = list(bootstrap(np.array(r["reward"]), np.array(base["reward"]),
                                               n_boot=cfg.n_bootstrap))
                row["length_effect"] = list(bootstrap(np.array(r["length"]), np.array(base["length"]),
                                                      n_boot=cfg.n_bootstrap))
            rows[name] = row
        out["splits"][split] = rows
        out.setdefault("comparisons", {})[split] = {
            f"{a} - {b}": list(bootstrap(np.array(doc["recipes"][a]["reward"]), np.array(doc["recipes"][b]["reward"]),
                                         n_boot=cfg.n_bootstrap))
            for a in group("ipg") if a in doc["recipes"] for b in group("practice") if b in doc["recipes"]}
    return out
