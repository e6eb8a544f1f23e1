"""Outputs that are provably the outputs of their inputs, and faults that give one line, not a traceback.

Each test feeds the failing input it names; user errors must print exactly one line and exit 2.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ipg_sae.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    """A sampled run, an SAE (trained by this project, with its digest) and an attribute config."""
    from ipg_sae.saes import write_sae_sidecar
    from tests import tiny

    root = tmp_path_factory.mktemp("faults")
    sae_dir = root / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    write_sae_sidecar(sae_dir, model_name=str(tiny_llama_dir), layer=2)
    rc = main(["sample", "--name", "r", "--runs_dir", str(root / "runs"), "--model.name", str(tiny_llama_dir),
               "--task.n_problems", "4", "--task.few_shot", "0", "--sampling.n_samples", "3",
               "--sampling.max_new_tokens", "6", "--reward", "tests.helpers:text_length_mod_7", "--no-wandb"])
    assert rc == 0
    cfg = root / "attribute.yaml"
    cfg.write_text(f"name: r\nruns_dir: {root / 'runs'}\nmodel: {{name: {tiny_llama_dir}}}\n"
                   f"saes: [{{path: {sae_dir}}}]\nattribution: {{n_steps: 3, checkpoint_every: 1}}\n"
                   "selection: {k: 3, n_bootstrap: 5}\nwandb: {enabled: false}\n")
    return root, sae_dir, cfg, tiny_llama_dir


def one_line_exit_2(capsys, args, match: str) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]  # progress bars use \r
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


# ---- 1-2: what outputs are matched against, and their digests ----------------------------------


def test_a_checkpoint_edited_with_its_header_kept_is_recomputed(setup, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ipg_sae.attribution import attribute
    from ipg_sae.models import load_model
    from ipg_sae.saes import load_sae
    from ipg_sae.trajectories import load_trajectories

    root, sae_dir, _, model_dir = setup
    model, tok = load_model(str(model_dir))
    saes = {2: load_sae(str(sae_dir), model)}
    trajs = load_trajectories(root / "runs" / "r" / "trajectories.jsonl")
    ckpt = tmp_path / "ckpt.safetensors"
    reference = attribute(model, saes, trajs, n_steps=3, tokenizer=tok, progress=False)
    attribute(model, saes, trajs, n_steps=3, tokenizer=tok, progress=False, checkpoint_path=ckpt)
    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(ckpt))
    tensors["L2.attribution"] = tensors["L2.attribution"] * 3  # edited values, the header left as it was
    save_file(tensors, str(ckpt), metadata=meta)
    seen = []
    again = attribute(model, saes, trajs, n_steps=3, tokenizer=tok, progress=False, checkpoint_path=ckpt,
                      callback=seen.append)
    assert len(seen) == 4  # nothing resumed from the edited file
    assert torch.equal(again.attributions[2], reference.attributions[2])
    # a checkpoint cut short: reported once, recomputed, no traceback
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    seen.clear()
    again = attribute(model, saes, trajs, n_steps=3, tokenizer=tok, progress=False, checkpoint_path=ckpt,
                      callback=seen.append)
    assert len(seen) == 4 and torch.equal(again.attributions[2], reference.attributions[2])
    # a checkpoint made with another SAE of the same shape is not resumed
    other = {2: load_sae(str(sae_dir), model)}
    with torch.no_grad():
        other[2].W_dec.mul_(1.5)
    seen.clear()
    attribute(model, other, trajs, n_steps=3, tokenizer=tok, progress=False, checkpoint_path=ckpt, callback=seen.append)
    assert len(seen) == 4


def test_a_flipped_bit_in_an_sae_is_refused(setup, tmp_path, capsys):
    import shutil

    root, sae_dir, cfg, _ = setup
    bad = tmp_path / "sae"
    shutil.copytree(sae_dir, bad)
    data = bytearray((bad / "sae_weights.safetensors").read_bytes())
    data[-10] ^= 0x01  # one bit of one weight
    (bad / "sae_weights.safetensors").write_bytes(bytes(data))
    text = cfg.read_text().replace(str(sae_dir), str(bad))
    (tmp_path / "a.yaml").write_text(text)
    one_line_exit_2(capsys, ["attribute", str(tmp_path / "a.yaml")], "is not the file that was trained")


def test_every_attribution_reports_the_saes_explained_variance(setup, capsys):
    from ipg_sae.attribution import AttributionResult

    root, _, cfg, _ = setup
    assert main(["attribute", str(cfg)]) == 0
    summary = AttributionResult.load(root / "runs" / "r").meta["summary"]
    assert "L2.explained_variance" in summary and summary["L2.explained_variance"] < 1.0


def test_a_corrupt_result_is_one_line(setup, tmp_path, capsys):
    import shutil

    root, sae_dir, cfg, model_dir = setup
    assert main(["attribute", str(cfg)]) == 0  # a good result to damage
    run = tmp_path / "runs" / "c"
    shutil.copytree(root / "runs" / "r", run)
    (run / "attribution.json").write_text("{not json")
    args = ["evaluate", "--name", "e", "--runs_dir", str(tmp_path / "runs"), "--model.name", str(model_dir),
            "--saes", f"[{{path: {sae_dir}}}]", "--sets", "{ipg: [[2, 1]]}", "--attribution_dir", str(run),
            "--no-wandb"]
    one_line_exit_2(capsys, args, "attribution.json is corrupt")
    shutil.copy(root / "runs" / "r" / "attribution.json", run / "attribution.json")
    st = run / "attribution.safetensors"
    st.write_bytes(st.read_bytes()[:-64])
    one_line_exit_2(capsys, args, "attribution.safetensors")


# ---- 3-4: nothing to attribute, one writer per directory --------------------------------------


def test_a_held_run_directory_stops_a_second_writer(setup, tmp_path, capsys):
    root, _, cfg, _ = setup
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ipg_sae.io import run_lock\n"
        f"with run_lock({str(root / 'runs' / 'r')!r}):\n    print('held', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_exit_2(capsys, ["attribute", str(cfg)], "is in use by process")
        assert str(holder.pid) in line
    finally:
        holder.kill()
        holder.wait()
    assert main(["attribute", str(cfg)]) == 0  # the kernel released the lock with its holder


# ---- 6: faults -----------------------------------------------------------------------------------


def test_faults_give_one_line(setup, tmp_path, capsys):
    import json

    root, sae_dir, cfg, model_dir = setup
    base = ["--name", "f", "--runs_dir", str(tmp_path / "runs"), "--model.name", str(model_dir), "--no-wandb"]
    # a run directory that cannot be written
    one_line_exit_2(capsys, ["sample", "--name", "f", "--runs_dir", "/proc/ipg-sae-test", "--model.name",
                             str(model_dir), "--task.n_problems", "1", "--no-wandb"], "cannot write")
    # a reward that raises
    one_line_exit_2(capsys, ["sample", *base, "--task.n_problems", "1", "--sampling.max_new_tokens", "2",
                             "--reward", "tests.helpers:raising_reward"], "raised ZeroDivisionError")
    # a prompt that leaves no room for max_new_tokens in the context (512 positions)
    one_line_exit_2(capsys, ["sample", *base, "--task.n_problems", "2", "--sampling.max_new_tokens", "600"],
                    "do not leave room for max_new_tokens 600")
    # trajectories: a row without a field, a token outside the vocabulary
    rows = [json.loads(line) for line in (root / "runs" / "r" / "trajectories.jsonl").read_text().splitlines()]
    for name, broken, match in [("missing", {k: v for k, v in rows[0].items() if k != "completion_ids"}, "lacks"),
                                ("vocab", {**rows[0], "completion_ids": [999999]}, "outside this model's vocabulary")]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in [broken] + rows[1:]) + "\n")
        one_line_exit_2(capsys, ["attribute", str(cfg), "--trajectories", str(path), "--name", name], match)
    # SAE weights with a NaN
    from tests import tiny

    nan_dir = tmp_path / "nan-sae"
    sae = tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    sae.save_model(str(nan_dir))
    one_line_exit_2(capsys, ["attribute", str(cfg), "--saes", f"[{{path: {nan_dir}}}]"], "non-finite values")
    # selection settings checked before any attribution: k beyond the SAE's width, k 0, an unknown ranking
    out = tmp_path / "runs" / "k"
    one_line_exit_2(capsys, ["attribute", str(cfg), "--name", "k", "--runs_dir", str(tmp_path / "runs"),
                             "--trajectories", str(root / "runs" / "r" / "trajectories.jsonl"),
                             "--selection.k", "1000"], "only 64 latents")
    assert not (out / "attribution.safetensors").exists()
    one_line_exit_2(capsys, ["attribute", str(cfg), "--selection.k", "0"], "select at least one latent")
    one_line_exit_2(capsys, ["attribute", str(cfg), "--selection.by", "meen"], "did you mean `mean`")
    # a negative gamma
    one_line_exit_2(capsys, ["evaluate", *base, "--sets", "{ipg: [[2, 1]]}", "--saes", f"[{{path: {sae_dir}}}]",
                             "--evaluation.gammas", "[-1, 2]"], "negative gamma")
    assert not (tmp_path / "runs" / "f" / "evaluate_config.yaml").exists()  # nothing written on a user error


def test_a_full_disk_keeps_the_old_checkpoint(setup, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    import ipg_sae.io as io

    root, sae_dir, cfg, _ = setup
    run = tmp_path / "runs" / "d"
    shutil.copytree(root / "runs" / "r", run)
    text = cfg.read_text().replace(f"runs_dir: {root / 'runs'}", f"runs_dir: {tmp_path / 'runs'}").replace(
        "name: r", "name: d")
    (tmp_path / "d.yaml").write_text(text)
    assert main(["attribute", str(tmp_path / "d.yaml"), "--attribution.n_steps", "2"]) == 0
    ckpt = run / "attribution.ckpt.safetensors"
    before = ckpt.read_bytes()
    original = io.atomic_path

    def full(path):
        if str(path).endswith(".ckpt.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path)

    monkeypatch.setattr(io, "atomic_path", full)
    one_line_exit_2(capsys, ["attribute", str(tmp_path / "d.yaml"), "--attribution.n_steps", "4"],
                    "No space left on device")
    assert ckpt.read_bytes() == before  # the old checkpoint is intact


# ---- 9: SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_stops_with_the_resume_message(setup, tmp_path):
    root, _, _, model_dir = setup
    proc = subprocess.Popen([sys.executable, "-m", "ipg_sae", "sample", "--name", "t", "--runs_dir",
                             str(tmp_path / "runs"), "--model.name", str(model_dir), "--task.n_problems", "40",
                             "--task.few_shot", "0", "--sampling.max_new_tokens", "4", "--no-wandb",
                             "--reward", "tests.helpers:slow_reward"], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(8)  # past the imports and the model load: sampling is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-500:]
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    # sampling keeps no partial work: the message says so instead of promising a resume (issue 20, item 16)
    assert "stopped: terminated (SIGTERM)" in last and "keeps no partial work, rerun it to start over" in last


# ---- 10: W&B that cannot be reached ----------------------------------------------------------------


@pytest.mark.slow
def test_an_unreachable_wandb_costs_seconds_not_minutes(tiny_llama_dir, tmp_path, monkeypatch):
    import socket

    import ipg_sae.tracking as tracking
    from ipg_sae.config import load_config
    from ipg_sae.experiments.pipeline import PipelineConfig, run_pipeline
    from tests import tiny

    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))

    def cfg(name):
        return load_config(PipelineConfig, None, {
            "name": name, "runs_dir": str(tmp_path / "runs"), "model.name": str(tiny_llama_dir),
            "task.n_problems": 2, "task.few_shot": 0, "sampling.n_samples": 2, "sampling.max_new_tokens": 4,
            "reward": "tests.helpers:text_length_mod_7", "sae.load": [{"path": str(sae_dir)}],
            "attribution.n_steps": 2, "baselines": [], "selection.k": 2, "selection.n_bootstrap": 0,
            "evaluation.gammas": [0.0], "evaluation.seeds": [0], "evaluation.n_random_sets": 0,
            "evaluation.task.n_problems": 2, "evaluation.task.few_shot": 0,
            "evaluation.sampling.max_new_tokens": 4, "evaluation.n_bootstrap": 100})

    monkeypatch.setenv("WANDB_MODE", "offline")
    t0 = time.perf_counter()
    run_pipeline(cfg("offline"))
    offline = time.perf_counter() - t0
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setattr(tracking, "_unreachable", None)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    run_pipeline(cfg("online"))
    online = time.perf_counter() - t0
    assert online < offline + 15, (online, offline)
    assert list((tmp_path / "runs" / "online" / "wandb").glob("offline-run-*"))  # it logged offline instead


def test_atomic_outputs_get_the_mode_a_plain_open_would(tmp_path):
    """mkstemp's 0600 must not leak into run outputs that collaborators read."""
    from ipg_sae import io

    io.write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    mode = (tmp_path / "atomic.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert mode == 0o666 & ~io._UMASK
