"""The jobs behind the CLI: each takes one typed config and writes ``runs/<name>/``.

Jobs own orchestration only (files, W&B, printing); the work is done by the library
modules, so everything a job does can also be called from a notebook.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import dump_yaml, to_dict
from .errors import IPGError
from .io import write_json, write_text
from .models import ModelConfig, load_model
from .rewards import summarize
from .sampling import SamplingConfig, sample
from .tasks import TaskConfig, build_prompts, load_problems
from .tracking import Tracker, WandbConfig
from .trajectories import Trajectory, save_trajectories

log = logging.getLogger(__name__)


@dataclass
class SampleJobConfig:
    name: str = "sample"
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: str = "correctness"  # correctness | length | neg_length | module.path:function
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


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
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "sample_config.yaml", dump_yaml(cfg))
    problems = load_problems(cfg.task)
    model, tokenizer = load_model(cfg.model)
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
    return metrics
