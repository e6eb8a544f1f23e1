"""End to end on the real offline default model (SmolLM2-135M-Instruct from its PyPI GGUF)."""

import pytest

pytestmark = pytest.mark.slow


def test_default_model_samples_and_scores(tmp_path, monkeypatch):
    from ipg_sae.cli import main
    from ipg_sae.io import read_json
    from ipg_sae.trajectories import load_trajectories

    monkeypatch.setenv("WANDB_MODE", "offline")
    rc = main(["sample", "configs/sample_default.yaml", "--name", "e2e", "--runs_dir", str(tmp_path),
               "--task.n_problems", "4", "--sampling.n_samples", "2", "--sampling.max_new_tokens", "48"])
    assert rc == 0
    trajs = load_trajectories(tmp_path / "e2e" / "trajectories.jsonl")
    assert len(trajs) == 8
    # a real instruct model answers in the requested format most of the time
    assert sum(t.parsed for t in trajs) >= 4
    assert all(t.model["name"] == "smollm2-135m-instruct" for t in trajs)
    metrics = read_json(tmp_path / "e2e" / "sample_summary.json")["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] == 8
