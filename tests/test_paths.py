"""The path comparison (``ipg-sae paths``) end to end on a tiny model: every stage, the numbers' meaning (a
single-latent removal equals a direct forward with that latent moved to its origin), the report, resume."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from ipg_sae.attribution import AttributionResult, advantages
from ipg_sae.config import load_config
from ipg_sae.errors import IPGError
from ipg_sae.models import block_hidden, decoder_layers, load_model, replace_block_hidden
from ipg_sae.experiments.origins import PathsConfig, agreement, origin_dir, run_paths
from ipg_sae.saes import load_saes
from ipg_sae.trajectories import load_trajectories


@pytest.fixture
def paths_cfg(tiny_llama_dir, tmp_path, monkeypatch):
    from tests import tiny

    monkeypatch.setenv("WANDB_MODE", "offline")
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    task = {"name": "arithmetic", "n_problems": 4, "few_shot": 0}
    overrides = {
        "name": "p", "runs_dir": str(tmp_path / "runs"), "model.name": str(tiny_llama_dir), "task": task,
        "sampling.n_samples": 3, "sampling.max_new_tokens": 6, "sae.load": [{"path": str(sae_dir)}],
        "attribution.delta_tol": 0.05, "attribution.max_nodes": 9, "reward": "tests.helpers:text_length_is_even",
        "heldout": {**task, "offset": 500}, "heldout_sampling.n_samples": 3, "heldout_sampling.max_new_tokens": 6,
        "ks": [1, 2], "top_latents": 3, "random_latents": 3, "single_heldout_problems": 3, "n_bootstrap": 100,
    }
    return load_config(PathsConfig, None, overrides)


def _objective_by_direct_forward(cfg, layer, latent, value):
    """``F(1) - F(latent moved to value)`` with a plain hook (the SAE encoded on the fly), no job code."""
    model, _ = load_model(cfg.model)
    sae = load_saes(cfg.sae.load, model)[layer]
    trajs = load_trajectories(cfg.run_dir / cfg.reward / "trajectories.jsonl")
    by_prompt = {}
    for t in trajs:
        by_prompt.setdefault(t.prompt_id, []).append(t)
    total = 0.0
    for group in by_prompt.values():
        A = advantages(torch.tensor([t.reward for t in group], dtype=torch.float64), cfg.attribution.advantage)
        for g, t in enumerate(group):
            logps = []
            for removed in (False, True):
                def hook(_m, _i, out):
                    x = block_hidden(out)
                    f = sae.encode(x)[..., latent]
                    shift = ((value - f)[..., None] * sae.W_dec[latent]).detach()
                    shift[:, 0] = 0  # each sequence's first token is never touched
                    return replace_block_hidden(out, x + shift)

                handle = decoder_layers(model)[layer].register_forward_hook(hook) if removed else None
                try:
                    ids = torch.tensor([t.prompt_ids + t.completion_ids])
                    with torch.no_grad():
                        lp = model(ids).logits.double().log_softmax(-1)
                finally:
                    if handle is not None:
                        handle.remove()
                P = len(t.prompt_ids)
                logps.append(float(lp[0, P - 1:-1].gather(-1, ids[0, P:, None]).sum()))
            total += float(A[g]) * (logps[0] - logps[1]) / (len(group) * len(by_prompt))
    return total


def test_paths_runs_reports_and_resumes(paths_cfg, caplog, stage_reads_declared):
    results = run_paths(paths_cfg)
    out = paths_cfg.run_dir / "paths"
    for name in ("single.json", "curves.json", "summary.json", "report.md", "single_latent.png", "curves.png"):
        assert (out / name).is_file(), name
    # the mean origin: the path starts at each latent's mean activation; completeness holds there too
    mean_ipg = AttributionResult.load(origin_dir(paths_cfg, "mean"))
    assert float(mean_ipg.origin[2].abs().sum()) > 0 and float(mean_ipg.delta.abs().max()) <= 0.05
    assert float(AttributionResult.load(origin_dir(paths_cfg, "zero")).origin[2].abs().sum()) == 0
    local = AttributionResult.load(origin_dir(paths_cfg, "mean") / "baselines" / "ipg_local")
    assert local.method_name == "ipg_local" and torch.equal(local.origin[2], mean_ipg.origin[2])
    single = json.loads((out / "single.json").read_text())
    for origin in ("zero", "mean"):
        rows = single["origins"][origin]["latents"]
        members = single["origins"][origin]["members"]
        assert set(members) == {"ipg", "ipg_local", "random"} and len(rows) == len({tuple(p) for ps in members.values()
                                                                                     for p in ps})
        row = max(rows, key=lambda r: abs(r["objective"]))
        want = row["origin_value"] if origin == "mean" else 0.0
        direct = _objective_by_direct_forward(paths_cfg, row["layer"], row["latent"], want)
        assert abs(direct) > 1e-4 and row["objective"] == pytest.approx(direct, rel=1e-3)
        assert len(row["heldout_per_problem"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    for origin in ("zero", "mean"):
        for method in ("ipg", "ipg_local"):
            for side in ("objective", "heldout"):
                entry = summary["per_latent"][origin][method][side]
                assert set(entry) == {"n", "spearman", "pearson", "sign"}
            curve = summary["sets"][origin][method]["0.0"]
            assert [r["k"] for r in curve["rows"]] == [1, 2]
            assert all(r["lo"] <= r["effect"] <= r["hi"] for r in curve["rows"])
    assert "Single-latent removals are best predicted by" in summary["answer"]
    assert "## Per latent" in (out / "report.md").read_text()
    assert results["report"]["answer"] == summary["answer"]
    from ipg_sae.tracking import read_offline_run  # the report's W&B run holds the summary's numbers

    run = next(r for r in read_offline_run(paths_cfg.run_dir)["runs"] if "paths/answer" in r["summary"])
    assert run["summary"]["paths/zero/ipg/heldout/spearman"] == summary["per_latent"]["zero"]["ipg"]["heldout"]["spearman"][0]
    assert {a["type"] for a in run["used"]} == {"model", "attribution"}
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_paths(paths_cfg)
    assert sum("already done" in r.getMessage() for r in caplog.records) == len(
        ["sample", "sae", "attribute", "heldout", "single", "curves", "report"])


def test_agreement_statistics():
    x = np.arange(10.0)
    out = agreement(x, 2 * x + 1, n_boot=200)
    assert out["spearman"][0] == pytest.approx(1.0) and out["pearson"][0] == pytest.approx(1.0)
    out = agreement(x - 4.5, -(x - 4.5), n_boot=200)
    assert out["spearman"][0] == pytest.approx(-1.0) and out["sign"][0] == 0.0
    assert out["spearman"][1] <= out["spearman"][0] <= out["spearman"][2]


def test_paths_config_is_checked_before_any_work(tmp_path):
    base = {"runs_dir": str(tmp_path), "sae.load": [{"path": "x"}]}
    with pytest.raises(IPGError, match="paths.origins"):
        load_config(PathsConfig, None, {**base, "origins": ["median"]})
    with pytest.raises(IPGError, match="paths.methods"):
        load_config(PathsConfig, None, {**base, "methods": ["ipg_local"]})
    with pytest.raises(IPGError, match="top_p 1"):
        load_config(PathsConfig, None, {**base, "heldout_sampling.top_p": 0.9})
    with pytest.raises(IPGError, match="paths.problems_per_batch is 0"):
        load_config(PathsConfig, None, {**base, "problems_per_batch": 0})
    with pytest.raises(IPGError, match="heldout split is also in the attribution split"):
        load_config(PathsConfig, None, {**base, "heldout.offset": 50})
    assert not any(tmp_path.iterdir())
