"""Attribution (IPG) against its floor and against a naive implementation, plus peak memory.

What is compared, for the same model, SAE (TopK at the middle layer), trajectories (one group
of ``G`` samples of one prompt, all ``T`` tokens) and ``n_steps``:

* ``ipg``: ``IPGEngine.attribute_group`` (the work per prompt), and ``attribute_e2e``: the
  top-level ``attribute()`` on the same trajectories (adds engine set-up, the resume signature and
  result assembly). ``attribute_e2e/node_passes`` is one ``attribute()`` call's time over the time
  of its own node passes (timed inside that call): what the whole call adds to the work that any
  IPG must do per node (target <= 1.3; it was 12.5 on an H200 when every call hashed the model's
  weights for the signature, which ``model_digest_s`` times: one such hash, now done once per
  loaded model).
* ``floor``: plain PyTorch doing the least work any exact ``n_steps``-node method must do:
  one no-grad forward through the blocks up to the spliced layer, then, for each chunk of
  nodes (the same chunks and batch layout as IPG: nodes stacked on the batch dimension), one
  forward+backward through the blocks above it from the cached residual (``requires_grad`` on
  the residual), with a dummy objective = the sum of the log-probs of the scored targets. No
  SAE, no splice, no clean pass above the layer, no ``log pi`` at ``c = 0``. Any IPG
  implementation needs at least this, so ``ipg / floor`` is its overhead (target <= 1.2).
* ``naive``: the textbook implementation: for every node, one at a time, a full-model forward
  and backward with the splice ``x + ((c - 1) * f) @ W_dec`` on a dense gate tensor
  ``c [G, T, d_sae]`` requiring grad (dense ``f``), full ``[G, T, vocab]`` logits, and two
  more full forwards for ``log pi`` at ``c = 1`` and ``c = 0``. ``naive / ipg`` is the speed-up
  of IPG's design; the two must agree numerically (``naive_vs_ipg_max_rel_diff``).

``ipg_breakdown`` splits IPG's time into its clean pass (full forward + SAE encode +
activation statistics), the ``c = 0`` pass, and the node passes, to show where any overhead
over the floor goes.

Memory: peak memory of ``attribute_group`` on one trajectory of ``--memory-tokens`` (1024 on
CPU) tokens, with and without ``gradient_checkpointing``, each in a fresh subprocess
(``ru_maxrss`` on CPU, where tracemalloc does not see torch's allocations;
``torch.cuda.max_memory_allocated`` on CUDA).
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

# Per shape: group size, prompt tokens, total tokens, n_steps, internal_batch_size, repeats,
# and the memory test's tokens and n_steps.
PRESETS = {
    "tiny": dict(group=2, prompt=8, tokens=48, n_steps=4, ibs=None, repeats=2, memory_tokens=128, memory_steps=2),
    "smollm2-135m": dict(group=2, prompt=16, tokens=64, n_steps=8, ibs=None, repeats=3, memory_tokens=1024,
                         memory_steps=2),
    "qwen2.5-math-1.5b": dict(group=4, prompt=64, tokens=1024, n_steps=8, ibs=16, repeats=5, memory_tokens=4096,
                              memory_steps=4),
}


# ---- the floor: plain PyTorch, blocks called directly ----------------------------------------


class Floor:
    """One no-grad forward up to ``layer``, then per node chunk one forward+backward above it."""

    def __init__(self, model, layer: int, ids, attn, targets, score_mask, chunks: list[int]):
        from ipg_sae.models import decoder_layers

        self.model, self.layer = model, layer
        self.base = model.base_model
        self.blocks = decoder_layers(model)
        self.head = model.get_output_embeddings()
        self.ids, self.attn, self.targets, self.score_mask = ids, attn, targets, score_mask
        self.chunks = chunks  # nodes per pass

    def _run(self, x, blocks, attn):
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(x.shape[1], device=x.device)[None, :]
        mask = create_causal_mask(config=self.base.config, inputs_embeds=x, attention_mask=attn,
                                  past_key_values=None, position_ids=pos)
        pe = self.base.rotary_emb(x, position_ids=pos)
        for block in blocks:
            x = block(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
            x = x[0] if isinstance(x, tuple) else x
        return x

    @torch.no_grad()
    def lower(self) -> torch.Tensor:
        x = self.base.embed_tokens(self.ids)
        return self._run(x, self.blocks[: self.layer + 1], self.attn)

    def upper(self, x_l: torch.Tensor) -> None:
        for n in self.chunks:
            rep = lambda t: t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
            x = rep(x_l).requires_grad_(True)
            h = self._run(x, self.blocks[self.layer + 1:], rep(self.attn))
            h = self.base.norm(h)
            mask = rep(self.score_mask)
            logits = self.head(h[mask]).float()
            objective = torch.log_softmax(logits, -1).gather(-1, rep(self.targets)[mask][:, None]).sum()
            objective.backward()

    def __call__(self) -> None:
        self.upper(self.lower())


# ---- the naive implementation ----------------------------------------------------------------


class Naive:
    """Full model per node, one node at a time, dense ``[G, T, d_sae]`` gates and full logits."""

    def __init__(self, model, sae, layer: int, ids, attn, targets, score_mask, scope, nodes, weights, adv):
        from ipg_sae.models import block_hidden, decoder_layers, replace_block_hidden
        from ipg_sae.saes import decoder_matrix

        self.model, self.sae, self.block = model, sae, decoder_layers(model)[layer]
        self.w_dec = decoder_matrix(sae).detach()
        self.ids, self.attn, self.targets, self.score_mask = ids, attn, targets, score_mask
        self.scope = scope.to(self.w_dec.dtype)[..., None]
        self.nodes, self.weights, self.adv = list(nodes), list(weights), adv
        self._bh, self._rbh = block_hidden, replace_block_hidden
        self.gate = None

    def _hook(self, _m, _i, out):
        x = self._bh(out)
        f = (self.sae.encode(x) * self.scope).detach()  # dense [G, T, d_sae]
        return self._rbh(out, x + ((self.gate - 1.0) * f) @ self.w_dec)

    def _logp(self) -> torch.Tensor:
        logits = self.model(input_ids=self.ids, attention_mask=self.attn, use_cache=False).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, self.targets[..., None]).squeeze(-1)
        return (lp * self.score_mask).sum(-1)

    def __call__(self):
        G, T = self.ids.shape
        d_sae = self.w_dec.shape[0]
        handle = self.block.register_forward_hook(self._hook)
        try:
            with torch.no_grad():
                self.gate = torch.ones(G, T, d_sae, dtype=self.w_dec.dtype, device=self.w_dec.device)
                logp1 = self._logp()
                self.gate = torch.zeros_like(self.gate)
                logp0 = self._logp()
            attr = torch.zeros(G, d_sae, dtype=torch.float64, device=self.w_dec.device)
            for alpha, w in zip(self.nodes, self.weights):
                self.gate = torch.full((G, T, d_sae), float(alpha), dtype=self.w_dec.dtype,
                                       device=self.w_dec.device, requires_grad=True)
                objective = (self.adv.to(torch.float32) * self._logp()).sum()
                objective.backward()
                attr += float(w) * self.gate.grad.double().sum(1)
                self.gate = None
        finally:
            handle.remove()
        return attr, logp1, logp0


# ---- IPG with a time breakdown -----------------------------------------------------------------


def instrument(engine, device) -> dict[str, float]:
    """Wrap the engine's passes with timers (sums since the caller last zeroed them)."""
    acc = {"clean_s": 0.0, "logp0_s": 0.0, "node_passes_s": 0.0}
    for attr, key in (("clean_pass", "clean_s"), ("logp_at", "logp0_s"), ("node_pass", "node_passes_s")):
        original = getattr(engine, attr)

        def wrapped(*a, _original=original, _key=key, **k):
            common.sync(device)
            t = time.perf_counter()
            out = _original(*a, **k)
            common.sync(device)
            acc[_key] += time.perf_counter() - t
            return out

        setattr(engine, attr, wrapped)
    return acc


