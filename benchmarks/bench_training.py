"""SAE training throughput: ``sae_training.train`` against sae-lens's own runner and the LM floor.

What is compared, for the same model (saved once as a local HF directory), layer, data (one
local ``train.jsonl`` of text), SAE architecture (TopK), width, ``k``, batch size, context
length, learning rate and LM batch size (training tokens per second, higher is better):

* ``ours``: ``sae_training.train(TrainSAEConfig(...))`` (our HF hooks stop the LM at the
  layer; sae-lens's ``SAETrainer`` steps the SAE).
* ``sae_lens``: ``sae_lens.LanguageModelSAETrainingRunner`` with
  ``model_class_name="AutoModelForCausalLM"`` (its ``HookedProxyLM`` also stops at the layer),
  the reference implementation the project builds on. Target: ``ours / sae_lens >= 1``.
* ``floor``: the LM forward alone up to the layer (``capture_residuals`` on the same rows, no
  SAE): training can't produce tokens faster than the LM produces activations, so
  ``ours / floor`` (<= 1) is the fraction of that bound we reach.

Both trainers have fixed costs that don't grow with the token budget (imports, model load,
tokenizing, sae-lens's norm estimate, our final evaluation and save). Each is therefore run
twice, with ``N1`` and ``N2`` training tokens, and its throughput is the marginal rate
``(N2 - N1) / (t2 - t1)`` (end-to-end rates at ``N2`` are recorded too). Runs are interleaved
(ours N1, sae-lens N1, ours N2, sae-lens N2) so drifts of a shared machine hit both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

# context: tokens per LM row; ours uses context + 1 so both train on `context` positions per row
# (we skip each row's first position, sae-lens trains on all). batch: training tokens per step.
# lm_batch: rows per LM forward (= sae-lens store_batch_size_prompts). buffer: LM batches per
# shuffle buffer (= our buffer_chunks with chunk_sequences = lm_batch). steps1/steps2: N1, N2 in steps.
PRESETS = {
    "tiny": dict(context=32, batch=256, lm_batch=8, buffer=4, steps1=2, steps2=6, floor_batches=4),
    "smollm2-135m": dict(context=64, batch=512, lm_batch=8, buffer=4, steps1=4, steps2=16, floor_batches=4),
    "qwen2.5-math-1.5b": dict(context=1024, batch=4096, lm_batch=8, buffer=8, steps1=8, steps2=40,
                              floor_batches=8),
}


def write_data(path: Path, n_tokens: int, vocab: int) -> Path:
    """Documents of random words (about ``n_tokens`` tokens in all) as ``train.jsonl``."""
    rng = random.Random(0)
    path.mkdir(parents=True, exist_ok=True)
    lines, total = [], 0
    while total < n_tokens:
        n = rng.randint(100, 300)
        lines.append(json.dumps({"text": common.random_prompt(n, vocab, rng)}))
        total += n + 1
    (path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return path / "train.jsonl"


def run_ours(args, model_dir: Path, data_file: Path, runs_dir: Path, tokens: int, name: str) -> dict:
    from ipg_sae.config import from_dict
    from sae_training import TrainSAEConfig, train

    p, shape = args.preset, args.shape_obj
    cfg = from_dict(TrainSAEConfig, {
        "name": name, "runs_dir": str(runs_dir),
        "model": {"name": str(model_dir), "dtype": args.dtype, "device": args.device},
        "layers": [shape.layer], "architecture": "topk", "expansion_factor": shape.sae_expansion, "k": shape.sae_k,
        "lr": 3e-4, "training_tokens": tokens, "context_size": p["context"] + 1, "batch_size_tokens": p["batch"],
        "lm_batch_size": p["lm_batch"], "chunk_sequences": p["lm_batch"], "buffer_chunks": p["buffer"],
        "checkpoint_every": 0, "n_eval_sequences": 2, "log_every": 1000, "dead_feature_window": 1000,
        "data": {"source": "text", "path": str(data_file)}, "wandb": {"enabled": False},
    })
    t = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t
    return {"tokens": tokens, "seconds": round(seconds, 3), "steps": summary.get("steps"),
            "internal_tokens_per_s": round(summary["throughput"]["tokens_per_second"], 1)}


def run_sae_lens(args, model_dir: Path, data_dir: Path, out_dir: Path, tokens: int) -> dict:
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    p, shape = args.preset, args.shape_obj
    sae_cfg = TopKTrainingSAEConfig(d_in=shape.hidden, d_sae=shape.d_sae, k=shape.sae_k, aux_loss_coefficient=1.0,
                                    normalize_activations="expected_average_only_in", dtype="float32",
                                    device=args.device)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=str(model_dir), model_class_name="AutoModelForCausalLM",
        model_from_pretrained_kwargs={"dtype": args.dtype},
        hook_name=f"model.layers.{shape.layer}", dataset_path=str(data_dir), streaming=False,
        is_dataset_tokenized=False, context_size=p["context"], training_tokens=tokens,
        train_batch_size_tokens=p["batch"], store_batch_size_prompts=p["lm_batch"],
        # sae-lens sizes its mixing buffer as n_batches_in_buffer * context_size tokens: the same
        # buffer * lm_batch rows as our shuffle blocks.
        n_batches_in_buffer=p["buffer"] * p["lm_batch"],
        n_batches_for_norm_estimate=2, device=args.device, dtype="float32", lr=3e-4, seed=0,
        dead_feature_window=1000, feature_sampling_window=1000, logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0, checkpoint_path=str(out_dir / "checkpoints"), save_final_checkpoint=False, output_path=None,
        verbose=False,
    )
    t = time.perf_counter()
    LanguageModelSAETrainingRunner(cfg).run()
    seconds = time.perf_counter() - t
    return {"tokens": tokens, "seconds": round(seconds, 3)}


def floor_rate(args, model, n_batches: int) -> dict:
    """Tokens/s of the LM forward up to the layer (no SAE), counting the positions trained on."""
    from ipg_sae.models import capture_residuals

    p = args.preset
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(3, args.shape_obj.vocab, (p["lm_batch"], p["context"] + 1), generator=gen).to(args.device)
    run = lambda: capture_residuals(model, rows, None, [args.shape_obj.layer])  # noqa: E731
    run()  # warm-up
    times = [common.timed(run, args.device) for _ in range(n_batches)]
    per_batch = p["lm_batch"] * p["context"]  # positions trained on (the first of each row is not)
    return {"batch_tokens": per_batch, "seconds_per_batch": common.summary(times),
            "tokens_per_s": round(per_batch / common.median(times), 1)}


def check_tokenizer(model_dir: Path) -> None:
    """The saved directory's tokenizer, loaded as the trainer loads it, must give the benchmark's tokens back."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("w5 w6 w7", add_special_tokens=False)["input_ids"]
    if ids != [5, 6, 7]:
        raise SystemExit(f"training: the benchmark's tokenizer reloads from {model_dir} as "
                         f"{type(tokenizer).__name__} and gives {ids} for 'w5 w6 w7' "
                         "(want [5, 6, 7]): the SAE would train on no tokens")


