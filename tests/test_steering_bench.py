"""The steering benchmark (``ipg-sae steering-bench``) end to end on a tiny model: every method through one
interface, dev-only choices (perturbing the test split changes no choice), on-policy test and transfer effects
paired with the unsteered run, capability costs, the report; overlapping splits refused before any work."""

from __future__ import annotations

import json
import logging

import pytest

from ipg_sae.config import load_config
from ipg_sae.errors import IPGError
from ipg_sae.experiments.steering_bench import METHODS, SteeringBenchConfig, run_bench


def test_bench_runs_chooses_on_dev_only_and_reports(bench_cfg, caplog, stage_reads_declared):
    results = run_bench(bench_cfg)
    out = bench_cfg.run_dir / "bench"
    for name in ("tuning.json", "evaluation.json", "capability.json", "leaderboard.json", "report.md",
                 "gain_vs_cost.png", "diffmean.safetensors"):
        assert (out / name).is_file(), name
    tuning = json.loads((out / "tuning.json").read_text())
    drawn = ("ipg_step_permuted", "ipg_step_shuffled")  # the step's nulls: one choice per dev draw
    tuned = [*METHODS, "diffmean_layer"]  # the fixture adds DiffMean at another layer
    assert set(tuning["chosen"]) == {m for m in tuned if m not in drawn} | {f"{m}#{d}" for m in drawn
                                                                          for d in range(3)}
    for name in tuning["chosen"]:  # each method (draw) tried its whole grid, within the budget, and chose one
        rows = [r for r in tuning["rows"] if r["name"] == name]
        assert 1 <= len(rows) <= 4 and sum(bool(r.get("chosen")) for r in rows) == 1
        assert all(r["estimator"] in ("off-policy", "on-policy") for r in rows)
    assert all(r["estimator"] == "on-policy" for r in tuning["rows"] if r["method"] == "prompting")
    board = json.loads((out / "leaderboard.json").read_text())
    assert set(board["splits"]) == {"test", "transfer-1", "transfer-2"}
    assert len(json.loads((out / "evaluation.json").read_text())["splits"]["transfer-2"]["recipes"]["unsteered"]
               ["problems"]) == 4  # every problem of the user's file
    for split, rows in board["splits"].items():
        shown = drawn if split == "test" else drawn[:1]  # test_only: ipg_step_shuffled
        assert {n for n in rows if not n.endswith("@push")} == {
            "unsteered", *(m for m in tuned if m not in drawn), "random_direction", "random_latents",
            *(f"{m}#{d}" for m in shown for d in range(2))}  # 2 test draws
        for name, row in rows.items():
            assert 0 <= row["parse_failure"] <= 1 and 0 <= row["degenerate"] <= 1
            if name != "unsteered":
                assert row["effect"][1] <= row["effect"][0] <= row["effect"][2]
                assert 0 <= row["helped"] and 0 <= row["hurt"] and row["helped"] + row["hurt"] <= 1
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["splits"]["test"]["recipes"]["unsteered"]["problems"] == \
        evaluation["splits"]["test"]["recipes"]["ipg_topk"]["problems"]  # paired by problem
    cap = json.loads((out / "capability.json").read_text())
    assert cap["prompting"]["generic"]["kl"] == 0.0 and cap["diffmean"]["generic"]["kl"] > 0
    assert cap["diffmean"]["offtask"]["kl"] > 0 and cap["diffmean"]["offtask"]["tokens"] > 0  # off-task English
    assert "KL/token corpus (in-domain)" in (out / "report.md").read_text()
    matched = json.loads((out / "matched.json").read_text())  # push matching, on the off-task text
    assert matched["reference"] == "ipg_step" and matched["recipes"]
    for name, m in matched["recipes"].items():  # each within the stated tolerance of the step's KL, or flagged
        assert m["matched"] == (abs(m["kl"] - matched["target_kl"]) <= matched["rtol"] * matched["target_kl"])
        assert name in board["splits"]["test"]
    assert matched["recipes"]["ipg_step@push"]["matched"] and matched["recipes"]["diffmean@push"]["matched"]
    nulls = board["nulls"]["test"]  # the step against each null's test draws: rank and two-level bootstrap
    assert set(nulls) == {"ipg_step_permuted", "ipg_step_shuffled"}
    assert set(board["nulls"]["transfer-1"]) == {"ipg_step_permuted"}  # test_only: ipg_step_shuffled
    for t in nulls.values():
        assert len(t["draws"]) == 2 and t["rank_p"] in (1 / 3, 2 / 3, 1.0)
        assert t["difference"][1] <= t["difference"][0] <= t["difference"][2]
    report_text = (out / "report.md").read_text()
    assert "## The step against its nulls' draws (test)" in report_text and "## Matched push" in report_text
    assert "best IPG-based recipe" in board["answer"] and results["report"]["answer"] == board["answer"]
    report_md = (out / "report.md").read_text()
    assert "## test" in report_md
    assert f"| ipg_step - diffmean | {board['comparisons']['test']['ipg_step - diffmean'][0] * 100:+.1f}" in report_md
    from ipg_sae.tracking import read_offline_run  # the report's W&B run holds the leaderboard's numbers

    run = next(r for r in read_offline_run(bench_cfg.run_dir)["runs"] if "steering_bench/answer" in r["summary"])
    assert run["summary"]["steering_bench/answer"] == board["answer"]
    assert run["summary"]["steering_bench/test/ipg_step/effect"] == board["splits"]["test"]["ipg_step"]["effect"][0]
    assert {a["type"] for a in run["used"]} == {"model", "attribution"}  # lineage: the SAE and the attributions

    # A reader applies a shipped recipe folder to the user's file, paired with no steering, without attribution:
    # the same samples as the bench's own on-policy run of that recipe on that split (same prompts and seeds).
    from ipg_sae.cli import main

    recipe_dir = out / "recipes" / "ipg_step"
    assert (recipe_dir / "recipe.json").is_file() and (out / "recipes" / "sae" / "layer_2" / "cfg.json").is_file()
    assert (out / "recipes" / "diffmean" / "vectors.safetensors").is_file()
    user = bench_cfg.transfer[1]
    rc = main(["steer", str(recipe_dir), "--runs_dir", str(bench_cfg.run_dir), "--name", "applied", "--no-wandb",
               "--task.name", "jsonl", "--task.path", user.path, "--task.few_shot", "0", "--reward", bench_cfg.reward,
               "--sampling.n_samples", "2", "--sampling.max_new_tokens", "6", "--sampling.temperature", "0.7",
               "--sampling.batch_size", "12", "--seeds", "[1, 2]", "--n_bootstrap", "50"])
    assert rc == 0
    applied = json.loads((bench_cfg.run_dir / "applied" / "apply.json").read_text())
    bench_rows = evaluation["splits"]["transfer-2"]["recipes"]
    assert applied["steered"] == pytest.approx(bench_rows["ipg_step"]["reward"])
    assert applied["unsteered"] == pytest.approx(bench_rows["unsteered"]["reward"])
    assert applied["effect"][1] <= applied["effect"][0] <= applied["effect"][2]

    # Perturb the test data (other problems) and break its cached samples: no dev choice changes.
    before = (out / "tuning.json").read_bytes()
    for cell in (out / "cells").glob("test_*.jsonl"):
        cell.write_text("damaged\n")
    bench_cfg.test.offset = 250
    caplog.set_level(logging.INFO)
    run_bench(bench_cfg)
    assert (out / "tuning.json").read_bytes() == before
    assert any("stage tune: already done" in r.getMessage() for r in caplog.records)
    after = json.loads((out / "evaluation.json").read_text())["splits"]["test"]["recipes"]["unsteered"]["problems"]
    assert after != evaluation["splits"]["test"]["recipes"]["unsteered"]["problems"]


