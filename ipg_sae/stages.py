"""Stages: the resumable steps of a multi-stage job (the pipeline, the study), and the SAE stage both share.

A :class:`Stage` names what its outputs depend on (``settings``), how to run it and which files
it writes. :func:`run_stages` runs stages in order under ``cfg.run_dir`` and, when a stage
finishes, writes a marker ``stages/<stage>.json`` holding its key and the digests of the files it
wrote. The key hashes the stage's settings, the inputs that come from outside the job (the
model's files, the SAEs it loads: :func:`model_inputs`, :func:`sae_inputs`), the digests of the
files the stages before it wrote, and the result-format version. A rerun reuses a stage only
when its key matches and its output files are still the ones it wrote (and says so in the log),
so a killed job resumes at the first unfinished stage, changing a setting or an input reruns
only what depends on it, and an edited output is never built upon.

The SAE stage (:data:`SAE_STAGE`) loads the SAEs a job names, or trains them with
:mod:`sae_training` from a train-sae YAML (:class:`SAESourceConfig`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import load_config
from .digest import FORMAT_VERSION, json_digest, key_dict, tree_digest
from .errors import IPGError
from .io import jsonable, read_json, remove_tree, write_json
from .models import source_digest
from .saes import SAESpec

log = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    settings: Callable[[Any], object]  # what the stage's outputs depend on (besides earlier stages)
    run: Callable[[Any], dict | None]
    outputs: Callable[[Any], list[Path]]  # the files later stages read
    # Partial outputs that a stage would refuse to reuse once its settings changed.
    stale: Callable[[Any], list[Path]] = lambda cfg: []


def run_stages(cfg, stages: list[Stage]) -> dict:
    """Run ``stages`` in order under ``cfg.run_dir``, reusing each one whose key and outputs still match."""
    run_dir = cfg.run_dir
    upstream, results = "", {}
    for stage in stages:
        key = stage_key(stage.settings(cfg), upstream)
        marker = run_dir / "stages" / f"{stage.name}.json"
        done = _read_marker(marker)
        outputs = tree_digest(stage.outputs(cfg)) if done else {}
        intact = done is not None and done.get("summary_sha256") == json_digest(done.get("summary"))
        if done and done["hash"] == key and done.get("outputs") == outputs and intact:
            log.info("stage %s: already done with these settings and inputs (key %s) and its %d output files are "
                     "the ones it wrote: reused", stage.name, key, len(outputs))
            results[stage.name] = done.get("summary")
        else:
            if done:  # finished before, but its settings, inputs or outputs changed: partial outputs are stale
                why = ("settings or inputs changed" if done["hash"] != key else
                       "its output files changed since" if done.get("outputs") != outputs else
                       "its marker's summary was edited")
                log.warning("stage %s: %s; rerunning it", stage.name, why)
                for path in stage.stale(cfg):
                    log.info("stage %s: removing %s", stage.name, path)
                    remove_tree(path)
            log.info("stage %s: running", stage.name)
            t0 = time.perf_counter()
            summary = jsonable(stage.run(cfg))
            seconds = round(time.perf_counter() - t0, 1)
            outputs = tree_digest(stage.outputs(cfg))
            write_json(marker, {"hash": key, "seconds": seconds, "outputs": outputs, "summary": summary,
                                "summary_sha256": json_digest(summary)})
            log.info("stage %s: done in %.0f s", stage.name, seconds)
            results[stage.name] = summary
        upstream = json_digest(outputs) + key
    return results


def run_job_stages(cfg, stages: list[Stage], config_file: str, contexts: list) -> dict:
    """A staged job's whole run: every ``(task, max_new_tokens, field)`` of ``contexts`` checked against the
    model's context first, then, under the run directory's lock, its config written to ``config_file`` and
    :func:`run_stages`."""
    from .config import dump_yaml
    from .io import run_lock, write_text
    from .sampling import check_fits_context

    check_fits_context(cfg.model, contexts)
    with run_lock(cfg.run_dir):
        write_text(cfg.run_dir / config_file, dump_yaml(cfg))
        return run_stages(cfg, stages)


def stage_key(settings, upstream: str) -> str:
    """The digest of a stage's settings (dataclasses as dicts), the format version and the stages before it."""
    def default(o):
        if dataclasses.is_dataclass(o):
            return key_dict(o)
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


def model_inputs(cfg) -> dict:
    """Digests of the model files a job reads (a hub id is identified by its name and revision only)."""
    return {"model": source_digest(cfg.model.name), "revision": cfg.model.revision}


# ---- the SAE stage ------------------------------------------------------------------------------


@dataclass
class SAESourceConfig:
    load: list[SAESpec] = field(default_factory=list)  # published or local SAEs; when empty, train them
    train_config: str | None = None  # a train-sae YAML (its name, runs_dir and model are the job's)
    train_overrides: dict = field(default_factory=dict)  # dotted overrides of that config, e.g. {training_tokens: 1e6}

    def validate(self) -> None:
        if not self.load and not self.train_config:
            raise IPGError("sae needs `load` (SAE entries) or `train_config` (a train-sae YAML)")


def train_job(cfg):
    """The train-sae config of a job whose ``sae`` trains its SAEs (its name, runs_dir, model and W&B)."""
    from sae_training.config import TrainSAEConfig

    overrides = {**cfg.sae.train_overrides, "name": cfg.name, "runs_dir": cfg.runs_dir}
    from .splits import problem_sets

    train = load_config(TrainSAEConfig, cfg.sae.train_config, overrides)
    # the SAE never trains on a question the job attributes on or evaluates on (every split it names)
    exclude = [*train.data.exclude_tasks, *(t for t in problem_sets(cfg) if t not in train.data.exclude_tasks)]
    return dataclasses.replace(train, model=cfg.model, wandb=dataclasses.replace(train.wandb, enabled=cfg.wandb.enabled),
                               data=dataclasses.replace(train.data, exclude_tasks=exclude))


def sae_specs(cfg) -> list[SAESpec]:
    """The SAEs a job uses: those it loads, or those its SAE stage trains (one per layer)."""
    if cfg.sae.load:
        return cfg.sae.load
    train = train_job(cfg)
    return [SAESpec(path=str(train.run_dir / "sae" / f"layer_{layer}")) for layer in train.layers]


def sae_inputs(cfg) -> dict:
    """Digests of the SAE files a job loads from local paths."""
    return {spec.path: tree_digest([spec.path]) for spec in cfg.sae.load if spec.path}


def run_sae_stage(cfg) -> dict:
    if cfg.sae.load:
        from sae_training.data import check_corpus_disjoint

        from .splits import problem_sets

        for spec in cfg.sae.load:  # an SAE trained here never saw a question the job attributes or evaluates on
            if spec.path:
                check_corpus_disjoint(spec.path, problem_sets(cfg))
        return {"loaded": [dataclasses.asdict(s) for s in cfg.sae.load]}
    from sae_training import train

    return train(train_job(cfg))


SAE_STAGE = Stage(
    "sae", lambda c: (c.sae, sae_inputs(c), train_job(c) if not c.sae.load else None), run_sae_stage,
    outputs=lambda c: [] if c.sae.load else [train_job(c).run_dir / "sae"],
    stale=lambda c: [] if c.sae.load else [train_job(c).run_dir / p for p in ("checkpoints", "sae", "sae_eval.json")])
