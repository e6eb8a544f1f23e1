"""Are the latents IPG picks more interpretable than chance? And what do explanations cost? (issue 38, points 5-6)

On an attribution run (the study's: ``runs/<name>`` of the default model), with ``ipg-sae explain``'s library:

* **measured answer** — detection (balanced accuracy, AUROC) and output score (its percentile among
  frequency-matched latents) of IPG's top 16 and top 64, of each baseline's top k, and of ``--n-random`` random
  sets frequency-matched latent by latent to IPG's top 64 (:func:`ipg_sae.nulls.frequency_matched_sets` on the
  activation frequencies of the explanation corpus). Each group's mean has a 95% bootstrap interval over its
  latents; IPG minus random is paired latent by latent (a random latent is drawn for each of IPG's), with the
  random draws resampled too (:func:`ipg_sae.stats.bootstrap`).
* **Arad et al.'s filter** — IPG's top k kept where ``output_percentile >= --filter-percentile``; the set is
  written as a selection file with an ``ipg-sae evaluate`` config comparing it with IPG's unfiltered top k on dev
  (run that command on the machine that ran the study; its effect goes in the README whatever it says).
* **cost** — seconds to encode the corpus, to score the null pool, and per latent, measured on ``--cost-latents``
  latents and extrapolated to 4,096; with ``--time-explorer`` the explorer's own build time on the same run.

Writes ``<run>/explanations/measured.json`` and ``measured.md``; resumable (``ipg-sae explain``'s files are
reused). ``--smoke`` builds a tiny run first and runs everything on it (seconds; the numbers mean nothing).

The default model, later, on an idle machine (about as long as the explorer per 4,096 latents; see the cost):

    python benchmarks/explain_measure.py --run-dir runs/study/correctness --top 64 --baseline-top 64 --n-random 8 \\
        --cost-latents 64 --time-explorer
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SCORES = ("detection_bacc", "detection_auroc", "output_percentile")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", help="the attribution run (with baselines for the baselines' top k)")
    p.add_argument("--top", type=int, default=64)
    p.add_argument("--baseline-top", type=int, default=64)
    p.add_argument("--n-random", type=int, default=8, help="frequency-matched random sets of IPG's top k size")
    p.add_argument("--filter-k", type=int, default=16, help="IPG's top k that Arad et al.'s filter is applied to")
    p.add_argument("--filter-percentile", type=float, default=0.9)
    p.add_argument("--cost-latents", type=int, default=64)
    p.add_argument("--time-explorer", action="store_true")
    p.add_argument("--max-sequences", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="build a tiny run and measure on it")
    args = p.parse_args(argv)
    if not args.smoke and not args.run_dir:
        p.error("give --run-dir (or --smoke)")
    return args


def tiny_run(root: Path) -> Path:
    """A tiny attribution run with the `act` baseline (the --smoke input)."""
    from ipg_sae.config import load_config
    from ipg_sae.jobs import AttributeJobConfig, SampleJobConfig, run_attribute, run_sample
    from tests import tiny

    tok = tiny.build_tokenizer(root / "model")
    tiny.build_model("llama", root / "model", vocab_size=len(tok))
    tiny.random_sae("standard", 64, layer=2, d_sae=512, seed=3).save_model(str(root / "sae"))
    common = {"name": "smoke", "runs_dir": str(root / "runs"), "model.name": str(root / "model"),
              "wandb.enabled": False}
    run_sample(load_config(SampleJobConfig, None, {**common, "task.n_problems": 6, "task.few_shot": 0,
                                                   "sampling.n_samples": 3, "sampling.max_new_tokens": 12,
                                                   "reward": "tests.helpers:text_length_mod_7"}), progress=False)
    run_attribute(load_config(AttributeJobConfig, None, {
        **common, "sae.load": [{"path": str(root / "sae")}], "attribution.n_steps": 2, "baselines": ["act"],
        "selection.k": 4, "selection.n_bootstrap": 0}), progress=False)
    return root / "runs" / "smoke"


def job(run_dir: Path, args, latents=(), smoke: bool = False):
    from ipg_sae.explain_run import ExplainJobConfig
    from ipg_sae.explanations import ExplainConfig
    from ipg_sae.tracking import WandbConfig

    explain = ExplainConfig(null_per_bin=2, n_contexts=2) if smoke else ExplainConfig()
    return ExplainJobConfig(run_dir=str(run_dir), explain=explain, top=args.top, baseline_top=args.baseline_top,
                            latents=[f"{a}:{b}" for a, b in latents], max_sequences=args.max_sequences,
                            wandb=WandbConfig(enabled=False))


def frequency_matched(run_dir: Path, cfg, model, saes, template, n: int):
    """``n`` random sets matched latent by latent to ``template`` on build-corpus activation frequency, and the
    seconds the corpus took to encode."""
    from ipg_sae.explain_run import run_corpus, trajectories_path
    from ipg_sae.explanations import encode_corpus
    from ipg_sae.nulls import LatentPool, frequency_matched_sets
    from ipg_sae.trajectories import load_trajectories

    corpus = run_corpus(load_trajectories(trajectories_path(run_dir)), cfg.max_sequences,
                        cfg.explain.held_out, cfg.explain.seed)
    freqs, start = {}, time.monotonic()
    for layer in sorted({layer for layer, _ in template}):
        acts = encode_corpus(model, saes[layer], layer, corpus, cfg.explain.batch)
        freqs[layer] = acts.build_frequencies(int(saes[layer].cfg.d_sae))
    seconds = time.monotonic() - start
    pool = LatentPool({layer: int(saes[layer].cfg.d_sae) for layer in freqs}, frequencies=freqs)
    return frequency_matched_sets(template, n, seed=cfg.explain.seed, pool=pool), seconds, corpus


def group_scores(found, pairs) -> dict:
    from ipg_sae.explanations import flat_columns
    from ipg_sae.stats import bootstrap

    out = {"n": len(pairs)}
    for key in SCORES:
        values = np.array([_num(flat_columns(found[p])[key]) for p in pairs if p in found], dtype=float)
        values = values[np.isfinite(values)]
        out[key] = list(bootstrap(values)) if len(values) >= 2 else None
    return out


def paired_vs_random(found, template, draws) -> dict:
    """IPG minus random, paired by template position, random draws resampled too: ``[mean, lo, hi]``."""
    from ipg_sae.explanations import flat_columns
    from ipg_sae.stats import bootstrap

    out = {}
    for key in SCORES:
        x = np.array([_num(flat_columns(found[p])[key]) for p in template], dtype=float)
        y = np.array([[_num(flat_columns(found[p])[key]) for p in draw] for draw in draws], dtype=float)
        keep = np.isfinite(x) & np.isfinite(y).all(0)
        out[key] = list(bootstrap(x[keep], y[:, keep])) if keep.sum() >= 2 else None
    return out


def _num(v) -> float:
    return float(v) if v not in (None, "") else float("nan")


def cost(run_dir: Path, args, model, tokenizer, saes, corpus, encode_s: float) -> dict:
    """Seconds per latent (fresh latents in a scratch folder, so nothing cached counts), the null pool's
    seconds, and the extrapolation to 4,096 latents."""
    from ipg_sae.explanations import ExplainConfig, encode_corpus, explain_latents, token_pieces

    layer = sorted(saes)[0]
    sae = saes[layer]
    cfg = ExplainConfig(null_per_bin=2, n_contexts=2) if args.smoke else ExplainConfig()
    acts = encode_corpus(model, sae, layer, corpus, cfg.batch)
    latents = sorted(acts.fires)[:args.cost_latents]
    pieces = token_pieces(tokenizer)
    nulls: dict = {}
    start = time.monotonic()
    explain_latents(model, sae, layer, [], corpus, pieces, cfg, acts=acts, null_scores=nulls)
    null_s = time.monotonic() - start
    start = time.monotonic()
    timed = explain_latents(model, sae, layer, latents, corpus, pieces, cfg, acts=acts, null_scores=nulls)
    per_latent = (time.monotonic() - start) / max(1, len(latents))
    out = {"encode_s": round(encode_s, 2), "null_pool_s": round(null_s, 2), "per_latent_s": round(per_latent, 4),
           "n_latents_timed": len(latents), "estimate_4096_s": round(encode_s + null_s + 4096 * per_latent, 1),
           **full_head_reference(model, sae, layer, timed[:16], corpus, pieces, cfg, acts, nulls, per_latent)}
    if args.time_explorer:
        from ipg_sae.explorer import build

        start = time.monotonic()
        build(run_dir, model=model, tokenizer=tokenizer, saes=saes)
        out["explorer_s"] = round(time.monotonic() - start, 1)
    return out


def full_head_reference(model, sae, layer, timed, corpus, pieces, cfg, acts, nulls, per_latent: float) -> dict:
    """The latents of ``timed`` (their explanations) again, with the LM head on every position: the reference
    (TokenChange before it read only the firing positions' logits). Its seconds per latent, the ratio to
    ``per_latent``, and whether the TokenChange tokens agree."""
    from ipg_sae.explanations import explain_latents
    from ipg_sae.explanations.output_side import _PLAIN_HEAD

    fast = {e.latent: e for e in timed}
    latents = list(fast)
    before = _PLAIN_HEAD.get(model)
    _PLAIN_HEAD[model] = False
    try:
        start = time.monotonic()
        full = explain_latents(model, sae, layer, latents, corpus, pieces, cfg, acts=acts, null_scores=nulls)
        seconds = (time.monotonic() - start) / max(1, len(latents))
    finally:
        _PLAIN_HEAD[model] = before
    same = all([t.token for t in e.token_change.promoted] == [t.token for t in fast[e.latent].token_change.promoted]
               for e in full)
    return {"per_latent_full_head_s": round(seconds, 4), "n_latents_full_head": len(latents),
            "full_head_over_head_at_firing": round(seconds / per_latent, 3) if per_latent else None,
            "same_token_change": same}


def arad_filter(run_dir: Path, found, ipg_top, args) -> dict:
    """IPG's top ``filter_k`` kept where the output score beats ``filter_percentile`` of its null; the selection
    file and the evaluate config comparing it with the unfiltered set."""
    import yaml

    from ipg_sae.io import write_json, write_text

    top = ipg_top[:args.filter_k]
    kept = [p for p in top if (found[p].output.percentile or 0.0) >= args.filter_percentile]
    out = run_dir / "explanations"
    write_json(out / "ipg_output_filtered.json", {"selection": [list(p) for p in kept]})
    write_json(out / "ipg_top.json", {"selection": [list(p) for p in top]})
    run_cfg = yaml.safe_load((run_dir / "attribute_config.yaml").read_text(encoding="utf-8"))
    cfg = {"name": f"{run_dir.name}-arad", "runs_dir": str(run_dir.parent), "model": run_cfg["model"],
           "sae": {"load": (run_cfg.get("sae") or {}).get("load") or run_cfg["saes"]}, "attribution_dir": str(run_dir),
           "sets": {"ipg": str(out / "ipg_top.json"), "ipg_output_filtered": str(out / "ipg_output_filtered.json")},
           # each set file is the whole set: no k (a k of the unfiltered size is refused for the smaller filtered set)
           "evaluation": {"k": None}}
    write_text(out / "evaluate_filtered.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return {"k": len(top), "kept": len(kept), "threshold": args.filter_percentile, "set": [list(p) for p in kept],
            "evaluate": f"ipg-sae evaluate {out / 'evaluate_filtered.yaml'} (set evaluation.task to the study's dev "
                        "split, e.g. --evaluation.task.offset, and its reward)"}


def markdown(result: dict) -> str:
    def fmt(ci):
        return "-" if not ci else f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"

    lines = ["| group | n | detection (balanced accuracy) | detection AUROC | output percentile |",
             "|---|---|---|---|---|"]
    for name, g in result["groups"].items():
        lines.append(f"| {name} | {g['n']} | " + " | ".join(fmt(g[k]) for k in SCORES) + " |")
    d = result["ipg_minus_random"]
    lines.append(f"| IPG top {result['template_size']} minus random (paired) | | "
                 + " | ".join(fmt(d[k]) for k in SCORES) + " |")
    c, a = result["cost"], result["arad_filter"]
    lines += ["", f"Arad et al.'s filter on IPG's top {a['k']}: {a['kept']} kept (output percentile >= "
              f"{a['threshold']}); steering effect on dev: `{a['evaluate']}`.", "",
              f"Cost: encode {c['encode_s']} s, null pool {c['null_pool_s']} s, {c['per_latent_s']} s per latent "
              f"({c['n_latents_timed']} timed) -> about {c['estimate_4096_s']} s for 4,096 latents"
              + (f"; the LM head on every position instead of the firing ones: {c['per_latent_full_head_s']} s per "
                 f"latent ({c['full_head_over_head_at_firing']}x, same TokenChange tokens: {c['same_token_change']})"
                 if "per_latent_full_head_s" in c else "")
              + (f"; the explorer took {c['explorer_s']} s" if "explorer_s" in c else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory() if args.smoke else None
    run_dir = tiny_run(Path(scratch.name)) if args.smoke else Path(args.run_dir)
    if args.smoke:
        args.top, args.baseline_top, args.n_random, args.cost_latents = 8, 4, 3, 4
    from ipg_sae.explain_run import chosen_latents, run_explain
    from ipg_sae.explanations import load_explanations
    from ipg_sae.explorer import load_run_model
    from ipg_sae.io import write_json, write_text

    model, tokenizer, saes = load_run_model(run_dir)
    cfg = job(run_dir, args, smoke=args.smoke)
    groups = chosen_latents(run_dir, cfg)
    template = groups["ipg_top"]
    draws, encode_s, corpus = frequency_matched(run_dir, cfg, model, saes, template, args.n_random)
    extra = sorted({p for d in draws for p in d})
    run_explain(job(run_dir, args, extra, smoke=args.smoke), model=model, tokenizer=tokenizer, saes=saes)
    found = load_explanations(run_dir)
    named = {"ipg_top16": template[:16], f"ipg_top{len(template)}": template,
             **{k: v for k, v in groups.items() if k.endswith("_top") and k != "ipg_top"},
             "random (frequency-matched)": [p for d in draws for p in d]}
    result = {"run": str(run_dir), "template_size": len(template), "n_random": len(draws),
              "groups": {k: group_scores(found, v) for k, v in named.items()},
              "ipg_minus_random": paired_vs_random(found, template, draws),
              "arad_filter": arad_filter(run_dir, found, template, args),
              "cost": cost(run_dir, args, model, tokenizer, saes, corpus, encode_s)}
    write_json(run_dir / "explanations" / "measured.json", result)
    write_text(run_dir / "explanations" / "measured.md", markdown(result))
    print(markdown(result))
    if args.smoke:  # the evaluate config is one `ipg-sae evaluate` reads, and its sets load
        from ipg_sae.config import load_config
        from ipg_sae.jobs import EvaluateJobConfig
        from ipg_sae.selection import load_selection

        evaluate = load_config(EvaluateJobConfig, run_dir / "explanations" / "evaluate_filtered.yaml")
        k = evaluate.evaluation.k  # how run_evaluate loads each set
        assert [len(load_selection(v, k=k)) for v in evaluate.sets.values()] == [result["arad_filter"]["k"],
                                                                                 result["arad_filter"]["kept"]]
        print(json.dumps({"smoke": True, "groups": sorted(result["groups"]), "cost": result["cost"],
                          "ipg_minus_random": sorted(result["ipg_minus_random"]),
                          "arad_kept": result["arad_filter"]["kept"]}))
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
