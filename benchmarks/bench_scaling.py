"""How attribution time grows with trajectory length and with ``n_steps``, next to its floor.

Two sweeps of ``IPGEngine.attribute_group`` on one group of trajectories (same model and TopK
SAE as ``bench_attribution.py``), each point timed together with the floor of
``bench_attribution.Floor`` (one no-grad forward up to the SAE layer + the node passes'
forward+backward above it, same batch layout): the floor is what any exact ``n_steps``-node
method costs, so the gap between the two curves is IPG's overhead at that size.

* length: 256, 512, 1024, 2048 tokens per trajectory (512-4096 on GPU) at fixed ``n_steps``;
  cost should grow linearly (MLP and projections) plus a quadratic attention term;
* ``n_steps``: 1, 2, 4, 8 (to 16 on GPU) at a fixed length; the node passes grow linearly,
  the clean pass and the ``c = 0`` pass are paid once, so ``ipg / floor`` falls with ``n_steps``.

Writes the numbers into ``results/<machine>.json`` and a plot ``results/<machine>-scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

PRESETS = {
    "tiny": dict(group=1, lengths=[32, 64, 128], length_steps=2, steps=[1, 2, 4], steps_length=32, ibs=None,
                 repeats=1),
    "smollm2-135m": dict(group=1, lengths=[256, 512, 1024, 2048], length_steps=2, steps=[1, 2, 4, 8],
                         steps_length=256, ibs=None, repeats=1),
    "qwen2.5-math-1.5b": dict(group=4, lengths=[512, 1024, 2048, 4096], length_steps=8, steps=[1, 2, 4, 8, 16],
                              steps_length=1024, ibs=4, repeats=3),
}


def parse(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="n_steps values of the second sweep")
    p.add_argument("--no-plot", action="store_true")
    args = common.finish_args(p.parse_args(argv))
    preset = PRESETS[args.shape]
    args.lengths = args.lengths or preset["lengths"]
    args.steps = args.steps or preset["steps"]
    args.preset = preset
    args.repeats = args.repeats or preset["repeats"]
    return args


def measure(model, sae, shape, device, group: int, tokens: int, n_steps: int, ibs, repeats: int) -> dict:
    from bench_attribution import Floor
    from ipg_sae.attribution import AttributionConfig, IPGEngine, quadrature

    advantage = "none" if group == 1 else "rloo"
    trajs = common.make_trajectories(1, group, min(64, tokens // 4), tokens, shape.vocab)
    engine = IPGEngine(model, {shape.layer: sae}, AttributionConfig(n_steps=n_steps, advantage=advantage,
                                                                    internal_batch_size=ibs))
    nodes, weights = quadrature(n_steps)
    b = engine.batch(trajs)
    chunks = [len(c) for c in engine.node_chunks(len(nodes), len(trajs))]
    floor = Floor(model, shape.layer, b.ids, b.attn, b.targets, b.score_mask, chunks)
    times = common.interleaved({"ipg": lambda: engine.attribute_group(trajs, nodes, weights), "floor": floor},
                               repeats=repeats, warmup=0, device=device, log=None)
    out = {"tokens": tokens, "n_steps": n_steps, "group_size": group, "ipg_s": round(min(times["ipg"]), 4),
           "floor_s": round(min(times["floor"]), 4), "ipg/floor": common.ratio(times["ipg"], times["floor"])}
    print("  " + json.dumps(out), flush=True)
    return out


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, sweep, xlabel in ((axes[0], "tokens", result["length"], "tokens per trajectory"),
                                   (axes[1], "n_steps", result["n_steps"], "n_steps (quadrature nodes)")):
        x = [p[key] for p in sweep]
        ax.plot(x, [p["ipg_s"] for p in sweep], "o-", label="IPG (attribute_group)")
        ax.plot(x, [p["floor_s"] for p in sweep], "s--", label="floor (fwd below + n_steps fwd+bwd above)")
        for p in sweep:
            ax.annotate(f"{p['ipg/floor']:.2f}x", (p[key], p["ipg_s"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per group")
        ax.grid(True, which="both", alpha=0.3)
    c = result["config"]
    axes[0].set_title(f"length sweep (G={c['group_size']}, n_steps={c['length_sweep_n_steps']})", fontsize=10)
    axes[1].set_title(f"n_steps sweep (G={c['group_size']}, {c['steps_sweep_tokens']} tokens)", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    args = parse(argv)
    shape, device, preset = args.shape_obj, args.device, args.preset
    print(f"scaling: {shape.name} on {device} ({args.dtype}, {torch.get_num_threads()} threads)", flush=True)
    model = common.build_model(shape, device, args.torch_dtype)
    sae = common.random_topk_sae(shape, device, args.torch_dtype)
    group, ibs = preset["group"], preset["ibs"]
    # Warm-up on the smallest point.
    measure(model, sae, shape, device, group, min(args.lengths), 1, ibs, 1)
    print("length sweep:", flush=True)
    length = [measure(model, sae, shape, device, group, t, preset["length_steps"], ibs, args.repeats)
              for t in args.lengths]
    print("n_steps sweep:", flush=True)
    steps = [measure(model, sae, shape, device, group, preset["steps_length"], n, ibs, args.repeats)
             for n in args.steps]
    result = {
        "config": {"model": shape.name, "layer": shape.layer, "d_sae": shape.d_sae, "k": shape.sae_k,
                   "group_size": group, "internal_batch_size": ibs, "length_sweep_n_steps": preset["length_steps"],
                   "steps_sweep_tokens": preset["steps_length"], "repeats": args.repeats},
        "length": length,
        "n_steps": steps,
    }
    # Growth exponents between the first and last points (1 = linear).
    import math

    def slope(sweep, key, val):
        a, b = sweep[0], sweep[-1]
        return round(math.log(b[val] / a[val]) / math.log(b[key] / a[key]), 3) if b[key] != a[key] else None

    result["growth_exponent"] = {"ipg_vs_tokens": slope(length, "tokens", "ipg_s"),
                                 "floor_vs_tokens": slope(length, "tokens", "floor_s"),
                                 "ipg_vs_n_steps": slope(steps, "n_steps", "ipg_s"),
                                 "floor_vs_n_steps": slope(steps, "n_steps", "floor_s")}
    if not args.no_plot:
        png = Path(args.results_dir) / f"{args.machine}-scaling.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(result, png, f"IPG attribution scaling: {shape.name}, {args.device} {args.dtype}, "
                          f"{torch.get_num_threads()} threads ({args.machine})")
        result["plot"] = png.name
    common.write_section(args, "scaling", result)
    return result


if __name__ == "__main__":
    main()
