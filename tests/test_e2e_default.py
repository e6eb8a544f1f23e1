"""End to end on the real offline default model (SmolLM2-135M-Instruct from its PyPI GGUF)."""

import pytest
import torch

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


def test_default_model_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    """The demo's pipeline, shrunk: sample -> train an SAE on layer 15 -> IPG -> steer -> report,
    all on the real default model. The length reward guarantees reward variance in a group."""
    import json

    from ipg_sae.attribution import AttributionResult
    from ipg_sae.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    rc = main(["pipeline", "configs/demo.yaml", "--name", "e2e", "--runs_dir", str(tmp_path),
               "--reward", "length", "--task.n_problems", "2", "--sampling.max_new_tokens", "32",
               "--sae.train_config", "configs/sae_tiny.yaml",
               "--sae.train_overrides", '{"training_tokens": 16384, "checkpoint_every": 0, "threads": null}',
               "--attribution.n_steps", "4", "--baselines", '["act"]', "--evaluate_baselines", '["act"]',
               "--selection.k", "4", "--selection.n_bootstrap", "10",
               "--evaluation.gammas", "[0.0]", "--evaluation.seeds", "[0]", "--evaluation.n_random_sets", "1",
               "--evaluation.n_bootstrap", "200", "--evaluation.task.n_problems", "2",
               "--evaluation.sampling.max_new_tokens", "32"])
    assert rc == 0
    run_dir = tmp_path / "e2e"
    sae_eval = json.loads((run_dir / "sae_eval.json").read_text())["layers"]["15"]
    assert 0.0 < sae_eval["explained_variance"] <= 1.0 and sae_eval["l0"] <= 16
    result = AttributionResult.load(run_dir)
    assert result.n_prompts == 2 and bool(torch.isfinite(result.delta).all())
    assert (run_dir / "report.md").is_file() and (run_dir / "plots" / "accuracy_vs_gamma.png").is_file()
    out = capsys.readouterr().out
    assert "attribute: ipg: top latents L15:" in out and f"report: {run_dir / 'report.md'}" in out
