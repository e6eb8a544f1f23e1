"""What every experiment shares: the sampling and held-out stages (sampled once, scored with every reward), the
attribution of a run's trajectories (IPG and its baselines), and one wording of the checks of the settings they
read (SAEs, held-out sampling, contexts). An experiment builds its stage list from these and its own stages; no
experiment imports another.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ..attribution.path import has_variance
from ..errors import IPGError
from ..jobs import AttributeJobConfig, SelectionConfig, run_attribute
from ..models import load_model
from ..rewards import get_reward
from ..saes import SAELoad
from ..sampling import SamplingConfig, sample
from ..tasks import TaskConfig, build_prompts, load_problems
from ..trajectories import Trajectory, prompt_groups, save_trajectories
# the checks a config's validate runs live torch-free in configs.py; re-exported here for the experiments
from .configs import (cheap_to_load, check_importance_sampling, check_problems_per_batch,  # noqa: F401
                      check_sae, check_splits_disjoint)
from .stages import Stage, model_files, model_inputs, sae_specs, task_files

log = logging.getLogger(__name__)


def reward_dir(cfg, reward: str) -> Path:
    """Where one reward's samples and attributions live inside a run."""
    return cfg.run_dir / reward


def reward_identities(cfg) -> list[dict]:
    """The rewards' names and, for user functions, the digests of their code: stored rewards go stale with them."""
    return [get_reward(r).identity for r in cfg.rewards]


def with_reward(trajectories: list[Trajectory], reward: str) -> list[Trajectory]:
    """The same samples scored with another reward."""
    fn = get_reward(reward)
    out = []
    for t in trajectories:
        score = fn.score(t.prompt, t.completion, t.reference, len(t.completion_ids))
        out.append(dataclasses.replace(t, reward=score.reward))
    return out


def sample_stage(cfg, task: TaskConfig, sampling: SamplingConfig, filename: str, keep_mixed: int = 0) -> dict:
    """Sample once, score with every reward (``cfg.rewards``); with ``keep_mixed``, keep only the first prompts whose
    samples got different rewards (the ones attribution works on), per reward."""
    model, tokenizer = load_model(cfg.model)
    problems = load_problems(task)
    trajectories = sample(model, tokenizer, problems, build_prompts(tokenizer, problems, task), sampling,
                          "correctness")
    summary = {}
    for reward in cfg.rewards:
        scored = with_reward(trajectories, reward)
        ids, groups = prompt_groups([t.prompt_id for t in scored])
        mixed = [pid for pid, idx in zip(ids, groups) if has_variance([scored[i].reward for i in idx])]
        if keep_mixed:
            if not mixed:
                raise IPGError(f"no attribution prompt's samples got different {reward} rewards ({len(ids)} prompts x "
                               f"{sampling.n_samples} samples), and attribution needs reward variance; sample more "
                               "problems (task.n_problems) or more per problem (sampling.n_samples), or raise "
                               "sampling.temperature")
            keep = set(mixed[:keep_mixed])
            scored = [t for t in scored if t.prompt_id in keep]
            if len(keep) < keep_mixed:
                log.warning("only %d prompts have samples with different %s rewards (wanted %d); sample more "
                            "problems (task.n_problems)", len(keep), reward, keep_mixed)
        save_trajectories(reward_dir(cfg, reward) / filename, scored)
        summary[reward] = {"mean_reward": float(np.mean([t.reward for t in scored])),
                           "prompts_with_variance": len(mixed), "prompts_kept": len({t.prompt_id for t in scored})}
    summary["accuracy"] = float(np.mean([t.correct for t in trajectories]))
    summary["n"] = len(trajectories)
    return summary


def attribution_sampling_stage(reward_field: str, extra_fields: tuple[str, ...] = (),
                               run: Callable | None = None, outputs: Callable | None = None,
                               files: Callable = lambda c: []) -> Stage:
    """The ``sample`` stage: the attribution problems sampled and scored with every reward, only the first
    ``attribute_prompts`` prompts with reward variance kept (``reward_field``: ``rewards`` or ``reward``)."""
    return Stage(
        "sample", run or (lambda c: sample_stage(c, c.task, c.sampling, "trajectories.jsonl", c.attribute_prompts)),
        outputs=outputs or (lambda c: [reward_dir(c, r) / "trajectories.jsonl" for r in c.rewards]),
        fields=("model", "task", "sampling", reward_field, "attribute_prompts", *extra_fields),
        files=lambda c: [*model_files(c), *task_files(c.task), *files(c)],
        identity=lambda c: (model_inputs(c), reward_identities(c)))


HELDOUT_STAGE = Stage(
    "heldout", lambda c: sample_stage(c, c.heldout, c.heldout_sampling, "heldout.jsonl"),
    outputs=lambda c: [reward_dir(c, r) / "heldout.jsonl" for r in c.rewards], fields=("heldout", "heldout_sampling"),
    files=lambda c: task_files(c.heldout))
"""Held-out problems sampled from the unsteered policy (never attributed on), scored with every reward."""


def attribute(cfg, where: Path, baselines: list[str], k: int, *, trajectories: Path | None = None,
              attribution=None, table_size: int | None = None) -> dict:
    """IPG (in ``where``) and ``baselines`` (under ``where/baselines/``) on a run's trajectories (``where``'s own
    ``trajectories.jsonl`` unless given), each method's top ``k`` selected without bootstrap; the summaries."""
    selection = SelectionConfig(k=k, n_bootstrap=0, **({"table_size": table_size} if table_size else {}))
    job = AttributeJobConfig(name=where.name, runs_dir=str(where.parent), model=cfg.model, sae=SAELoad(sae_specs(cfg)),
                             trajectories=str(trajectories) if trajectories else None,
                             attribution=attribution or cfg.attribution, baselines=list(baselines),
                             selection=selection, wandb=cfg.wandb)
    return run_attribute(job, group=cfg.name)


def contexts(cfg) -> list:
    """The (task, max_new_tokens, field) pairs a job with attribution and held-out sampling checks first."""
    return [(cfg.task, cfg.sampling.max_new_tokens, "sampling.max_new_tokens"),
            (cfg.heldout, cfg.heldout_sampling.max_new_tokens, "heldout_sampling.max_new_tokens")]