# ---- memory child -------------------------------------------------------------------------------


def memory_child(args) -> None:
    from ipg_sae.attribution import AttributionConfig, IPGEngine, quadrature

    shape = args.shape_obj
    model = common.build_model(shape, args.device, args.torch_dtype)
    sae = common.random_topk_sae(shape, args.device, args.torch_dtype)
    trajs = common.make_trajectories(1, 1, min(64, args.memory_tokens // 4), args.memory_tokens, shape.vocab)
    engine = IPGEngine(model, {shape.layer: sae}, AttributionConfig(
        n_steps=args.memory_steps, advantage="none", gradient_checkpointing=bool(args.gc)))
    nodes, weights = quadrature(args.memory_steps)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    # Building the model peaks far above its steady size: reset the peak so only attribution counts.
    reset = common.reset_peak_rss()
    rss_before, maxrss_before = common.rss_mib(), common.max_rss_mib()
    seconds = common.timed(lambda: engine.attribute_group(trajs, nodes, weights), args.device)
    out = {"gradient_checkpointing": bool(args.gc), "tokens": args.memory_tokens, "n_steps": args.memory_steps,
           "seconds": round(seconds, 3), "rss_before_mib": round(rss_before, 1),
           "max_rss_before_mib": round(maxrss_before, 1), "max_rss_mib": round(common.max_rss_mib(), 1),
           "peak_over_baseline_mib": round(common.max_rss_mib() - rss_before, 1), "peak_reset": reset}
    if cuda:
        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_peak_over_baseline_mib"] = round((torch.cuda.max_memory_allocated() - base_alloc) / 2**20, 1)
    print(json.dumps(out), flush=True)


# ---- main --------------------------------------------------------------------------------------


def parse(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per trajectory (prompt + generated)")
    p.add_argument("--n-steps", type=int, default=None)
    p.add_argument("--internal-batch-size", type=int, default=None)
    p.add_argument("--memory-tokens", type=int, default=None)
    p.add_argument("--memory-steps", type=int, default=None)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    args = common.finish_args(p.parse_args(argv))
    preset = PRESETS[args.shape]
    args.group_size = args.group_size or preset["group"]
    args.tokens = args.tokens or preset["tokens"]
    args.prompt = min(preset["prompt"], args.tokens // 2)
    args.n_steps = args.n_steps or preset["n_steps"]
    args.internal_batch_size = args.internal_batch_size or preset["ibs"]
    args.repeats = args.repeats or preset["repeats"]
    args.memory_tokens = args.memory_tokens or preset["memory_tokens"]
    args.memory_steps = args.memory_steps or preset["memory_steps"]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    from ipg_sae.attribution import AttributionConfig, IPGEngine, advantages, attribute, quadrature

    shape, device = args.shape_obj, args.device
    print(f"attribution: {shape.name} on {device} ({args.dtype}, {torch.get_num_threads()} threads), "
          f"G={args.group_size} T={args.tokens} n_steps={args.n_steps}", flush=True)
    model = common.build_model(shape, device, args.torch_dtype)
    sae = common.random_topk_sae(shape, device, args.torch_dtype)
    layer = shape.layer
    trajs = common.make_trajectories(1, args.group_size, args.prompt, args.tokens, shape.vocab)
    cfg = AttributionConfig(n_steps=args.n_steps, internal_batch_size=args.internal_batch_size)
    engine = IPGEngine(model, {layer: sae}, cfg)
    nodes, weights = quadrature(args.n_steps)
    breakdown = instrument(engine, device)

    # The batch exactly as IPG builds it.
    b = engine.batch(trajs)
    chunks = [len(c) for c in engine.node_chunks(len(nodes), len(trajs))]
    adv = advantages(torch.tensor([t.reward for t in trajs]), cfg.advantage).to(device)
    floor = Floor(model, layer, b.ids, b.attn, b.targets, b.score_mask, chunks)
    naive = Naive(model, engine.saes[layer], layer, b.ids, b.attn, b.targets, b.score_mask, b.scope, nodes, weights, adv)

    # Correctness first: the naive and the engine compute the same attributions.
    ga = engine.attribute_group(trajs, nodes, weights)
    attr_naive, logp1_n, logp0_n = naive()
    ipg_attr = ga.per_traj[layer].to(attr_naive.device)
    rel = float((ipg_attr - attr_naive).abs().max() / attr_naive.abs().max().clamp(min=1e-30))
    print(f"naive vs ipg: max |diff| / max |attr| = {rel:.2e}", flush=True)

    splits: list[dict[str, float]] = []  # the breakdown of every timed engine call

    def run_ipg():
        for k in breakdown:
            breakdown[k] = 0.0
        engine.attribute_group(trajs, nodes, weights)
        splits.append(dict(breakdown))

    e2e_node_passes: list[float] = []  # the node passes' time inside every attribute() call
    tokenizer = common.build_tokenizer(shape.vocab)

    def run_e2e():
        spent = [0.0]
        node_pass = IPGEngine.node_pass

        def timed_node_pass(self, *a, **k):
            common.sync(device)
            t = time.perf_counter()
            out = node_pass(self, *a, **k)
            common.sync(device)
            spent[0] += time.perf_counter() - t
            return out

        IPGEngine.node_pass = timed_node_pass  # the engine attribute() builds is timed from inside
        try:
            attribute(model, {layer: sae}, trajs, n_steps=args.n_steps, internal_batch_size=args.internal_batch_size,
                      progress=False, tokenizer=tokenizer)  # as the jobs call it: the model is fingerprinted too
        finally:
            IPGEngine.node_pass = node_pass
        e2e_node_passes.append(spent[0])

    fns = {
        "ipg": run_ipg,
        "attribute_e2e": run_e2e,
        "floor": floor,
        "naive": naive,
    }
    times = common.interleaved(fns, repeats=args.repeats, warmup=1, device=device)
    # The split of the fastest timed call (after the warm-up one).
    best = min(range(args.repeats), key=lambda i: times["ipg"][i])
    per_call = dict(splits[1 + best])
    total_ipg = times["ipg"][best]
    per_call["total_s"] = total_ipg
    per_call["other_s"] = total_ipg - sum(v for k, v in per_call.items() if k != "total_s")
    floor_lower = min(common.timed(floor.lower, device) for _ in range(3))
    per_call = {k: round(v, 4) for k, v in per_call.items()}
    per_call["floor_lower_s"] = round(floor_lower, 4)
    # attribute() over its own node passes, call by call (the warm-up call, which computed the model's digest
    # once, is left out like every warm-up).
    e2e_over_passes = [t / max(1e-12, n) for t, n in zip(times["attribute_e2e"], e2e_node_passes[1:])]
    e2e_best = min(range(args.repeats), key=lambda i: times["attribute_e2e"][i])
    from ipg_sae.digest import tensors_digest

    model_digest_s = min(common.timed(lambda: tensors_digest(dict(model.state_dict())), device) for _ in range(2))

    result = {
        "config": {"model": shape.name, "layer": layer, "d_sae": shape.d_sae, "k": shape.sae_k,
                   "group_size": args.group_size, "tokens_per_trajectory": args.tokens, "prompt_tokens": args.prompt,
                   "n_steps": args.n_steps, "internal_batch_size": args.internal_batch_size,
                   "node_chunks": chunks, "repeats": args.repeats},
        "times": {k: common.summary(v) for k, v in times.items()},
        "ratios": {
            "ipg/floor": common.ratio(times["ipg"], times["floor"]),
            "attribute_e2e/floor": common.ratio(times["attribute_e2e"], times["floor"]),
            "naive/ipg": common.ratio(times["naive"], times["ipg"]),
            # the fastest call's own ratio (its node passes timed inside it)
            "attribute_e2e/node_passes": round(e2e_over_passes[e2e_best], 4),
        },
        "ratios_of_medians": {
            "ipg/floor": common.ratio_median(times["ipg"], times["floor"]),
            "attribute_e2e/floor": common.ratio_median(times["attribute_e2e"], times["floor"]),
            "naive/ipg": common.ratio_median(times["naive"], times["ipg"]),
            "attribute_e2e/node_passes": round(sorted(e2e_over_passes)[len(e2e_over_passes) // 2], 4),
        },
        "ipg_breakdown_s": per_call,
        "attribute_e2e_node_passes_s": [round(v, 4) for v in e2e_node_passes[1:]],
        "model_digest_s": round(model_digest_s, 4),  # one full hash of the weights (once per loaded model now)
        "naive_vs_ipg_max_rel_diff": rel,
        "tokens_per_s": {"ipg": round(args.group_size * args.tokens / min(times["ipg"]), 1),
                         "naive": round(args.group_size * args.tokens / min(times["naive"]), 1)},
    }
    print(json.dumps(result["ratios"]), json.dumps(result["ipg_breakdown_s"]), flush=True)

    if not args.skip_memory:
        del engine, floor, naive, fns
        memory = {}
        for gc_on in (0, 1):
            extra = ["--memory-child", "--gc", str(gc_on), "--memory-tokens", str(args.memory_tokens),
                     "--memory-steps", str(args.memory_steps)]
            with common.section_timer(f"memory child (gradient_checkpointing={bool(gc_on)})"):
                memory["checkpointing" if gc_on else "no_checkpointing"] = common.run_child(
                    Path(__file__), common.child_args(args) + extra)
        key = "cuda_peak_over_baseline_mib" if device.startswith("cuda") else "peak_over_baseline_mib"
        memory["metric"] = key
        memory["checkpointing/no_checkpointing"] = round(
            memory["checkpointing"][key] / max(1e-9, memory["no_checkpointing"][key]), 4)
        result["memory"] = memory
        print(json.dumps(memory), flush=True)

    common.write_section(args, "attribution", result)
    return result


if __name__ == "__main__":
    main()
