"""Provably fresh, never destructive (issue 20): each test feeds the reproduction of one numbered item.

Stale reuse (1-4), cells that catch accidents (5, 13), the explorer's embedded data (6), cells kept when
settings change (7), symbolic links inside a run (8), a silent W&B server (9), a real full disk (10),
damaged inputs that must be one line (11, 12, 14), checks before the first stage (15), messages (16), and
a viewed run that must not run its code (17).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ipg_sae.cells import LOGPROBS, CellStore
from ipg_sae.config import load_config
from ipg_sae.digest import file_digest, tree_digest
from ipg_sae.errors import IPGError
from ipg_sae.io import run_lock, write_text
from ipg_sae.experiments.stages import Stage, run_stages
from tests import tiny

REPO = Path(__file__).resolve().parents[1]


def _restore_mtime_after(path: Path, edit) -> None:
    """Edit ``path`` in place, then put its modification time back (what item 2's attack does)."""
    st = path.stat()
    edit(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---- 1: the study's stages carry the model's and the SAEs' digests -----------------------------------


def _small_study(tmp_path: Path, model_dir: Path, reward: str, n_problems: int, **overrides):
    """A study config on a tiny model with a random SAE at layer 2, W&B off."""
    from ipg_sae.experiments.study import StudyConfig

    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    task = {"name": "arithmetic", "n_problems": n_problems, "few_shot": 0}
    return load_config(StudyConfig, None, {
        "name": "s", "runs_dir": str(tmp_path / "runs"), "model.name": str(model_dir), "task": task,
        "sae.load": [{"path": str(sae_dir)}], "rewards": [reward], "methods": ["ipg"],
        "heldout": {**task, "offset": 500}, "wandb.enabled": False, **overrides})


@pytest.mark.slow
def test_the_study_reruns_after_the_sae_or_the_model_changes_at_the_same_path(tiny_llama_dir, tmp_path, caplog,
                                                                               monkeypatch):
    from ipg_sae.experiments.study import run_study

    monkeypatch.setenv("WANDB_MODE", "disabled")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    sae_dir = tmp_path / "sae"
    cfg = _small_study(tmp_path, model_dir, "tests.helpers:text_length_mod_7", 3, **{
        "sampling.n_samples": 3, "sampling.max_new_tokens": 6, "attribution.n_steps": 2,
        "heldout_sampling.n_samples": 3, "heldout_sampling.max_new_tokens": 6, "k": 2, "ks": [2], "null_sets": 2,
        "other_null_sets": 1, "curve_null_sets": 0, "confirm_samples": 1, "n_bootstrap": 100})
    run_study(cfg)
    summary = (cfg.run_dir / "study" / "summary.json").read_text()
    other = tmp_path / "other"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=11).save_model(str(other))
    shutil.copy(other / "sae_weights.safetensors", sae_dir / "sae_weights.safetensors")  # same path, new weights
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_study(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert any("stage sae: settings or inputs changed" in m for m in messages)
    assert not any(m.startswith("stage score: already done") for m in messages)
    assert (cfg.run_dir / "study" / "summary.json").read_text() != summary  # IPG's set moved with the SAE
    # the model's weights replaced at the same path: everything from sampling on is recomputed
    from transformers import AutoTokenizer

    tiny.build_model("llama", tmp_path / "model2", vocab_size=len(AutoTokenizer.from_pretrained(model_dir)), seed=5)
    shutil.copy(tmp_path / "model2" / "model.safetensors", model_dir / "model.safetensors")
    caplog.clear()
    run_study(cfg)
    assert any("stage sample: settings or inputs changed" in r.getMessage() for r in caplog.records)
    assert sum("already done" in r.getMessage() for r in caplog.records) == 0


# ---- 2: digests do not trust a restored modification time; a stripped sidecar is an error ------------


def test_an_edit_with_its_mtime_restored_is_seen(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    path.write_text('{"reward": 0.0}\n{"reward": 1.0}\n')
    before = tree_digest([path])
    _restore_mtime_after(path, lambda p: p.write_text('{"reward": 1.0}\n{"reward": 1.0}\n'))  # same size
    assert tree_digest([path]) != before


def test_a_flipped_byte_in_an_sae_with_its_mtime_restored_is_refused(tmp_path):
    from ipg_sae.saes import load_sae, write_sae_sidecar

    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 16, layer=1, d_sae=32, k=4).save_model(str(sae_dir))
    write_sae_sidecar(sae_dir, "tiny", 1)
    load_sae(str(sae_dir))  # the digest of the intact file is now remembered
    _restore_mtime_after(sae_dir / "sae_weights.safetensors", _flip_byte)
    with pytest.raises(IPGError, match="its sha256 differs"):
        load_sae(str(sae_dir))


def test_an_empty_or_stripped_sidecar_is_an_error(tmp_path):
    from ipg_sae.saes import SIDECAR, load_sae, write_sae_sidecar

    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 16, layer=1, d_sae=32, k=4).save_model(str(sae_dir))
    write_sae_sidecar(sae_dir, "tiny", 1)
    for content in ({}, {"model": "x"}, {"weights_sha256": ""}):
        (sae_dir / SIDECAR).write_text(json.dumps(content))
        with pytest.raises(IPGError, match="records no weights_sha256"):
            load_sae(str(sae_dir))


def test_verify_ignores_the_memo(tmp_path, monkeypatch):
    import ipg_sae.digest as digest

    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    file_digest(path)
    hashed = []
    original = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda p: hashed.append(p) or original(p))
    file_digest(path)
    assert hashed == []  # unchanged: remembered
    monkeypatch.setenv("IPG_SAE_VERIFY", "1")
    file_digest(path)
    assert hashed == [path]