def test_the_null_test_ranks_the_step_among_the_draws():
    from ipg_sae.experiments.steering_bench.summary import null_test

    base = [0.0, 0.0, 0.0, 0.0]
    t = null_test([1.0, 1.0, 0.0, 0.0], [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]], base, 200)
    assert t["step"] == 0.5 and t["draws"] == [0.0, 0.25, 0.75] and t["rank_p"] == 2 / 4
    assert t["difference"][0] == pytest.approx(0.5 - (0.0 + 0.25 + 0.75) / 3)


def test_helped_and_hurt_count_problems_whose_mean_reward_rose_or_fell():
    from ipg_sae.experiments.steering_bench.summary import helped_hurt

    assert helped_hurt([1.0, 0.5, 0.0, 0.25], [0.5, 0.5, 0.25, 0.0]) == (0.5, 0.25)


def test_overlapping_splits_are_refused_before_any_work(tmp_path):
    task = {"name": "arithmetic", "n_problems": 10, "few_shot": 0}
    cfg = load_config(SteeringBenchConfig, None, {"runs_dir": str(tmp_path), "sae.load": [{"path": "x"}],
                                                  "task": task, "dev": {**task, "offset": 5},
                                                  "test": {**task, "offset": 100}, "transfer": [{**task, "offset": 200}]})
    with pytest.raises(IPGError, match="also in the attribution split"):
        run_bench(cfg)
    assert not any(tmp_path.iterdir())
    with pytest.raises(IPGError, match="grid.max_settings"):
        load_config(SteeringBenchConfig, None, {"runs_dir": str(tmp_path), "sae.load": [{"path": "x"}],
                                                "grid.max_settings": 3})


