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
    args = common.finish_args(p.parse_args(argv))
    preset = PRESETS[args.shape]
    args.prompts = args.prompts or preset["prompts"]
    args.group_size = args.group_size or preset["group"]
    args.new_tokens = args.new_tokens or preset["new_tokens"]
    args.prompt_tokens = preset["prompt_tokens"]
    args.selection = preset["selection"]
    args.repeats = args.repeats or preset["repeats"]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    from ipg_sae.sampling import SamplingConfig, eos_ids, sample
    from ipg_sae.steering import scale, steering
    from ipg_sae.tasks import Problem

    shape, device = args.shape_obj, args.device
    print(f"sampling: {shape.name} on {device} ({args.dtype}, {torch.get_num_threads()} threads), "
          f"{args.prompts} prompts x G={args.group_size}, {args.new_tokens} new tokens", flush=True)
    model = common.build_model(shape, device, args.torch_dtype)
    tok = common.build_tokenizer(shape.vocab)
    sae = common.random_topk_sae(shape, device, args.torch_dtype)
    rng = random.Random(0)
    prompts = [common.random_prompt(args.prompt_tokens, shape.vocab, rng) for _ in range(args.prompts)]
    problems = [Problem(id=f"p{i}", question=p, answer="0") for i, p in enumerate(prompts)]
    cfg = SamplingConfig(n_samples=args.group_size, temperature=0.7, max_new_tokens=args.new_tokens,
                         batch_size=args.prompts * args.group_size, seed=0)
    stops = eos_ids(model, tok)
    selection = [(shape.layer, i) for i in range(0, shape.d_sae, shape.d_sae // args.selection)][: args.selection]
    intervention = steering(model, {shape.layer: sae}, scale(selection, 0.0))
    gen_kwargs = dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
                      num_return_sequences=args.group_size, pad_token_id=tok.pad_token_id,
                      eos_token_id=sorted(stops), use_cache=True)
    counts: dict[str, int] = {}

    def run_sampler(name, **kw):
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
    # Warm up every code path cheaply (a full warm-up round would double the run time).
    with torch.no_grad():
        enc = tok(prompts[:1], return_tensors="pt", add_special_tokens=False).to(device)
        model.generate(**enc, **{**gen_kwargs, "max_new_tokens": 2})
        with intervention():
            model.generate(**enc, **{**gen_kwargs, "max_new_tokens": 2})
    times = common.interleaved(fns, repeats=args.repeats, warmup=0, device=device)
    tps = {k: counts[k] / min(v) for k, v in times.items()}  # best of the repeats (see common.ratio)
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
        },
    }
    result["ratios"]["steering_overhead"] = round(1 / result["ratios"]["steered/plain"] - 1, 4)
    print(json.dumps(result["tokens_per_s"]), json.dumps(result["ratios"]), flush=True)
    common.write_section(args, "sampling", result)
    return result


if __name__ == "__main__":
    main()