# ---- 3: a user reward function's code is part of every key -------------------------------------------


def test_editing_a_reward_function_changes_the_keys_of_what_stored_its_rewards(tmp_path, monkeypatch):
    import importlib

    from ipg_sae.experiments.pipeline import STAGES, PipelineConfig
    from ipg_sae.rewards import get_reward
    from ipg_sae.experiments.stages import declared_view, stage_key

    (tmp_path / "myrewards.py").write_text("def reward(prompt, completion, reference):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(PipelineConfig, None, {"runs_dir": str(tmp_path / "runs"), "reward": "myrewards:reward",
                                             "sae.load": [{"path": "x"}]})
    sample = next(s for s in STAGES if s.name == "sample")
    monkeypatch.setattr("ipg_sae.experiments.pipeline.model_inputs", lambda c: {"model": "fixed"})
    view = declared_view(cfg, STAGES, STAGES.index(sample))
    first_identity, first_key = get_reward("myrewards:reward").identity, stage_key(sample, view, "")
    (tmp_path / "myrewards.py").write_text("def reward(prompt, completion, reference):\n    return 2.0\n")
    importlib.reload(importlib.import_module("myrewards"))
    assert get_reward("myrewards:reward").identity != first_identity
    assert stage_key(sample, view, "") != first_key
    assert get_reward("correctness").identity == {"name": "correctness", "code": None}


# ---- 4: a stage marker's summary is covered by its digest ---------------------------------------------


class _Job:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir


def test_an_edited_stage_summary_reruns_the_stage(tmp_path, caplog):
    runs = []

    def run(cfg):
        runs.append(1)
        write_text(cfg.run_dir / "out.txt", "x")
        return {"top": [[15, 514]]}

    stages = [Stage("only", run, outputs=lambda c: [c.run_dir / "out.txt"], identity=lambda c: "settings")]
    job = _Job(tmp_path / "run")
    assert run_stages(job, stages)["only"] == {"top": [[15, 514]]}
    assert run_stages(job, stages)["only"] == {"top": [[15, 514]]} and len(runs) == 1
    marker = job.run_dir / "stages" / "only.json"
    doc = json.loads(marker.read_text())
    doc["summary"]["top"] = [[15, 7]]
    marker.write_text(json.dumps(doc))
    caplog.set_level(logging.WARNING)
    assert run_stages(job, stages)["only"] == {"top": [[15, 514]]} and len(runs) == 2
    assert "summary was edited" in caplog.text


