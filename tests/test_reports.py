"""The experiments' report modules, on hand-made summaries (no job run): each renders what it is given, and the
answers' verdicts follow the intervals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def _bench_row(effect, accuracy=0.5):
    return {"reward": accuracy, "accuracy": accuracy, "length": 20.0, "parse_failure": 0.1, "degenerate": 0.0,
            "effect": list(effect), "length_effect": [1.0, -0.5, 2.5]}


def _bench_summary(ipg_minus_diffmean):
    unsteered = {k: v for k, v in _bench_row([0, 0, 0]).items() if k not in ("effect", "length_effect")}
    rows = {"unsteered": unsteered, "ipg_topk": _bench_row([0.10, 0.05, 0.15], 0.6),
            "diffmean": _bench_row([0.02, -0.01, 0.05], 0.52)}
    tuning = {"dev_problems": 50, "min_ess": 0.5, "rows": [
        {"method": "ipg_topk", "label": "ipg_topk k=4,gamma=2.0", "effect": 0.12, "estimator": "off-policy",
         "ess": 0.8, "chosen": True},
        {"method": "diffmean", "label": "diffmean alpha=0.1", "effect": 0.03, "estimator": "on-policy",
         "chosen": True}]}
    from ipg_sae.experiments.steering_bench.summary import FORMAT, BenchSummary

    return BenchSummary.from_json({
            "splits": {"test": rows, "transfer-1": {**rows, "ipg_topk": _bench_row([-0.04, -0.08, -0.01])}},
            "comparisons": {"test": {"ipg_topk - diffmean": list(ipg_minus_diffmean)}},
            "capability": {"ipg_topk": {"generic": {"kl": 0.01, "ppl_ratio": 1.02}, "corpus": {"kl": 0.02}},
                           "diffmean": {"generic": {"kl": 0.05, "ppl_ratio": 1.1}, "corpus": {"kl": 0.04}}},
            "dev": tuning, "recipes": {"ipg_topk": {"label": "ipg_topk k=4,gamma=2.0"},
                                       "diffmean": {"label": "diffmean alpha=0.1"}}, "answer": "", "format": FORMAT})


BENCH_CFG = SimpleNamespace(reward="correctness", methods=["ipg_topk", "diffmean"], eval_seeds=[1, 2],
                            eval_sampling=SimpleNamespace(n_samples=4), grid=SimpleNamespace(max_settings=12))


@pytest.mark.parametrize("diff, verdict", [([0.08, 0.02, 0.14], "beats diffmean"),
                                           ([0.08, -0.02, 0.14], "does not separate from diffmean"),
                                           ([-0.08, -0.12, -0.02], "loses to diffmean")])
def test_the_bench_answer_follows_the_paired_interval(diff, verdict):
    from ipg_sae.experiments.steering_bench.report import answer

    text = answer(BENCH_CFG, _bench_summary(diff))
    assert text.startswith("On test, the best IPG-based recipe is ipg_topk (ipg_topk k=4,gamma=2.0; chosen by its "
                           "dev effect")
    assert verdict in text and "On transfer-1 it reverses: -4.0 [-8.0, -1.0] points." in text


def test_the_bench_answer_picks_its_best_ipg_recipe_on_dev_not_on_test():
    """Issue 37 item 8: of two IPG-based recipes, the one with the larger dev effect is "best" even where the other
    has the larger test effect."""
    from ipg_sae.experiments.steering_bench.report import answer, best_on_dev

    summary = _bench_summary([0.08, 0.02, 0.14])
    summary.splits["test"]["ipg_step"] = summary.splits["test"]["ipg_topk"].__class__(
        **{**_bench_row([0.30, 0.20, 0.40], 0.8)})  # far better on test ...
    summary.recipes["ipg_step"] = {"label": "ipg_step eta=1.0"}
    summary.dev["rows"].append({"method": "ipg_step", "name": "ipg_step", "label": "ipg_step eta=1.0", "effect": 0.01,
                                "estimator": "off-policy", "ess": 0.9, "chosen": True})  # ... but worse on dev
    assert best_on_dev(summary, ["ipg_topk", "ipg_step"]) == "ipg_topk"
    summary.splits["transfer-1"]["ipg_step"] = summary.splits["test"]["ipg_step"]
    assert answer(BENCH_CFG, summary).startswith("On test, the best IPG-based recipe is ipg_topk")
    summary.dev["rows"][-1]["effect"] = 0.5  # now best on dev: chosen, whatever test says
    assert best_on_dev(summary, ["ipg_topk", "ipg_step"]) == "ipg_step"
    from ipg_sae.experiments.steering_bench.summary import Comparison

    summary.comparisons["test"].append(Comparison("ipg_step", "diffmean", [0.28, 0.2, 0.36]))
    summary.nulls = {"test": {"ipg_step_permuted": {"step": 0.3, "draws": [0.01, -0.02, 0.05, 0.0, 0.02],
                                                    "rank_p": 1 / 6, "difference": [0.29, 0.2, 0.38]}}}
    assert ("Against its own ipg_step_permuted null (5 draws, each tuned on dev) the step ranks p = 0.17, "
            "difference +29.0 [+20.0, +38.0]") in answer(BENCH_CFG, summary)


def test_the_bench_markdown_ranks_by_effect_and_lists_every_dev_choice():
    from ipg_sae.experiments.steering_bench.report import markdown

    summary = _bench_summary([0.08, 0.02, 0.14])
    summary.answer = "ANSWER"
    text = markdown(BENCH_CFG, summary)
    test = text[text.index("## test"):text.index("## transfer-1")]
    assert test.index("| 1 | ipg_topk |") < test.index("| 2 | diffmean |")
    assert "| ipg_topk - diffmean | +8.0 [+2.0, +14.0] |" in test and "**Answer.** ANSWER" in text
    assert "| ipg_topk | 1 | ipg_topk k=4,gamma=2.0 | +12.0 | off-policy | 0.80 |" in text
    assert "| diffmean | 1 | diffmean alpha=0.1 | +3.0 | on-policy | n/a |" in text


def test_the_bench_summary_round_trips_its_file(tmp_path):
    import json

    from ipg_sae.experiments.steering_bench.summary import BenchSummary

    summary = _bench_summary([0.08, 0.02, 0.14])
    doc = json.loads(summary.save(tmp_path / "leaderboard.json").read_text())
    assert "effect" not in doc["splits"]["test"]["unsteered"] and doc["comparisons"]["test"] == {
        "ipg_topk - diffmean": [0.08, 0.02, 0.14]}
    again = BenchSummary.load(tmp_path / "leaderboard.json")
    assert again.comparison("test", "ipg_topk", "diffmean").difference == [0.08, 0.02, 0.14]
    assert again.to_json() == summary.to_json()


def _agreement(rho):
    from ipg_sae.experiments.origins.summary import Agreement

    return Agreement(10, [rho, rho - 0.1, rho + 0.1], [rho, rho - 0.2, rho + 0.2], [0.7, 0.6, 0.8])


def _origins_summary():
    from ipg_sae.experiments.origins.summary import Curve, CurveRow, OriginsSummary

    per_latent = {"zero": {"ipg": {"objective": _agreement(0.9), "heldout": _agreement(0.2)},
                           "ipg_local": {"objective": _agreement(0.5), "heldout": _agreement(0.6)}},
                  "mean": {"ipg": {"objective": _agreement(float("nan")), "heldout": _agreement(0.1)},
                           "ipg_local": {"objective": _agreement(0.3), "heldout": _agreement(0.4)}}}

    def curve(auc):
        return Curve([CurveRow(1, 0.5, -0.01, -0.02, 0.0, 0.9), CurveRow(4, 0.4, -0.1, -0.15, -0.05, 0.7)], auc)

    sets = {o: {"ipg": {0.0: curve(-0.2 if o == "mean" else -0.05), 2.0: curve(0.01)},
                "ipg_local": {0.0: curve(-0.03), 2.0: curve(0.01)}} for o in ("zero", "mean")}
    return OriginsSummary("", per_latent, sets, 0.5, 12, 6, 8, 8, ["zero", "mean"], ["ipg", "ipg_local"])


def test_the_origin_answer_and_markdown_name_the_best_path():
    from ipg_sae.experiments.origins.report import markdown
    from ipg_sae.experiments.origins.summary import answer

    cfg = SimpleNamespace(origins=["zero", "mean"], methods=["ipg", "ipg_local"], ks=[1, 4], gammas=[0.0, 2.0],
                          top_latents=8, random_latents=8)
    summary = _origins_summary()
    summary.answer = text = answer(summary)
    assert "best predicted by ipg from the zero origin on the attribution objective (Spearman 0.90)" in text
    assert "by ipg_local from the zero origin on held-out reward (Spearman 0.60)" in text
    assert "steepest deletion curve on held-out problems is ipg from the mean origin (mean effect over k -20.0" in text
    md = markdown(cfg, summary, {"attributed_trajectories": 40, "heldout_problems": 6})
    assert "| zero | ipg | 10 | 0.90 [0.80, 1.00] |" in md and "| mean | ipg | 10 | n/a |" in md
    assert "Held-out accuracy without steering 50.0% (12 problems)" in md
    assert "| mean | ipg | 0 | -1.0 [-2.0, +0.0] | -10.0 [-15.0, -5.0] | -20.0 |" in md


def test_the_origin_summary_saves_and_loads_with_its_format(tmp_path):
    import json

    from ipg_sae.errors import IPGError
    from ipg_sae.experiments.origins.summary import OriginsSummary

    summary = _origins_summary()
    path = summary.save(tmp_path / "summary.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "ipg-sae-origins-summary/1" and set(doc["sets"]["zero"]["ipg"]) == {"0.0", "2.0"}
    again = OriginsSummary.load(path)
    assert again.sets["mean"]["ipg"][0.0].auc == -0.2 and again.per_latent["zero"]["ipg"]["objective"].n == 10
    assert json.dumps(again.to_json()) == json.dumps(summary.to_json())  # NaN included
    doc["format"] = "old"
    path.write_text(json.dumps(doc))
    with pytest.raises(IPGError, match="rerun its report stage"):
        OriginsSummary.load(path)
    del doc["per_latent"]  # a file that is not one at all: one line naming it, not a KeyError
    doc["format"] = "ipg-sae-origins-summary/1"
    path.write_text(json.dumps(doc))
    with pytest.raises(IPGError, match=rf"^{path} is not a summary of an origin comparison \(KeyError"):
        OriginsSummary.load(path)


def _study_row(effect, headline=True, **kw):
    from ipg_sae.experiments.study.results import EffectRow, NullRank

    row = EffectRow(value=0.3 + effect, effect=effect, lo=effect - 0.02, hi=effect + 0.02, accuracy=0.3 + effect,
                    length=30.0, parsed=0.99, degenerate=0.01, abs_log_ratio=1.5, abs_log_ratio_per_token=0.05,
                    first_order_change=0.7, ess_mean=0.6, ess_min=0.2, ess_flag=False, **kw)
    if headline:
        row.null_percentile, row.p_value, row.vs_null, row.vs_null_lo, row.vs_null_hi = 2.0, 0.02, effect, -0.1, 0.1
        row.nulls = {"frequency": NullRank(2.0, 0.02), "push": NullRank(5.0, 0.05)}
    return row


def _study_summary(confirmed: bool = True):
    """A hand-made two-gamma, two-method study of one reward, with its push null and, if ``confirmed``, one
    on-policy cell per gamma."""
    from ipg_sae.experiments.study.labels import CellLabel
    from ipg_sae.experiments.study.results import (Calibration, ConfirmedCell, Contrast, Curve, FrequencyNull,
                                                   NullDraws, Regeneration, RewardSummary, StudySummary)

    gammas = [0.0, 2.0]
    effect = {("ipg", 0.0): -0.1, ("ipg", 2.0): 0.05, ("act", 0.0): -0.01, ("act", 2.0): 0.0}
    null = lambda n: NullDraws(n=n, effects=[0.01 * i for i in range(n)], abs_log_ratios=[1.0] * n,  # noqa: E731
                               mean_ess=0.7, abs_log_ratio=1.0, abs_log_ratio_per_token=0.04, first_order_change=0.5,
                               parsed=0.98, degenerate=0.0)
    res = RewardSummary(
        base={"accuracy": 0.3, "length": 31.0, "reward": 0.3},
        methods={m: {g: _study_row(effect[m, g]) for g in gammas} for m in ("ipg", "act")},
        frequency={g: FrequencyNull(n=50, mean_ess=0.8, band={1: (-0.01, 0.01), 16: (-0.02, 0.02)}) for g in gammas},
        nulls={g: {"frequency": null(50), "push": null(20)} for g in gammas},
        sign_control={g: _study_row(0.02, headline=False, as_predicted=True) for g in gammas},
        curves={m: {g: Curve(auc=effect[m, g], ks=[1, 16], values=[0.3, 0.3 + effect[m, g]], lo=[0.28, 0.25],
                             hi=[0.32, 0.35]) for g in gammas} for m in ("ipg", "act")},
        answer="IPG moved it.")
    cells = [ConfirmedCell(reward="correctness", label=CellLabel("ipg", 16), gamma=g, why="ipg headline",
                           latents=[[15, 1]], off_policy_effect=-0.08, on_policy_effect=[-0.07, -0.1, -0.04],
                           on_minus_off=[0.01, -0.02, 0.04], agree=True, on_policy_value=0.23, accuracy=0.23,
                           length=30.0, parsed=1.0, degenerate=0.0, samples=16) for g in gammas] if confirmed else []
    extra = dict(
        confirm_samples_per_problem=16, unsteered_on_policy={"correctness": {"reward": 0.3, "correct": 0.3}},
        calibration={"correctness": Calibration(slope=1.1, intercept=-0.01, correlation=0.8, cells=4)},
        contrasts=[Contrast(gamma=0.0, against="push null", sets=5, rank=1, ipg_minus=[-0.09, -0.12, -0.06])],
        regeneration=Regeneration(samples=800, token_identical=800, differing=[], stored_accuracy=0.3,
                                  regenerated_accuracy=0.3, heldout_seed=0,
                                  unsteered_minus_heldout_accuracy=[-0.01, -0.03, 0.01],
                                  unsteered_accuracy_by_seed={"1": 0.29})) if confirmed else {}
    return StudySummary(k=16, ks=[1, 16], gammas=gammas, problems=100, samples_per_problem=8, null_sets=50,
                        curve_null_sets=3, rewards={"correctness": res}, confirmation=cells, **extra)


STUDY_CFG = SimpleNamespace(name="tiny", k=16, ks=[1, 16], gammas=[0.0, 2.0], methods=["ipg", "act"],
                            rewards=["correctness"], null_sets=50, other_null_sets=20, curve_null_sets=3,
                            heldout_sampling=SimpleNamespace(temperature=0.5))


def test_the_study_answer_states_each_null_it_was_ranked_in():
    from ipg_sae.experiments.study.report import answer

    res = _study_summary().rewards["correctness"]
    text = answer(STUDY_CFG, "correctness", res)
    assert "removing IPG's top 16 latents changed accuracy by -10.0 pts" in text and "beats the null" in text
    assert "against 20 push-matched random sets: 5th percentile (p = 0.05)" in text
    assert text.endswith("The method whose sets moved it most in the predicted directions: ipg.")


def test_the_study_markdown_renders_a_hand_made_summary():
    from ipg_sae.experiments.study.report import markdown

    text = markdown(STUDY_CFG, _study_summary())
    assert "**IPG moved it.**" in text and "Held-out problems: 100 x 8 unsteered samples" in text
    assert "| ipg | 0 | -10.0 pts [-12.0 pts, -8.0 pts] |" in text and "| act | 2 | +0.0 pts" in text
    assert "| push null | 0 | 20 |" in text and "(opposite sign, as predicted)" in text
    assert "| ipg | -10.0 pts | +5.0 pts |" in text  # the areas under the curves, by gamma
    assert "## On-policy effects" in text and "| ipg-k16 | 0 | ipg headline | -7.0 pts [-10.0 pts, -4.0 pts] |" in text
    assert "| 0 | push null | 5 | -9.0 pts [-12.0 pts, -6.0 pts] | 1 of 6 |" in text
    assert "Calibration over the 4 cells: on-policy effect = 1.10 x off-policy effect -1.0 pts" in text
    assert "regenerated 800 of the 800 held-out samples (seed 0)" in text and "29.0% (seed 1)" in text
    assert "On-policy" not in markdown(STUDY_CFG, _study_summary(confirmed=False))


def test_the_study_plots_draw_a_hand_made_summary(tmp_path):
    from ipg_sae.experiments.study.report import plot_calibration, plot_curves, plot_null, plot_push

    summary = _study_summary()
    res = summary.rewards["correctness"]
    for plot in (plot_curves, plot_null, plot_push):
        assert plot(STUDY_CFG, "correctness", res, tmp_path / f"{plot.__name__}.png").stat().st_size > 0
    assert plot_calibration(summary.confirmation, tmp_path / "calibration.png").stat().st_size > 0


def test_the_study_summary_saves_and_loads_with_its_format(tmp_path):
    import json

    from ipg_sae.errors import IPGError
    from ipg_sae.experiments.study.results import FORMAT, StudySummary

    summary = _study_summary()
    path = tmp_path / "summary.json"
    summary.save(path)
    again = StudySummary.load(path)
    for row in (r for rows in summary.rewards["correctness"].methods.values() for r in rows.values()):
        row.latents = None  # not saved: scores.json keeps each set
    assert again == summary and again.gammas == [0.0, 2.0] and isinstance(again.gammas[0], float)
    assert again.confirmation[0].label.name == "ipg" and again.confirmation[0].set == "ipg-k16"
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and list(doc["rewards"]["correctness"]["methods"]["ipg"]) == ["0.0", "2.0"]
    doc["format"] = "old"
    path.write_text(json.dumps(doc))
    with pytest.raises(IPGError, match="rerun its report stage"):
        StudySummary.load(path)


def test_the_committed_study_summary_loads_and_writes_back_its_numbers():
    """``docs/study/summary.json`` was written before the summary was typed (no format, no curves' points): it
    loads, and writing it back changes none of its keys' values."""
    import json
    from pathlib import Path

    from ipg_sae.experiments.study.results import StudySummary

    path = Path(__file__).parent.parent / "docs" / "study" / "summary.json"
    summary = StudySummary.load(path)
    ipg = summary.rewards["correctness"].methods["ipg"][0.0]
    assert summary.gammas == [0.0, 2.0] and ipg.nulls["push"].percentile == 100.0 and ipg.p_value < 0.05
    assert summary.confirmation[0].label.name == "ipg" and summary.confirmation[0].label.k == 16
    assert summary.rewards["correctness"].curves["ipg"][0.0].values is None  # not kept then
    assert summary.rewards["length"].answer.startswith("removing IPG's top 16 latents")
    assert summary.regeneration.token_identical == 800 and summary.calibration["correctness"].cells == 36
    assert summary.contrasts[0].against == "best baseline" and summary.contrasts[0].gamma == 0.0
    written = summary.to_json()
    assert written.pop("format")
    for res in written["rewards"].values():
        res.pop("curves"), res.pop("null_band")
    assert json.dumps(written, indent=2) == json.dumps(json.loads(path.read_text()), indent=2)


def test_a_study_cell_label_is_written_and_read_back_with_its_fields():
    from ipg_sae.experiments.study.summary import CellLabel, null_labels

    for label in (CellLabel("ipg", 16), CellLabel("push", 16, 3), CellLabel("null", 4, 0), CellLabel("ipg_bottom", 2)):
        assert CellLabel.parse(str(label)) == label
    assert str(CellLabel("perm", 16, 12)) == "perm12|k16" and CellLabel.parse("grad_x_act|k64").draw is None
    cells = {"ipg|k2": {}, "null0|k2": {}, "null1|k2": {}, "null0|k1": {}, "push0|k2": {}, "policy0|k2": {}}
    assert null_labels(cells, "frequency", 2) == ["null0|k2", "null1|k2"]
    assert null_labels(cells, "frequency", None) == ["null0|k2", "null1|k2", "null0|k1"]
    assert null_labels(cells, "push", 2) == ["push0|k2"] and null_labels(cells, "permutation", 2) == []
