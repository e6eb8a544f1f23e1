"""Where a change goes, checked: a null registered with the study's registry and a recipe registered with the
benchmark's are drawn, scored, confirmed, tuned, evaluated and reported by a tiny study and a tiny benchmark; an
estimator registered in ``evaluation.ESTIMATORS`` and a kind of null in ``nulls.NULLS`` evaluate a tiny pipeline;
each with no other edit (``docs/architecture.md``, "Where a change goes")."""

from __future__ import annotations

import json

import pytest

from ipg_sae.config import load_config
from ipg_sae.errors import IPGError


@pytest.fixture
def toy_null():
    from ipg_sae.experiments.study import nulls

    entry = nulls.register(nulls.ControlNull("toy", "toy", 101, nulls.random_sets("uniform"), "toy random sets",
                                             default_sets=2))
    yield entry
    del nulls.NULLS["toy"]


@pytest.fixture
def toy_recipe():
    from ipg_sae.experiments.steering_bench import recipes
    from ipg_sae.selection import select
    from ipg_sae.steering import scale

    kind = recipes.register(recipes.RecipeKind(
        "toy_top1", "ipg", settings=lambda grid: [{"gamma": g} for g in grid.gammas],
        build=lambda method, s, ing: recipes.Recipe(method, s, scale(select(ing.results["ipg"], 1), s["gamma"])),
        attribution="ipg"))
    yield kind
    del recipes.KINDS["toy_top1"]


def test_a_registered_null_is_drawn_summarised_confirmed_and_reported(toy_null, study_overrides):
    from ipg_sae.experiments.study import StudyConfig, run_study

    cfg = load_config(StudyConfig, None, {**study_overrides, "null_counts": {"toy": 2}})
    run_study(cfg)
    out = cfg.run_dir / "study"
    first = cfg.rewards[0]
    scores = json.loads((out / "scores.json").read_text())
    assert {"toy0|k2", "toy1|k2"} <= set(scores["cells"][first])
    summary = json.loads((out / "summary.json").read_text())
    for gamma, nulls in summary["rewards"][first]["nulls"].items():
        assert nulls["toy"]["n"] == 2 and len(nulls["toy"]["effects"]) == 2
        assert "toy" in summary["rewards"][first]["methods"]["ipg"][gamma]["nulls"]  # IPG ranked in it
    assert any(c["why"] == "toy null" for c in summary["confirmation"])  # sampled on-policy
    report = (out / "report.md").read_text()
    assert "| toy null |" in report and "toy random sets" in report
    with pytest.raises(IPGError, match="study.null_counts"):
        load_config(StudyConfig, None, {**study_overrides, "null_counts": {"not_registered": 1}})


def test_a_registered_recipe_is_tuned_evaluated_and_compared(toy_recipe, bench_overrides):
    from ipg_sae.experiments.steering_bench import SteeringBenchConfig, run_bench

    cfg = load_config(SteeringBenchConfig, None, {**bench_overrides, "methods": ["ipg_topk", "diffmean", "toy_top1"],
                                                  "nulls": []})
    run_bench(cfg)
    out = cfg.run_dir / "bench"
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["chosen"]["toy_top1"] == {"gamma": 2.0}
    board = json.loads((out / "leaderboard.json").read_text())
    assert "toy_top1" in board["splits"]["test"] and "toy_top1 - diffmean" in board["comparisons"]["test"]
    assert "toy_top1" in (out / "report.md").read_text()


@pytest.fixture
def toy_estimator():
    """An estimator registered under a new name: the on-policy sampler's rows, each tagged, and its calls counted."""
    from ipg_sae import evaluation

    calls = []
    sampling = evaluation.ESTIMATORS["sampling"]

    def toy(harness, sets, active, progress):
        calls.append(sorted(sets))
        rows, all_sets, ess = sampling(harness, sets, active, progress)
        return rows, all_sets, ess

    evaluation.ESTIMATORS["toy"] = toy
    yield calls
    del evaluation.ESTIMATORS["toy"]


def test_a_registered_estimator_evaluates_a_tiny_pipeline(toy_estimator, pipeline_cfg):
    """One entry in ``evaluation.ESTIMATORS`` and ``eval.estimator`` names it: validated, dispatched to, saved with
    the result and reported, with no other edit."""
    from ipg_sae.evaluation import EvalConfig, EvalResult
    from ipg_sae.experiments.pipeline import run_pipeline

    pipeline_cfg.evaluation.estimator = "toy"
    pipeline_cfg.validate()
    run_pipeline(pipeline_cfg)
    assert toy_estimator and "ipg" in toy_estimator[0]  # evaluate dispatched to it
    result = EvalResult.load(pipeline_cfg.run_dir / "eval")
    assert result.meta.estimator == "toy" and result.rows
    assert (pipeline_cfg.run_dir / "report.md").is_file()
    with pytest.raises(IPGError, match="eval.estimator 'not_registered' is not a registered estimator; give one of "
                                       "importance, sampling, toy"):
        load_config(EvalConfig, None, {"estimator": "not_registered"})
    with pytest.raises(IPGError, match="eval.estimator 'importnce' is not a registered estimator "
                                       r"\(did you mean `importance`\?\)"):
        load_config(EvalConfig, None, {"estimator": "importnce"})


@pytest.fixture
def toy_library_null():
    """A kind of null registered in the library's ``nulls.NULLS``: uniform draws, its calls counted."""
    from ipg_sae import nulls

    calls = []

    def toy(template, n, seed, pool):
        calls.append(n)
        return nulls.uniform_sets(template, n, seed, pool)

    nulls.NULLS["toy"] = toy
    yield calls
    del nulls.NULLS["toy"]


def test_a_registered_kind_of_null_is_drawn_by_a_tiny_pipeline(toy_library_null, pipeline_cfg):
    """One entry in ``nulls.NULLS`` and ``eval.null`` names it: validated, drawn and recorded, with no other edit."""
    from ipg_sae.evaluation import EvalConfig, EvalResult
    from ipg_sae.experiments.pipeline import run_pipeline

    pipeline_cfg.evaluation.estimator, pipeline_cfg.evaluation.null = "sampling", "toy"
    pipeline_cfg.validate()
    run_pipeline(pipeline_cfg)
    assert toy_library_null == [pipeline_cfg.evaluation.n_random_sets]  # the random sets came from it
    assert EvalResult.load(pipeline_cfg.run_dir / "eval").meta.null == "toy"
    with pytest.raises(IPGError, match="eval.null 'not_registered' is not a registered null; give one of uniform, "
                                       "frequency, push, policy, toy"):
        load_config(EvalConfig, None, {"null": "not_registered"})
    with pytest.raises(IPGError, match=r"eval.null 'frequncy' is not a registered null \(did you mean `frequency`\?\)"):
        load_config(EvalConfig, None, {"null": "frequncy"})
