"""What a whole experiment costs: its stages' total seconds (over every run and resume, from the stage markers
``<run_dir>/stages/<stage>.json``), CPU hours at the threads it ran with, and seconds per cell for the stages
whose work is cells.

    .venv/bin/python benchmarks/experiment_cost.py runs/study --threads 2 --cells score=480 confirm=168
    .venv/bin/python benchmarks/experiment_cost.py --recorded        # the committed runs' figures (below)

A marker's ``total_seconds`` adds up every run of the stage with the same key, killed runs included (a process
killed by SIGKILL loses its unfinished seconds). Markers written before ``total_seconds`` existed hold the last
run's ``seconds`` only: the table says which. ``--recorded`` prints the figures of the default model's published
runs, taken from the stage times their docs recorded (``docs/study/README.md``, ``docs/steering/README.md``,
``docs/paths/README.md``), since their run folders are not part of the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The published runs on the 2-core CPU (2 threads), as their docs recorded them: stage -> (seconds, cells, note).
RECORDED = {
    "study (docs/study, 2026-11-29 to 12-01)": {
        "sample": (77, None, "112 problems x 4"),
        "sae": (1518, None, "0.70M tokens"),
        "attribute": (4409, None, "2 rewards x 5 methods x 60 prompts"),
        "heldout": (129, None, "100 problems x 8"),
        "score": (19800, 462, "off-policy cells of 100 problems x 8 samples (~5.5 h across sessions: the last run "
                              "15033 s, 35-50 s a cell, plus 7.5 min of per-latent policy change)"),
        "confirm": (8050, 165, "on-policy (set, gamma, seed) cells of 100 problems x 4 samples, computed in the last "
                              "run (3 reused), with the 800-sample regeneration check"),
        "report": (5, None, ""),
    },
    "steering bench (docs/steering, 2026-11-30)": {
        "diffmean": (37, None, ""),
        "dev": (56, None, "dev sampling"),
        "tune": (4418, 100, "dev settings (34 off-policy, 66 on-policy)"),
        "evaluate": (7420, 44, "on-policy cells of 400 samples in the last run"),
        "evaluate, earlier session": (0, None, "52 more cells, not timed (at the last run's rate, ~8,800 s more)"),
        "capability": (353, None, ""),
        "report": (4, None, ""),
    },
    "origin comparison (docs/paths, 2026-11-30)": {
        "attribute": (1986, None, "both origins, both rules"),
        "heldout": (162, None, ""),
        "single": (3252, 87, "single-latent removals"),
        "curves": (1786, 32, "off-policy curve cells"),
    },
}


def markers(run_dir: Path) -> dict[str, dict]:
    """Each stage's marker under ``run_dir/stages`` (stage name -> its JSON)."""
    out = {}
    for path in sorted((run_dir / "stages").glob("*.json")):
        if path.name.endswith(".partial.json"):
            continue
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "hash" in doc:
            out[path.stem] = doc
    return out


def cost_table(stages: dict[str, tuple[float, int | None, str]], threads: int) -> list[str]:
    lines = ["| stage | seconds | cells | s per cell | note |", "|---|---|---|---|---|"]
    for name, (seconds, cells, note) in stages.items():
        per = f"{seconds / cells:.0f}" if cells else ""
        lines.append(f"| {name} | {seconds:,.0f} | {cells or ''} | {per} | {note} |")
    total = sum(s for s, _, _ in stages.values())
    lines.append(f"| **all** | **{total:,.0f}** ({total / 3600:.1f} h wall) | | | "
                 f"**{threads * total / 3600:.1f} CPU hours** at {threads} threads |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a staged job's run directory (runs/<name>)")
    p.add_argument("--threads", type=int, default=2, help="threads the job ran with (CPU hours = threads x wall)")
    p.add_argument("--cells", nargs="*", default=[], help="STAGE=N: the cells a stage computed, for s per cell")
    p.add_argument("--recorded", action="store_true", help="the published runs' recorded figures")
    args = p.parse_args(argv)
    if args.recorded:
        for run, stages in RECORDED.items():
            print(f"\n### {run}\n")
            print("\n".join(cost_table(stages, args.threads)))
        return 0
    if not args.run_dir:
        p.error("give a run directory, or --recorded")
    found = markers(Path(args.run_dir))
    if not found:
        print(f"no stage markers under {args.run_dir}/stages", file=sys.stderr)
        return 1
    cells = {k: int(v) for k, v in (c.split("=", 1) for c in args.cells)}
    stages = {}
    for name, doc in found.items():
        total = doc.get("total_seconds")
        note = "" if total is not None else "last run only (marker predates total_seconds)"
        stages[name] = (float(total if total is not None else doc.get("seconds", 0.0)), cells.get(name), note)
    print("\n".join(cost_table(stages, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