def test_shipped_configs_load_and_the_cpu_splits_are_disjoint():
    """The default model's benchmark: its dev, test and transfer windows share no question text with the study's
    attribution problems (level 1 repeats questions: the windows were chosen for it); the GPU config (the paper's
    setting) is validated as a config here, not run."""
    from ipg_sae.splits import disjoint_splits
    from ipg_sae.experiments.steering_bench import splits

    cpu = load_config(SteeringBenchConfig, "configs/steering_bench_smollm2.yaml")
    sizes = {name: len(problems) for name, problems in disjoint_splits(splits(cpu)).items()}
    assert sizes == {"attribution": 112, "dev": 50, "test": 100, "transfer-1": 100, "transfer-2": 100}
    gpu = load_config(SteeringBenchConfig, "configs/steering_bench_qwen25_math_gsm8k.yaml")
    assert gpu.model.name == "Qwen/Qwen2.5-Math-1.5B-Instruct" and gpu.test.name == "gsm8k"
    with pytest.raises(IPGError, match="steering_bench.problems_per_batch is 0"):  # on load, not when tuning starts
        load_config(SteeringBenchConfig, "configs/steering_bench_smollm2.yaml", {"problems_per_batch": 0})


def test_a_missing_reused_attribution_names_the_job_that_makes_it(bench_cfg, tmp_path):
    """Issue 36 item 12: reported before the sample and SAE stages run."""
    bench_cfg.attribution_dir = str(tmp_path / "runs" / "study" / "correctness")
    with pytest.raises(IPGError, match=r"no ipg attribution; run the job that makes it first .*ipg-sae study"):
        run_bench(bench_cfg)
    assert not (bench_cfg.run_dir / "stages").exists()


def test_a_reused_attribution_is_checked_for_its_problems_reward_and_saes(bench_cfg, tmp_path, stage_reads_declared):
    """Issue 36 items 1 and 2: an attribution made on the test split's problems, with another reward or with
    other SAEs is refused before any work, each in one line naming the field and the fix."""
    import dataclasses

    from ipg_sae.experiments.stages import run_stages
    from ipg_sae.experiments.steering_bench import STAGES
    from tests import tiny

    made = dataclasses.replace(bench_cfg, name="made", methods=["ipg_topk"], nulls=[])
    run_stages(made, STAGES[:3])  # sample, sae, attribute: an attribution run of `made.task`
    reuse = dict(name="reuse", attribution_dir=str(made.run_dir / made.reward), methods=["ipg_topk"], nulls=[],
                 task=dataclasses.replace(bench_cfg.task, offset=400))
    on_test = dataclasses.replace(bench_cfg, test=made.task, **reuse)  # its problems are the test split
    with pytest.raises(IPGError, match=r"attribution_dir .* was attributed on problem .* in the test split"):
        run_bench(on_test)
    assert not on_test.run_dir.exists()
    with pytest.raises(IPGError, match=r"attribution_dir .* was attributed with the reward .*not steering_bench.reward"):
        run_bench(dataclasses.replace(bench_cfg, reward="length", **reuse))
    other_sae = tmp_path / "other_sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=4).save_model(str(other_sae))
    other = dataclasses.replace(bench_cfg, sae=dataclasses.replace(bench_cfg.sae, load=[
        dataclasses.replace(bench_cfg.sae.load[0], path=str(other_sae))]), **reuse)
    with pytest.raises(IPGError, match=r"attribution_dir .* was made with other SAEs than steering_bench.sae"):
        run_bench(other)
    fits = dataclasses.replace(bench_cfg, **reuse)  # other problems, this reward, these SAEs: reused as it is
    results = run_bench(fits)
    assert results["sample"] == {"reused": fits.attribution_dir} and results["attribute"] == results["sample"]
    assert not (fits.run_dir / fits.reward).exists() and (fits.run_dir / "bench" / "leaderboard.json").is_file()
    assert any(p.startswith(str(made.run_dir)) for p in stage_reads_declared)  # read where it lies, declared


def test_the_offtask_text_ships_with_its_source_and_license_and_holds_20k_tokens():
    """Issue 37 item 5: at least 20,000 tokens of general English ship offline (counted here with a
    tokenizer-independent lower bound: words and punctuation marks; the slow test counts with the default model's
    tokenizer), in documents short enough that ``capability_max_tokens`` truncates none."""
    from importlib.resources import files

    from ipg_sae.capability import OFFTASK_FILE, offtask_texts, proxy_tokens

    header = [line for line in files("ipg_sae").joinpath(OFFTASK_FILE).read_text().splitlines() if line.startswith("#")]
    assert any("fortunes-min" in line for line in header) and any("Redistribution" in line for line in header)
    docs = offtask_texts()
    assert sum(proxy_tokens(d) for d in docs) >= 20_000 and max(len(d) for d in docs) <= 640
    assert not any(d.startswith("#") for d in docs) and offtask_texts(max_texts=3) == docs[:3]


