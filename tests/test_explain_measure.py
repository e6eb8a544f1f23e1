"""benchmarks/explain_measure.py --smoke: the measured answer (issue 38 point 5) and the cost figure (point 6)
run end to end on a tiny run, in their own process as they will run on the default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_measurement_script_runs_on_a_tiny_run():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "explain_measure.py"), "--smoke", "--threads",
                          "1", "--time-explorer"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"ipg_top16", "random (frequency-matched)", "act_top"} <= set(last["groups"])
    assert last["ipg_minus_random"] == ["detection_auroc", "detection_bacc", "output_percentile"]
    cost = last["cost"]
    # the estimate is the fixed costs plus 4096 latents at the unrounded rate; per_latent_s is rounded to 1e-4 s
    at_least = 4096 * (cost["per_latent_s"] - 5e-5) + cost["encode_s"] + cost["null_pool_s"] - 0.05 - 0.01
    assert cost["per_latent_s"] > 0 and cost["estimate_4096_s"] >= at_least
    assert cost["explorer_s"] > 0
    # the reference (LM head on every position) reads the same TokenChange tokens as the firing-positions head
    assert cost["same_token_change"] is True and cost["per_latent_full_head_s"] > 0 and cost["n_latents_full_head"] > 0
    assert "| IPG top 8 minus random (paired) |" in out.stdout and "Arad et al.'s filter" in out.stdout
