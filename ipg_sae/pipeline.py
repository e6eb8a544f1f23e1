"""The main job: sample -> SAE (train or load) -> attribute -> select -> evaluate -> report.

Every stage writes its outputs under ``runs/<name>/`` and, when it finishes, a marker
``stages/<stage>.json`` holding a hash of the settings it depends on (its own config and
the hashes of the stages before it). A rerun skips a stage whose marker matches, so a
killed pipeline resumes at the first unfinished stage, and changing a setting reruns only
what depends on it. Inside a stage, SAE training, attribution and evaluation resume from
their own checkpoints. Each stage is one W&B run; all of them share the group ``<name>``.
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

from .attribution import AttributionConfig
from .config import JobConfig, dump_yaml, load_config
from .errors import IPGError
from .evaluation import EvalConfig
from .io import read_json, write_json, write_text
from .jobs import (AttributeJobConfig, EvaluateJobConfig, SampleJobConfig, SelectionConfig, method_dir, run_attribute,
                   run_evaluate, run_sample)
from .saes import SAESpec
from .sampling import SamplingConfig
from .tasks import TaskConfig

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
    reward: str = "correctness"
    sae: PipelineSAEConfig = field(default_factory=PipelineSAEConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    baselines: list[str] = field(default_factory=lambda: ["act", "grad_x_act"])
    evaluate_baselines: list[str] | None = None  # baselines whose sets are also steered (default: all but random)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)  # its task must be held out from `task`

    def validate(self) -> None:
        super().validate()
        if not self.sae.load and not self.sae.train_config:
            raise IPGError("pipeline.sae needs `load` (SAE entries) or `train_config` (a train-sae YAML)")
        unknown = set(self.evaluate_baselines or []) - set(self.baselines)
        if unknown:
            raise IPGError(f"evaluate_baselines lists {sorted(unknown)}, which are not in `baselines`; add them there")


# ---- stages ---------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    settings: Callable[[PipelineConfig], object]  # what the stage's outputs depend on
    run: Callable[[PipelineConfig], dict | None]
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


STAGES = [
    Stage("sample", lambda c: (c.model, c.task, c.sampling, c.reward),
          lambda c: run_sample(_sample_job(c))),
    Stage("sae", lambda c: (c.model, c.sae, _train_job(c) if not c.sae.load else None), _run_train,
          stale=lambda c: [] if c.sae.load else [_train_job(c).run_dir / p for p in ("checkpoints", "sae", "sae_eval.json")]),
    Stage("attribute", lambda c: (c.attribution, c.baselines, c.selection),
          lambda c: run_attribute(_attribute_job(c), group=c.name)),
    Stage("evaluate", lambda c: (c.evaluation, c.evaluate_baselines), _run_evaluate, stale=lambda c: [c.run_dir / "eval" / "cells"]),
]


def _hash(obj, upstream: str) -> str:
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        return str(o)

    text = json.dumps(obj, default=default, sort_keys=True) + upstream
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage not already finished with the same settings; return each stage's summary."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "pipeline_config.yaml", dump_yaml(cfg))
    upstream, results = "", {}
    for stage in STAGES:
        digest = _hash(stage.settings(cfg), upstream)
        marker = run_dir / "stages" / f"{stage.name}.json"
        done = read_json(marker) if marker.is_file() else None
        if done and done.get("hash") == digest:
            log.info("stage %s: already done with these settings, skipped", stage.name)
            results[stage.name] = done.get("summary")
        else:
            if done:  # finished before with other settings: its partial outputs are stale
                for path in stage.stale(cfg):
                    log.info("stage %s: settings changed, removing %s", stage.name, path)
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
            log.info("stage %s: running", stage.name)
            t0 = time.perf_counter()
            summary = stage.run(cfg)
            seconds = round(time.perf_counter() - t0, 1)
            write_json(marker, {"hash": digest, "seconds": seconds, "summary": summary})
            log.info("stage %s: done in %.0f s", stage.name, seconds)
            results[stage.name] = summary
        upstream = digest
    return results