# ---- 6: the explorer's data is valid JSON inside <script> for every string ---------------------------


def test_the_embedded_data_survives_every_string_that_could_break_a_script_block():
    import re

    from ipg_sae.explorer import render

    nasty = ["<!--", "</script>", "<script>", "a\u2028b\u2029c", "\udc80lone", "</SCRIPT >", "-->", "&lt;", "é"]
    data = {"run": {"name": "<!-- run </script>"}, "latents": [], "details": {}, "trajectories": [nasty]}
    page = render(data)
    payload = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(payload) == data  # valid JSON, the same data back
    for bad in ("<!--", "</script", "<script", "\u2028", "\u2029"):
        assert bad not in payload.lower()


# ---- 7: a changed evaluation setting keeps every cell whose key still matches -------------------------


def test_pipeline_keeps_cells_when_the_bootstrap_changes(pipeline_cfg, caplog):  # noqa: F811
    import dataclasses

    from ipg_sae.experiments.pipeline import run_pipeline

    run_pipeline(pipeline_cfg)
    cells = pipeline_cfg.run_dir / "eval" / "cells"
    precious = cells / "precious.txt"
    precious.write_text("mine")
    before = sorted(p.name for p in cells.iterdir())
    changed = dataclasses.replace(pipeline_cfg, evaluation=dataclasses.replace(pipeline_cfg.evaluation,
                                                                               n_bootstrap=300))
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_pipeline(changed)
    messages = [r.getMessage() for r in caplog.records]
    assert any("stage evaluate: settings or inputs changed" in m for m in messages)
    assert sorted(p.name for p in cells.iterdir()) == before and precious.read_text() == "mine"
    assert sum(": reused" in m and m.startswith("cell ") for m in messages) >= 3  # every cell read back


# ---- 8: never write or delete through a symbolic link inside a run ----------------------------------


def test_writes_and_deletes_never_follow_a_link_out_of_the_run(tmp_path):
    from ipg_sae.io import check_inside_run, remove_tree

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cells").mkdir(parents=True)
    (elsewhere / "cells" / "precious.txt").write_text("mine")
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "explorer").symlink_to(elsewhere, target_is_directory=True)
    (run_dir / "eval").symlink_to(elsewhere, target_is_directory=True)
    with run_lock(run_dir):
        with pytest.raises(IPGError, match="symbolic link inside the run directory"):
            write_text(run_dir / "explorer" / "index.html", "page")
        with pytest.raises(IPGError, match="symbolic link inside the run directory"):
            remove_tree(run_dir / "eval" / "cells")
        write_text(run_dir / "report.md", "fine")  # a real folder is fine
    assert not (elsewhere / "index.html").exists() and (elsewhere / "cells" / "precious.txt").read_text() == "mine"
    check_inside_run(run_dir / "explorer" / "index.html")  # outside a held run nothing is refused


