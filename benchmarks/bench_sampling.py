"""Sampling: our batched sampler against plain ``model.generate`` calls, and steering on vs off.

What is compared, for the same model, prompts, ``G`` samples per prompt and ``max_new_tokens``
(generated tokens per second; every contender counts the tokens it kept, cut after EOS):

* ``sampler``: ``ipg_sae.sampling.sample`` with all prompts in one batch (tokenizing, left
  padding, ``generate`` with the KV cache, decoding, rewards, trajectory records).
* ``generate_loop``: the plain way without the sampler: a loop over the prompts, one
  ``model.generate(num_return_sequences=G)`` call per prompt. ``sampler / generate_loop``
  (tokens/s) is what batching buys.
* ``generate_batched``: one bare ``model.generate`` call on the same batch the sampler builds:
  the floor of the sampler (no bookkeeping), so ``sampler / generate_batched`` (tokens/s, at
  most ~1) is the sampler's own overhead.
* ``sampler_steered``: the sampler with ``steering(model, saes, scale(selection, 0.0))``
  hooks (a TopK SAE at the middle layer, encoded in full at every step, and a selection of
  latents scaled to 0). ``steered / plain`` (tokens/s) is the price of the hooks (target: at
  least 0.9, i.e. overhead <= 10%).
* ``floor``: the model's own matrix multiplications at the decode shape of the sampler's batch:
  every ``nn.Linear`` of the decoder blocks and the LM head on a ``[B, d_in]`` input, no attention,
  no Python around them, timed in the same run. ``B / (one step's time)`` tokens/s is what no
  sampler of this batch size can beat on this machine; ``sampler/floor`` and ``steered/floor``
  (useful tokens/s, cut after EOS) say how close the sampler gets (the sampler issue's target:
  at least 0.5).

``--compile`` adds the ``loop`` backend with and without ``sampling.compile`` (the decoding steps'
norms and MLPs compiled by ``torch.compile``): ``sampler_loop`` and ``sampler_loop_compiled`` (with
``--real``: ``loop_b96_compiled``, plain and steered). Compilation is timed apart, before the
timed rounds: the first compiled run of a small workload (4 prompts) minus the same run again
(``compile_s``); the timed rounds then reuse the compiled code. ``*_amortised`` figures charge that
compile time to one run of the benchmark's workload (``tokens / (time + compile_s)``), as a job
that compiles once would pay it.

``--real`` runs the sampler on the offline default model (SmolLM2-135M-Instruct, real weights)
with the demo's settings instead of random weights: 96 level-1 arithmetic prompts with one
worked example (about 156 tokens; the demo's held-out sampling), G 4, temperature 0.5, 96 new
tokens; the ``hf`` backend at the demo's batch of 32 and the ``loop`` backend (one random stream
per sample, continuous batching, the shared prompt prefix read once) at 96 and 128 rows, plain
and steered. ``--group-size 16 --prompts 24`` is the studies' on-policy setting. Real answers
stop early (about 37 tokens), so ``sampler/floor`` also shows the decode steps a sampler spends
on rows that have finished.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

PRESETS = {
    "tiny": dict(prompts=4, group=4, prompt_tokens=12, new_tokens=16, selection=8, repeats=2),
    "smollm2-135m": dict(prompts=4, group=4, prompt_tokens=16, new_tokens=32, selection=16, repeats=3),
    "qwen2.5-math-1.5b": dict(prompts=16, group=8, prompt_tokens=128, new_tokens=256, selection=32, repeats=3),
}


def cut(row: list[int], stops: set[int]) -> list[int]:
    n = next((i + 1 for i, tok in enumerate(row) if tok in stops), len(row))
    return row[:n]


def parse(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--real", action="store_true", help="the offline default model and the demo's prompts")
    p.add_argument("--compile", action="store_true",
                   help="also the loop backend with sampling.compile (compile time reported apart and amortised)")
    args = common.finish_args(p.parse_args(argv))
    if args.real:  # the demo's settings unless overridden (the presets are for random-weight shapes)
        args.prompts, args.group_size = args.prompts or 96, args.group_size or 4
        args.repeats = args.repeats or 1
        return args
    preset = PRESETS[args.shape]
    args.prompts = args.prompts or preset["prompts"]
    args.group_size = args.group_size or preset["group"]
    args.new_tokens = args.new_tokens or preset["new_tokens"]
    args.prompt_tokens = preset["prompt_tokens"]
    args.selection = preset["selection"]
    args.repeats = args.repeats or preset["repeats"]
    return args


@torch.no_grad()
def linear_floor(model, batch: int, device, repeats: int = 5) -> float:
    """Tokens/s of the model's linear layers and head alone at one decode step of ``batch`` rows (the best of
    ``repeats`` timings of the whole step)."""
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head] + [head]
    dtype = head.weight.dtype
    inputs = [torch.randn(batch, m.in_features, device=device, dtype=dtype) for m in layers]

    def step():
        for m, x in zip(layers, inputs):
            m(x)

    step()  # warm-up
    best = min(common.timed(step, device) for _ in range(repeats))
    return batch / best


def compile_seconds(model, tok, problems, prompts, cfg, **kw) -> float:
    """The compilation time of ``cfg`` (with ``compile``): a first run of a small workload (4 prompts) minus the
    same run again, which reuses the compiled code. Also leaves the code compiled for the timed rounds."""
    import dataclasses

    from ipg_sae.sampling import sample

    small = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, 4 * cfg.n_samples))
    runs = []
    for _ in range(2):
        runs.append(common.timed(lambda: sample(model, tok, problems[:4], prompts[:4], small, reward="correctness",
                                                progress=False, **kw)))
    return max(0.0, runs[0] - runs[1])


def real_setup(args):
    """The default model, the demo's prompts and settings, and an SAE at layer 15 (the demo's when it exists)."""
    from ipg_sae.models import load_model
    from ipg_sae.saes import load_sae
    from ipg_sae.tasks import TaskConfig, build_prompts, load_problems

    model, tok = load_model("smollm2-135m-instruct")
    task = TaskConfig(name="arithmetic", level=1, n_problems=args.prompts, seed=0, few_shot=1)
    problems = load_problems(task)
    demo_sae = common.REPO / "runs" / "demo" / "sae" / "layer_15"
    if demo_sae.is_dir():
        sae = load_sae(str(demo_sae), model)
    else:
        sys.path.insert(0, str(common.REPO))
        from tests.tiny import random_sae

        sae = random_sae("topk", 576, 15, d_sae=2304, k=32, seed=0)
    return model, tok, problems, build_prompts(tok, problems, task), sae


def synthetic_setup(args, prompt_tokens: int):
    """A random-weight model of ``args``'s shape, its word-level tokenizer, and ``args.prompts`` random prompts of
    ``prompt_tokens`` words as problems (answer "0")."""
    from ipg_sae.tasks import Problem

    shape = args.shape_obj
    model = common.build_model(shape, args.device, args.torch_dtype)
    tok = common.build_tokenizer(shape.vocab)
    rng = random.Random(0)
    prompts = [common.random_prompt(prompt_tokens, shape.vocab, rng) for _ in range(args.prompts)]
    return model, tok, [Problem(id=f"p{i}", question=p, answer="0") for i, p in enumerate(prompts)], prompts


def main(argv=None) -> dict:
    args = parse(argv)
    if args.real:
        return main_real(args)
    from ipg_sae.sampling import SamplingConfig, eos_ids, sample
    from ipg_sae.steering import scale, steering

    shape, device = args.shape_obj, args.device
    print(f"sampling: {shape.name} on {device} ({args.dtype}, {torch.get_num_threads()} threads), "
          f"{args.prompts} prompts x G={args.group_size}, {args.new_tokens} new tokens", flush=True)
    model, tok, problems, prompts = synthetic_setup(args, args.prompt_tokens)
    sae = common.random_topk_sae(shape, device, args.torch_dtype)
    cfg = SamplingConfig(n_samples=args.group_size, temperature=0.7, max_new_tokens=args.new_tokens,
                         batch_size=args.prompts * args.group_size, seed=0)
    stops = eos_ids(model, tok)
    selection = [(shape.layer, i) for i in range(0, shape.d_sae, shape.d_sae // args.selection)][: args.selection]
    intervention = steering(model, {shape.layer: sae}, scale(selection, 0.0))
    gen_kwargs = dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
                      num_return_sequences=args.group_size, pad_token_id=tok.pad_token_id,
                      eos_token_id=sorted(stops), use_cache=True)
    counts: dict[str, int] = {}

    def run_sampler(name, cfg=cfg, **kw):
        def fn():
            trajs = sample(model, tok, problems, prompts, cfg, reward="correctness", progress=False, **kw)
            counts[name] = sum(len(t.completion_ids) for t in trajs)
        return fn

    def generate_loop():
        n = 0
        for p in prompts:
            enc = tok([p], return_tensors="pt", add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, **gen_kwargs)
            n += sum(len(cut(row, stops)) for row in out[:, enc["input_ids"].shape[1]:].tolist())
        counts["generate_loop"] = n

    def generate_batched():
        side = tok.padding_side
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        tok.padding_side = side
        with torch.no_grad():
            out = model.generate(**enc, **gen_kwargs)
        counts["generate_batched"] = sum(len(cut(row, stops)) for row in out[:, enc["input_ids"].shape[1]:].tolist())

    fns = {"sampler": run_sampler("sampler"), "sampler_steered": run_sampler("sampler_steered",
                                                                              intervention=intervention),
           "generate_loop": generate_loop, "generate_batched": generate_batched}
    configs = {}
    compile_s = None
    if args.compile:
        import dataclasses

        configs = {"sampler_loop": dataclasses.replace(cfg, backend="loop"),
                   "sampler_loop_compiled": dataclasses.replace(cfg, backend="loop", compile=True)}
        fns["sampler_loop"] = run_sampler("sampler_loop", cfg=configs["sampler_loop"])
        fns["sampler_loop_compiled"] = run_sampler("sampler_loop_compiled", cfg=configs["sampler_loop_compiled"])
        with common.section_timer("compiling the loop's decoding step"):
            compile_s = compile_seconds(model, tok, problems, prompts, configs["sampler_loop_compiled"])
    # Warm up every code path cheaply (a full warm-up round would double the run time).
    with torch.no_grad():
        enc = tok(prompts[:1], return_tensors="pt", add_special_tokens=False).to(device)
        model.generate(**enc, **{**gen_kwargs, "max_new_tokens": 2})
        with intervention():
            model.generate(**enc, **{**gen_kwargs, "max_new_tokens": 2})
    times = common.interleaved(fns, repeats=args.repeats, warmup=0, device=device)
    tps = {k: counts[k] / min(v) for k, v in times.items()}  # best of the repeats (see common.ratio)
    floor = linear_floor(model, cfg.batch_size, device)
    result = {
        "config": {"model": shape.name, "prompts": args.prompts, "group_size": args.group_size,
                   "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.new_tokens,
                   "sampler_batch_size": cfg.batch_size, "steered_layer": shape.layer, "d_sae": shape.d_sae,
                   "k": shape.sae_k, "steered_latents": len(selection), "repeats": args.repeats},
        "times": {k: common.summary(v) for k, v in times.items()},
        "generated_tokens": counts,
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "ratios": {
            "sampler/generate_loop": round(tps["sampler"] / tps["generate_loop"], 4),
            "sampler/generate_batched": round(tps["sampler"] / tps["generate_batched"], 4),
            "steered/plain": round(tps["sampler_steered"] / tps["sampler"], 4),
            "sampler/floor": round(tps["sampler"] / floor, 4),
            "steered/floor": round(tps["sampler_steered"] / floor, 4),
        },
        "floor_tokens_per_s": round(floor, 2),
    }
    result["ratios"]["steering_overhead"] = round(1 / result["ratios"]["steered/plain"] - 1, 4)
    if args.compile:
        amortised = counts["sampler_loop_compiled"] / (min(times["sampler_loop_compiled"]) + compile_s)
        result["compile_s"] = round(compile_s, 3)
        result["tokens_per_s"]["sampler_loop_compiled_amortised"] = round(amortised, 2)
        result["ratios"].update({
            "loop/floor": round(tps["sampler_loop"] / floor, 4),
            "loop_compiled/floor": round(tps["sampler_loop_compiled"] / floor, 4),
            "loop_compiled_amortised/floor": round(amortised / floor, 4),
            "loop_compiled/loop": round(tps["sampler_loop_compiled"] / tps["sampler_loop"], 4),
        })
    print(json.dumps(result["tokens_per_s"]), json.dumps(result["ratios"]), flush=True)
    common.write_section(args, "sampling_compiled" if args.compile else "sampling", result)
    return result


def main_real(args) -> dict:
    """The sampler on the default model at the demo's settings (96 prompts x G 4: the demo's held-out sampling;
    ``--group-size 16 --prompts 24``: the studies' on-policy cells), plain and steered, against the floor: the hf
    backend at the demo's batch of 32, and the loop backend (continuous batching) at 96 and 128 rows."""
    import dataclasses

    from ipg_sae.sampling import SamplingConfig, sample
    from ipg_sae.steering import scale, steering

    model, tok, problems, prompts, sae = real_setup(args)
    base = SamplingConfig(n_samples=args.group_size, temperature=0.5, max_new_tokens=96, batch_size=32, seed=0)
    variants = {"hf_b32": base, "loop_b96": dataclasses.replace(base, backend="loop", batch_size=96),
                "loop_b128": dataclasses.replace(base, backend="loop", batch_size=128)}
    if args.compile:
        variants["loop_b96_compiled"] = dataclasses.replace(base, backend="loop", batch_size=96, compile=True)
    selection = [(15, i) for i in range(16)]
    intervention = steering(model, {15: sae}, scale(selection, 0.0))
    counts: dict[str, int] = {}

    def run(name, cfg, **kw):
        def fn():
            trajs = sample(model, tok, problems, prompts, cfg, reward="correctness", progress=False, **kw)
            counts[name] = sum(len(t.completion_ids) for t in trajs)
        return fn

    print(f"sampling (real): smollm2-135m-instruct, {len(problems)} prompts x G={base.n_samples}, "
          f"{base.max_new_tokens} new tokens, {torch.get_num_threads()} threads", flush=True)
    fns = {}
    for name, cfg in variants.items():
        fns[name] = run(name, cfg)
        fns[name + "_steered"] = run(name + "_steered", cfg, intervention=intervention)
    compile_s = None
    if args.compile:
        with common.section_timer("compiling the loop's decoding step"):
            compile_s = compile_seconds(model, tok, problems, prompts, variants["loop_b96_compiled"])
    times = common.interleaved(fns, repeats=args.repeats, warmup=0, device=args.device)
    tps = {k: counts[k] / min(v) for k, v in times.items()}
    floors = {b: linear_floor(model, b, args.device) for b in sorted({c.batch_size for c in variants.values()})}
    ratios = {}
    for name, cfg in variants.items():
        for suffix in ("", "_steered"):
            ratios[f"{name}{suffix}/floor"] = round(tps[name + suffix] / floors[cfg.batch_size], 4)
        ratios[f"{name}: steered/plain"] = round(tps[name + "_steered"] / tps[name], 4)
    for name in variants:
        if name != "hf_b32":
            ratios[f"{name}/hf_b32"] = round(tps[name] / tps["hf_b32"], 4)
    if args.compile:  # compile time charged to one run of this workload (plain and steered alike)
        for suffix in ("", "_steered"):
            name = "loop_b96_compiled" + suffix
            amortised = counts[name] / (min(times[name]) + compile_s)
            tps[name + "_amortised"] = amortised
            ratios[f"{name}_amortised/floor"] = round(amortised / floors[96], 4)
        ratios["loop_b96_compiled/loop_b96"] = round(tps["loop_b96_compiled"] / tps["loop_b96"], 4)
    result = {
        "config": {"model": "smollm2-135m-instruct", "prompts": len(problems), "group_size": base.n_samples,
                   "max_new_tokens": base.max_new_tokens, "temperature": base.temperature,
                   "variants": {k: {"backend": c.backend, "batch_size": c.batch_size, "compile": c.compile}
                                for k, c in variants.items()},
                   "prompt_tokens_mean": round(sum(len(tok(p, add_special_tokens=False)["input_ids"])
                                                   for p in prompts) / len(prompts), 1),
                   "steered_latents": len(selection), "repeats": args.repeats},
        "times": {k: common.summary(v) for k, v in times.items()},
        "useful_tokens": counts,
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "floor_tokens_per_s": {str(b): round(f, 2) for b, f in floors.items()},
        "ratios": ratios,
    }
    if args.compile:
        result["compile_s"] = round(compile_s, 3)
    print(json.dumps(result["tokens_per_s"]), json.dumps(ratios), flush=True)
    section = "sampling_real" if base.n_samples == 4 else f"sampling_real_g{base.n_samples}"
    common.write_section(args, section + ("_compiled" if args.compile else ""), result)
    return result


if __name__ == "__main__":
    main()
