"""The pipeline end to end on a tiny model: every stage runs, outputs exist, a rerun skips them all."""

import json
import re

import pytest

from ipg_sae.config import load_config
from ipg_sae.experiments.pipeline import PipelineConfig, run_pipeline


def test_pipeline_runs_and_resumes(pipeline_cfg, caplog, stage_reads_declared):
    import logging

    caplog.set_level(logging.INFO)
    results = run_pipeline(pipeline_cfg)
    run_dir = pipeline_cfg.run_dir
    for path in ["trajectories.jsonl", "attribution.safetensors", "attribution.json", "features.csv",
                 "selection.json", "baselines/act/selection.json", "eval/summary.json", "report.md"]:
        assert (run_dir / path).is_file(), path
    report = (run_dir / "report.md").read_text()
    assert "ipg" in report and "random" in report
    assert set(results) == {"sample", "sae", "attribute", "evaluate", "explain", "explore"}
    assert (run_dir / "explorer" / "index.html").is_file()
    # the W&B runs of the stages share one group
    from ipg_sae.tracking import read_offline_run

    runs = read_offline_run(run_dir)["runs"]
    assert len(runs) >= 4

    caplog.clear()
    run_pipeline(pipeline_cfg)
    skipped = [r.getMessage() for r in caplog.records if "already done" in r.getMessage()]
    assert len(skipped) == 6, skipped
    assert any("trajectories.jsonl" in p for p in stage_reads_declared)  # the watcher saw the stages' reads
    marker = json.loads((run_dir / "stages" / "attribute.json").read_text())
    assert 0 < marker["seconds"] <= marker["total_seconds"]


def test_changed_setting_reruns_only_downstream(pipeline_cfg, caplog):
    import dataclasses
    import logging

    run_pipeline(pipeline_cfg)
    caplog.set_level(logging.INFO)
    caplog.clear()
    changed = dataclasses.replace(pipeline_cfg, selection=dataclasses.replace(pipeline_cfg.selection, k=1))
    run_pipeline(changed)
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "stage sample: already done" in msgs and "stage sae: already done" in msgs
    assert "stage attribute: running" in msgs and "stage evaluate: running" in msgs


def test_pipeline_needs_an_sae(tmp_path):
    from ipg_sae.errors import IPGError

    with pytest.raises(IPGError, match="pipeline.sae needs"):
        load_config(PipelineConfig, None, {"runs_dir": str(tmp_path)})


def test_trained_sae_stage_retrains_when_its_settings_change(pipeline_cfg, tmp_path, caplog):
    """With `sae.train_config` the pipeline trains the SAE; a changed training setting retrains it
    from scratch (the old checkpoints are stale) instead of refusing to resume them."""
    import dataclasses
    import logging

    import yaml

    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({
        "layers": [2], "k": 4, "expansion_factor": 2, "training_tokens": 64 * 6, "context_size": 16,
        "batch_size_tokens": 64, "lm_batch_size": 4, "chunk_sequences": 4, "buffer_chunks": 2,
        "checkpoint_every": 2, "n_eval_sequences": 2, "dead_feature_window": 5,
        "data": {"source": "task", "task": {"name": "arithmetic", "n_problems": 8, "offset": 500, "few_shot": 0},
                 "task_levels": [1]}}))
    sae = dataclasses.replace(pipeline_cfg.sae, load=[], train_config=str(train_yaml))
    cfg = dataclasses.replace(pipeline_cfg, sae=sae)
    results = run_pipeline(cfg)
    assert results["sae"]["steps"] == 6
    assert (cfg.run_dir / "sae" / "layer_2" / "cfg.json").is_file()
    assert (cfg.run_dir / "sae_eval.json").is_file()

    caplog.set_level(logging.INFO)
    changed = dataclasses.replace(cfg, sae=dataclasses.replace(sae, train_overrides={"k": 2}))
    results = run_pipeline(changed)
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "stage sample: already done" in msgs and "stage sae: running" in msgs
    assert results["sae"]["steps"] == 6 and results["sae"].get("resumed_from", 0) == 0
    import json

    assert json.loads((cfg.run_dir / "sae" / "layer_2" / "cfg.json").read_text())["k"] == 2