@pytest.mark.slow
def test_the_offtask_text_holds_20k_tokens_of_the_default_tokenizer():
    from ipg_sae.capability import offtask_texts
    from ipg_sae.models import ModelConfig, load_tokenizer_and_config

    tokenizer, _ = load_tokenizer_and_config(ModelConfig())
    counts = [len(tokenizer(d)["input_ids"]) for d in offtask_texts()]
    assert sum(counts) >= 20_000 and max(counts) <= 256  # capability_max_tokens: no document truncated


def test_push_matching_hits_its_target_within_the_tolerance():
    """Issue 37 item 2: the bracketing bisection finds the multiple whose KL is within rtol of the target, on
    monotone curves of several shapes; an unreachable target is flagged, not faked."""
    from ipg_sae.experiments.steering_bench.push import match_push

    for curve in (lambda t: 0.01 * t ** 2, lambda t: 0.3 * (1 - 2.718 ** (-t)), lambda t: 1e-4 * t ** 3 + 0.002 * t):
        for target in (0.0005, 0.02, 0.1):
            m = match_push(curve, target, rtol=0.05)
            assert m.matched and abs(curve(m.t) - target) <= 0.05 * target, (target, m)
    m = match_push(lambda t: 0.01 * (1 - 2.718 ** (-t)), 0.5, rtol=0.05)  # saturates below the target
    assert not m.matched and m.kl < 0.5


def test_replicates_draw_disjoint_problems_and_their_own_sae_seed():
    """Issue 37 item 3: each replicate's study and benchmark configs load (the documented commands' overrides);
    its attributed problems share no question with another replicate's, the study's held-out split or the
    benchmark's splits, and its SAE's corpus leaves them out; its SAE trains with its own seed. Nothing is run."""
    import dataclasses

    from ipg_sae.experiments.replicates import REPLICATES, bench_overrides, commands, study_overrides
    from ipg_sae.experiments.stages import train_job
    from ipg_sae.experiments.steering_bench import splits
    from ipg_sae.experiments.study import StudyConfig
    from ipg_sae.splits import disjoint_splits

    sets = {}
    for r in REPLICATES:
        study = load_config(StudyConfig, "configs/study_smollm2.yaml", study_overrides(r))
        bench = load_config(SteeringBenchConfig, "configs/steering_bench_smollm2.yaml", bench_overrides(r))
        assert bench.task == study.task and train_job(study).seed == (r if r else 0)
        sets[f"attribution-r{r}"] = study.task
        if r == 0:
            sets.update({k: t for k, t in splits(bench).items() if k != "attribution"}, heldout=study.heldout)
        assert commands(r)[0].startswith("ipg-sae study configs/study_smollm2.yaml")
        excluded = [dataclasses.asdict(t) if dataclasses.is_dataclass(t) else t
                    for t in train_job(study).data.exclude_tasks]
        assert dataclasses.asdict(study.task) in excluded  # its SAE's corpus leaves its attributed questions out
    disjoint_splits(sets)  # raises on any shared question
    from ipg_sae.digest import key_dict
    from ipg_sae.experiments.stages import SAESourceConfig

    assert "seed" not in key_dict(SAESourceConfig(train_config="x"))  # the published runs' SAE keys stay valid
    assert key_dict(SAESourceConfig(train_config="x", seed=1))["seed"] == 1
    assert "--sae.seed 1" in commands(1)[0] and "runs/study_r1/sae/layer_15" in commands(1)[1]
    import shlex

    from ipg_sae.cli import build_parser
    from ipg_sae.config import overrides_from_args

    for line, overrides in zip(commands(1), (study_overrides(1), bench_overrides(1))):  # the commands as typed
        argv = shlex.split(line)[1:]
        assert overrides_from_args(build_parser(argv[0]).parse_args(argv)) == overrides


def test_the_replicates_spread_reports_every_replicate_and_the_range():
    from ipg_sae.experiments.replicates import spread

    def board(step, topk, diff):
        return {"splits": {"test": {"ipg_step": {"effect": [step, step - 0.04, step + 0.04]},
                                    "ipg_topk": {"effect": [topk, topk - 0.04, topk + 0.04]}}},
                "comparisons": {"test": {"ipg_step - diffmean": [diff, diff - 0.05, diff + 0.05]}}}

    out = spread({0: board(0.12, 0.09, 0.12), 1: board(0.05, 0.02, 0.06), 2: board(0.08, 0.10, 0.07)})
    assert out["ipg_step effect"]["min"] == 0.05 and out["ipg_step effect"]["max"] == 0.12
    assert out["ipg_topk effect"]["mean"] == pytest.approx(0.07)
    assert out["ipg_step - diffmean"]["replicates"][1] == pytest.approx([0.06, 0.01, 0.11])
    assert "ipg_step - prompting" not in out
