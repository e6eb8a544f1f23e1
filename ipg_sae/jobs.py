"""The jobs behind the CLI: each takes one typed config and writes ``runs/<name>/``.

Jobs own orchestration only (files, W&B, printing); the work is done by the library
modules, so everything a job does can also be called from a notebook.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from .config import dump_yaml, to_dict
from .errors import IPGError
from .io import read_json, run_lock, write_json, write_text
# The job configs live torch-free in jobs_config (a command's --help and its config's typos answer without torch);
# every name stays importable from here.
from .jobs_config import (AttributeJobConfig, EvaluateJobConfig, ExploreJobConfig, ExportJobConfig,  # noqa: F401
                          SampleJobConfig, SelectionConfig, check_baselines)
from .models import load_model
from .saes import load_saes
from .sampling import sample
from .tasks import build_prompts, load_problems
from .tracking import Tracker, artifact_name, attribution_files, use_inputs
from .trajectories import Trajectory, load_trajectories, save_trajectories

log = logging.getLogger(__name__)


def trajectory_metrics(trajectories: list[Trajectory]) -> dict:
    """Accuracy, mean reward, mean generated length and unparseable count of a set of trajectories."""
    n = len(trajectories)
    return {
        "n": n,
        "accuracy": sum(t.correct for t in trajectories) / max(n, 1),
        "mean_reward": sum(t.reward for t in trajectories) / max(n, 1),
        "mean_length": sum(len(t.completion_ids) for t in trajectories) / max(n, 1),
        "unparseable": sum(not t.parsed for t in trajectories),
    }


def sample_table(trajectories: list[Trajectory], limit: int = 50) -> tuple[list[str], list[list]]:
    cols = ["id", "reference", "answer", "correct", "reward", "n_tokens", "completion"]
    rows = [[t.id, t.reference, t.answer, t.correct, t.reward, len(t.completion_ids), t.completion]
            for t in trajectories[:limit]]
    return cols, rows


def run_sample(cfg: SampleJobConfig, progress: bool = True) -> dict:
    """Sample and score completions; write ``trajectories.jsonl`` and ``sample_summary.json``."""
    problems = load_problems(cfg.task)  # bad input fails before anything is written
    model, tokenizer = load_model(cfg.model)
    with run_lock(cfg.run_dir):
        return _sample(cfg, problems, model, tokenizer, progress)


def _sample(cfg: SampleJobConfig, problems, model, tokenizer, progress: bool) -> dict:
    run_dir = cfg.run_dir
    write_text(run_dir / "sample_config.yaml", dump_yaml(cfg))
    prompts = build_prompts(tokenizer, problems, cfg.task)
    t0 = time.perf_counter()
    trajectories = sample(model, tokenizer, problems, prompts, cfg.sampling, cfg.reward, progress=progress)
    seconds = time.perf_counter() - t0
    save_trajectories(run_dir / "trajectories.jsonl", trajectories)
    metrics = trajectory_metrics(trajectories)
    metrics["seconds"] = round(seconds, 2)
    metrics["generated_tokens_per_s"] = round(sum(len(t.completion_ids) for t in trajectories) / seconds, 2)
    write_json(run_dir / "sample_summary.json", {"metrics": metrics, "config": to_dict(cfg)})
    with Tracker(cfg.wandb, run_dir, cfg.name, "sample", to_dict(cfg)) as tracker:
        tracker.log({f"sample/{k}": v for k, v in metrics.items()})
        tracker.summary({f"sample/{k}": v for k, v in metrics.items()})
        tracker.table("sample/completions", *sample_table(trajectories))
        path = run_dir / "trajectories.jsonl"
        tracker.artifact(artifact_name("trajectories", path), "dataset", path)
    return metrics


# ---- attribute ----------------------------------------------------------------------------


def method_dir(run_dir: Path, method: str) -> Path:
    """Where a method's attribution lives: the run dir for IPG, ``baselines/<name>/`` for the others."""
    return run_dir if method == "ipg" else run_dir / "baselines" / method


