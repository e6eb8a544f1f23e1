from pathlib import Path

from ipg_sae.tracking import Tracker, WandbConfig, read_offline_run, resolve_mode


def test_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # whatever the machine's own login
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


def test_auto_mode_goes_online_after_wandb_login(tmp_path, monkeypatch):
    """`wandb login` writes the API key to the netrc file; auto mode reads it there."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode(WandbConfig()) == "offline"  # no credentials anywhere
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_mode(WandbConfig()) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a self-hosted server: its own entry
    assert resolve_mode(WandbConfig()) == "offline"


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def test_unreachable_server_falls_back_offline_once(tmp_path, monkeypatch, caplog):
    import time

    import ipg_sae.tracking as tracking

    monkeypatch.setattr(tracking, "_unreachable", None)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    for job in ("sample", "attribute"):
        with Tracker(WandbConfig(project="t"), tmp_path, "r", job) as tr:
            assert tr.active and tr.mode == "offline"
            tr.log({"x": 1})
    assert time.perf_counter() - t0 < 20
    assert caplog.text.count("cannot be reached") == 1  # reported once per process
    assert "wandb sync" in caplog.text
    assert len(read_offline_run(tmp_path)["runs"]) == 2


def test_a_killed_job_continues_its_wandb_run(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(KeyboardInterrupt):
        with Tracker(WandbConfig(project="t"), tmp_path, "r", "attribute") as tr:
            first = tr.run.id
            tr.log({"done": 1})
            raise KeyboardInterrupt
    with Tracker(WandbConfig(project="t"), tmp_path, "r", "attribute") as tr:
        assert tr.run.id == first  # resumed
        tr.log({"done": 2})
    with Tracker(WandbConfig(project="t"), tmp_path, "r", "attribute") as tr:
        assert tr.run.id != first  # the job had finished: a new W&B run
    runs = read_offline_run(tmp_path)["runs"]
    assert [r["id"] for r in runs].count(first) == 2


def test_lineage_records_made_and_used_artifacts(tmp_path, monkeypatch):
    from ipg_sae.tracking import artifact_name

    monkeypatch.setenv("WANDB_MODE", "offline")
    data = tmp_path / "demo" / "trajectories.jsonl"
    data.parent.mkdir()
    data.write_text('{"id": 1}\n')
    name = artifact_name("trajectories", data)
    assert name == "demo-trajectories"
    assert artifact_name("sae", tmp_path / "demo" / "sae" / "layer_15") == "demo-sae-layer_15"
    assert artifact_name("attribution", tmp_path / "demo" / "baselines" / "act") == "demo-attribution-act"
    # every run's evaluation is its own artifact, not one "eval-evaluation" shared by every pipeline of a project
    assert artifact_name("evaluation", tmp_path / "demo" / "eval") == "demo-evaluation"
    with Tracker(WandbConfig(project="t"), tmp_path / "a", "r", "sample") as tr:
        tr.artifact(name, "dataset", data)
    with Tracker(WandbConfig(project="t"), tmp_path / "b", "r", "attribute") as tr:
        tr.use(name, "dataset", data)
    made = read_offline_run(tmp_path / "a")["made"]
    used = read_offline_run(tmp_path / "b")["used"]
    assert [a["name"] for a in made] == [a["name"] for a in used] == ["demo-trajectories"]
    assert made[0]["digest"] == used[0]["digest"]  # same content: the same W&B version, one lineage edge


def test_offline_artifacts_reference_their_files_relative_to_the_run_and_copy_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "runs" / "demo"
    (run_dir / "sae" / "layer_1").mkdir(parents=True)
    weights = run_dir / "sae" / "layer_1" / "sae_weights.safetensors"
    weights.write_bytes(b"\x00" * 4096)
    outside = tmp_path / "published.txt"
    outside.write_text("x")
    with Tracker(WandbConfig(project="t"), run_dir, "demo", "sae") as tr:
        tr.artifact("demo-sae-layer_1", "model", run_dir / "sae" / "layer_1")
    for job in ("attribute-ipg", "attribute-act", "evaluate"):  # used by several jobs: still never copied
        with Tracker(WandbConfig(project="t"), run_dir, "demo", job) as tr:
            tr.use("demo-sae-layer_1", "model", run_dir / "sae" / "layer_1")
            tr.use("published", "model", outside)
    runs = read_offline_run(run_dir)["runs"]
    made = [a for r in runs for a in r["made"]]
    assert made[0]["files"] == {"sae_weights.safetensors": "sae/layer_1/sae_weights.safetensors"}
    used = [a for r in runs for a in r["used"] if a["name"] == "published"]
    assert used and all(a["files"]["published.txt"] == str(outside.resolve()) for a in used)
    staged = [p for p in (run_dir / "wandb-data").rglob("*") if p.is_file()] if (run_dir / "wandb-data").exists() else []
    assert not staged, staged  # nothing staged: a 4 KB file used by four jobs costs no copies


def test_relative_input_paths_outside_the_run_dir_are_recorded_and_keep_wandb_alive(tmp_path, monkeypatch):
    """A job started from the repository with relative paths (runs/study/length using runs/study/sae/layer_15):
    the used artifact names the file where it is, and the W&B run keeps logging (it once resolved the path from
    inside the run directory, failed, and dropped W&B for the rest of the job)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    sae = Path("runs/study/sae/layer_15")
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text("{}")
    traj = Path("runs/study/length/trajectories.jsonl")
    traj.parent.mkdir(parents=True)
    traj.write_text('{"id": 1}\n')
    with Tracker(WandbConfig(project="t"), Path("runs/study/length"), "study", "attribute-ipg") as tr:
        tr.use("study-sae-layer_15", "model", sae)
        tr.use("study-length-trajectories", "dataset", traj)
        assert tr.run is not None
        tr.log({"done": 1})
    run = read_offline_run(Path("runs/study/length"))
    used = {a["name"]: a["files"] for a in run["used"]}
    assert used["study-sae-layer_15"] == {"cfg.json": str((tmp_path / sae / "cfg.json").resolve())}
    assert used["study-length-trajectories"] == {"trajectories.jsonl": "trajectories.jsonl"}  # inside: relative
    assert run["history"][-1]["done"] == 1


