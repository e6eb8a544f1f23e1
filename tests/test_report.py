"""Plots and the Markdown report (:mod:`ipg_sae.report`)."""

from __future__ import annotations

import numpy as np
import pytest

from ipg_sae.errors import IPGError
from ipg_sae.evaluation import EvalConfig, evaluate, summarize_samples
from ipg_sae.models import hidden_size, load_model
from ipg_sae.report import plot_score_histogram, plot_top_latents, write_report
from ipg_sae.sampling import SamplingConfig
from ipg_sae.tasks import TaskConfig, build_prompts, load_problems
from ipg_sae.tracking import Tracker, WandbConfig, read_offline_run
from tests.tiny import random_sae

FEATURES = [
    {"layer": "1", "latent": "3", "rank": "2", "mean": "0.20", "context": "so the total is $5 | wait"},
    {"layer": "1", "latent": "5", "rank": "1", "mean": "0.35", "context": ["Wait, let me check.\n again", "x"]},
    {"layer": "1", "latent": "9", "rank": "3", "mean": "-0.10", "context": ""},
]


def _png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_and_top_latents(tmp_path):
    rng = np.random.default_rng(0)
    assert _png(plot_score_histogram(np.append(rng.normal(size=(4, 50)), np.nan), tmp_path / "h.png"))
    assert _png(plot_score_histogram({"ipg": rng.normal(size=40), "act": rng.normal(size=40)}, tmp_path / "h2.png"))
    assert _png(plot_top_latents(FEATURES, tmp_path / "top.png"))  # "$" in a context must not break mathtext
    with pytest.raises(IPGError, match="no column 'score'"):
        plot_top_latents(FEATURES, tmp_path / "x.png", score_key="score")


def _synthetic_result(shift, reward="correctness", primary_metric="accuracy", reward_scale=1.0):
    """An evaluation result from synthetic samples: the target raises accuracy by ``shift`` at gamma 2 (and the
    reward, ``reward_scale`` times correctness, with it)."""
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(150)]
    p = rng.uniform(0.2, 0.6, len(ids))
    samples = []
    for name, gamma, lift in [("none", None, 0.0), ("ipg", 2.0, shift), ("random-draw0", 2.0, 0.0),
                              ("random-draw1", 2.0, 0.0)]:
        for seed in (0, 1):
            for i, pid in enumerate(ids):
                correct = int(rng.random() < p[i] + lift)
                samples.append({"cell": f"{name}-{seed}", "set": name, "gamma": gamma, "seed": seed, "problem_id": pid,
                                "sample_index": 0, "correct": correct, "reward": reward_scale * correct, "length": 20,
                                "parsed": 1, "repetition": 0, "empty": 0, "degenerate": 0})
    from ipg_sae.evaluation import EvalMeta, EvalResult

    meta = EvalMeta(estimator="sampling", null="uniform", problem_ids=ids, n_problems=len(ids), seeds=[0, 1],
                    gammas=[2.0], n_samples=1, samples_per_problem=2, target="ipg",
                    sets={"ipg": [[1, 3]], "random-draw0": [[1, 8]], "random-draw1": [[1, 9]]},
                    random_sets=["random-draw0", "random-draw1"], reward=reward, primary_metric=primary_metric,
                    primary_direction=1, scope="all", sampling={"temperature": 0.7, "max_new_tokens": 64}, task={},
                    n_bootstrap=500, confidence=0.95, model={"name": "synthetic"}, degenerate_rule={})
    rows, comparisons = summarize_samples(samples, meta)
    return EvalResult(rows, comparisons, samples, meta)


def test_verdict_states_what_the_interval_supports(tmp_path):
    strong = write_report(tmp_path / "a", _synthetic_result(0.3)).read_text()
    assert "`ipg` beats random sets at gamma 2" in strong and "150 problems x 2 seed(s)" in strong
    null = write_report(tmp_path / "b", _synthetic_result(0.0)).read_text()
    assert "does not beat random sets at any gamma" in null and "not evidence of no effect" in null


