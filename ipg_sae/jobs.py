"""The jobs behind the CLI: each takes one typed config and writes ``runs/<name>/``.

Jobs own orchestration only (files, W&B, printing); the work is done by the library
modules, so everything a job does can also be called from a notebook.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attribution import AttributionConfig, Baseline
from .config import JobConfig, dump_yaml, to_dict
from .errors import IPGError
from .evaluation import EvalConfig
from .explorer import ExplorerConfig
from .io import read_json, run_lock, write_json, write_text
from .models import load_model
from .rewards import get_reward
from .saes import SAELoad, SAESpec, load_saes, take_old_saes
from .selection import Normalize, RankBy
from .sampling import SamplingConfig, sample
from .tasks import TaskConfig, build_prompts, load_problems
from .tracking import Tracker, WandbConfig, artifact_name, attribution_files, use_inputs
from .trajectories import Trajectory, load_trajectories, save_trajectories

log = logging.getLogger(__name__)


@dataclass
class SampleJobConfig(JobConfig):
    name: str = "sample"
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: str = "correctness"  # correctness | length | neg_length | module.path:function

    def validate(self) -> None:
        super().validate()
        get_reward(self.reward)  # an unknown name or a function that cannot be imported fails here, before any work


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


@dataclass
class SelectionConfig:
    k: int = 16  # size of the selected set
    by: RankBy | None = None  # mean | t | mean_abs | score; None = the method's natural score
    per_layer: bool = False  # k per layer instead of k overall
    normalize: Normalize = "none"  # none | length | l1: per-trajectory normalization before aggregating
    n_bootstrap: int = 100  # prompt resamples for the Jaccard stability of the top-k
    table_size: int = 50  # rows in features.csv

    def validate(self) -> None:
        if self.k < 1:
            raise IPGError(f"selection.k is {self.k}; select at least one latent")
        if self.n_bootstrap < 0 or self.table_size < 1:
            raise IPGError("selection.n_bootstrap must be >= 0 and selection.table_size >= 1")

    def check_width(self, saes: dict) -> None:
        """Refuse a ``k`` larger than the latents there are, before any attribution runs."""
        widths = {layer: int(sae.cfg.d_sae) for layer, sae in saes.items()}
        available = min(widths.values()) if self.per_layer else sum(widths.values())
        if self.k > available:
            where = "the narrowest SAE has" if self.per_layer else "the SAEs have"
            raise IPGError(f"selection.k is {self.k} but {where} only {available} latents; lower selection.k")


@dataclass
class AttributeJobConfig(JobConfig):
    name: str = "attribute"
    sae: SAELoad = field(default_factory=SAELoad)  # sae: {load: [{path: dir} or {release, sae_id}, ...]}, one per layer
    saes: list[SAESpec] | None = None  # deprecated spelling of sae.load (moved there, with a warning)
    trajectories: str | None = None  # default: runs/<name>/trajectories.jsonl
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    baselines: list[Baseline] = field(default_factory=list)  # also run these (act, reason_words, grad_x_act, ...)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def validate(self) -> None:
        super().validate()
        if not self.sae.load:
            raise IPGError("no SAE given: add an entry under `sae: {load: [...]}` (path: <sae dir>, or release + "
                           "sae_id)")
        check_baselines(self.baselines)

    def __post_init__(self) -> None:
        take_old_saes(self)


def check_baselines(names: list[str]) -> None:
    if "ipg" in names:
        raise IPGError("`baselines` lists ipg, which always runs; list only the baselines")
    if len(set(names)) != len(names):
        raise IPGError(f"`baselines` {names} lists a baseline twice; list each once")


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


@dataclass
class EvaluateJobConfig(JobConfig):
    name: str = "evaluate"
    sae: SAELoad = field(default_factory=SAELoad)  # sae: {load: [...]}, as in attribute and the pipeline
    saes: list[SAESpec] | None = None  # deprecated spelling of sae.load (moved there, with a warning)
    # Sets to compare: name -> a source load_selection accepts (result dir, features.csv, "layer:latent" list).
    sets: dict[str, Any] = field(default_factory=dict)
    attribution_dir: str | None = None  # its prompt ids are checked for overlap; its active latents seed random sets
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        take_old_saes(self)


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


@dataclass
class ExploreJobConfig:
    run_dir: str = ""  # the attribution run to explore (a directory with attribution.safetensors)
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)  # what the page shows
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # let the run's model run its own code (the run's own trust_remote_code is never used: only for runs you trust)
    trust_remote_code: bool = False

    def validate(self) -> None:
        if not self.run_dir or not (Path(self.run_dir) / "attribution.json").is_file():
            raise IPGError(f"{self.run_dir or '(no run_dir)'} is not an attribution run (no attribution.json); give "
                           "the run directory of `ipg-sae attribute` or `ipg-sae pipeline`, e.g. runs/demo")


def run_explore(cfg: ExploreJobConfig, group: str | None = None) -> Path:
    """Build the explorer of ``cfg.run_dir`` and log it to W&B."""
    from .explorer import build

    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir, lock_hint=False), Tracker(cfg.wandb, run_dir, run_dir.name, "explore", to_dict(cfg),
                                                     group=group) as tracker:
        use_inputs(tracker, attribution_dirs=[run_dir])  # lineage: attribution -> explorer
        return build(run_dir, cfg=cfg.explorer, tracker=tracker, trust_remote_code=cfg.trust_remote_code)


# ---- export -------------------------------------------------------------------------------


@dataclass
class ExportJobConfig:
    sae: str = ""  # the SAE directory to export (one this project trained, e.g. runs/demo/sae/layer_15)
    out_dir: str | None = None  # where the copy goes (default: <run>/export/layer_L for <run>/sae/layer_L)
    model: str | None = None  # the model it reads (default: the one named in the SAE's ipg_sae.json)
    check: bool = True  # load the model and compare the bridge's residual and activations with this project's
    force: bool = False  # replace files in out_dir that an earlier export of this SAE did not write

    def validate(self) -> None:
        if not self.sae or not (Path(self.sae) / "cfg.json").is_file():
            raise IPGError(f"{self.sae or '(no SAE)'} is not an SAE directory (no cfg.json); give one, e.g. "
                           "runs/demo/sae/layer_15")


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
