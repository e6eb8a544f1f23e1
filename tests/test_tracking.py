import os

from ipg_sae.tracking import Tracker, WandbConfig, read_offline_run, resolve_mode


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(WandbConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(WandbConfig()) == "online"
    assert resolve_mode(WandbConfig(enabled=False)) == "disabled"
    assert resolve_mode(WandbConfig(mode="offline")) == "offline"


def test_offline_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with Tracker(WandbConfig(project="t"), tmp_path, "r", "sample", {"lr": 0.1}) as tr:
        assert tr.active
        tr.log({"sample/accuracy": 0.25, "sample/unparseable": 2})
        tr.summary({"sample/accuracy": 0.25})
        tr.table("sample/completions", ["id", "text"], [["a", "x"]])
    run = read_offline_run(tmp_path)
    assert run["history"][0]["sample/accuracy"] == 0.25 and run["history"][0]["sample/unparseable"] == 2
    assert run["summary"]["sample/accuracy"] == 0.25
    assert run["config"]["lr"] == 0.1


def test_wandb_failure_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tr = Tracker(WandbConfig(project="t"), tmp_path, "r", "sample")

    def boom(*a, **k):
        raise RuntimeError("network down")

    monkeypatch.setattr(tr.run, "log", boom)
    tr.log({"a": 1})  # must not raise
    assert not tr.active and "W&B logging failed" in caplog.text
    tr.finish()


def test_disabled_writes_nothing(tmp_path):
    with Tracker(WandbConfig(enabled=False), tmp_path, "r", "sample") as tr:
        tr.log({"a": 1})
    assert not any(p.name == "wandb" for p in tmp_path.iterdir())