def test_a_user_reward_is_what_the_verdict_and_table_show(tmp_path):
    """A reward of another scale (here 0.01 per correct answer) is reported by its configured name, with enough
    digits to see it, and has its own columns beside accuracy and length."""
    result = _synthetic_result(0.3, reward="my_rewards:even", primary_metric="reward", reward_scale=0.01)
    text = write_report(tmp_path, result).read_text()
    comp = next(c for c in result.comparisons if c["metric"] == "reward" and c["against"] == "random")
    assert f"Paired difference in reward `my_rewards:even` between `ipg`" in text
    assert f"gamma 2: {comp['delta']:+.3g} [{comp['lo']:+.3g}, {comp['hi']:+.3g}]" in text
    assert abs(comp["delta"]) > 1e-3 and "-0.0 [-0.1, +0.0]" not in text
    assert "| set | gamma | reward `my_rewards:even` [CI] | Δ reward vs none [CI] | accuracy [CI] |" in text
    assert "`ipg` beats random sets at gamma 2" in text and "reward `my_rewards:even` higher for gamma > 1" in text


def test_report_end_to_end_on_tiny_model(tiny_llama_dir, tmp_path):
    model, tok = load_model(str(tiny_llama_dir))
    task = TaskConfig(n_problems=2, offset=200, few_shot=0)
    problems = load_problems(task)
    prompts = build_prompts(tok, problems, task)
    saes = {1: random_sae("topk", hidden_size(model), 1, d_sae=32, k=4)}
    cfg = EvalConfig(gammas=[0.0, 2.0], seeds=[0], n_random_sets=1, n_bootstrap=200, estimator="sampling",
                     sampling=SamplingConfig(n_samples=1, max_new_tokens=5, batch_size=4))
    run_dir = tmp_path / "run"
    evaluate(model, tok, saes, problems, prompts, {"ipg": [(1, 2), (1, 4)], "act": [(1, 6), (1, 8)]}, cfg,
             out_dir=run_dir / "eval", progress=False)
    (run_dir / "features.csv").write_text("layer,latent,rank,mean,context\n1,2,1,0.5,the answer\n1,4,2,0.3,wait\n")
    with Tracker(WandbConfig(mode="offline"), run_dir, "t", "report") as tracker:
        path = write_report(run_dir, scores=np.random.default_rng(0).normal(size=100), tracker=tracker)
    text = path.read_text()
    assert path == run_dir / "report.md"
    for expected in ("Held-out problems: **2**", "seeds [0] x 1 sample(s)", "| problems | seeds | samples |",
                     "does not beat random sets", "![accuracy_vs_gamma](plots/accuracy_vs_gamma.png)",
                     "## Top latents", "95% percentile bootstrap"):
        assert expected in text, expected
    for name in ("accuracy_vs_gamma", "length_vs_gamma", "attribution_scores", "top_latents"):
        assert _png(run_dir / "plots" / f"{name}.png"), name
    logged = read_offline_run(run_dir)
    keys = {k for row in logged["history"] for k in row}
    for key in ("report/accuracy_vs_gamma", "report/top_latents", "report/attribution_score_values", "eval/rows"):
        assert f"{key}/_type" in keys, key


def test_context_labels_escape_control_characters():
    from ipg_sae.report import _context_text

    assert _context_text("a\x0eb  c $5") == r"a\x0eb c \$5"


def test_report_of_the_importance_estimator(tiny_llama_dir, tmp_path):
    model, tok = load_model(str(tiny_llama_dir))
    task = TaskConfig(n_problems=2, offset=200, few_shot=0)
    problems = load_problems(task)
    saes = {1: random_sae("topk", hidden_size(model), 1, d_sae=32, k=4)}
    cfg = EvalConfig(gammas=[0.0, 2.0], seeds=[0], n_random_sets=2, n_bootstrap=200, estimator="importance",
                     sampling=SamplingConfig(n_samples=4, max_new_tokens=5, batch_size=8))
    run_dir = tmp_path / "run"
    evaluate(model, tok, saes, problems, build_prompts(tok, problems, task), {"ipg": [(1, 2), (1, 4)]}, cfg,
             out_dir=run_dir / "eval", progress=False)
    text = write_report(run_dir).read_text()
    for expected in ("**4** unsteered samples per problem", "Estimator: **importance**", "| ESS |",
                     "matched to the target's activation frequencies"):
        assert expected in text, expected
    ipg_rows = [line for line in text.splitlines() if line.startswith("| ipg |")]
    assert len(ipg_rows) == 2 and all("| 8 shared |" in line for line in ipg_rows)  # 2 problems x 4 samples
