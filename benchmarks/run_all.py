"""Run every benchmark, merge their results into ``results/<machine>.json``, print the ratio table.

Each benchmark runs in its own process (a crash or a memory peak in one does not touch the
others) with the same flags; each merges its section into the machine's results file. The
table is also written to ``results/<machine>.md`` for the README.

    .venv/bin/python benchmarks/run_all.py                      # CPU, SmolLM2-135M shapes
    .venv/bin/python benchmarks/run_all.py --threads 1          # on a shared machine
    .venv/bin/python benchmarks/run_all.py --device cuda --dtype bfloat16 --shape qwen2.5-math-1.5b
    .venv/bin/python benchmarks/run_all.py --smoke --results-dir /tmp/bench   # seconds, checks only
    .venv/bin/python benchmarks/run_all.py --report-only        # reprint the table of a results file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from ipg_sae.io import write_text  # noqa: E402  (importable once common has set sys.path)

BENCHMARKS = ("attribution", "training", "sampling", "scaling", "faithfulness", "adaptive", "cli")
# Random-weight models at real shapes: run by default. `adaptive` needs the real model and a demo run
# (`make demo`): run it with --only adaptive.
DEFAULT = ("attribution", "training", "sampling", "scaling", "faithfulness", "cli")


def _get(doc: dict, path: str):
    node = doc
    for key in path.split("|"):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


# (section, key path in the section, what it is, target)
ROWS = [
    ("attribution", "ratios|ipg/floor", "IPG attribute_group / floor (time)", "<= 1.2"),
    ("attribution", "ratios|attribute_e2e/floor", "attribute() end-to-end / floor (time)", ""),
    ("attribution", "ratios|attribute_e2e/node_passes", "attribute() end-to-end / its node passes (time)", "<= 1.3"),
    ("attribution", "ratios|naive/ipg", "naive (full model per node, dense gates) / IPG (time)", "> 1"),
    ("attribution", "memory|checkpointing/no_checkpointing", "peak memory, checkpointing / none", "< 1"),
    ("training", "ratios|ours/sae_lens", "train-sae / sae-lens runner (tokens/s)", ">= 1"),
    ("training", "ratios|ours/floor", "train-sae / LM forward to the layer (tokens/s)", "<= 1"),
    ("training", "ratios|sae_lens/floor", "sae-lens runner / LM forward to the layer (tokens/s)", "<= 1"),
    ("sampling", "ratios|sampler/generate_loop", "sampler / generate() per prompt (tokens/s)", "> 1"),
    ("sampling", "ratios|sampler/generate_batched", "sampler / one bare batched generate() (tokens/s)", "~ 1"),
    ("sampling", "ratios|steered/plain", "sampler with steering hooks / without (tokens/s)", ">= 0.9"),
    ("adaptive", "ratios|gl16/adaptive", "attribution to a median gap <= 1%, max <= 5%: GL16 / adaptive (time)", ">= 1.5"),
    ("adaptive", "ratios|gl20/adaptive", "same: GL20 (a fixed rule that meets the target) / adaptive (time)", ">= 1.5"),
    ("faithfulness", "ratios|flat/tree", "scoring a steered cell: flat passes / prefix tree + replay (time)", "> 3"),
    ("faithfulness", "ratios|tokens_flat/tree", "tokens run: flat / prefix tree", ""),
    ("cli", "seconds|help", "`ipg-sae --help`, seconds (torch not imported)", "< 1"),
    ("cli", "seconds|typo", "a mistyped command's error, seconds", "< 1"),
    ("cli", "seconds|command_help", "`ipg-sae sample --help`, seconds (loads its config class)", ""),
    ("cli", "ratios|help/python", "`ipg-sae --help` / bare interpreter start-up (time)", ""),
]


def table(doc: dict) -> str:
    lines = [f"Results for `{doc.get('machine')}` (updated {doc.get('updated')})", ""]
    metas = {s: doc[s]["meta"] for s in BENCHMARKS if s in doc}
    if metas:
        m = next(iter(metas.values()))
        lines.append(f"{m.get('cpu')} ({m.get('nproc')} cores){', ' + m['gpu'] if m.get('gpu') else ''}; "
                     f"torch {m.get('torch')}, {m.get('device')} {m.get('dtype')}, {m.get('threads')} threads, "
                     f"shape {m.get('shape')}{' (SMOKE)' if m.get('smoke') else ''}")
        lines.append("")
    lines += ["| benchmark | ratio | value | target |", "| --- | --- | --- | --- |"]
    for section, path, what, target in ROWS:
        value = _get(doc.get(section, {}), path)
        shown = "not run" if section not in doc else ("-" if value is None else f"{value:.3g}")
        lines.append(f"| {section} | {what} | {shown} | {target} |")
    scaling = doc.get("scaling")
    if scaling:
        for sweep, key in (("length", "tokens"), ("n_steps", "n_steps")):
            pts = ", ".join(f"{p[key]}: {p['ipg/floor']:.2f}" for p in scaling.get(sweep, []))
            lines.append(f"| scaling | IPG / floor by {key} | {pts} | |")
        g = scaling.get("growth_exponent", {})
        lines.append(f"| scaling | time ~ tokens^a: a (IPG, floor) | {g.get('ipg_vs_tokens')}, "
                     f"{g.get('floor_vs_tokens')} | ~1 |")
    att = doc.get("attribution", {})
    mem = att.get("memory")
    if mem:
        key = mem.get("metric")
        lines.append(f"| attribution | peak memory over baseline, {mem['no_checkpointing'].get('tokens')} tokens x "
                     f"{mem['no_checkpointing'].get('n_steps')} nodes (MiB, none / checkpointing) | "
                     f"{mem['no_checkpointing'].get(key)} / {mem['checkpointing'].get(key)} | |")
    if "ipg_breakdown_s" in att:
        b = att["ipg_breakdown_s"]
        lines.append(f"| attribution | IPG time split (s): clean pass, c=0 pass, node passes, other; floor's lower "
                     f"part | {b.get('clean_s')}, {b.get('logp0_s')}, {b.get('node_passes_s')}, {b.get('other_s')}; "
                     f"{b.get('floor_lower_s')} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(DEFAULT))
    p.add_argument("--report-only", action="store_true", help="print the table of the existing results file")
    args = common.finish_args(p.parse_args(argv))
    failed = []
    if not args.report_only:
        here = Path(__file__).resolve().parent
        flags = common.child_args(args) + (["--repeats", str(args.repeats)] if args.repeats else [])
        for name in args.only:
            print(f"\n=== {name} ===", flush=True)
            t = time.perf_counter()
            rc = subprocess.run([sys.executable, str(here / f"bench_{name}.py"), *flags], cwd=str(common.REPO)).returncode
            print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t:.0f}s",
                  flush=True)
            if rc != 0:
                failed.append(name)
    path = common.results_path(args)
    if not path.is_file():
        print(f"no results file {path}", file=sys.stderr)
        return 1
    text = table(json.loads(path.read_text()))
    write_text(path.with_suffix(".md"), text)
    print("\n" + text)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
