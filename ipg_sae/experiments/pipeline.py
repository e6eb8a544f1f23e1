"""The main job: sample -> SAE (train or load) -> attribute -> select -> evaluate -> report -> explain -> explore.

The stages run through :func:`ipg_sae.experiments.stages.run_stages`. Every stage writes its outputs under ``runs/<name>/`` and, when it finishes, a marker
``stages/<stage>.json`` holding its key and the digests of the files it wrote. The key hashes
everything the outputs depend on: the stage's settings, the inputs that come from outside
the pipeline (the model's files, the SAEs it loads) and the digests of the files the stages
before it wrote, plus the result-format version. A rerun reuses a stage only when its key
matches and its output files are still the ones it wrote (and says so in the log), so a
killed pipeline resumes at the first unfinished stage, changing a setting or an input
reruns only what depends on it, and an edited output is never built upon. Inside a stage,
SAE training, attribution and evaluation resume from their own checkpoints. Each stage is
one W&B run; all of them share the group ``<name>``.

The explain stage explains and scores the latents the explorer gives a full panel (``explanations/``, with
``explanations/features.csv``: the feature table with the explanation columns); the explore stage comes after it,
so the page shows them and a rerun of explain rebuilds the page.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..explain_run import run_explain
from ..explanations import OUT as EXPLANATIONS
from ..explorer import panel_latents
from ..jobs import (AttributeJobConfig, EvaluateJobConfig, ExploreJobConfig, SampleJobConfig, method_dir,
                    run_attribute, run_evaluate, run_explore, run_sample)
from ..provenance import PROVENANCE_FILE, write_provenance
from ..rewards import get_reward
from ..saes import SAELoad
from ..tracking import attribution_files
# the settings live torch-free in pipeline_config (`ipg-sae pipeline --help`, a config's typo); re-exported here
from .pipeline_config import PipelineConfig
from .stages import SAE_STAGE, Stage, model_files, model_inputs, run_job_stages, sae_specs, task_files

log = logging.getLogger(__name__)


# ---- stages ---------------------------------------------------------------------------


def _sample_job(cfg: PipelineConfig) -> SampleJobConfig:
    return SampleJobConfig(name=cfg.name, runs_dir=cfg.runs_dir, model=cfg.model, task=cfg.task,
                           sampling=cfg.sampling, reward=cfg.reward, wandb=cfg.wandb)


def _attribute_job(cfg: PipelineConfig) -> AttributeJobConfig:
    return AttributeJobConfig(name=cfg.name, runs_dir=cfg.runs_dir, model=cfg.model, sae=SAELoad(sae_specs(cfg)),
                              attribution=cfg.attribution, baselines=cfg.baselines, selection=cfg.selection,
                              wandb=cfg.wandb)


def _evaluate_job(cfg: PipelineConfig) -> EvaluateJobConfig:
    sets = {"ipg": str(method_dir(cfg.run_dir, "ipg") / "selection.json")}
    steered = cfg.evaluate_baselines if cfg.evaluate_baselines is not None else cfg.baselines
    sets.update({b: str(method_dir(cfg.run_dir, b) / "selection.json") for b in steered if b != "random"})
    evaluation = dataclasses.replace(cfg.evaluation, k=cfg.evaluation.k or cfg.selection.k, reward=cfg.reward)
    return EvaluateJobConfig(name=cfg.name, runs_dir=cfg.runs_dir, model=cfg.model, sae=SAELoad(sae_specs(cfg)), sets=sets,
                             attribution_dir=str(cfg.run_dir), evaluation=evaluation, wandb=cfg.wandb)


def _run_evaluate(cfg: PipelineConfig) -> dict:
    result, report = run_evaluate(_evaluate_job(cfg), group=cfg.name)
    return {"report": str(report), "comparisons": result.comparisons}


def _run_attribute(cfg: PipelineConfig) -> dict:
    summaries = run_attribute(_attribute_job(cfg), group=cfg.name)
    write_provenance(cfg.run_dir, cfg.task, sae_specs(cfg), get_reward(cfg.reward).identity)
    return summaries


def _attribution_outputs(c: PipelineConfig) -> list[Path]:
    files = [f for method in ["ipg", *c.baselines] for f in attribution_files(method_dir(c.run_dir, method))]
    return files + [c.run_dir / PROVENANCE_FILE]


def _run_explain(cfg: PipelineConfig) -> dict:
    """Explain exactly the latents the explore stage will give a full panel (so the cost follows
    ``explorer.detail``); the run's own ``features.csv`` stays the attribute stage's output."""
    if not cfg.explain.enabled:
        return {"enabled": False}
    job = cfg.explain.job(cfg.run_dir, cfg.wandb, cfg.model.trust_remote_code)
    summary = run_explain(job, group=cfg.name, groups=panel_latents(cfg.run_dir, cfg.explorer.detail))
    return {"n_latents": summary["n_latents"], "seconds": summary["seconds"], "groups_mean": summary["groups_mean"],
            "table": str(cfg.run_dir / EXPLANATIONS / "features.csv")}


STAGES = [
    Stage("sample", lambda c: run_sample(_sample_job(c)), outputs=lambda c: [c.run_dir / "trajectories.jsonl"],
          fields=("model", "task", "sampling", "reward"), files=lambda c: [*model_files(c), *task_files(c.task)],
          identity=lambda c: (model_inputs(c), get_reward(c.reward).identity)),
    SAE_STAGE,
    Stage("attribute", _run_attribute, outputs=_attribution_outputs,
          fields=("attribution", "baselines", "selection")),
    Stage("evaluate", _run_evaluate, outputs=lambda c: [c.run_dir / "eval" / "summary.json", c.run_dir / "report.md"],
          fields=("evaluation", "evaluate_baselines"), files=lambda c: task_files(c.evaluation.task)),
    # After evaluate (each stage's key holds the stages before it): changing an explain setting reruns the explain
    # and explore stages only, never the evaluation. Its files are resumable partial work: stale once its key changes.
    Stage("explain", _run_explain, outputs=lambda c: [c.run_dir / EXPLANATIONS], fields=("explain", "explorer.detail"),
          stale=lambda c: [c.run_dir / EXPLANATIONS]),
    Stage("explore", lambda c: _run_explore(c),
          outputs=lambda c: [c.run_dir / "explorer" / "index.html", c.run_dir / "explorer" / "data.json"],
          fields=("explorer",)),
]


def _run_explore(cfg: PipelineConfig) -> dict:
    page = run_explore(ExploreJobConfig(run_dir=str(cfg.run_dir), explorer=cfg.explorer, wandb=cfg.wandb),
                       group=cfg.name)
    return {"explorer": str(page)}


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage not already finished with the same settings; return each stage's summary."""
    evaluation = _evaluate_job(cfg).evaluation
    return run_job_stages(cfg, STAGES, "pipeline_config.yaml", [
        (cfg.task, cfg.sampling.max_new_tokens, "sampling.max_new_tokens"),
        (evaluation.task, evaluation.sampling.max_new_tokens, "evaluation.sampling.max_new_tokens")])
