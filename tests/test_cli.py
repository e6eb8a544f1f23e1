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


# Every command: a mistyped flag and its closest real one; and, for the commands that read a YAML file, a config with
# a typo at the top level (`nme`) and one in a nested section (the sections before it built and checked first).
TYPO_FLAGS = {
    "sample": ("--sampling.temprature", "--sampling.temperature"),
    "train-sae": ("--training_tokns", "--training_tokens"),
    "attribute": ("--attribution.n_stpes", "--attribution.n_steps"),
    "evaluate": ("--evaluation.gamas", "--evaluation.gammas"),
    "pipeline": ("--explorer.detial", "--explorer.detail"),
    "study": ("--nul_sets", "--null_sets"),
    "paths": ("--top_latnets", "--top_latents"),
    "steering-bench": ("--grid.max_setings", "--grid.max_settings"),
    "steer": ("--seeeds", "--seeds"),
    "explore": ("--explorer.neraest", "--explorer.nearest"),
    "explain": ("--baseline_tpo", "--baseline_top"),
    "export": ("--out_dri", "--out_dir"),
}
NESTED_TYPOS = {  # command -> (YAML text, the mistyped field, the suggestion)
    "sample": ("task: {n_problems: 4}\nsampling: {temprature: 0.5}\n", "sampling.temprature", "sampling.temperature"),
    "train-sae": ("layers: [3]\ndata: {task: {n_problem: 5}}\n", "data.task.n_problem", "data.task.n_problems"),
    "attribute": ("selection: {k: 4}\nattribution: {n_stpes: 4}\n", "attribution.n_stpes", "attribution.n_steps"),
    "evaluate": ("evaluation: {gammas: [0, 2], sampling: {temprature: 1}}\n", "evaluation.sampling.temprature",
                 "evaluation.sampling.temperature"),
    "pipeline": ("attribution: {n_steps: 4}\nevaluation: {n_random_sets: 2}\nexplain: {gama: 4}\n", "explain.gama",
                 "explain.gamma"),
    "study": ("heldout: {n_problems: 10}\nheldout_sampling: {n_sample: 8}\n", "heldout_sampling.n_sample",
              "heldout_sampling.n_samples"),
    "paths": ("attribution: {n_steps: 4}\nheldout: {n_problem: 10}\n", "heldout.n_problem", "heldout.n_problems"),
    "steering-bench": ("dev: {n_problems: 10}\ngrid: {max_setings: 3}\n", "grid.max_setings", "grid.max_settings"),
}
TRAINS_ITS_SAE = {"pipeline", "study", "paths", "steering-bench"}  # `sae: {train_config: <train-sae YAML>}`
_RUN_ALL = """
import contextlib, io, json, sys
from ipg_sae.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def test_every_command_is_covered():
    from ipg_sae.cli import COMMANDS, RUN_DIR_COMMANDS

    assert set(TYPO_FLAGS) == set(COMMANDS)
    assert set(NESTED_TYPOS) == set(COMMANDS) - set(RUN_DIR_COMMANDS)  # the others take a directory, not a YAML file
    assert TRAINS_ITS_SAE < set(NESTED_TYPOS)


@pytest.mark.parametrize("command", list(TYPO_FLAGS))
def test_a_commands_help_flag_and_config_typos_answer_without_torch(command, tmp_path):
    """`ipg-sae CMD --help`, a mistyped flag and a config file's typo answer at once: building a command's flags and
    checking its config never imports torch (seconds to import); only the command that runs does."""
    import json

    from ipg_sae.cli import RUN_DIR_COMMANDS

    directory = [str(tmp_path)] if command in RUN_DIR_COMMANDS else []  # their positional argument, required
    typo, closest = TYPO_FLAGS[command]
    cases = [[command, "--help"], [command, *directory, f"{typo}=1"]]
    expected = []  # the error of each config file below
    if command in NESTED_TYPOS:
        text, field, suggestion = NESTED_TYPOS[command]
        for name, body, wrong, right in [("top.yaml", "nme: x\n", "nme", "name"),
                                         ("nested.yaml", text, field, suggestion)]:
            path = tmp_path / name
            path.write_text(body, encoding="utf-8")
            expected.append(f"error: {path}: unknown field `{wrong}` (did you mean `{right}`?)")
            cases.append([command, str(path)])
    if command in TRAINS_ITS_SAE:  # a typo in the train-sae YAML its `sae.train_config` names: that file is named
        train, job = tmp_path / "sae.yaml", tmp_path / "job.yaml"
        train.write_text("layers: [1]\nexpansion_factr: 2\n", encoding="utf-8")
        job.write_text(f"sae: {{train_config: {train}}}\n", encoding="utf-8")
        expected.append(f"error: {train} + sae.train_overrides of {job}: unknown field `expansion_factr` (did you mean "
                        "`expansion_factor`?)")
        cases.append([command, str(job)])
    r = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(cases)], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    helped, flagged, *loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert helped["code"] == 0 and f"usage: ipg-sae {command}" in helped["out"], helped
    assert "config overrides" in helped["out"]  # the command's own flags, built from its config class
    assert flagged["code"] == 2 and f"unrecognized arguments: {typo}=1 (did you mean {closest}?)" in flagged["err"]
    assert len(loaded) == len(expected)
    for result, message in zip(loaded, expected):
        assert result["code"] == 2 and message in result["err"], result
    assert not [(case, result) for case, result in zip(cases, [helped, flagged, *loaded]) if result["torch"]], \
        "torch was imported"


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