def test_the_evaluation_run_summary_holds_the_targets_numbers(tmp_path, monkeypatch, tiny_llama_dir):
    from ipg_sae.config import load_config
    from ipg_sae.jobs import EvaluateJobConfig, run_evaluate
    from tests import tiny

    monkeypatch.setenv("WANDB_MODE", "offline")
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    (tmp_path / "set.yaml").write_text("[[2, 3], [2, 5]]\n")
    cfg = load_config(EvaluateJobConfig, None, {
        "name": "e", "runs_dir": str(tmp_path / "runs"), "model.name": str(tiny_llama_dir),
        "saes": [{"path": str(sae_dir)}], "sets": {"ipg": str(tmp_path / "set.yaml")}, "evaluation.k": 2,
        "evaluation.gammas": [0.0, 2.0], "evaluation.seeds": [0], "evaluation.n_random_sets": 2,
        "evaluation.estimator": "sampling", "evaluation.n_bootstrap": 100, "evaluation.task.n_problems": 3,
        "evaluation.task.few_shot": 0, "evaluation.sampling.max_new_tokens": 5})
    result, _ = run_evaluate(cfg, progress=False)
    run = read_offline_run(cfg.run_dir)
    target = next(r for r in result.rows if r["set"] == "ipg" and r["gamma"] == 2.0)
    null = next(r for r in result.rows if r["condition"] == "random_mean" and r["gamma"] == 2.0)
    assert run["summary"]["evaluate/ipg/g2/accuracy"] == target["accuracy"]
    assert run["summary"]["evaluate/random_mean/g2/accuracy"] == null["accuracy"]
    assert "evaluate/accuracy" not in run["summary"] and run["summary"]["evaluate/target"] == "ipg"
    headline = next(c for c in result.comparisons if c["against"] == "random" and c["gamma"] == 2.0
                    and c["metric"] == "accuracy")
    assert run["summary"]["evaluate/headline/g2/accuracy_vs_random"] == headline["delta"]
    steps = [h for h in run["history"] if any(k.startswith("evaluate/") and "random_draws" not in k for k in h)]
    assert len(steps) == 1 and "evaluate/ipg/g0/accuracy" in steps[0]  # one step, each set and gamma its own key
    # no duplicates: for correctness the reward is the accuracy, and each random draw is a table row, not keys
    keys = [k for k in run["summary"] if k.startswith("evaluate/")]
    assert not [k for k in keys if k.endswith(("/reward", "/reward_delta")) or "random-draw" in k or "/random-" in k]
    draws = [r for r in result.rows if r["condition"] == "random"]
    assert len(draws) == 4 and any(k.startswith("evaluate/random_draws") for k in run["summary"])
    made = next(a for a in run["made"] if a["type"] == "evaluation")
    assert made["name"] == "e-evaluation" and made["metadata"]["target"] == "ipg"  # the verdict travels with it
    assert made["metadata"]["vs_random"] == [{k: c[k] for k in ("gamma", "delta", "lo", "hi", "verdict")}
                                             for c in result.comparisons
                                             if c["against"] == "random" and c["metric"] == "accuracy"]
    files = {f for a in run["made"] if a["type"] == "evaluation" for f in a["files"]}
    assert {"report.md", "summary.json", "samples.csv"} <= files
