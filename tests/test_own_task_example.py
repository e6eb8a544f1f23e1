"""Issue 39.5: docs/own-model.md's CPU-sized example (examples/own_task: a JSONL task, an own reward built on
`ipg_sae.rewards.extract_answer` / `answers_match`, a local SAE path) runs end to end through the command line as
documented, with only the model and the SAE path replaced by the tiny ones (and its sizes shrunk)."""

import json
import sys
from pathlib import Path

import yaml

from ipg_sae.cli import main
from tests import tiny

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_task"


def test_the_own_task_example_runs_as_documented(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(EXAMPLE.parent.parent)  # paths in the example are relative to the repository root
    monkeypatch.syspath_prepend(str(EXAMPLE))  # PYTHONPATH=examples/own_task, as the doc says
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # another test's my_rewards is not this one
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    doc = (Path("docs") / "own-model.md").read_text()
    assert "examples/own_task/pipeline.yaml" in doc and "PYTHONPATH=examples/own_task" in doc
    overrides = ["--name", "own", "--runs_dir", str(tmp_path / "runs"), "--model.name", str(tiny_llama_dir),
                 "--sae.load", json.dumps([{"path": str(sae_dir)}]),
                 "--task.n_problems", "3", "--sampling.n_samples", "4", "--sampling.max_new_tokens", "6",
                 "--attribution.max_nodes", "5", "--selection.k", "2", "--selection.n_bootstrap", "5",
                 "--evaluation.task.n_problems", "2", "--evaluation.sampling.max_new_tokens", "6",
                 "--evaluation.seeds", "[0]", "--evaluation.n_random_sets", "1", "--evaluation.n_bootstrap", "200"]
    assert main(["pipeline", "examples/own_task/pipeline.yaml", *overrides]) == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "own"
    assert (run / "report.md").is_file() and (run / "explorer" / "index.html").is_file()
    kept = yaml.safe_load((run / "pipeline_config.yaml").read_text())
    assert kept["reward"] == "my_rewards:reward" and kept["task"]["path"] == "examples/own_task/problems.jsonl"
    rewards = {json.loads(line)["reward"] for line in (run / "trajectories.jsonl").read_text().splitlines()}
    assert rewards <= {1.0, 0.0, -0.5}  # the example's own reward scored the samples


def test_the_example_config_loads_as_shipped(monkeypatch):
    """Unchanged (the default model, runs/demo's SAE), the example's config and reward pass every check on load."""
    from ipg_sae.config import load_config
    from ipg_sae.experiments.pipeline import PipelineConfig
    from ipg_sae.rewards import get_reward

    monkeypatch.chdir(EXAMPLE.parent.parent)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # another test's my_rewards is not this one
    cfg = load_config(PipelineConfig, "examples/own_task/pipeline.yaml")
    assert cfg.sae.load[0].path == "runs/demo/sae/layer_15" and cfg.task.path == "examples/own_task/problems.jsonl"
    fn = get_reward(cfg.reward)
    assert [fn.score("q", c, "43", 3).reward for c in ("#### 43", "It is 42.", "no idea")] == [1.0, 0.0, -0.5]