def test_a_stale_path_behind_a_link_is_not_deleted(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("mine")
    job = _Job(tmp_path / "run")
    job.run_dir.mkdir()
    (job.run_dir / "cache").symlink_to(elsewhere, target_is_directory=True)
    calls = []
    stages = [Stage("s", lambda c: calls.append(1) or {}, outputs=lambda c: [], identity=lambda c: len(calls),
                    stale=lambda c: [c.run_dir / "cache" / "precious.txt"])]
    with run_lock(job.run_dir):
        run_stages(job, stages)
        with pytest.raises(IPGError, match="refusing to delete"):
            run_stages(job, stages)  # settings changed: the stale file would be deleted through the link
    assert (elsewhere / "precious.txt").read_text() == "mine"


# ---- 9: a W&B server that accepts connections but never answers ---------------------------------------


def test_a_silent_wandb_server_falls_back_to_offline_logging_in_seconds(tmp_path, monkeypatch):
    import ipg_sae.tracking as tracking
    from ipg_sae.tracking import Tracker, WandbConfig

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_hold():  # accepts, reads nothing back, never answers
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except socket.timeout:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setattr(tracking, "_unreachable", None)
        t0 = time.perf_counter()
        with Tracker(WandbConfig(mode="online"), tmp_path / "run", "silent", "test") as tracker:
            assert tracker.mode == "offline" and tracker.active
            tracker.log({"x": 1.0})
        assert time.perf_counter() - t0 < 45  # seconds (the probe), then an offline run: not 60-76 s and nothing
        assert accepted, "the probe never reached the silent server"
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
        for conn in accepted:
            conn.close()


# ---- 10: a real full disk is one line naming the file --------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (root only: skipped with the reason where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()[:80]}): the full-disk test needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_names_the_file_for_tensors_and_text(full_disk):
    from safetensors.torch import save_file

    from ipg_sae.io import atomic_path

    big = {"x": torch.zeros(200_000)}  # 800 KB: more than the disk holds
    with pytest.raises(OSError) as err:
        with atomic_path(full_disk / "attribution.safetensors") as tmp:
            save_file(big, str(tmp))
    assert err.value.filename == str(full_disk / "attribution.safetensors") and "No space" in str(err.value)
    with pytest.raises(OSError) as err:
        write_text(full_disk / "explorer" / "index.html", "x" * 1_000_000)
    assert err.value.filename == str(full_disk / "explorer" / "index.html")
    assert not [p for p in full_disk.rglob("*") if p.is_file()]  # no half-written file left behind


def test_the_cli_says_one_line_on_a_full_disk(full_disk, tiny_llama_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "ipg_sae", "sample", "--name", "t", "--runs_dir", str(full_disk),
                           "--model.name", str(tiny_llama_dir), "--task.n_problems", "60", "--task.few_shot", "0",
                           "--sampling.n_samples", "4", "--sampling.max_new_tokens", "8", "--no-wandb"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-800:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write or read") and str(full_disk) in last and "No space" in last
    assert "Traceback" not in proc.stderr


# ---- 11: an attribution sidecar with the wrong structure ---------------------------------------------


@pytest.fixture(scope="module")
def attribution_dir(tmp_path_factory, tiny_llama_dir):
    from ipg_sae.attribution import attribute
    from ipg_sae.models import hidden_size

    model, tok, trajs = tiny.sample_tiny(tiny_llama_dir, n_problems=2, n_samples=3, max_new_tokens=5)
    out = tmp_path_factory.mktemp("attr")
    attribute(model, {1: tiny.random_sae("topk", hidden_size(model), 1, d_sae=32, k=4)}, trajs, n_steps=2,
              tokenizer=tok, out_dir=out, progress=False)
    return out


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("method"), "method"),
    (lambda m: m.update(layers=["two"]), "layers"),
    (lambda m: m.update(layers=[1, 5], d_sae={"1": 32, "5": 32}), "holds no tensors for it"),
    (lambda m: m.update(prompt_ids=5), "prompt_ids"),
    (lambda m: m.update(d_sae=[64]), "d_sae"),
])
def test_a_sidecar_with_the_wrong_structure_is_one_line(attribution_dir, tmp_path, edit, field):
    from ipg_sae.attribution import AttributionResult

    run = tmp_path / "run"
    shutil.copytree(attribution_dir, run)
    meta = json.loads((run / "attribution.json").read_text())
    edit(meta)
    (run / "attribution.json").write_text(json.dumps(meta))
    with pytest.raises(IPGError, match=field):
        AttributionResult.load(run)


# ---- 12: trajectory rows with the wrong types ----------------------------------------------------------


