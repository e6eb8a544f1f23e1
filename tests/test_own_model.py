"""A user's own setting (docs/own-model.md): the documented config loads, published-SAE and hub failures are
one line in seconds, and an SAE exported for TransformerLens loads there exactly (on the real default model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipg_sae.errors import IPGError

REPO = Path(__file__).resolve().parents[1]


def test_the_documented_config_loads_and_is_checked(tmp_path, monkeypatch):
    from ipg_sae.config import load_config
    from ipg_sae.experiments.pipeline import PipelineConfig

    doc = (REPO / "docs" / "own-model.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # another test's my_rewards is not this one
    (tmp_path / "my_rewards.py").write_text("def reward(prompt, completion, reference):\n    return float(reference in completion)\n")
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(450)]
    (tmp_path / "my_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my-run.yaml").write_text(block)
    cfg = load_config(PipelineConfig, tmp_path / "my-run.yaml")
    assert cfg.sae.load[0].release == "gemma-scope-2b-pt-res-canonical" and cfg.model.device == "cuda"
    # the documented pairing fits: sae-lens's registry (shipped with the package) says whose SAE it is
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    assert get_pretrained_saes_directory()[cfg.sae.load[0].release].model == cfg.model.name.split("/")[-1]
    # the held-out split is checked before any work: an overlapping one is refused
    (tmp_path / "overlap.yaml").write_text(block.replace("offset: 200", "offset: 100"))
    with pytest.raises(IPGError, match="also in the attribution split"):
        load_config(PipelineConfig, tmp_path / "overlap.yaml")


def test_a_mistyped_published_sae_names_the_closest_ones():
    from ipg_sae.saes import SAESpec, load_sae

    with pytest.raises(IPGError) as err:
        load_sae(SAESpec(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_99/width_16k/canonical"))
    message = str(err.value)
    assert "layer_9/width_16k/canonical" in message and "58 in all" in message and message.endswith(")")
    with pytest.raises(IPGError, match="closest: \\['gemma-scope-2b-pt-res-canonical'"):
        load_sae(SAESpec(release="gemma-scope-2b-pt-res-canonicl", sae_id="x"))


@pytest.mark.parametrize("args, what", [
    (["--model.name", "ipg-sae-test/no-such-model"], "model 'ipg-sae-test/no-such-model'"),
    (["--task.name", "gsm8k"], "dataset 'openai/gsm8k'"),
])
def test_an_unreachable_hub_fails_in_seconds_from_the_cli(tmp_path, args, what):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), WANDB_MODE="disabled")
    # What the command costs before it touches the hub (its imports), measured now on this machine, so a loaded
    # machine does not fail the test; a retry loop with backoff would add tens of seconds on top.
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, datasets, ipg_sae.cli, ipg_sae.sampling, "
                    "ipg_sae.tasks, ipg_sae.models"], cwd=REPO, env=env, check=True, timeout=120)
    imports = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ipg_sae", "sample", "--runs_dir", str(tmp_path), "--no-wandb",
                           *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-600:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot reach the Hugging Face hub" in last and what in last
    assert seconds < imports + 10, f"{seconds:.1f} s against {imports:.1f} s of imports"  # one probe, no retries


@pytest.mark.slow
def test_an_exported_sae_loads_exactly_through_the_transformer_lens_bridge(tmp_path):
    """On the real default model: the bridge's residual at block 15 and the exported SAE's activations equal
    this project's (both exactly), and `ipg-sae export` says so."""
    from ipg_sae.cli import main
    from ipg_sae.jobs import ExportJobConfig, run_export
    from ipg_sae.saes import write_sae_sidecar
    from tests import tiny

    sae_dir = tmp_path / "sae" / "layer_15"
    tiny.random_sae("topk", 576, layer=15, d_sae=256, k=16, seed=1).save_model(str(sae_dir))
    write_sae_sidecar(sae_dir, "smollm2-135m-instruct", 15)
    out = run_export(ExportJobConfig(sae=str(sae_dir)))
    assert out["residual"] == 0.0 and out["activations"] == 0.0 and out["layer"] == 15
    cfg = json.loads((Path(out["exported"]) / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"
    assert main(["export", str(sae_dir), "--out_dir", str(tmp_path / "tl"), "--check", "false"]) == 0
    assert (tmp_path / "tl" / "sae_weights.safetensors").read_bytes() == (sae_dir / "sae_weights.safetensors").read_bytes()
