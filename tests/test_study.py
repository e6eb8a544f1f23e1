"""The faithfulness study end to end on a tiny model: every stage, the report, the answer, resume."""

from __future__ import annotations

import json

import pytest

from ipg_sae.config import load_config
from ipg_sae.errors import IPGError
from ipg_sae.study import StudyConfig, run_study


def text_length_mod_3(prompt, completion, reference):
    """A second reward that varies between samples of a random model."""
    return float(len(completion) % 3)


@pytest.fixture
def study_cfg(tiny_llama_dir, tmp_path, monkeypatch):
    from tests import tiny

    monkeypatch.setenv("WANDB_MODE", "offline")
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    task = {"name": "arithmetic", "n_problems": 3, "few_shot": 0}
    overrides = {
        "name": "s", "runs_dir": str(tmp_path / "runs"), "model.name": str(tiny_llama_dir), "task": task,
        "sampling.n_samples": 3, "sampling.max_new_tokens": 6, "sae.load": [{"path": str(sae_dir)}],
        "attribution.delta_tol": 0.05, "attribution.max_nodes": 9,
        "rewards": ["tests.test_pipeline:text_length_mod_7", "tests.test_study:text_length_mod_3"],
        "methods": ["ipg", "act"],
        "heldout": {**task, "offset": 500}, "heldout_sampling.n_samples": 3, "heldout_sampling.max_new_tokens": 6,
        "k": 2, "ks": [1, 2], "null_sets": 4, "other_null_sets": 3, "curve_null_sets": 2, "confirm_samples": 2, "n_bootstrap": 200,
    }
    return load_config(StudyConfig, None, overrides)


def test_study_runs_reports_and_resumes(study_cfg, caplog):
    import logging

    results = run_study(study_cfg)
    out = study_cfg.run_dir / "study"
    for name in ("scores.json", "confirm.json", "summary.json", "report.md",
                 "curves_tests.test_pipeline_text_length_mod_7.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    length = summary["rewards"]["tests.test_pipeline:text_length_mod_7"]
    assert length["null_size"] == {"0.0": 4, "2.0": 4}
    assert summary["rewards"]["tests.test_study:text_length_mod_3"]["null_size"] == {"0.0": 3, "2.0": 3}
    ipg = length["methods"]["ipg"]["2.0"]
    assert ipg["lo"] <= ipg["effect"] <= ipg["hi"] and 0 <= ipg["null_percentile"] <= 100 and 0 < ipg["p_value"] <= 1
    assert set(length["auc"]) == {"ipg", "act"}
    answer = summary["answer"]["tests.test_pipeline:text_length_mod_7"]
    assert "IPG's top 2 latents" in answer and "matched random sets" in answer
    cells = summary["confirmation"]
    assert {c["why"] for c in cells} >= {"best", "worst"} and all(len(c["off_minus_on"]) == 3 for c in cells)
    assert "## On-policy confirmation" in (out / "report.md").read_text()
    assert results["report"]["answer"] == summary["answer"]
    # a rerun reuses every stage
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_study(study_cfg)
    assert sum("already done" in r.getMessage() for r in caplog.records) == 7


def test_study_config_is_checked_before_any_work(tmp_path):
    base = {"runs_dir": str(tmp_path), "sae.load": [{"path": "x"}]}
    with pytest.raises(IPGError, match="must be one of study.ks"):
        load_config(StudyConfig, None, {**base, "k": 3})
    with pytest.raises(IPGError, match="must include ipg"):
        load_config(StudyConfig, None, {**base, "methods": ["act"]})
    with pytest.raises(IPGError, match="top_p 1"):
        load_config(StudyConfig, None, {**base, "heldout_sampling.top_p": 0.9})
    with pytest.raises(IPGError, match="unknown reward"):
        load_config(StudyConfig, None, {**base, "rewards": ["correctnes"]})
    assert not any(tmp_path.iterdir())
