"""The main job: sample -> SAE (train or load) -> attribute -> select -> evaluate -> report.

Every stage writes its outputs under ``runs/<name>/`` and, when it finishes, a marker
``stages/<stage>.json`` holding its key and the digests of the files it wrote. The key hashes
everything the outputs depend on: the stage's settings, the inputs that come from outside
the pipeline (the model's files, the SAEs it loads) and the digests of the files the stages
before it wrote, plus the result-format version. A rerun reuses a stage only when its key
matches and its output files are still the ones it wrote (and says so in the log), so a
killed pipeline resumes at the first unfinished stage, changing a setting or an input
reruns only what depends on it, and an edited output is never built upon. Inside a stage,
SAE training, attribution and evaluation resume from their own checkpoints. Each stage is
one W&B run; all of them share the group ``<name>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .attribution import AttributionConfig, Baseline
from .config import JobConfig, dump_yaml, load_config
from .digest import FORMAT_VERSION, json_digest, tree_digest
from .errors import IPGError
from .evaluation import EvalConfig, check_held_out
from .explorer import ExplorerConfig
from .io import read_json, run_lock, write_json, write_text
from .jobs import (AttributeJobConfig, EvaluateJobConfig, SampleJobConfig, SelectionConfig, check_baselines, method_dir,
                   run_attribute, run_evaluate, run_sample)
from .models import source_digest
from .rewards import get_reward
from .tracking import attribution_files
from .saes import SAESpec
from .sampling import SamplingConfig
from .tasks import TaskConfig, load_problems

log = logging.getLogger(__name__)


@dataclass
class PipelineSAEConfig:
    load: list[SAESpec] = field(default_factory=list)  # published or local SAEs; when empty, train them
    train_config: str | None = None  # a train-sae YAML (its name, runs_dir and model are the pipeline's)
    train_overrides: dict = field(default_factory=dict)  # dotted overrides of that config, e.g. {training_tokens: 1e6}


@dataclass
class PipelineConfig(JobConfig):
    name: str = "pipeline"
    task: TaskConfig = field(default_factory=TaskConfig)  # the problems attributed on
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: str = "correctness"  # correctness | length | neg_length | module.path:function
    sae: PipelineSAEConfig = field(default_factory=PipelineSAEConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    baselines: list[Baseline] = field(default_factory=lambda: ["act", "grad_x_act"])  # attributed beside IPG
    evaluate_baselines: list[Baseline] | None = None  # baselines whose sets are also steered (default: all but random)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)  # its task must be held out from `task`
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)  # the feature explorer page

    def validate(self) -> None:
        super().validate()
        if not self.sae.load and not self.sae.train_config:
            raise IPGError("pipeline.sae needs `load` (SAE entries) or `train_config` (a train-sae YAML)")
        unknown = set(self.evaluate_baselines or []) - set(self.baselines)
        if unknown:
            raise IPGError(f"evaluate_baselines lists {sorted(unknown)}, which are not in `baselines`; add them there")
        check_baselines(self.baselines)
        get_reward(self.reward)
        # Every stage's config is built (and so checked) now, before the first stage runs.
        if not self.sae.load:
            try:
                _train_job(self)
            except IPGError as e:
                raise IPGError(f"sae.train_config: {e}") from None
        dataclasses.replace(self.evaluation, k=self.evaluation.k or self.selection.k, reward=self.reward).validate()
        if all(t.name == "arithmetic" or t.path for t in (self.task, self.evaluation.task)):  # cheap to load here
            check_held_out(load_problems(self.evaluation.task), [p.id for p in load_problems(self.task)])


# ---- stages ---------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    settings: Callable[[PipelineConfig], object]  # what the stage's outputs depend on (besides earlier stages)
    run: Callable[[PipelineConfig], dict | None]
    outputs: Callable[[PipelineConfig], list[Path]]  # the files later stages read
    # Partial outputs that a stage would refuse to reuse once its settings changed.
    stale: Callable[[PipelineConfig], list[Path]] = lambda cfg: []


def _sample_job(cfg: PipelineConfig) -> SampleJobConfig:
    return SampleJobConfig(name=cfg.name, runs_dir=cfg.runs_dir, model=cfg.model, task=cfg.task,
                           sampling=cfg.sampling, reward=cfg.reward, wandb=cfg.wandb)


def _train_job(cfg: PipelineConfig):
    from sae_training.config import TrainSAEConfig

    overrides = {**cfg.sae.train_overrides, "name": cfg.name, "runs_dir": cfg.runs_dir}
    train = load_config(TrainSAEConfig, cfg.sae.train_config, overrides)
    return dataclasses.replace(train, model=cfg.model, wandb=dataclasses.replace(train.wandb, enabled=cfg.wandb.enabled))


def _sae_specs(cfg: PipelineConfig) -> list[SAESpec]:
    if cfg.sae.load:
        return cfg.sae.load
    train = _train_job(cfg)
    return [SAESpec(path=str(train.run_dir / "sae" / f"layer_{layer}")) for layer in train.layers]


def _attribute_job(cfg: PipelineConfig) -> AttributeJobConfig:
    return AttributeJobConfig(name=cfg.name, runs_dir=cfg.runs_dir, model=cfg.model, saes=_sae_specs(cfg),
                              attribution=cfg.attribution, baselines=cfg.baselines, selection=cfg.selection,
                              wandb=cfg.wandb)


def _evaluate_job(cfg: PipelineConfig) -> EvaluateJobConfig:
    sets = {"ipg": str(method_dir(cfg.run_dir, "ipg") / "selection.json")}
    steered = cfg.evaluate_baselines if cfg.evaluate_baselines is not None else cfg.baselines
    sets.update({b: str(method_dir(cfg.run_dir, b) / "selection.json") for b in steered if b != "random"})
    evaluation = dataclasses.replace(cfg.evaluation, k=cfg.evaluation.k or cfg.selection.k, reward=cfg.reward)
    return EvaluateJobConfig(name=cfg.name, runs_dir=cfg.runs_dir, model=cfg.model, saes=_sae_specs(cfg), sets=sets,
                             attribution_dir=str(cfg.run_dir), evaluation=evaluation, wandb=cfg.wandb)


def _run_train(cfg: PipelineConfig) -> dict:
    if cfg.sae.load:
        return {"loaded": [dataclasses.asdict(s) for s in cfg.sae.load]}
    from sae_training import train

    return train(_train_job(cfg))


def _run_evaluate(cfg: PipelineConfig) -> dict:
    result, report = run_evaluate(_evaluate_job(cfg), group=cfg.name)
    return {"report": str(report), "comparisons": result.comparisons}


def _model_inputs(cfg: PipelineConfig) -> dict:
    """Digests of the model files the pipeline reads (a hub id is identified by its name and revision only)."""
    return {"model": source_digest(cfg.model.name), "revision": cfg.model.revision}


def _sae_inputs(cfg: PipelineConfig) -> dict:
    return {spec.path: tree_digest([spec.path]) for spec in cfg.sae.load if spec.path}


def _attribution_outputs(c: PipelineConfig) -> list[Path]:
    return [f for method in ["ipg", *c.baselines] for f in attribution_files(method_dir(c.run_dir, method))]


STAGES = [
    Stage("sample", lambda c: (c.model, _model_inputs(c), c.task, c.sampling, c.reward),
          lambda c: run_sample(_sample_job(c)), outputs=lambda c: [c.run_dir / "trajectories.jsonl"]),
    Stage("sae", lambda c: (c.sae, _sae_inputs(c), _train_job(c) if not c.sae.load else None), _run_train,
          outputs=lambda c: [] if c.sae.load else [_train_job(c).run_dir / "sae"],
          stale=lambda c: [] if c.sae.load else [_train_job(c).run_dir / p for p in ("checkpoints", "sae", "sae_eval.json")]),
    Stage("attribute", lambda c: (c.attribution, c.baselines, c.selection),
          lambda c: run_attribute(_attribute_job(c), group=c.name), outputs=_attribution_outputs),
    Stage("evaluate", lambda c: (c.evaluation, c.evaluate_baselines), _run_evaluate,
          outputs=lambda c: [c.run_dir / "eval" / "summary.json", c.run_dir / "report.md"],
          stale=lambda c: [c.run_dir / "eval" / "cells"]),
    Stage("explore", lambda c: (c.explorer,), lambda c: _run_explore(c),
          outputs=lambda c: [c.run_dir / "explorer" / "index.html", c.run_dir / "explorer" / "data.json"]),
]


def _run_explore(cfg: PipelineConfig) -> dict:
    from .explorer import ExploreJobConfig, run_explore

    page = run_explore(ExploreJobConfig(run_dir=str(cfg.run_dir), explorer=cfg.explorer, wandb=cfg.wandb),
                       group=cfg.name)
    return {"explorer": str(page)}


def _key(settings, upstream: str) -> str:
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        return str(o)

    text = json.dumps([FORMAT_VERSION, settings], default=default, sort_keys=True) + upstream
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_marker(marker: Path) -> dict | None:
    if not marker.is_file():
        return None
    try:
        done = read_json(marker)
    except (ValueError, UnicodeDecodeError):
        done = None
    if not isinstance(done, dict) or "hash" not in done:
        raise IPGError(f"{marker} is corrupt; delete it to rerun the {marker.stem} stage")
    return done


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage not already finished with the same settings; return each stage's summary."""
    with run_lock(cfg.run_dir):
        write_text(cfg.run_dir / "pipeline_config.yaml", dump_yaml(cfg))
        return run_stages(cfg, STAGES)


