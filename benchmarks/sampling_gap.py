"""Where the ``loop`` sampler's time goes, against its floor: one real run split into parts that add up.

``bench_sampling.py --real`` gives ``sampler/floor`` (useful tokens/s against the model's linear layers
alone at the batch's width). This script explains the rest of the run from the same workload (the
default model, the demo's held-out prompts, G 4 and 96 rows; ``--group-size 16 --prompts 24`` for the
studies' on-policy cells) by timing the decode loop's own functions while it runs once:

* ``floor``: the useful tokens at the floor's rate (what the ratio compares against);
* ``narrow_and_idle_rows``: the linear work the steps really did (each step's width, at the linear
  layers' measured time for that width) minus the floor: rows that decode a token nobody keeps,
  and narrower batches in the tail running below the full width's rate;
* ``step_beyond_linear``: each decoding step's time minus its linear work: attention, norms,
  rotary, activations, residual adds, the cache's writes, and the Python between them;
* ``prefill``: the prompts' forward passes; ``draws``: sampling tokens from the logits;
* ``bookkeeping``: the rest of the loop (slot refills, shrinking the batch, per-row Python).

``--profile`` also runs the same workload once under ``torch.profiler`` and records the operators
with the most self CPU time (the profiler adds overhead; its shares, not its seconds, are the figure).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sampling_gap.py --threads 2 --profile
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sampling_gap.py --threads 2 --group-size 16 --prompts 24

``--smoke`` runs the same decomposition on a tiny random model (``tests/test_benchmarks_smoke.py``: the parts
add up to the run's time, whatever the numbers).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from bench_sampling import linear_floor, real_setup, synthetic_setup  # noqa: E402


class Clock:
    """Seconds spent in a few of ``ipg_sae.decode``'s functions, and each decoding step's width."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.step_widths: list[int] = []
        self.step_seconds: list[float] = []

    def wrap(self, module, name: str, key: str, on_step: bool = False):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds[key] += spent
                if on_step:  # _step(model, cache, slots, ...): the width is the slots' row count
                    self.step_widths.append(len(args[2].owner))
                    self.step_seconds.append(spent)

        setattr(module, name, timed)
        return lambda: setattr(module, name, original)


def decompose(model, tok, problems, prompts, cfg, device) -> dict:
    from ipg_sae import decode
    from ipg_sae.sampling import sample

    clock = Clock()
    undo = [clock.wrap(decode, "_step", "steps", on_step=True), clock.wrap(decode, "draw_tokens", "draws"),
            clock.wrap(decode._Prefill, "__call__", "prefill"), clock.wrap(decode, "_fill", "fill")]
    try:
        start = time.perf_counter()
        trajs = sample(model, tok, problems, prompts, cfg, reward="correctness", progress=False)
        total = time.perf_counter() - start
    finally:
        for u in undo:
            u()
    useful = sum(len(t.completion_ids) for t in trajs)
    widths = collections.Counter(clock.step_widths)
    linear = {w: w / linear_floor(model, w, device) for w in widths}  # seconds of linear work per step at width w
    floor_s = useful * linear[cfg.batch_size] / cfg.batch_size if cfg.batch_size in linear else \
        useful / linear_floor(model, cfg.batch_size, device)
    steps_linear = sum(linear[w] * n for w, n in widths.items())
    steps = clock.seconds["steps"]
    prefill, draws = clock.seconds["prefill"], clock.seconds["draws"]
    parts = {"floor": floor_s, "narrow_and_idle_rows": steps_linear - floor_s, "step_beyond_linear": steps - steps_linear,
             "prefill": prefill, "draws": draws, "bookkeeping": total - steps - prefill - draws}
    return {
        "total_s": round(total, 3), "useful_tokens": useful, "sampler/floor": round(floor_s / total, 4),
        "parts_s": {k: round(v, 3) for k, v in parts.items()},
        "parts_share": {k: round(v / total, 4) for k, v in parts.items()},
        "steps": len(clock.step_widths), "full_width_steps": widths.get(cfg.batch_size, 0),
        "row_steps": sum(clock.step_widths),
        "linear_share_of_step": round(steps_linear / steps, 4) if steps else None,
        "ceiling_without_step_overhead": round(floor_s / (total - parts["step_beyond_linear"]), 4),
    }


def profile_ops(model, tok, problems, prompts, cfg, top: int = 14) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    from ipg_sae.sampling import sample

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample(model, tok, problems, prompts, cfg, reward="correctness", progress=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_share": round(e.self_cpu_time_total / total, 4),
             "us_per_call": round(e.self_cpu_time_total / max(e.count, 1), 1)} for e in rows]


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--profile", action="store_true", help="also an operator table from torch.profiler")
    args = common.finish_args(p.parse_args(argv))
    from ipg_sae.sampling import SamplingConfig, sample

    if args.smoke:
        args.prompts, args.rows = min(args.prompts, 4), min(args.rows, 8)
        model, tok, problems, prompts = synthetic_setup(args, prompt_tokens=16)
    else:
        args.real = True
        model, tok, problems, prompts, _ = real_setup(args)
    cfg = SamplingConfig(n_samples=args.group_size, temperature=0.5, max_new_tokens=8 if args.smoke else 96,
                         batch_size=args.rows, seed=0, backend="loop")
    print(f"sampling gap: {len(problems)} prompts x G={cfg.n_samples}, {cfg.batch_size} rows, "
          f"{torch.get_num_threads()} threads", flush=True)
    small = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, 4 * cfg.n_samples))
    sample(model, tok, problems[:4], prompts[:4], small, reward="correctness", progress=False)  # warm-up
    result = {"config": {"prompts": len(problems), "group_size": cfg.n_samples, "rows": cfg.batch_size,
                         "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature},
              **decompose(model, tok, problems, prompts, cfg, args.device)}
    if args.profile:
        result["profile_top_ops"] = profile_ops(model, tok, problems, prompts, cfg)
    print(json.dumps(result, indent=1), flush=True)
    section = "sampling_gap" if cfg.n_samples == 4 else f"sampling_gap_g{cfg.n_samples}"
    common.write_section(args, section, result)
    return result


if __name__ == "__main__":
    main()
