"""Adaptive attribution against fixed Gauss-Legendre, on the real default model, SAE and demo trajectories.

The question (issue "attribution to a stated accuracy"): how long does it take to reach a median
completeness gap of 1% and a largest gap of 5% over the demo's trajectories? Contenders, in one
process, on the same prompts, each through ``attribute()`` end to end:

* ``gl16``: fixed 16-node Gauss-Legendre (the demo's setting before adaptive attribution);
* ``gl20``: fixed 20-node Gauss-Legendre (what a fixed rule needs to reach the target here);
* ``adaptive``: adaptive Simpson with ``delta_tol`` (default 0.02): panels bisected where the
  exact per-panel completeness error is largest, per prompt.

It reports, per contender, the time, the mean node count per attributed prompt, the median and
largest relative gap, whether the target is met, and the time ratios. Needs ``runs/demo`` (``make
demo``); ``--smoke`` runs a tiny random model instead (seconds: checks the script only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def parse(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--run-dir", default="runs/demo", help="a demo run: trajectories.jsonl and sae/layer_15")
    p.add_argument("--delta-tol", type=float, default=0.02)
    p.add_argument("--max-prompts", type=int, default=None, help="attribute only the first N prompts")
    return common.finish_args(p.parse_args(argv))


def inputs(args):
    """(model, tokenizer, saes, trajectories): the demo's, or tiny random ones with --smoke."""
    from ipg_sae.models import load_model
    from ipg_sae.saes import load_sae
    from ipg_sae.trajectories import group_by_prompt, load_trajectories

    if args.smoke:
        shape = args.shape_obj
        model = common.build_model(shape, args.device, args.torch_dtype)
        tok = common.build_tokenizer(shape.vocab)
        saes = {shape.layer: common.random_topk_sae(shape, args.device, args.torch_dtype)}
        trajs = common.make_trajectories(3, 4, 12, 24, shape.vocab)
        return model, tok, saes, trajs
    run = Path(args.run_dir)
    if not (run / "trajectories.jsonl").is_file():
        raise SystemExit(f"no demo run at {run}: run `make demo` first (or pass --run-dir)")
    model, tok = load_model("smollm2-135m-instruct", device=args.device)
    sae = load_sae(str(run / "sae" / "layer_15"), model)
    trajs = load_trajectories(run / "trajectories.jsonl")
    if args.max_prompts:
        keep = set(list(group_by_prompt(trajs))[: args.max_prompts])
        trajs = [t for t in trajs if t.prompt_id in keep]
    return model, tok, {15: sae}, trajs


def main(argv=None) -> dict:
    args = parse(argv)
    from ipg_sae.attribution import attribute

    model, tok, saes, trajs = inputs(args)
    print(f"adaptive: {'tiny (smoke)' if args.smoke else args.run_dir} on {args.device}, "
          f"{torch.get_num_threads()} threads, {len(trajs)} trajectories", flush=True)
    contenders = {"gl16": dict(n_steps=16), "gl20": dict(n_steps=20),
                  "adaptive": dict(delta_tol=args.delta_tol, max_nodes=33)}
    out = {}
    for name, kw in contenders.items():
        t0 = time.perf_counter()
        result = attribute(model, saes, trajs, tokenizer=tok, progress=False, **kw)
        seconds = time.perf_counter() - t0
        live = result.traj("advantage") != 0
        gaps = result.delta.abs()[live]
        attributed = ~result.prompt("skipped")
        row = {"seconds": round(seconds, 2), "mean_nodes": round(float(result.prompt("n_nodes")[attributed].double().mean()), 2),
               "median_gap": float(gaps.median()), "max_gap": float(gaps.max()),
               "prompts": int(attributed.sum()), "trajectories": int(live.sum())}
        row["meets_target"] = row["median_gap"] <= 0.01 and row["max_gap"] <= 0.05
        out[name] = row
        print(name, json.dumps(row), flush=True)
    result = {
        "config": {"run_dir": None if args.smoke else args.run_dir, "delta_tol": args.delta_tol,
                   "target": {"median_gap": 0.01, "max_gap": 0.05}},
        "contenders": out,
        "ratios": {"gl16/adaptive": round(out["gl16"]["seconds"] / out["adaptive"]["seconds"], 3),
                   "gl20/adaptive": round(out["gl20"]["seconds"] / out["adaptive"]["seconds"], 3)},
    }
    print(json.dumps(result["ratios"]), flush=True)
    common.write_section(args, "adaptive", result)
    return result


if __name__ == "__main__":
    main()
