"""Issue 39.1: the README's quick start in miniature (pipeline, `export` of its SAE, the same pipeline again) reuses
every stage and keeps the export; files someone adds beside a stage's outputs are neither counted nor deleted; an
edited output file is refused in one line naming it, and only `--force true` redoes the stage."""

import json
import logging

import pytest
import yaml

from ipg_sae.cli import main
from ipg_sae.config import dump_yaml


@pytest.fixture
def trained_pipeline(pipeline_cfg, tmp_path):
    """The pipeline fixture with its SAE trained by the pipeline (so `sae/` is a folder the pipeline owns), as a
    config file."""
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({
        "layers": [2], "k": 4, "expansion_factor": 2, "training_tokens": 64 * 4, "context_size": 16,
        "batch_size_tokens": 64, "lm_batch_size": 4, "chunk_sequences": 4, "buffer_chunks": 2,
        "checkpoint_every": 2, "n_eval_sequences": 2, "dead_feature_window": 5,
        "data": {"source": "task", "task": {"name": "arithmetic", "n_problems": 8, "offset": 500, "few_shot": 0},
                 "task_levels": [1]}}))
    doc = yaml.safe_load(dump_yaml(pipeline_cfg))
    doc["sae"] = {"load": [], "train_config": str(train_yaml)}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, pipeline_cfg.run_dir


def _reused(caplog) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records if "already done" in r.getMessage()]


def test_export_then_rerun_reuses_every_stage_and_keeps_the_export(trained_pipeline, caplog, capsys):
    config, run_dir = trained_pipeline
    assert main(["pipeline", str(config)]) == 0
    sae = run_dir / "sae" / "layer_2"
    assert main(["export", str(sae), "--check", "false"]) == 0
    export = run_dir / "export" / "layer_2"
    assert (export / "cfg.json").is_file() and (export / "sae_weights.safetensors").is_file()
    (run_dir / "sae" / "notes.txt").write_text("mine")  # a file of the user's beside the SAE stage's outputs
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert main(["pipeline", str(config)]) == 0
    assert _reused(caplog) == ["stage sample", "stage sae", "stage attribute", "stage evaluate", "stage explain",
                              "stage explore"]
    assert (export / "cfg.json").is_file() and (run_dir / "sae" / "notes.txt").read_text() == "mine"


def test_an_edited_output_is_refused_naming_the_file_and_force_redoes_the_stage(trained_pipeline, caplog, capsys):
    config, run_dir = trained_pipeline
    assert main(["pipeline", str(config)]) == 0
    (run_dir / "sae" / "notes.txt").write_text("mine")
    edited = run_dir / "sae" / "layer_2" / "cfg.json"
    edited.write_text(json.dumps({**json.loads(edited.read_text()), "note": "edited"}))
    capsys.readouterr()
    assert main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(edited) in err[0] and "--force true" in err[0], err
    assert "note" in json.loads(edited.read_text())  # nothing was rerun or removed
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert main(["pipeline", str(config), "--force", "true"]) == 0
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "stage sample: already done" in msgs and "stage sae: running" in msgs
    assert "note" not in json.loads(edited.read_text())  # the stage wrote its file again
    assert (run_dir / "sae" / "notes.txt").read_text() == "mine"  # and kept what it never wrote
