"""The benchmark scripts (``benchmarks/``) in their ``--smoke`` mode: they run on a tiny model and
write the results JSON with the keys the README's table and the lead's GPU runs rely on.

These check that the scripts work, not speed (the numbers of a tiny model are meaningless).
Each script runs in its own process, as ``run_all.py`` runs it; marked slow (about a minute
in all, mostly interpreter start-up and imports).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
MACHINE = "smoke-test"

pytestmark = pytest.mark.slow

META_KEYS = {"machine", "date", "torch", "device", "dtype", "threads", "shape", "smoke", "nproc", "cpu"}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-results")


def run_script(name: str, results_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / name), "--smoke", "--threads", "1", "--machine", MACHINE,
           "--results-dir", str(results_dir), *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def section(results_dir: Path, name: str) -> dict:
    doc = json.loads((results_dir / f"{MACHINE}.json").read_text())
    assert doc["machine"] == MACHINE
    assert name in doc, f"no [{name}] section in {sorted(doc)}"
    sec = doc[name]
    assert META_KEYS <= set(sec["meta"]), META_KEYS - set(sec["meta"])
    assert sec["meta"]["smoke"] is True and sec["meta"]["device"] == "cpu" and sec["meta"]["threads"] == 1
    return sec


def test_attribution(results_dir):
    run_script("bench_attribution.py", results_dir)
    sec = section(results_dir, "attribution")
    assert set(sec["times"]) == {"ipg", "attribute_e2e", "floor", "naive"}
    assert set(sec["ratios"]) == {"ipg/floor", "attribute_e2e/floor", "naive/ipg", "attribute_e2e/node_passes"}
    # attribute() includes its node passes (timed inside it), so it takes at least their time
    assert sec["ratios"]["attribute_e2e/node_passes"] >= 1 and sec["model_digest_s"] > 0
    assert len(sec["attribute_e2e_node_passes_s"]) == sec["config"]["repeats"]
    assert all(v > 0 for v in sec["ratios"].values())
    assert {"clean_s", "logp0_s", "node_passes_s", "other_s", "floor_lower_s"} <= set(sec["ipg_breakdown_s"])
    # The naive implementation computes the same attributions as the engine.
    assert sec["naive_vs_ipg_max_rel_diff"] < 1e-3
    mem = sec["memory"]
    assert {"no_checkpointing", "checkpointing", "metric", "checkpointing/no_checkpointing"} <= set(mem)
    assert mem["checkpointing"]["gradient_checkpointing"] is True
    assert mem["no_checkpointing"][mem["metric"]] > 0


def test_training(results_dir):
    run_script("bench_training.py", results_dir)
    sec = section(results_dir, "training")
    assert set(sec["tokens_per_s"]) == {"ours", "sae_lens", "floor"}
    assert {"ours/sae_lens", "ours/floor", "sae_lens/floor"} <= set(sec["ratios"])
    assert all(v > 0 for v in sec["tokens_per_s"].values())
    assert [r["tokens"] for r in sec["runs"]["ours"]] == [r["tokens"] for r in sec["runs"]["sae_lens"]]


def test_sampling(results_dir):
    run_script("bench_sampling.py", results_dir)
    sec = section(results_dir, "sampling")
    assert set(sec["tokens_per_s"]) == {"sampler", "sampler_steered", "generate_loop", "generate_batched"}
    assert {"sampler/generate_loop", "sampler/generate_batched", "steered/plain", "steering_overhead"} <= \
        set(sec["ratios"])
    assert all(n > 0 for n in sec["generated_tokens"].values())


def test_sampling_compiled(results_dir):
    """``--compile``: the loop backend with and without sampling.compile, compile time apart and amortised."""
    run_script("bench_sampling.py", results_dir, "--compile")
    sec = section(results_dir, "sampling_compiled")
    assert {"sampler_loop", "sampler_loop_compiled", "sampler_loop_compiled_amortised"} <= set(sec["tokens_per_s"])
    assert {"loop/floor", "loop_compiled/floor", "loop_compiled_amortised/floor", "loop_compiled/loop"} <= \
        set(sec["ratios"])
    assert sec["compile_s"] >= 0
    # the amortised figure charges the compile time to the run: never above the compiled run's own rate
    assert sec["tokens_per_s"]["sampler_loop_compiled_amortised"] <= sec["tokens_per_s"]["sampler_loop_compiled"]


def test_sampling_gap(results_dir):
    """``sampling_gap.py``: the loop sampler's run split into parts that add up to its measured time."""
    run_script("sampling_gap.py", results_dir, "--profile")
    sec = section(results_dir, "sampling_gap")
    parts = sec["parts_s"]
    assert set(parts) == {"floor", "narrow_and_idle_rows", "step_beyond_linear", "prefill", "draws", "bookkeeping"}
    assert sum(parts.values()) == pytest.approx(sec["total_s"], abs=0.01)  # the parts are the whole run
    assert sum(sec["parts_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert sec["useful_tokens"] > 0 and sec["steps"] >= sec["full_width_steps"]
    # the ratio is the floor's share of the run (seconds are rounded to 1 ms, the ratio to 1e-4)
    assert sec["sampler/floor"] * sec["total_s"] == pytest.approx(parts["floor"], abs=1e-3)
    assert sec["profile_top_ops"] and all(0 <= r["self_share"] <= 1 for r in sec["profile_top_ops"])


def test_gpu_rows_script(tmp_path):
    """``gpu_rows.sh``, the one prepared script for a lent GPU, runs its three benchmarks (here on the tiny CPU
    model) and each writes its section."""
    env = {**__import__("os").environ, "SMOKE": "1", "PY": sys.executable, "RESULTS_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(BENCH / "gpu_rows.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    doc = json.loads((tmp_path / f"{MACHINE}.json").read_text())
    assert {"attribution", "sampling_compiled", "training"} <= set(doc), sorted(doc)


def test_faithfulness(results_dir):
    run_script("bench_faithfulness.py", results_dir)
    sec = section(results_dir, "faithfulness")
    assert sec["agreement_rel"] < 1e-4  # the tree scores what the flat passes score
    assert {"flat/tree", "tokens_flat/tree"} <= set(sec["ratios"]) and sec["ratios"]["tokens_flat/tree"] > 1
    assert sec["tokens"]["tree"] < sec["tokens"]["flat"]


def test_adaptive(results_dir):
    run_script("bench_adaptive.py", results_dir)
    sec = section(results_dir, "adaptive")
    assert set(sec["contenders"]) == {"gl16", "gl20", "adaptive"}
    assert all({"seconds", "mean_nodes", "median_gap", "max_gap", "meets_target"} <= set(c)
               for c in sec["contenders"].values())
    assert sec["contenders"]["gl16"]["mean_nodes"] == 16 and {"gl16/adaptive", "gl20/adaptive"} <= set(sec["ratios"])


def test_scaling(results_dir):
    run_script("bench_scaling.py", results_dir)
    sec = section(results_dir, "scaling")
    assert [p["tokens"] for p in sec["length"]] == [32, 64, 128]
    assert [p["n_steps"] for p in sec["n_steps"]] == [1, 2, 4]
    assert all({"ipg_s", "floor_s", "ipg/floor"} <= set(p) for p in sec["length"] + sec["n_steps"])
    assert set(sec["growth_exponent"]) == {"ipg_vs_tokens", "floor_vs_tokens", "ipg_vs_n_steps", "floor_vs_n_steps"}
    png = results_dir / sec["plot"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(results_dir):
    run_script("bench_cli.py", results_dir)
    sec = section(results_dir, "cli")
    assert set(sec["seconds"]) == {"python", "help", "typo", "command_help"}
    assert all(v > 0 for v in sec["seconds"].values())
    assert set(sec["ratios"]) == {"help/python", "typo/python", "command_help/python"}


def test_run_all_report(results_dir):
    """run_all.py prints (and writes) the ratio table of the merged results file."""
    if not (results_dir / f"{MACHINE}.json").is_file():
        pytest.skip("needs the results of the tests above")
    out = run_script("run_all.py", results_dir, "--report-only")
    table = (results_dir / f"{MACHINE}.md").read_text()
    for needle in ("IPG attribute_group / floor", "train-sae / sae-lens runner",
                   "sampler with steering hooks / without", "IPG / floor by tokens"):
        assert needle in table and needle in out.stdout
    assert "not run" not in table


def test_experiment_cost_reads_stage_markers(tmp_path):
    """benchmarks/experiment_cost.py: a run's stage totals (total_seconds over resumes), CPU hours, s per cell."""
    stages = tmp_path / "run" / "stages"
    stages.mkdir(parents=True)
    (stages / "score.json").write_text(json.dumps({"hash": "k", "seconds": 50.0, "total_seconds": 300.0}))
    (stages / "sample.json").write_text(json.dumps({"hash": "k", "seconds": 60.0}))  # an old marker: last run only
    (stages / "score.partial.json").write_text(json.dumps({"hash": "k", "seconds": 9.0}))  # not a finished stage
    out = subprocess.run([sys.executable, str(BENCH / "experiment_cost.py"), str(tmp_path / "run"), "--threads", "2",
                          "--cells", "score=10"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| score | 300 | 10 | 30 |" in out.stdout and "| sample | 60 |" in out.stdout
    assert "last run only" in out.stdout and "**360** (0.1 h wall)" in out.stdout and "**0.2 CPU hours**" in out.stdout
