"""Where one warm ``attribute()`` call spends its time (cProfile), at the GPU benchmark's setting.

    SHAPE=qwen2.5-math-1.5b DEV=cuda python3 benchmarks/profile_attribute.py   # what the H200 run used
    SHAPE=tiny DEV=cpu .venv/bin/python benchmarks/profile_attribute.py

One group of G 4 x 1024 tokens, ``n_steps`` 8, bfloat16, a random TopK SAE at the middle layer (as
``bench_attribution.py``). Prints the wall time of one call, then the top functions by own and by
cumulative time.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from ipg_sae.attribution import attribute  # noqa: E402


def main() -> None:
    shape = common.SHAPES[os.environ.get("SHAPE", "qwen2.5-math-1.5b")]
    device = os.environ.get("DEV", "cuda")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model = common.build_model(shape, device, torch.bfloat16)
    sae = common.random_topk_sae(shape, device, torch.bfloat16)
    trajs = common.make_trajectories(1, 4, 64, 1024, shape.vocab)

    def run():
        attribute(model, {shape.layer: sae}, trajs, n_steps=8, internal_batch_size=16, progress=False)
        sync()

    run()  # warm-up
    start = time.perf_counter()
    run()
    print("attribute() end to end:", round(time.perf_counter() - start, 3), "s", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(35)
        print(out.getvalue(), flush=True)


if __name__ == "__main__":
    main()
