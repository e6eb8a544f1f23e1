"""The README's answer quotes committed results: each number it states is recomputed here from the JSON it
came from (docs/study/summary.json, docs/steering/leaderboard.json), so a republished result that the README
does not follow fails this test instead of leaving a stale claim on the first screen."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest

REPO = Path(__file__).resolve().parents[1]
README = " ".join((REPO / "README.md").read_text().split())  # line breaks fall anywhere in prose


def _load(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def interval(triple) -> str:
    """``-12.9 points [-16.2, -9.9]``'s number and interval, from ``[estimate, lo, hi]`` as fractions."""
    est, lo, hi = triple
    return f"{pts(est)} points [{pts(lo)}, {pts(hi)}]"


def bare(triple) -> str:
    est, lo, hi = triple
    return f"{pts(est)} [{pts(lo)}, {pts(hi)}]"


def tokens(triple) -> str:
    est, lo, hi = triple
    return f"{est:+.1f} tokens [{lo:+.1f}, {hi:+.1f}]"


def _cell(study: dict, reward: str, name: str, gamma: float) -> dict:
    cells = [c for c in study["confirmation"] if c["reward"] == reward and c["set"] == name and c["gamma"] == gamma]
    assert len(cells) == 1, (reward, name, gamma)
    return cells[0]


def _contrast(study: dict, against: str, gamma: float) -> list[float]:
    return next(c["ipg_minus"] for c in study["contrasts"] if c["against"] == against and c["gamma"] == gamma)


def study_claims() -> list[str]:
    s = _load("docs/study/summary.json")
    ipg0, ipg2 = (_cell(s, "correctness", "ipg-k16", g) for g in (0.0, 2.0))
    policy0 = [c["on_policy_effect"][0] for c in s["confirmation"]
               if c["reward"] == "correctness" and c["why"] == "policy null" and c["gamma"] == 0.0]
    return [
        interval(ipg0["on_policy_effect"]),
        interval(ipg2["on_policy_effect"]),
        f"(unsteered {100 * s['unsteered_on_policy']['correctness']['correct']:.1f}%)",
        bare(_contrast(s, "policy null", 0.0)),
        bare(_contrast(s, "policy null", 2.0)),
        f"lower accuracy by {-100 * mean(policy0):.1f} points on average",
        bare(_cell(s, "correctness", "grad_x_act-k16", 0.0)["on_policy_effect"]),
        bare(_contrast(s, "best baseline", 2.0)),
        tokens(_cell(s, "length", "ipg-k16", 0.0)["on_policy_effect"]),
        f"amplified {tokens(_cell(s, 'length', 'ipg-k16', 2.0)['on_policy_effect']).replace(' tokens', '')}",
        f"IPG's removal is {pts(ipg0['off_policy_effect'])} points off-policy against {pts(ipg0['on_policy_effect'][0])}",
    ]


def steering_claims() -> list[str]:
    board = _load("docs/steering/leaderboard.json")["splits"]
    test, transfer = board["test"], board["transfer-1"]
    return [
        f"from {100 * test['unsteered']['accuracy']:.1f}% to {100 * test['ipg_step']['accuracy']:.1f}%",
        interval(test["ipg_step"]["effect"]),
        f"by {bare(test['ipg_topk']['effect'])}",
        f"DiffMean ({bare(test['diffmean']['effect'])})",
        f"prompt ({bare(test['prompting']['effect'])})",
        f"at {100 * transfer['unsteered']['accuracy']:.1f}% unsteered",
    ]


def demo_claims() -> list[str]:
    """The demo's last run, as docs/demo/run/ keeps it."""
    ev = _load("docs/demo/run/eval_summary.json")
    run = _load("docs/demo/run/run_summary.json")
    sae = _load("docs/demo/run/sae_eval.json")["layers"]["15"]
    vs_random = {c["gamma"]: c for c in ev["comparisons"] if c["against"] == "random" and c["metric"] == "accuracy"}
    act2 = next(r for r in ev["rows"] if r["set"] == "act" and r["gamma"] == 2.0)
    att = run["attribution"]
    return [
        f"{100 * run['sample']['accuracy']:.1f}% of the {run['sample']['n']} samples correct",
        f"explained variance {sae['explained_variance']:.3f}, L0 {sae['l0']:.0f}, {100 * sae['dead_fraction']:.1f}% dead",
        f"{att['mean_nodes']:.1f} node passes per prompt",
        f"gap median {100 * att['delta_median']:.2f}%, max {100 * att['delta_max']:.2f}%",
        f"{bare([vs_random[0.0][k] for k in ('delta', 'lo', 'hi')]).replace(' [', ' pts [')} removed",
        f"{bare([vs_random[2.0][k] for k in ('delta', 'lo', 'hi')]).replace(' [', ' pts [')} amplified",
        bare([act2["accuracy_delta"], act2["accuracy_delta_lo"], act2["accuracy_delta_hi"]]).replace(" [", " pts ["),
        f"sample {run['stages']['sample']['seconds']:.0f} s, SAE {run['stages']['sae']['seconds']:.0f} s",
    ]


def explanation_claims() -> list[str]:
    """Issue 38's measured answer, as docs/explanations/measured.json keeps it."""
    m = _load("docs/explanations/measured.json")
    d = m["ipg_minus_random"]
    return [
        "balanced accuracy {:+.3f} [{:+.3f}, {:+.3f}]".format(*d["detection_bacc"]),
        "({:+.3f} [{:+.3f}, {:+.3f}] in percentile)".format(*d["output_percentile"]),
        f"keeps {m['arad_filter']['kept']} of IPG's top {m['arad_filter']['k']}",
        f"costs {m['cost']['per_latent_s']:.2f} s here",
        f"({m['cost']['estimate_4096_s'] / 3600:.1f} h for 4,096)",
    ] + arad_claims()


def arad_claims() -> list[str]:
    """The filter's on-policy dev effect, as docs/explanations/arad_dev/rows.csv keeps it."""
    import csv

    lines = (REPO / "docs/explanations/arad_dev/rows.csv").read_text(encoding="utf-8").splitlines()
    rows = {(r["set"], r["gamma"]): r for r in csv.DictReader(lines)}
    return [f"(removal {100 * float(rows[('ipg_output_filtered', '0.0')]['accuracy_delta']):+.1f} pts against "
            f"{100 * float(rows[('ipg', '0.0')]['accuracy_delta']):.1f})"]


@pytest.mark.parametrize("claim", study_claims() + steering_claims() + demo_claims() + explanation_claims())
def test_the_readme_states_the_committed_number(claim):
    assert claim in README, f"README does not state {claim!r} (the committed JSON says so)"