@pytest.mark.parametrize("value", [None, "1 2 3", {"ids": [1]}, [1, "x"]])
def test_trajectory_rows_with_wrong_token_ids_are_one_line(tmp_path, value):
    from ipg_sae.trajectories import load_trajectories

    row = {"id": "p/s0", "prompt_id": "p", "sample_index": 0, "prompt": "q", "completion": "a", "reference": "1",
           "prompt_ids": [1, 2], "completion_ids": value, "reward": 1.0}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(IPGError, match="completion_ids"):
        load_trajectories(path)


# ---- 13: damaged cells are recomputed with a warning -------------------------------------------------


@pytest.mark.parametrize("damage", [b"\xff\xfe not utf-8\n", b"[]\n", b'{"cell": {}}\n[]\n', b""])
def test_a_damaged_cell_is_recomputed(tmp_path, caplog, damage):
    store = CellStore(tmp_path / "cells")
    key = {"latents": [[1, 2]], "gamma": 0.0}
    computed = []
    compute = lambda: computed.append(1) or torch.tensor([0.5, -1.0], dtype=torch.float64)  # noqa: E731
    first = store.fetch("logp", key, compute, LOGPROBS)
    path = next((tmp_path / "cells").glob("logp.*.jsonl"))
    assert torch.equal(store.fetch("logp", key, compute, LOGPROBS), first) and len(computed) == 1
    path.write_bytes(damage)
    caplog.set_level(logging.WARNING)
    again = store.fetch("logp", key, compute, LOGPROBS)
    assert torch.equal(again, first) and len(computed) == 2
    assert "recomputing it" in caplog.text


def test_a_damaged_evaluation_cell_is_recomputed(tmp_path, tiny_llama_dir, caplog):
    from ipg_sae.evaluation import EvalConfig, evaluate
    from ipg_sae.models import hidden_size, load_model
    from ipg_sae.sampling import SamplingConfig
    from ipg_sae.tasks import TaskConfig, build_prompts, load_problems

    model, tok = load_model(str(tiny_llama_dir))
    task = TaskConfig(n_problems=2, offset=300, few_shot=0)
    problems = load_problems(task)
    saes = {1: tiny.random_sae("topk", hidden_size(model), 1, d_sae=32, k=4)}
    cfg = EvalConfig(gammas=[2.0], seeds=[0], n_random_sets=0, n_bootstrap=100, estimator="sampling",
                     sampling=SamplingConfig(n_samples=1, max_new_tokens=4, batch_size=4))
    args = (model, tok, saes, problems, build_prompts(tok, problems, task), {"ipg": [(1, 3)]}, cfg)
    first = evaluate(*args, out_dir=tmp_path / "eval", progress=False)
    for damage in (b"\xff\xfe\n", b"[]\n"):
        for cell in (tmp_path / "eval" / "cells").glob("*.jsonl"):
            cell.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = evaluate(*args, out_dir=tmp_path / "eval", progress=False)
        assert again.rows == first.rows and "is damaged" in caplog.text


# ---- 14: bad `sets` targets --------------------------------------------------------------------------


def test_bad_selection_sources_are_one_line(tmp_path, attribution_dir):
    from ipg_sae.selection import load_selection

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(IPGError, match="tensor file, not a selection"):
        load_selection(str(weights))
    table = tmp_path / "features.csv"
    table.write_bytes(b"layer,latent\n\xff\xfe,1\n")
    with pytest.raises(IPGError, match="not UTF-8"):
        load_selection(str(table))
    bad_yaml = tmp_path / "set.yaml"
    bad_yaml.write_text("[[1, 2], [3, 4\n")
    with pytest.raises(IPGError, match="not valid YAML"):
        load_selection(str(bad_yaml))
    assert load_selection(str(attribution_dir / "attribution.safetensors"), k=2)  # its run is meant


# ---- 15: the context check runs before the first stage -----------------------------------------------