def run_stages(cfg, stages: list[Stage]) -> dict:
    """Run ``stages`` in order under ``cfg.run_dir``, reusing each one whose key and outputs still match."""
    run_dir = cfg.run_dir
    upstream, results = "", {}
    for stage in stages:
        key = _key(stage.settings(cfg), upstream)
        marker = run_dir / "stages" / f"{stage.name}.json"
        done = _read_marker(marker)
        outputs = tree_digest(stage.outputs(cfg)) if done else {}
        if done and done["hash"] == key and done.get("outputs") == outputs:
            log.info("stage %s: already done with these settings and inputs (key %s) and its %d output files are "
                     "the ones it wrote: reused", stage.name, key, len(outputs))
            results[stage.name] = done.get("summary")
        else:
            if done:  # finished before, but its settings, inputs or outputs changed: partial outputs are stale
                why = "settings or inputs changed" if done["hash"] != key else "its output files changed since"
                log.warning("stage %s: %s; rerunning it", stage.name, why)
                for path in stage.stale(cfg):
                    log.info("stage %s: removing %s", stage.name, path)
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
            log.info("stage %s: running", stage.name)
            t0 = time.perf_counter()
            summary = stage.run(cfg)
            seconds = round(time.perf_counter() - t0, 1)
            outputs = tree_digest(stage.outputs(cfg))
            write_json(marker, {"hash": key, "seconds": seconds, "outputs": outputs, "summary": summary})
            log.info("stage %s: done in %.0f s", stage.name, seconds)
            results[stage.name] = summary
        upstream = json_digest(outputs) + key
    return results