def run_attribute(cfg: AttributeJobConfig, progress: bool = True, group: str | None = None) -> dict:
    """Attribute the trajectories (and optional baselines); write results, the feature table and selection."""
    from . import distributed

    rank, world = distributed.init_distributed()
    main = rank == 0
    model_cfg = cfg.model
    if world > 1 and model_cfg.device.startswith("cuda"):  # one GPU per rank
        model_cfg = dataclasses.replace(model_cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    run_dir = cfg.run_dir
    trajectories = load_trajectories(cfg.trajectories or run_dir / "trajectories.jsonl")
    model, tokenizer = load_model(model_cfg)
    saes = load_saes(cfg.sae.load, model, tokenizer)
    cfg.selection.check_width(saes)
    with run_lock(run_dir):
        return _attribute(cfg, trajectories, model, tokenizer, saes, main, progress, group)


def _attribute(cfg: AttributeJobConfig, trajectories, model, tokenizer, saes, main: bool, progress: bool,
               group: str | None) -> dict:
    from .attribution import run_attribution

    run_dir = cfg.run_dir
    if main:
        write_text(run_dir / "attribute_config.yaml", dump_yaml(cfg))
    sources = {layer: dataclasses.asdict(spec) for layer, spec in zip(saes, cfg.sae.load)}
    logging_cfg = cfg.wandb if main else dataclasses.replace(cfg.wandb, enabled=False)
    summaries = {}
    for method in ["ipg", *cfg.baselines]:
        out = method_dir(run_dir, method)
        with Tracker(logging_cfg, run_dir, cfg.name, f"attribute-{method}", to_dict(cfg), group=group) as tracker:
            use_inputs(tracker, trajectories_path=cfg.trajectories or run_dir / "trajectories.jsonl", saes=cfg.sae.load)
            acfg = dataclasses.replace(cfg.attribution, baseline=method)
            result = run_attribution(
                model, saes, trajectories, acfg, tokenizer=tokenizer, out_dir=out, progress=progress and main,
                checkpoint_path=out / "attribution.ckpt.safetensors", sae_sources=sources,
                callback=lambda stats: tracker.log({f"attribution/{k}": v for k, v in stats.items()
                                                     if isinstance(v, (int, float))}))
            if not main:
                continue  # rank 0 merged the shards and writes the tables
            summaries[method] = _write_selection(cfg, method, out, result, tokenizer, trajectories, tracker)
            tracker.artifact(artifact_name("attribution", out), "attribution", *attribution_files(out),
                             metadata={"method": method, "layers": list(result.layers),
                                       "prompts": result.n_prompts, "top_latents": summaries[method]["selection"][:16]})
    return summaries


def _write_selection(cfg: AttributeJobConfig, method: str, out: Path, result, tokenizer, trajectories, tracker) -> dict:
    """The selected set, its bootstrap stability, and the feature table of one method's result."""
    from .selection import bootstrap_stability, feature_table, log_to_wandb, select, write_feature_table

    sel = cfg.selection
    chosen = select(result, sel.k, by=sel.by, per_layer=sel.per_layer, normalize=sel.normalize)
    wanted = sel.k * (len(result.layers) if sel.per_layer else 1)
    if len(chosen) < wanted:
        log.warning("%s: only %d latents are active on these trajectories, fewer than selection.k (%d); the set has %d",
                    method, len(chosen), sel.k, len(chosen))
    rows = feature_table(result, tokenizer, trajectories, k=sel.table_size, by=sel.by, per_layer=sel.per_layer,
                         normalize=sel.normalize)
    write_feature_table(out / "features.csv", rows)
    zero = [pair for pair in chosen if float(result.score[pair[0]][pair[1]]) == 0.0]
    if zero:  # a latent with score 0 is in the set only to fill it: its rank means nothing
        log.warning("%s: %d of the %d selected latents have a score of exactly 0 (%s); no stability is reported",
                    method, len(zero), len(chosen), ", ".join(f"L{layer}:{i}" for layer, i in zero[:5]))
    stability = (bootstrap_stability(result, sel.k, n_boot=sel.n_bootstrap, by=sel.by, per_layer=sel.per_layer,
                                     normalize=sel.normalize, seed=cfg.attribution.seed)
                 if result.is_gradient_method and sel.n_bootstrap > 0 and not zero else None)
    summary = {"method": method, "selection": chosen, "k_requested": sel.k, "n_zero_score": len(zero),
               "stability": stability, **result.meta.get("summary", {})}
    write_json(out / "selection.json", summary)
    log_to_wandb(tracker, rows, result)
    if result.is_gradient_method:  # how many nodes each prompt needed, and the gap it ended at
        attributed = ~result.prompt("skipped")
        if bool(attributed.any()):
            tracker.histogram("attribution/nodes_per_prompt", result.prompt("n_nodes")[attributed].numpy())
            tracker.histogram("attribution/delta_per_prompt", result.prompt("delta")[attributed].numpy())
    tracker.summary({f"attribution/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary


# ---- evaluate -----------------------------------------------------------------------------


def _set_dirs(sets: dict) -> list[Path]:
    """The attribution directories the evaluated sets were read from (a directory, or a file in one)."""
    out = []
    for source in sets.values():
        if isinstance(source, (str, Path)):
            path = Path(source)
            path = path if path.is_dir() else path.parent
            if (path / "attribution.safetensors").is_file() and path not in out:
                out.append(path)
    return out


def run_evaluate(cfg: EvaluateJobConfig, progress: bool = True, group: str | None = None):
    """Steer with each set at each gamma on held-out problems; write ``eval/`` and ``report.md``."""
    from .attribution import AttributionResult
    from .evaluation import evaluate
    from .report import write_report
    from .selection import load_selection

    run_dir = cfg.run_dir
    if not cfg.sets:
        raise IPGError("no sets to evaluate: add `sets: {ipg: <attribution run dir or features.csv>}`")
    model, tokenizer = load_model(cfg.model)
    saes = load_saes(cfg.sae.load, model, tokenizer)
    k = cfg.evaluation.k
    sets = {name: load_selection(source, k=k) for name, source in cfg.sets.items()}
    active = prompt_ids = scores = None
    if cfg.attribution_dir:
        attribution = AttributionResult.load(cfg.attribution_dir)
        active = {layer: mask.any(0) for layer, mask in attribution.active.items()}
        prompt_ids = attribution.prompt_ids
        scores = {f"L{layer}": s[active[layer]].numpy() for layer, s in attribution.score.items()}
    problems = load_problems(cfg.evaluation.task)
    prompts = build_prompts(tokenizer, problems, cfg.evaluation.task)
    with run_lock(run_dir), Tracker(cfg.wandb, run_dir, cfg.name, "evaluate", to_dict(cfg), group=group) as tracker:
        write_text(run_dir / "evaluate_config.yaml", dump_yaml(cfg))
        use_inputs(tracker, saes=cfg.sae.load, attribution_dirs=_set_dirs(cfg.sets))
        result = evaluate(model, tokenizer, saes, problems, prompts, sets, cfg.evaluation, out_dir=run_dir / "eval",
                          active=active, attribution_prompt_ids=prompt_ids, progress=progress)
        history, summary = evaluation_metrics(result)
        tracker.log(history)
        tracker.summary(summary)
        metric = result.meta.primary_metric
        draws = [[r["set"], r["gamma"], r.get(metric), r.get(f"{metric}_delta")] for r in result.rows
                 if r["condition"] == "random"]
        if draws:
            tracker.table("evaluate/random_draws", ["set", "gamma", metric, f"{metric}_delta"], draws)
        report = write_report(run_dir, result, scores=scores, tracker=tracker)
        outputs = [run_dir / "eval" / f for f in ("summary.json", "rows.csv", "comparisons.csv", "samples.csv")]
        tracker.artifact(artifact_name("evaluation", run_dir / "eval"), "evaluation", report, *outputs,
                         *[p for p in [run_dir / "plots"] if p.is_dir()], metadata=_evaluation_metadata(result))
    return result, report


_W_METRICS = ("accuracy", "length", "reward", "degenerate", "unparseable", "ess")


def evaluation_metrics(result) -> tuple[dict, dict]:
    """W&B keys of an evaluation, one per set, gamma and metric (``evaluate/<set>/g<gamma>/<metric>``, the
    unsteered base as ``evaluate/none/<metric>``, with ``_delta``/``_lo``/``_hi`` against it), logged as one
    step; and the run's summary: the same keys plus the headline, the target against the random sets at
    each gamma on the primary metric (``evaluate/headline/g<gamma>/<metric>_vs_random``, its interval and
    verdict). The runs table then shows the target's numbers, never a null's."""
    meta = result.meta
    # The reward is a key of its own only when it is neither accuracy nor length (else it repeats one of them);
    # each random draw is a row of the `evaluate/random_draws` table, and only their mean is a key.
    metrics = [m for m in _W_METRICS if m != "reward" or meta.primary_metric == "reward"]
    history = {}
    for row in result.rows:
        if row["condition"] == "random":
            continue
        name = "random_mean" if row["condition"] == "random_mean" else row["set"]
        prefix = "evaluate/none" if row["gamma"] is None else f"evaluate/{name}/g{row['gamma']:g}"
        for m in metrics:
            for suffix in ("", "_delta", "_delta_lo", "_delta_hi", "_lo", "_hi"):
                value = row.get(m + suffix)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    history[f"{prefix}/{m}{suffix}"] = value
    summary = dict(history)
    for c in result.comparisons:
        if c["against"] == "random" and c["metric"] == meta.primary_metric:
            key = f"evaluate/headline/g{c['gamma']:g}/{c['metric']}_vs_random"
            summary.update({key: c["delta"], f"{key}_lo": c["lo"], f"{key}_hi": c["hi"],
                            f"{key}_verdict": c["verdict"]})
    summary["evaluate/target"] = meta.target
    summary["evaluate/primary_metric"] = meta.primary_metric
    return history, summary


def _evaluation_metadata(result) -> dict:
    """What the evaluation artifact's page shows: the target, the reward, and its verdict against random sets."""
    meta = result.meta
    return {"target": meta.target, "reward": meta.reward, "primary_metric": meta.primary_metric,
            "estimator": meta.estimator, "problems": meta.n_problems, "random_sets": len(meta.random_sets),
            "vs_random": [{k: c[k] for k in ("gamma", "delta", "lo", "hi", "verdict")} for c in result.comparisons
                          if c["against"] == "random" and c["metric"] == meta.primary_metric]}


# ---- explore ------------------------------------------------------------------------------


def run_explore(cfg: ExploreJobConfig, group: str | None = None) -> Path:
    """Build the explorer of ``cfg.run_dir`` and log it to W&B."""
    from .explorer import build

    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir, lock_hint=False), Tracker(cfg.wandb, run_dir, run_dir.name, "explore", to_dict(cfg),
                                                     group=group) as tracker:
        use_inputs(tracker, attribution_dirs=[run_dir])  # lineage: attribution -> explorer
        return build(run_dir, cfg=cfg.explorer, tracker=tracker, trust_remote_code=cfg.trust_remote_code)


# ---- export -------------------------------------------------------------------------------


def run_export(cfg: ExportJobConfig) -> dict:
    """Write the TransformerLens copy of an SAE and, with ``check``, verify it through sae-lens's bridge.

    The SAE is checked intact (its recorded weights digest) whatever ``check`` says, and with ``check`` the model
    is named and loaded before anything is written; a copy that fails its check is not left behind."""
    from .export import default_export_dir, export_for_transformer_lens, round_trip
    from .models import model_source
    from .saes import SIDECAR, check_sidecar

    sae_dir = Path(cfg.sae)
    out_dir = cfg.out_dir or default_export_dir(sae_dir)
    side = check_sidecar(sae_dir)  # a tampered SAE or a sidecar that is not an object: one line, nothing written
    summary: dict = {}
    check = None
    if cfg.check:
        name = cfg.model or (side or {}).get("model_name")
        if not name:
            raise IPGError(f"{sae_dir} does not name its model (no model_name in {SIDECAR}); pass --model NAME, or "
                           "--check false")
        model, tokenizer = load_model(name)

        def check(staged: Path) -> None:
            summary.update(round_trip(model, tokenizer, model_source(name), sae_dir, staged))

    out = export_for_transformer_lens(sae_dir, out_dir, force=cfg.force, check=check)
    summary.update(exported=str(out))
    return summary
