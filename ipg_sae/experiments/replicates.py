"""Replicates of the headline (issue 37 item 3): the study and the steering benchmark again, each replicate with
its own SAE seed (``sae.seed``) and its own draw of attributed problems (``task.offset``), disjoint from every
other replicate's draw, from the study's held-out split and from the benchmark's dev, test and transfer splits
(checked by ``tests/test_steering_bench.py``; each SAE's corpus leaves its job's splits out, as always).
Replicate 0 is the published run. Each replicate attributes 112 problems (60 attributed prompts), like the
published run.

Per replicate, two commands (:func:`commands`), run in order; each resumes when killed::

    ipg-sae study configs/study_smollm2.yaml --name study_r1 --task.offset 4000 --sae.seed 1
    ipg-sae steering-bench configs/steering_bench_smollm2.yaml --name steering_bench_r1 --task.offset 4000 \\
        --attribution_dir runs/study_r1/correctness --sae.load '[{path: runs/study_r1/sae/layer_15}]'
"""

from __future__ import annotations

# replicate -> (the attributed problems' offset in the level-1 stream, the SAE's seed); 0: the published run
REPLICATES: dict[int, tuple[int, int | None]] = {0: (0, None), 1: (4000, 1), 2: (7400, 2)}


def study_overrides(r: int) -> dict:
    offset, seed = REPLICATES[r]
    return {} if r == 0 else {"name": f"study_r{r}", "task.offset": offset, "sae.seed": seed}


def bench_overrides(r: int, layer: int = 15) -> dict:
    offset, _ = REPLICATES[r]
    return {} if r == 0 else {"name": f"steering_bench_r{r}", "task.offset": offset,
                              "attribution_dir": f"runs/study_r{r}/correctness",
                              "sae.load": [{"path": f"runs/study_r{r}/sae/layer_{layer}"}]}


def commands(r: int) -> list[str]:
    """The two command lines of replicate ``r`` (the study, then the benchmark that reuses its attributions)."""
    def flags(overrides: dict) -> str:
        return " ".join(f"--{k} '[{{path: {v[0]['path']}}}]'" if k == "sae.load" else f"--{k} {v}"
                        for k, v in overrides.items())
    return [f"ipg-sae study configs/study_smollm2.yaml {flags(study_overrides(r))}".strip(),
            f"ipg-sae steering-bench configs/steering_bench_smollm2.yaml {flags(bench_overrides(r))}".strip()]


HEADLINE = ("ipg_step", "ipg_topk")  # per replicate: their test effects and their differences with practice
PRACTICE = ("diffmean", "prompting")


def spread(leaderboards: dict[int, dict], split: str = "test") -> dict:
    """Per replicate (its ``bench/leaderboard.json``, read as a dict) the headline recipes' effects on ``split`` and
    their paired differences with DiffMean and prompting (``[point, lo, hi]``), and across replicates each one's
    points' min, max and mean: what the README reports instead of one draw."""
    rows: dict[str, dict[int, list[float]]] = {}
    for r, board in sorted(leaderboards.items()):
        recipes = board["splits"][split]
        for name in HEADLINE:
            if name in recipes:
                rows.setdefault(f"{name} effect", {})[r] = recipes[name]["effect"]
            for other in PRACTICE:
                label = f"{name} - {other}"
                if label in board["comparisons"].get(split, {}):
                    rows.setdefault(label, {})[r] = board["comparisons"][split][label]
    out = {}
    for label, per in rows.items():
        points = [v[0] for v in per.values()]
        out[label] = {"replicates": per, "min": min(points), "max": max(points), "mean": sum(points) / len(points)}
    return out
