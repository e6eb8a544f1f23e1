"""The run lock and the symbolic-link guard hold whatever the environment says (issue 36, item 9), and an
argument that is not UTF-8 is one line (item 14)."""

from __future__ import annotations

import fcntl
import os

import pytest
import torch.distributed as dist

from ipg_sae.errors import IPGError
from ipg_sae.io import run_lock, write_text


def _outside_link(tmp_path, name: str):
    """A run directory whose ``name`` folder is a link to a folder outside it holding an ``index.html``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "index.html").write_text("the user's page")
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / name).symlink_to(outside, target_is_directory=True)
    return run, outside


# ---- 9: RANK in the environment is not a process group -----------------------------------------


def test_rank_set_outside_torchrun_keeps_the_symlink_guard(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run, outside = _outside_link(tmp_path, "explorer")
    with run_lock(run):
        with pytest.raises(IPGError, match="is a symbolic link inside the run directory"):
            write_text(run / "explorer" / "index.html", "overwritten")
    assert (outside / "index.html").read_text() == "the user's page"


def test_rank_set_outside_torchrun_keeps_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # another holder (flock: per open file)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(IPGError, match="is in use by"):
            with run_lock(run):
                pass
    finally:
        os.close(fd)


def test_a_secondary_rank_of_a_process_group_shares_the_lock_and_keeps_the_guard(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    run, outside = _outside_link(tmp_path, "shards")
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # rank 0 holds it
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with run_lock(run):  # not refused: the ranks share the directory
            with pytest.raises(IPGError, match="symbolic link"):
                write_text(run / "shards" / "rank1of2.safetensors", "x")
    finally:
        os.close(fd)
    assert sorted(p.name for p in outside.iterdir()) == ["index.html"]


@pytest.mark.parametrize("folder", ["wandb", "wandb-data"])
def test_wandb_never_writes_through_a_symlinked_folder(tmp_path, monkeypatch, folder):
    from ipg_sae.tracking import Tracker, WandbConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    run, outside = _outside_link(tmp_path, folder)
    with pytest.raises(IPGError, match=rf"{folder} is a symbolic link inside the run directory"):
        Tracker(WandbConfig(project="t"), run, "r", "sample")
    assert sorted(p.name for p in outside.iterdir()) == ["index.html"]


# ---- 14: an argument that is not UTF-8 ----------------------------------------------------------


def _bad(text: str) -> str:
    return os.fsdecode(text.encode() + b"\xff")  # what Python makes of a non-UTF-8 byte in argv


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_a_run_name_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch, tiny_llama_dir):
    from ipg_sae.cli import main

    code = main(["sample", "--name", _bad("demo"), "--runs_dir", str(tmp_path / "runs"),
                 "--model.name", str(tiny_llama_dir), "--task.n_problems", "2", "--sampling.n_samples", "1",
                 "--sampling.max_new_tokens", "2", "--no-wandb"])
    assert code == 2
    line = _one_line(capsys)
    assert "--name 'demo\\xff' holds a byte that is not UTF-8" in line
    assert not (tmp_path / "runs").exists()


def test_a_config_path_that_is_not_utf8_is_one_line(tmp_path, capsys):
    from ipg_sae.cli import main

    config = tmp_path / _bad("config") / "sample.yaml"
    config.parent.mkdir()
    config.write_text(f"runs_dir: {tmp_path / 'runs'}\n")
    assert main(["sample", str(config), "--no-wandb"]) == 2
    assert "the config path" in _one_line(capsys)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    from ipg_sae.cli import main

    config = tmp_path / "sample.yaml"
    config.write_bytes(b"name: caf\xe9\n")
    assert main(["sample", str(config), "--no-wandb"]) == 2
    assert "is not UTF-8; save the config file as UTF-8" in _one_line(capsys)
