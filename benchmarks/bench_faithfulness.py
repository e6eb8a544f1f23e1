"""Off-policy scoring: one (set, gamma) cell as a prefix tree with replayed lower blocks, against flat scoring.

What is compared, for the same model, SAE, intervention and trajectories (``P`` problems x ``G``
samples, each prompt = a long shared prefix (system turn, worked example) + its own question):

* ``tree``: :class:`ipg_sae.faithfulness.TrajectoryScorer` scoring a steered cell: the shared
  prefix once, each question once, the ``G`` completions on their question's KV cache, only the
  blocks above the steered layer (the clean output there is replayed), logits only where scored.
* ``flat``: the direct way: every trajectory's whole sequence (prompt + completion) through the
  full model under the steering hooks, batched, log-softmax at the completion positions.

``flat / tree`` (time) is what the prefix tree and the replay buy (target: > 3 at the study's
shape); the two must agree (checked on every run). ``tokens`` reports the positions each runs
through the model: the tree's are counted per segment.

``scorer/floor`` = (floor time) / (tree time): the floor is the model's own matrix
multiplications for the work the tree cannot avoid: every ``nn.Linear`` of the blocks above the
steered layer on the tree's tokens, and the LM head on the scored positions, run on random
inputs in chunks of 512 rows (no attention, no Python around them), timed in the same run.
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
    # prompt tokens: shared prefix + question; completion tokens; problems; samples each
    "tiny": dict(prefix=24, question=6, completion=8, problems=4, group=4, repeats=2, batch=4),
    "smollm2-135m": dict(prefix=120, question=35, completion=35, problems=16, group=8, repeats=2, batch=8),
    "qwen2.5-math-1.5b": dict(prefix=200, question=60, completion=200, problems=32, group=8, repeats=3, batch=16),
}


def parse(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--problems", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    args = common.finish_args(p.parse_args(argv))
    preset = PRESETS[args.shape]
    for key in ("prefix", "question", "completion", "batch"):
        setattr(args, key, preset[key])
    args.problems = args.problems or preset["problems"]
    args.group_size = args.group_size or preset["group"]
    args.repeats = args.repeats or preset["repeats"]
    return args


def trajectories(args, vocab: int):
    from ipg_sae.trajectories import Trajectory

    rng = random.Random(0)
    prefix = [rng.randint(3, vocab - 1) for _ in range(args.prefix)]
    out = []
    for p in range(args.problems):
        prompt = prefix + [rng.randint(3, vocab - 1) for _ in range(args.question + rng.randint(-3, 3))]
        for g in range(args.group_size):
            completion = [rng.randint(3, vocab - 1) for _ in range(args.completion + rng.randint(-5, 5))]
            out.append(Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="",
                                  reference="", prompt_ids=prompt, completion_ids=completion, reward=float(g % 2)))
    return out


def flat_logprobs(model, saes, trajs, interventions, temperature: float, batch: int):
    """Every trajectory whole, right-padded, in batches, full model, under the steering hooks."""
    from ipg_sae.steering import steer

    out = []
    with torch.no_grad(), steer(model, saes, interventions):
        for s in range(0, len(trajs), batch):
            chunk = trajs[s:s + batch]
            seqs = [t.prompt_ids + t.completion_ids for t in chunk]
            width = max(map(len, seqs))
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, q in enumerate(seqs):
                ids[i, :len(q)] = torch.tensor(q)
                mask[i, :len(q)] = 1
            device = model.get_output_embeddings().weight.device
            ids, mask = ids.to(device), mask.to(device)
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            for i, t in enumerate(chunk):
                P, n = len(t.prompt_ids), len(seqs[i])
                logits = model.get_output_embeddings()(hidden[i, P - 1:n - 1]).double() / temperature
                lp = torch.log_softmax(logits, -1).gather(-1, ids[i, P:n, None]).sum()
                out.append(float(lp))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def scorer_floor(model, layer: int, tokens: int, scored: int, device, chunk: int = 512, repeats: int = 3) -> float:
    """Seconds for the linear layers of the blocks above ``layer`` on ``tokens`` rows and the head on ``scored``
    rows (the best of ``repeats``)."""
    from ipg_sae.models import decoder_layers

    head = model.get_output_embeddings()
    upper = [m for block in list(decoder_layers(model))[layer + 1:] for m in block.modules()
             if isinstance(m, torch.nn.Linear)]
    dtype = head.weight.dtype
    work = [(m, tokens) for m in upper] + [(head, scored)]
    inputs = {m.in_features: torch.randn(chunk, m.in_features, device=device, dtype=dtype) for m, _ in work}

    def run():
        for m, rows in work:
            for start in range(0, rows, chunk):
                m(inputs[m.in_features][:min(chunk, rows - start)])

    run()
    return min(common.timed(run, device) for _ in range(repeats))


def main(argv=None) -> dict:
    args = parse(argv)
    from ipg_sae.faithfulness import TrajectoryScorer
    from ipg_sae.saes import prepare_sae
    from ipg_sae.steering import scale

    shape, device = args.shape_obj, args.device
    print(f"faithfulness: {shape.name} on {device} ({args.dtype}, {torch.get_num_threads()} threads), "
          f"{args.problems} problems x G={args.group_size}", flush=True)
    model = common.build_model(shape, device, args.torch_dtype)
    sae = prepare_sae(common.random_topk_sae(shape, device, args.torch_dtype), model, shape.layer)
    saes = {shape.layer: sae}
    trajs = trajectories(args, shape.vocab)
    interventions = scale([(shape.layer, i) for i in range(0, shape.d_sae, shape.d_sae // 8)][:8], 2.0)
    temperature = 0.5
    scorer = TrajectoryScorer(model, trajs, temperature, saes=saes, problems_per_batch=args.batch)
    scorer.logprobs(interventions)  # the one-off clean pass whose output at the layer is replayed by every cell
    a = scorer.logprobs(interventions)
    b = flat_logprobs(model, saes, trajs, interventions, temperature, args.batch * args.group_size)
    rel = float((a - b).abs().max() / b.abs().max())
    print(f"tree vs flat: max |diff| / max |logp| = {rel:.2e}", flush=True)
    fns = {"tree": lambda: scorer.logprobs(interventions),
           "flat": lambda: flat_logprobs(model, saes, trajs, interventions, temperature, args.batch * args.group_size)}
    times = common.interleaved(fns, repeats=args.repeats, warmup=0, device=device)
    tree = scorer.tree
    scored = sum(len(c) for cs in tree.completions for c in cs)
    floor = scorer_floor(model, shape.layer, tree.n_tokens, scored, device)
    result = {
        "config": {"model": shape.name, "layer": shape.layer, "problems": args.problems, "group_size": args.group_size,
                   "prefix_tokens": args.prefix, "question_tokens": args.question,
                   "completion_tokens": args.completion, "problems_per_batch": args.batch,
                   "repeats": args.repeats},
        "tokens": {"tree": tree.n_tokens, "flat": tree.n_tokens_flat},
        "times": {k: common.summary(v) for k, v in times.items()},
        "agreement_rel": rel,
        "floor_s": round(floor, 4),
        "ratios": {"flat/tree": common.ratio(times["flat"], times["tree"]),
                   "tokens_flat/tree": round(tree.n_tokens_flat / tree.n_tokens, 3),
                   "scorer/floor": round(floor / min(times["tree"]), 4)},
    }
    print(json.dumps(result["tokens"]), json.dumps(result["ratios"]), flush=True)
    common.write_section(args, "faithfulness", result)
    return result


if __name__ == "__main__":
    main()
