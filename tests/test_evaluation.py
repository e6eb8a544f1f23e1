"""The evaluation harness (:mod:`ipg_sae.evaluation`).

Statistics are checked on synthetic outcomes with known differences; the harness itself on
a tiny random Llama (2 problems, a handful of tokens), counting ``generate`` calls to check
that a rerun resumes from finished cells.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ipg_sae.config import load_config
from ipg_sae.errors import IPGError
from ipg_sae.evaluation import EvalConfig, EvalResult, evaluate, is_repetitive, summarize_samples
from ipg_sae.models import hidden_size, load_model
from ipg_sae.nulls import LatentPool, uniform_sets
from ipg_sae.stats import bootstrap
from ipg_sae.sampling import SamplingConfig
from ipg_sae.tasks import TaskConfig, build_prompts, load_problems
from tests.tiny import random_sae

# ---- statistics -----------------------------------------------------------------------


def _simulate(rng, n, shift):
    p = rng.uniform(0.2, 0.7, n)
    return (rng.random(n) < p).astype(float), (rng.random(n) < p + shift).astype(float)


@pytest.mark.parametrize("shift", [0.0, 0.15])
def test_paired_bootstrap_covers_known_difference(shift):
    rng = np.random.default_rng(1)
    sims, covered = 300, 0
    for s in range(sims):
        base, steered = _simulate(rng, 80, shift)
        _, lo, hi = bootstrap(steered, base, n_boot=500, seed=s)
        covered += lo <= shift <= hi
    assert 0.90 <= covered / sims <= 0.985, covered / sims


def test_bootstrap_pairing_and_zero_difference():
    rng = np.random.default_rng(0)
    x = rng.random(50)
    assert bootstrap(x, x.copy()) == (0.0, 0.0, 0.0)  # identical conditions: exactly no difference
    # Pairing removes the shared per-problem variation: a constant shift has a degenerate interval.
    delta, lo, hi = bootstrap(x + 0.1, x)
    assert delta == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    mean, lo, hi = bootstrap(x)
    assert lo < mean < hi and mean == pytest.approx(x.mean())


def test_draws_add_variation():
    rng = np.random.default_rng(0)
    per_problem = rng.random(60)
    draws = per_problem + np.array([[-0.3], [0.0], [0.3]])  # three random sets with very different effects
    _, lo1, hi1 = bootstrap(draws.mean(0, keepdims=True))
    _, lo3, hi3 = bootstrap(draws)
    assert hi3 - lo3 > 2 * (hi1 - lo1)


def test_repetition_detector():
    assert is_repetitive([5] * 12)
    assert not is_repetitive([5] * 11)
    assert is_repetitive([1, 2, 3] * 4)  # a 3-gram loop, 12 tokens
    assert not is_repetitive([1, 2, 3] * 3 + [4, 5, 6])
    assert is_repetitive(list(range(30)) + [7, 8, 9, 10] * 4)  # a loop at the end
    assert not is_repetitive(list(range(100)))
    assert not is_repetitive([])
    assert is_repetitive([9] * 5, repeat_times=5, min_span=5)


def test_random_sets_match_layers_and_respect_active():
    saes = {1: random_sae("topk", 16, 1, d_sae=20), 3: random_sae("topk", 16, 3, d_sae=20)}
    template = [(1, 0), (1, 1), (3, 2)]
    active = {1: np.arange(20) < 10, 3: torch.arange(20) >= 15}
    draws = uniform_sets(template, 5, 0, LatentPool.of(saes, active=active))
    assert draws == uniform_sets(template, 5, 0, LatentPool.of(saes, active=active))  # deterministic: resumable
    for d in draws:
        assert sorted(l for l, _ in d) == [1, 1, 3]
        assert all(2 <= i < 10 for l, i in d if l == 1)  # active, and not the template's own latents
        assert all(i >= 15 for l, i in d if l == 3)
    with pytest.raises(IPGError, match="candidate latents"):
        uniform_sets(template, 1, 0, LatentPool.of(saes, active={1: np.arange(20) < 2, 3: np.ones(20)}))


def test_eval_config_loads_from_yaml(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("gammas: [0, 2]\nseeds: [1]\nk: 4\ntask: {offset: 500}\nsampling: {n_samples: 2}\n")
    cfg = load_config(EvalConfig, path)
    assert cfg.gammas == [0.0, 2.0] and cfg.k == 4 and cfg.task.offset == 500 and cfg.sampling.n_samples == 2
    with pytest.raises(IPGError, match="confidence"):
        load_config(EvalConfig, None, {"confidence": 1.5})


# ---- the harness on a tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    task = TaskConfig(n_problems=2, offset=100, few_shot=0)
    problems = load_problems(task)
    saes = {1: random_sae("topk", hidden_size(model), 1, d_sae=32, k=4)}
    return model, tok, problems, build_prompts(tok, problems, task), saes


def _cfg(**kw):
    return EvalConfig(**{"gammas": [0.0, 2.0], "seeds": [0], "n_random_sets": 1, "n_bootstrap": 200,
                         "sampling": SamplingConfig(n_samples=1, temperature=0.7, max_new_tokens=5, batch_size=4),
                         "estimator": "sampling", **kw})


SETS = {"ipg": [(1, 3), (1, 5)], "act": [(1, 7), (1, 9)]}


def _counting(model, monkeypatch):
    calls = []
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_evaluate_rows_and_resume(setup, tmp_path, monkeypatch):
    model, tok, problems, prompts, saes = setup
    calls = _counting(model, monkeypatch)
    out = tmp_path / "eval"
    result = evaluate(model, tok, saes, problems, prompts, SETS, _cfg(), out_dir=out, progress=False)
    assert len(calls) == 1 + 3 * 2  # base + (ipg, act, one random draw) x 2 gammas, one batch each
    assert len(list((out / "cells").glob("*.jsonl"))) == 7
    sets = [(r["set"], r["gamma"]) for r in result.rows]
    assert sets[0] == ("none", None)
    assert ("ipg", 2.0) in sets and ("random-draw0", 0.0) in sets and ("random (mean of 1)", 2.0) in sets
    ipg = next(r for r in result.rows if r["set"] == "ipg" and r["gamma"] == 0.0)
    assert ipg["n_problems"] == 2 and ipg["n_seeds"] == 1 and ipg["n_samples"] == 2
    for key in ("accuracy", "accuracy_lo", "accuracy_delta_hi", "length", "length_delta_lo", "degenerate"):
        assert key in ipg
    assert ipg["accuracy_lo"] <= ipg["accuracy"] <= ipg["accuracy_hi"]
    assert {c["against"] for c in result.comparisons} == {"random", "act"}
    assert len(result.samples) == 2 * 7

    # rerun: everything is loaded, nothing sampled
    again = evaluate(model, tok, saes, problems, prompts, SETS, _cfg(), out_dir=out, progress=False)
    assert len(calls) == 7 and again.rows == result.rows
    # a killed run: one cell missing -> only that one is sampled
    next((out / "cells").glob("ipg__g2__s0.*.jsonl")).unlink()
    evaluate(model, tok, saes, problems, prompts, SETS, _cfg(), out_dir=out, progress=False)
    assert len(calls) == 8
    # a new gamma adds cells; gamma = 1 reuses the base and samples nothing
    evaluate(model, tok, saes, problems, prompts, SETS, _cfg(gammas=[0.0, 2.0, 1.0]), out_dir=out, progress=False)
    assert len(calls) == 8
    # the same directory with other settings is recomputed, never silently reused (and the log says why)
    evaluate(model, tok, saes, problems, prompts, SETS,
             _cfg(sampling=SamplingConfig(n_samples=1, temperature=0.7, max_new_tokens=6, batch_size=4)),
             out_dir=out, progress=False)
    assert len(calls) == 8 + 7
    # back to the first settings: their cells were kept beside the others (content-addressed), so nothing is sampled
    evaluate(model, tok, saes, problems, prompts, SETS, _cfg(), out_dir=out, progress=False)
    assert len(calls) == 8 + 7

    # the summary can be recomputed from the saved per-sample table
    loaded = EvalResult.load(out)
    rows, comparisons = summarize_samples(loaded.samples, loaded.meta)
    assert rows == loaded.rows and comparisons == loaded.comparisons


def test_a_cell_computed_with_another_sae_or_edited_is_recomputed(setup, tmp_path, monkeypatch, caplog):
    import logging

    model, tok, problems, prompts, saes = setup
    calls = _counting(model, monkeypatch)
    out = tmp_path / "eval"
    cfg = _cfg(n_random_sets=0, gammas=[2.0])
    with caplog.at_level(logging.INFO, logger="ipg_sae"):
        evaluate(model, tok, saes, problems, prompts, {"ipg": SETS["ipg"]}, cfg, out_dir=out, progress=False)
        assert len(calls) == 2
        evaluate(model, tok, saes, problems, prompts, {"ipg": SETS["ipg"]}, cfg, out_dir=out, progress=False)
        assert len(calls) == 2 and "cell ipg__g2__s0: reused" in caplog.text
        other = {1: random_sae("topk", hidden_size(model), 1, d_sae=32, k=4, seed=9)}  # same width, other weights
        evaluate(model, tok, other, problems, prompts, {"ipg": SETS["ipg"]}, cfg, out_dir=out, progress=False)
        assert len(calls) == 3  # the steered cell is recomputed; the unsteered one does not depend on the SAE
        assert "computed with other saes; recomputing" in caplog.text
        cell = max((out / "cells").glob("ipg__g2__s0.*.jsonl"), key=lambda p: p.stat().st_mtime_ns)  # the newest
        lines = cell.read_text().splitlines()
        cell.write_text("\n".join(lines[:-1]) + "\n")  # one row removed, header kept
        result = evaluate(model, tok, other, problems, prompts, {"ipg": SETS["ipg"]}, cfg, out_dir=out,
                          progress=False)
        assert len(calls) == 4 and "does not match its recorded digest" in caplog.text
    target = next(r for r in result.rows if r["set"] == "ipg")
    assert target["n_samples"] == 2 and not math.isnan(target["accuracy"])  # never an `n/a` from a short cell


def test_length_reward_reports_length_and_accuracy(setup):
    model, tok, problems, prompts, saes = setup
    result = evaluate(model, tok, saes, problems, prompts, {"ipg": SETS["ipg"]},
                      _cfg(reward="length", gammas=[3.0], n_random_sets=1), progress=False)
    assert result.meta.primary_metric == "length"
    target = next(r for r in result.rows if r["set"] == "ipg")
    assert target["reward"] == pytest.approx(target["length"])  # the length reward is the generated length
    assert {"accuracy", "accuracy_delta", "length_delta"} <= set(target)
    assert {c["metric"] for c in result.comparisons} == {"accuracy", "length", "reward"}


def test_held_out_and_set_checks(setup):
    model, tok, problems, prompts, saes = setup
    with pytest.raises(IPGError, match="used for attribution"):
        evaluate(model, tok, saes, problems, prompts, SETS, _cfg(), attribution_prompt_ids=[problems[1].id],
                 progress=False)
    with pytest.raises(IPGError, match="the target set 'ipg' is not among"):
        evaluate(model, tok, saes, problems, prompts, {"act": SETS["act"]}, _cfg(), progress=False)
    with pytest.raises(IPGError, match="32 latents"):  # a set from a wider SAE
        evaluate(model, tok, saes, problems, prompts, {"ipg": [(1, 40)]}, _cfg(), progress=False)


def test_importance_estimator_scores_every_cell_on_one_set_of_samples(setup, tmp_path, monkeypatch):
    import ipg_sae.faithfulness as faithfulness

    model, tok, problems, prompts, saes = setup
    calls = _counting(model, monkeypatch)
    scored = []
    original = faithfulness.TrajectoryScorer.logprobs
    monkeypatch.setattr(faithfulness.TrajectoryScorer, "logprobs",
                        lambda self, ivs=(): scored.append(len(ivs)) or original(self, ivs))
    cfg = _cfg(estimator="importance", gammas=[0.0, 1.0, 2.0], n_random_sets=3,
               sampling=SamplingConfig(n_samples=4, temperature=0.7, max_new_tokens=5, batch_size=8))
    out = tmp_path / "eval"
    result = evaluate(model, tok, saes, problems, prompts, SETS, cfg, out_dir=out, progress=False)
    assert len(calls) == 1  # only the unsteered samples: every other cell is scored on them
    assert len(scored) == 1 + 5 * 2  # the base, then (ipg, act, 3 random) x (gamma 0, 2); gamma 1 needs no pass
    assert result.meta.estimator == "importance" and result.meta.samples_per_problem == 4
    rows = {(r["set"], r["gamma"]): r for r in result.rows}
    base = rows[("none", None)]
    one = rows[("ipg", 1.0)]
    assert one["accuracy"] == base["accuracy"] and one["length"] == base["length"] and one["ess"] == 1.0
    ipg = rows[("ipg", 2.0)]
    assert 0 < ipg["ess_min"] <= ipg["ess"] <= 1 and "ess_flag" in ipg
    assert set(result.meta.ess) >= {"ipg__g2__s-1", "random-draw2__g0__s-1"}
    # the random sets are frequency-matched: their latents fire on the held-out samples
    for name in result.meta.random_sets:
        assert len(result.meta.sets[name]) == 2 and not set(map(tuple, result.meta.sets[name])) & {(1, 3), (1, 5)}
    # a rerun reuses the saved cells; the summary is reproducible from samples.csv
    scored.clear()
    again = evaluate(model, tok, saes, problems, prompts, SETS, cfg, out_dir=out, progress=False)
    assert scored == [] and len(calls) == 1 and again.rows == result.rows
    loaded = EvalResult.load(out)
    rows2, comparisons2 = summarize_samples(loaded.samples, loaded.meta)
    assert rows2 == loaded.rows and comparisons2 == loaded.comparisons
    with pytest.raises(IPGError, match="full-support sampler"):
        _cfg(estimator="importance", sampling=SamplingConfig(n_samples=4, temperature=0.7, top_p=0.9)).validate()


def test_the_unsteered_cell_scores_what_sampling_scores(setup):
    """The held-out gap of the demo (6% evaluated vs 28% sampled) was not the harness: the same problems
    through `sample` and through the evaluation's unsteered cell, with the same settings, give the same
    samples and rewards."""
    from ipg_sae.sampling import sample

    model, tok, problems, prompts, saes = setup
    sampling = SamplingConfig(n_samples=3, temperature=0.7, max_new_tokens=6, batch_size=6, seed=4)
    sampled = sample(model, tok, problems, prompts, sampling, "correctness", progress=False)
    result = evaluate(model, tok, saes, problems, prompts, {"ipg": SETS["ipg"]},
                      _cfg(seeds=[4], sampling=sampling, n_random_sets=0), progress=False)
    base = [r for r in result.samples if r["set"] == "none"]
    assert [(r["problem_id"], r["sample_index"]) for r in base] == [(t.prompt_id, t.sample_index) for t in sampled]
    assert [r["length"] for r in base] == [len(t.completion_ids) for t in sampled]
    assert [r["correct"] for r in base] == [int(t.correct) for t in sampled]