def parse(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--keep", action="store_true", help="keep the temporary model, data and run directories")
    args = common.finish_args(p.parse_args(argv))
    args.preset = PRESETS[args.shape]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    shape, p = args.shape_obj, args.preset
    if shape.family == "qwen2":
        # transformers 5 loads the tokenizer of any qwen2 directory as Qwen2Tokenizer, which cannot hold this
        # benchmark's word-level vocabulary (every text tokenizes to nothing). The cost measured does not depend
        # on the family (Qwen2 adds q/k/v biases, well under 0.1% of the FLOPs), so the model is Llama at its sizes.
        shape = dataclasses.replace(shape, family="llama")
        print("training: the qwen2 shape runs as Llama at the same sizes (see bench_training.main)", flush=True)
    print(f"training: {shape.name} on {args.device} ({args.dtype}, {torch.get_num_threads()} threads), layer "
          f"{shape.layer}, TopK d_sae={shape.d_sae} k={shape.sae_k}, batch {p['batch']} tokens", flush=True)
    n1, n2 = p["steps1"] * p["batch"], p["steps2"] * p["batch"]
    tmp = Path(tempfile.mkdtemp(prefix="ipg-bench-train-"))
    # Keep the datasets cache of the throw-away data file out of the user's cache.
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
    try:
        model = common.build_model(shape, args.device, args.torch_dtype)
        tok = common.build_tokenizer(shape.vocab)
        model_dir = common.save_model_dir(model, tok, tmp / "model")
        check_tokenizer(model_dir)
        data_file = write_data(tmp / "data", int(n2 * 3 + 20 * p["lm_batch"] * p["context"]), shape.vocab)
        with common.section_timer("floor (LM forward up to the layer)"):
            floor = floor_rate(args, model, p["floor_batches"])
        del model
        # Untimed warm-up runs of one step each: imports, the datasets cache of the data file and
        # first-call initializations would otherwise land in the N1 runs.
        with common.section_timer("warm-up runs"):
            run_ours(args, model_dir, data_file, tmp / "runs", p["batch"], "warmup")
            run_sae_lens(args, model_dir, data_file.parent, tmp / "saelens-warmup", p["batch"])
        runs = {"ours": [], "sae_lens": []}
        for i, n in enumerate((n1, n2)):
            with common.section_timer(f"ours, {n} tokens"):
                runs["ours"].append(run_ours(args, model_dir, data_file, tmp / "runs", n, f"bench{i}"))
            with common.section_timer(f"sae-lens, {n} tokens"):
                runs["sae_lens"].append(run_sae_lens(args, model_dir, data_file.parent, tmp / f"saelens{i}", n))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    def marginal(r):
        dt = r[1]["seconds"] - r[0]["seconds"]
        if dt <= 0.05 * r[1]["seconds"]:  # lost in the noise (tiny --smoke runs): use the end-to-end rate
            return round(r[1]["tokens"] / r[1]["seconds"], 1)
        return round((r[1]["tokens"] - r[0]["tokens"]) / dt, 1)

    rate = {"ours": marginal(runs["ours"]), "sae_lens": marginal(runs["sae_lens"]), "floor": floor["tokens_per_s"]}
    e2e = {k: round(v[1]["tokens"] / v[1]["seconds"], 1) for k, v in runs.items()}
    result = {
        "config": {"model": shape.name, "layer": shape.layer, "architecture": "topk", "d_sae": shape.d_sae,
                   "k": shape.sae_k, "context_tokens_trained_per_row": p["context"], "batch_size_tokens": p["batch"],
                   "lm_batch_size": p["lm_batch"], "buffer_lm_batches": p["buffer"], "n1_tokens": n1,
                   "n2_tokens": n2},
        "runs": runs,
        "floor": floor,
        "tokens_per_s": rate,
        "end_to_end_tokens_per_s_at_n2": e2e,
        "ratios": {"ours/sae_lens": round(rate["ours"] / rate["sae_lens"], 4),
                   "ours/floor": round(rate["ours"] / rate["floor"], 4),
                   "sae_lens/floor": round(rate["sae_lens"] / rate["floor"], 4),
                   "end_to_end ours/sae_lens": round(e2e["ours"] / e2e["sae_lens"], 4)},
    }
    print(json.dumps(result["tokens_per_s"]), json.dumps(result["ratios"]), flush=True)
    common.write_section(args, "training", result)
    return result


if __name__ == "__main__":
    main()