def test_pipeline_command_prints_what_each_stage_found(pipeline_cfg, tmp_path, capsys):
    from ipg_sae.cli import main
    from ipg_sae.config import dump_yaml

    path = tmp_path / "pipeline.yaml"
    path.write_text(dump_yaml(pipeline_cfg))
    assert main(["pipeline", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sample: accuracy" in out and "over 9 samples" in out
    assert "attribute: ipg: top latents L2:" in out and "median completeness gap" in out
    assert "attribute: act: top latents" in out
    assert f"report: {pipeline_cfg.run_dir / 'report.md'}" in out


def test_edited_outputs_and_inputs_rerun_what_depends_on_them(pipeline_cfg, tmp_path, caplog):
    """A stage is reused only if its key (settings + outside inputs + upstream outputs) matches and its
    own output files are the ones it wrote."""
    import dataclasses
    import logging

    from ipg_sae.errors import IPGError

    run_pipeline(pipeline_cfg)
    caplog.set_level(logging.INFO)
    # an edited output of the first stage: refused, naming it; with force it reruns (and everything after it)
    traj = pipeline_cfg.run_dir / "trajectories.jsonl"
    traj.write_text(traj.read_text() + "\n")
    with pytest.raises(IPGError, match=re.escape(f"stage sample: its output file {traj} changed since")):
        run_pipeline(pipeline_cfg)
    caplog.clear()
    run_pipeline(dataclasses.replace(pipeline_cfg, force=True))
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert f"stage sample: its output file {traj} changed since (--force true); rerunning it" in msgs
    # a loaded SAE whose weights changed (same path): sample is reused, everything downstream reruns
    from tests import tiny

    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=4).save_model(str(tmp_path / "sae"))
    caplog.clear()
    run_pipeline(pipeline_cfg)
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "stage sample: already done" in msgs
    assert "stage sae: settings or inputs changed" in msgs and "stage attribute: running" in msgs
    assert "stage evaluate: running" in msgs
    # a corrupt marker is one clear error, not a traceback
    (pipeline_cfg.run_dir / "stages" / "attribute.json").write_text("{not json")
    with pytest.raises(IPGError, match="attribute.json is corrupt; delete it"):
        run_pipeline(pipeline_cfg)


def test_wandb_lineage_of_the_stages(pipeline_cfg):
    """sample -> SAE -> attribution -> evaluation, read back from the offline run files."""
    from ipg_sae.tracking import read_offline_run

    run_pipeline(pipeline_cfg)
    runs = {r["config"].get("_job") or r["file"]: r for r in read_offline_run(pipeline_cfg.run_dir)["runs"]}
    made = {a["name"] for r in runs.values() for a in r["made"]}
    used = {a["name"] for r in runs.values() for a in r["used"]}
    assert {"p-trajectories", "p-attribution", "p-attribution-act"} <= made
    assert {"p-trajectories", "sae-sae", "p-attribution"} <= used  # each stage declares what it read
    by_digest = {(a["name"], a["digest"]) for r in runs.values() for a in r["made"]}
    assert all((a["name"], a["digest"]) in by_digest for r in runs.values() for a in r["used"]
               if a["name"] != "sae-sae")  # the same content: the same W&B version, one edge per use
    explore = next(r for r in runs.values() if any(a["type"] == "explorer" for a in r["made"]))
    assert "p-attribution" in {a["name"] for a in explore["used"]}  # attribution -> explorer
    assert any(a["type"] == "evaluation" for r in runs.values() for a in r["made"])  # report.md and eval/


def test_the_explain_stage_explains_the_explorers_panels(pipeline_cfg, caplog, stage_reads_declared):
    """The explain stage (between evaluate and explore) explains exactly the latents the explorer gives a full
    panel: the page's data and `explanations/features.csv` carry every selected latent's explanations and scores,
    and W&B gets the table. A rerun reuses it; a changed explain setting reruns explain and explore only; turned
    off, it removes the files it wrote and the page shows none."""
    import csv
    import dataclasses
    import logging

    from ipg_sae.explanations import EXPLANATION_COLUMNS
    from ipg_sae.explorer import load
    from ipg_sae.tracking import read_offline_run

    results = run_pipeline(pipeline_cfg)
    run_dir = pipeline_cfg.run_dir
    data = load(run_dir)
    selected = {tuple(p) for p in data["run"]["selected"]}
    panels = {(r["layer"], r["latent"]) for r in data["latents"] if r["detail"]}
    explained = {(r["layer"], r["latent"]): r["explanation"] for r in data["latents"] if "explanation" in r}
    assert selected and selected <= panels and set(explained) == panels
    assert results["explain"]["n_latents"] == len(panels)
    for pair in selected:
        assert set(EXPLANATION_COLUMNS) <= set(explained[pair]) and explained[pair]["vocab_proj"].startswith("promotes")
    with open(run_dir / "explanations" / "features.csv", encoding="utf-8") as f:
        table = {(int(r["layer"]), int(r["latent"])): r for r in csv.DictReader(f)}
    assert all(table[pair]["explanation"] and table[pair]["vocab_proj"] for pair in selected)
    assert results["explain"]["table"] == str(run_dir / "explanations" / "features.csv")
    with open(run_dir / "features.csv", encoding="utf-8") as f:  # the attribute stage's table, as it wrote it
        assert not set(EXPLANATION_COLUMNS) & set(next(csv.reader(f)))
    histories = [row for r in read_offline_run(run_dir)["runs"] for row in r["history"]]
    assert any(row.get("explanations/features/nrows") == len(table) for row in histories)

    caplog.set_level(logging.INFO)
    caplog.clear()
    run_pipeline(pipeline_cfg)
    assert "stage explain: already done" in " ".join(r.getMessage() for r in caplog.records)

    caplog.clear()
    explain = dataclasses.replace(pipeline_cfg.explain, n_tokens=3)
    run_pipeline(dataclasses.replace(pipeline_cfg, explain=explain))
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "stage evaluate: already done" in msgs
    assert "stage explain: settings or inputs changed" in msgs and "stage explore: running" in msgs
    shown = [r["explanation"] for r in load(run_dir)["latents"] if "explanation" in r]
    assert shown and all(len(e["vocab_proj_tokens"]) == 3 for e in shown)

    off = dataclasses.replace(pipeline_cfg.explain, enabled=False)
    assert run_pipeline(dataclasses.replace(pipeline_cfg, explain=off))["explain"] == {"enabled": False}
    assert not list((run_dir / "explanations").glob("*"))
    assert not any("explanation" in r for r in load(run_dir)["latents"])