def test_a_held_out_max_new_tokens_beyond_the_context_fails_before_any_stage(pipeline_cfg):  # noqa: F811
    import dataclasses

    from ipg_sae.experiments.pipeline import run_pipeline

    sampling = dataclasses.replace(pipeline_cfg.evaluation.sampling, max_new_tokens=100_000)
    cfg = dataclasses.replace(pipeline_cfg, evaluation=dataclasses.replace(pipeline_cfg.evaluation, sampling=sampling))
    with pytest.raises(IPGError, match="evaluation.sampling.max_new_tokens"):
        run_pipeline(cfg)
    assert not (cfg.run_dir / "stages").exists() and not (cfg.run_dir / "trajectories.jsonl").exists()


# ---- 16: late or wrong messages ----------------------------------------------------------------------


def test_a_run_directory_linked_to_a_missing_target_is_made(tmp_path):
    link = tmp_path / "runs" / "x"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "big-disk" / "x", target_is_directory=True)
    with run_lock(link):
        write_text(link / "report.md", "ok")
    assert (tmp_path / "big-disk" / "x" / "report.md").read_text() == "ok"


def test_a_folder_in_place_of_an_output_names_the_output(tmp_path):
    (tmp_path / "attribution.ckpt.safetensors").mkdir()
    with pytest.raises(OSError) as err:
        write_text(tmp_path / "attribution.ckpt.safetensors", "x")
    assert err.value.filename == str(tmp_path / "attribution.ckpt.safetensors")


def test_the_explore_lock_message_does_not_suggest_a_name_flag(tmp_path):
    held = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ipg_sae.io import run_lock\n"
                             f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(30)"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(IPGError) as err:
            with run_lock(tmp_path, lock_hint=False):
                pass
        assert "in use by" in str(err.value) and "--name" not in str(err.value)
        with pytest.raises(IPGError, match="--name"):
            with run_lock(tmp_path):
                pass
    finally:
        held.kill()
        held.wait()


def test_rewards_that_differ_by_float_noise_have_no_variance():
    from ipg_sae.attribution.path import advantages, has_variance

    noisy = torch.tensor([0.3, 0.3 + 5e-17, 0.3], dtype=torch.float64)
    assert not has_variance(noisy) and torch.equal(advantages(noisy), torch.zeros(3, dtype=torch.float64))
    assert has_variance([0.0, 1.0]) and has_variance([1e6, 1e6 + 1]) and not has_variance([1e12, 1e12 + 1e-4])


def test_a_study_without_reward_variance_says_so(tiny_llama_dir, tmp_path, monkeypatch):
    from ipg_sae.experiments.study import run_study

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = _small_study(tmp_path, tiny_llama_dir, "tests.helpers:constant_reward", 2, **{
        "sampling.n_samples": 2, "sampling.max_new_tokens": 3, "k": 1, "ks": [1]})
    with pytest.raises(IPGError, match="no attribution prompt's samples got different"):
        run_study(cfg)


# ---- 17: viewing a run never runs its code -------------------------------------------------------------


def test_explore_ignores_the_runs_own_trust_remote_code(attribution_dir, tiny_llama_dir, tmp_path):
    import yaml

    from ipg_sae.explorer import build

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_llama_dir, evil)
    (evil / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'llama'\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (evil / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    shutil.copytree(attribution_dir, run)
    from ipg_sae.trajectories import save_trajectories

    save_trajectories(run / "trajectories.jsonl",  # the run's trajectories, for the page
                      tiny.sample_tiny(tiny_llama_dir, n_problems=2, n_samples=3, max_new_tokens=5)[2])
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=1, d_sae=32, k=4).save_model(str(sae_dir))
    (run / "attribute_config.yaml").write_text(yaml.safe_dump(
        {"model": {"name": str(evil), "trust_remote_code": True}, "saes": [{"path": str(sae_dir)}]}))
    try:
        build(run)
    except IPGError:
        pass  # whatever the run holds, its code must not have run
    assert not marker.exists()
    try:  # the user's own word on the command line is what lets it run: the test would see the code run
        build(run, trust_remote_code=True)
    except Exception:
        pass
    assert marker.exists()
