import subprocess
import sys
from pathlib import Path

import pytest

from ipg_sae.cli import main

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("argv", [["--help"], ["pipline"], ["--version"], []])
def test_help_and_a_mistyped_command_do_not_import_torch(argv):
    """Help and argument errors answer at once: torch (seconds to import) is loaded by the command that runs."""
    code = ("import sys\nfrom ipg_sae.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)") % (argv,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stderr[-2000:]


def test_mistyped_command_names_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pipline", "configs/demo.yaml"])
    assert e.value.code == 2
    assert "unknown command 'pipline' (did you mean pipeline?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "choose one of sample, train-sae" in capsys.readouterr().err


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


@pytest.mark.parametrize("override,match", [
    ("--baselines=[actt]", "did you mean `act`"),
    ("--selection.normalize=foo", "choose one of 'none', 'length', 'l1'"),
    ("--reward=correctnes", "unknown reward 'correctnes'; did you mean 'correctness'"),
    ("--sae.train_config=nope.yaml", "sae.train_config: config file nope.yaml not found"),
    ("--sae.train_overrides={expansion_factr: 2}", "did you mean `expansion_factor`"),
    ("--evaluation.task.offset=5", "also in the attribution split"),
])
def test_pipeline_checks_every_stage_before_the_first_runs(override, match, capsys, tmp_path):
    """The mistakes that used to surface 15 minutes into the demo (after sampling, SAE training and IPG)."""
    assert main(["pipeline", "configs/demo.yaml", override, "--runs_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not any(tmp_path.iterdir())  # nothing started


def test_mistyped_flags_and_fields_get_suggestions(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--sampling.temprature", "0.3"])
    assert "did you mean --sampling.temperature?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--no-wandb", "--samplng.temperature", "0.3"])
    assert "did you mean --sampling.temperature?" in capsys.readouterr().err
    from ipg_sae.config import load_config
    from ipg_sae.errors import IPGError
    from ipg_sae.jobs import SampleJobConfig

    with pytest.raises(IPGError, match="unknown field `samplng` \\(did you mean `sampling`\\?\\)"):
        load_config(SampleJobConfig, None, {"samplng": {"temperature": 0.3}})


def test_help_describes_fields_and_version(capsys):
    from ipg_sae import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ipg-sae {__version__}"
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--attribution.delta_tol VALUE" in out and "completeness gap" in out
    assert "--sampling.temperature" not in out  # attribute has no sampling section
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--sampling.max_new_tokens VALUE generated tokens per completion at most" in out
