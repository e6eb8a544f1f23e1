"""The faithfulness study end to end on a tiny model: every stage, the report, the answer, resume."""

from __future__ import annotations

import json

import pytest

from ipg_sae.config import load_config
from ipg_sae.errors import IPGError
from ipg_sae.experiments.study import StudyConfig, run_study


def test_study_runs_reports_and_resumes(study_cfg, caplog, stage_reads_declared):
    import logging

    results = run_study(study_cfg)
    out = study_cfg.run_dir / "study"
    for name in ("scores.json", "confirm.json", "summary.json", "report.md",
                 "curves_tests.helpers_text_length_mod_7.png", "push_tests.helpers_text_length_mod_7.png",
                 "calibration.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    length = summary["rewards"]["tests.helpers:text_length_mod_7"]
    assert length["null_size"] == {"0.0": 4, "2.0": 4}
    binary = summary["rewards"]["tests.helpers:text_length_is_even"]
    assert binary["null_size"] == {"0.0": 3, "2.0": 3}
    for gamma in ("0.0", "2.0"):  # the controls: push-matched sets, the reward-permutation null, the sign control
        assert {kind: null["n"] for kind, null in binary["nulls"][gamma].items()} == {
            "frequency": 3, "push": 3, "policy": 3, "permutation": 3}
        for null in binary["nulls"][gamma].values():
            assert null["abs_log_ratio"] >= 0 and 0 <= null["parsed"] <= 1 and 0 <= null["degenerate"] <= 1
            assert null["first_order_change"] >= 0 and len(null["abs_log_ratios"]) == null["n"]
        assert binary["methods"]["ipg"][gamma]["first_order_change"] > 0  # the set's change, which the policy null matches
        ranks = binary["methods"]["ipg"][gamma]["nulls"]
        assert set(ranks) == {"frequency", "push", "policy", "permutation"}
        assert all(0 < r["p_value"] <= 1 for r in ranks.values())
        control = binary["sign_control"][gamma]
        assert control["lo"] <= control["effect"] <= control["hi"] and isinstance(control["as_predicted"], bool)
    report = (out / "report.md").read_text()
    assert "Controls at k 2" in report and "sign control" in report and "permutation null" in report
    assert "first-order" in report
    ipg = length["methods"]["ipg"]["2.0"]
    assert ipg["lo"] <= ipg["effect"] <= ipg["hi"] and 0 <= ipg["null_percentile"] <= 100 and 0 < ipg["p_value"] <= 1
    assert set(length["auc"]) == {"ipg", "act"}
    answer = summary["answer"]["tests.helpers:text_length_mod_7"]
    assert "IPG's top 2 latents" in answer and "matched random sets" in answer
    cells = summary["confirmation"]  # on-policy effects, paired with an unsteered run of the same seeds
    assert {c["why"] for c in cells} >= {"ipg headline", "best baseline", "sign control", "push null"}
    assert {c["gamma"] for c in cells} == {0.0, 2.0}
    assert sum(c["why"] == "push null" for c in cells) == 2 * 3  # confirm_null_sets (5) capped by the 3 drawn
    assert sum(c["why"] == "policy null" for c in cells) == 2 * 3
    for c in cells:
        effect, gap = c["on_policy_effect"], c["on_minus_off"]
        assert effect[1] <= effect[0] <= effect[2] and gap[1] <= gap[0] <= gap[2]
        assert c["samples"] == 3 * 2 * 4  # problems x confirm_samples x the 4 confirm_seeds
        assert 0 <= c["parsed"] <= 1 and 0 <= c["degenerate"] <= 1
    first, second = study_cfg.rewards
    assert {c["why"] for c in cells if c["reward"] == second} == {"ipg headline", "sign control"}  # other rewards
    for reward in (first, second):  # calibration per reward, over that reward's cells
        assert set(summary["calibration"][reward]) == {"slope", "intercept", "correlation", "cells"}
        assert summary["calibration"][reward]["cells"] == sum(c["reward"] == reward for c in cells)
    effect = {(c["set"], c["gamma"]): c["on_policy_effect"][0] for c in cells if c["reward"] == first}
    for c in summary["contrasts"]:  # IPG minus a group on-policy: the difference of their effects (same unsteered run)
        group = [e for (name, g), e in effect.items() if g == c["gamma"] and
                 next(x["why"] for x in cells if x["set"] == name and x["reward"] == first) == c["against"]]
        assert len(group) == c["sets"] and 1 <= c["rank"] <= c["sets"] + 1
        assert c["ipg_minus"][0] == pytest.approx(effect[("ipg-k2", c["gamma"])] - sum(group) / len(group))
    assert {c["against"] for c in summary["contrasts"]} == {"best baseline", "sign control", "push null",
                                                           "policy null", "permutation null"}
    check = summary["regeneration"]  # the evaluation path draws the held-out samples token for token
    assert check["samples"] == 3 * 3 and check["token_identical"] == 9 and check["differing"] == []
    assert check["stored_accuracy"] == check["regenerated_accuracy"]
    assert set(check["unsteered_accuracy_by_seed"]) == {str(s) for s in study_cfg.confirm_seeds}
    gap = check["unsteered_minus_heldout_accuracy"]
    assert gap[1] <= gap[0] <= gap[2]
    rows = (out / "confirm" / "tests.helpers_text_length_mod_7" / "samples.csv").read_text().splitlines()
    assert len(rows) - 1 >= 3 * 2 * 4 * (1 + len({(c["set"], c["gamma"]) for c in cells}))  # every cell's rows kept
    assert "## On-policy effects" in (out / "report.md").read_text()
    assert results["report"]["answer"] == summary["answer"]
    # a rerun reuses every stage
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_study(study_cfg)
    assert sum("already done" in r.getMessage() for r in caplog.records) == 8


def test_regeneration_check_finds_a_sample_that_differs(study_cfg):
    """The check compares tokens: one held-out sample edited on disk is reported, the others still match."""
    import numpy as np

    from ipg_sae.models import load_model
    from ipg_sae.experiments.common import reward_dir, sample_stage
    from ipg_sae.experiments.study.run import regeneration_check
    from ipg_sae.tasks import build_prompts, load_problems
    from ipg_sae.trajectories import load_trajectories, save_trajectories

    sample_stage(study_cfg, study_cfg.heldout, study_cfg.heldout_sampling, "heldout.jsonl")  # the heldout stage
    path = reward_dir(study_cfg, study_cfg.rewards[0]) / "heldout.jsonl"
    stored = load_trajectories(path)
    stored[4].completion_ids = stored[4].completion_ids[:-1] + [stored[4].completion_ids[-1] + 1]
    save_trajectories(path, stored)
    model, tokenizer = load_model(study_cfg.model)
    problems = load_problems(study_cfg.heldout)
    prompts = build_prompts(tokenizer, problems, study_cfg.heldout)
    check = regeneration_check(study_cfg, model, tokenizer, problems, prompts, [p.id for p in problems],
                               {"correct": np.full(len(problems), 0.5)})
    assert check["samples"] == 9 and check["token_identical"] == 8 and check["differing"] == [stored[4].id]


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
    with pytest.raises(IPGError, match="study.problems_per_batch is 0"):  # on load, not when scoring starts
        load_config(StudyConfig, None, {**base, "problems_per_batch": 0})
    with pytest.raises(IPGError, match="heldout split is also in the attribution split"):
        load_config(StudyConfig, None, {**base, "heldout.offset": 50})  # its window overlaps the attributed one
    assert not any(tmp_path.iterdir())


def test_shipped_study_config_loads_with_disjoint_splits():
    """The default model's study: its attributed and held-out windows share no problem (checked on load)."""
    from ipg_sae.experiments.study.config import splits
    from ipg_sae.splits import disjoint_splits

    cfg = load_config(StudyConfig, "configs/study_smollm2.yaml")
    assert {name: len(p) for name, p in disjoint_splits(splits(cfg)).items()} == {"attribution": 112, "heldout": 100}


def test_splits_too_dear_to_load_on_load_are_checked_before_the_first_stage(study_overrides, monkeypatch):
    """A hub dataset is not loaded to validate a config: its splits' overlap is refused by the run, before any work."""
    from ipg_sae.experiments import configs  # where check_splits_disjoint looks cheap_to_load up

    monkeypatch.setattr(configs, "cheap_to_load", lambda task: False)
    cfg = load_config(StudyConfig, None, {**study_overrides, "heldout.offset": 1})  # overlaps, yet loads
    with pytest.raises(IPGError, match="heldout split is also in the attribution split"):
        run_study(cfg)
    assert not (cfg.run_dir / "stages").exists()
