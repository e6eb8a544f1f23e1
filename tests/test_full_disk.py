"""A full disk during SAE training, and under W&B, is one line, not a traceback (issue 36, item 13). Needs root to
mount a small tmpfs; skipped with the reason elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SAE_CONFIG = """name: full
layers: [1]
k: 8
expansion_factor: 4
lr: 0.001
training_tokens: 7680
context_size: 32
batch_size_tokens: 256
lm_batch_size: 8
chunk_sequences: 16
buffer_chunks: 2
checkpoint_every: 10
n_eval_sequences: 8
dead_feature_window: 50
cache_activations: false
data: {source: task, task: {name: arithmetic, n_problems: 200, few_shot: 0}}
"""


def _mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()[:80]}): the full-disk test needs root")


@pytest.fixture
def mounts():
    made: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        _mount(path, size)
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", str(path)], capture_output=True)


def _run(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    code = f"import sys; {prelude}from ipg_sae.cli import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def test_train_sae_on_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, mounts, tiny_llama_dir):
    config = tmp_path / "sae.yaml"
    config.write_text(SAE_CONFIG)
    disk = mounts(tmp_path / "disk", "400k")  # the config and the first steps fit, the first checkpoint does not
    proc = _run(["train-sae", str(config), "--runs_dir", str(disk), "--model.name", str(tiny_llama_dir),
                 "--no-wandb"])
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    errors = [line[line.index("error:"):] for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-1500:]
    last = errors[0]  # after the progress bar's last redraw, on its line
    assert last.startswith("error: cannot write or read") and "No space left" in last
    assert str(disk / "full" / "checkpoints" / "step_00000010") in last
    assert not list(disk.rglob("*.partial"))  # no half-written checkpoint left behind


@pytest.mark.parametrize("case", ["full before it starts", "fills while it runs"])
def test_wandb_on_a_full_disk_is_one_warning(tmp_path, mounts, tiny_llama_dir, case):
    runs = tmp_path / "runs"
    wandb_dir = mounts(runs / "t" / "wandb", "8k" if case == "fills while it runs" else "64k")
    prelude = ""
    if case == "full before it starts":
        (wandb_dir / "fill").write_bytes(b"\0" * 60_000)
    else:  # a disk that has room when W&B starts: W&B's own writes fill it
        prelude = "import ipg_sae.tracking as t; t.MIN_FREE_BYTES = 0; "
    proc = _run(["sample", "--name", "t", "--runs_dir", str(runs), "--model.name", str(tiny_llama_dir),
                 "--task.n_problems", "4", "--task.few_shot", "0", "--sampling.n_samples", "2",
                 "--sampling.max_new_tokens", "4", "--wandb.mode", "offline"], prelude)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert (runs / "t" / "trajectories.jsonl").is_file()  # the job's own output is there
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr and "asyncio" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "W&B" in line]
    assert len(warnings) == 1 and ("No space left" in warnings[0] or "free disk space" in warnings[0]), warnings
