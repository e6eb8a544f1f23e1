import subprocess
import sys

import pytest

from ipg_sae.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "sample" in out


@pytest.mark.parametrize("args,match", [
    (["sample", "/no/such.yaml"], "config file /no/such.yaml not found"),
    (["sample", "--task.name", "nope", "--no-wandb"], "unknown task"),
    (["sample", "--model.name", "/no/such/model.gguf", "--no-wandb"], "GGUF file /no/such/model.gguf not found"),
    (["sample", "--sampling.temperature", "hot"], "field `sampling.temperature` is 'hot'"),
])
def test_errors_are_one_line_exit_2(args, match, capsys, tmp_path):
    assert main(args + ["--runs_dir", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())  # nothing written for bad input
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(match, err), err


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "ipg_sae", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "sample" in r.stdout


def test_sample_job_writes_outputs_and_logs(tiny_llama_dir, tmp_path, monkeypatch):
    from ipg_sae.io import read_json
    from ipg_sae.tracking import read_offline_run
    from ipg_sae.trajectories import load_trajectories

    monkeypatch.setenv("WANDB_MODE", "offline")
    rc = main(["sample", "--name", "t", "--runs_dir", str(tmp_path), "--model.name", str(tiny_llama_dir),
               "--task.n_problems", "2", "--sampling.n_samples", "2", "--sampling.max_new_tokens", "4"])
    assert rc == 0
    run_dir = tmp_path / "t"
    assert len(load_trajectories(run_dir / "trajectories.jsonl")) == 4
    summary = read_json(run_dir / "sample_summary.json")["metrics"]
    logged = read_offline_run(run_dir)
    assert logged["summary"]["sample/accuracy"] == summary["accuracy"]
    assert logged["summary"]["sample/unparseable"] == summary["unparseable"]
