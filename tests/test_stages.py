"""Declared stage keys: a stage's key is built from exactly the fields and files it declares, a stage that reads
anything else fails, and the cost of a stage is kept over every run. The experiments' stages are run here with
stub bodies (each writes its outputs), so the keys' behaviour is checked without a model; the experiments' own
tests run them for real with every file read watched (``stage_reads_declared`` in ``conftest.py``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipg_sae.config import load_config
from ipg_sae.io import write_text
from ipg_sae.experiments.stages import ConfigView, Stage, UndeclaredRead, run_stages


@dataclass
class _Grid:
    ks: list[int] = field(default_factory=lambda: [1, 2])
    gammas: list[float] = field(default_factory=lambda: [2.0])


@dataclass
class _Job:
    run_dir: Path
    seed: int = 0
    grid: _Grid = field(default_factory=_Grid)

    @property
    def first_k(self) -> int:
        return self.grid.ks[0]


def test_a_stage_reads_only_what_it_declares():
    view = ConfigView(_Job(Path("r")), frozenset({"grid.ks"}), "tune")
    assert view.grid.ks == [1, 2] and view.first_k == 1 and view.run_dir == Path("r")  # the header is free
    with pytest.raises(UndeclaredRead, match=r"stage tune read `seed`.*add 'seed'"):
        view.seed
    with pytest.raises(UndeclaredRead, match="grid.gammas"):
        view.grid.gammas
    whole = ConfigView(_Job(Path("r")), frozenset({"grid"}), "tune")
    assert dataclasses.replace(whole.grid, ks=[3]).ks == [3]  # a field declared whole is the object itself


def test_a_stage_that_reads_an_undeclared_field_fails_and_a_declared_one_is_in_its_key(tmp_path, caplog):
    calls = []

    def run(cfg):
        calls.append(cfg.seed)
        write_text(cfg.run_dir / "out.txt", str(cfg.seed))
        return {}

    job = _Job(tmp_path / "run")
    with pytest.raises(UndeclaredRead, match="seed"):
        run_stages(job, [Stage("tune", run, outputs=lambda c: [c.run_dir / "out.txt"], fields=("grid",))])
    stages = [Stage("tune", run, outputs=lambda c: [c.run_dir / "out.txt"], fields=("grid", "seed"))]
    run_stages(job, stages)
    run_stages(job, stages)
    assert calls == [0]
    job.seed = 1
    caplog.set_level(logging.INFO)
    run_stages(job, stages)
    assert calls == [0, 1] and "stage tune: settings or inputs changed" in caplog.text


def test_a_stage_keeps_its_total_seconds_over_interrupted_runs(tmp_path):
    tries = []

    def run(cfg):
        tries.append(1)
        if len(tries) == 1:
            raise KeyboardInterrupt  # killed by Ctrl-C or SIGTERM the first time
        write_text(cfg.run_dir / "out.txt", "x")
        return {}

    job = _Job(tmp_path / "run")
    stages = [Stage("slow", run, outputs=lambda c: [c.run_dir / "out.txt"])]
    with pytest.raises(KeyboardInterrupt):
        run_stages(job, stages)
    partial = job.run_dir / "stages" / "slow.partial.json"
    doc = json.loads(partial.read_text())
    doc["seconds"] = 100.0  # as if the interrupted run had worked for 100 s
    partial.write_text(json.dumps(doc))
    run_stages(job, stages)
    marker = json.loads((job.run_dir / "stages" / "slow.json").read_text())
    assert marker["total_seconds"] >= 100 + marker["seconds"] - 0.1 and not partial.exists()


# ---- the experiments' declared keys, with stub bodies -------------------------------------------------------


def _stubbed(stages: list[Stage]) -> tuple[list[Stage], list[str]]:
    """The same stages (same declarations) whose bodies only write their output files and note that they ran."""
    ran: list[str] = []

    def stub(stage: Stage):
        def run(cfg):
            ran.append(stage.name)
            for path in stage.outputs(cfg._obj):
                write_text(path, stage.name)
            return {}
        return run

    return [dataclasses.replace(s, run=stub(s)) for s in stages], ran


def _tiny_sae(tmp_path: Path) -> str:
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text("{}")
    return str(sae)


def test_changing_the_bench_seed_reruns_tune(tmp_path):
    """The bench's tune stage seeds its on-policy dev samples with ``seed``: a new seed reruns it (and what
    follows), and nothing before it."""
    from ipg_sae.experiments.steering_bench import STAGES, SteeringBenchConfig

    cfg = load_config(SteeringBenchConfig, None, {"runs_dir": str(tmp_path / "runs"),
                                                  "sae.load": [{"path": _tiny_sae(tmp_path)}]})
    stages, ran = _stubbed(STAGES)
    run_stages(cfg, stages)
    ran.clear()
    run_stages(cfg, stages)
    assert ran == []
    cfg.seed = 1
    run_stages(cfg, stages)
    assert ran == ["tune", "match", "evaluate", "capability", "recipes", "report"]


def test_an_origin_file_rewritten_at_the_same_path_reruns_the_comparison_from_its_attribution(tmp_path):
    from ipg_sae.experiments.origins import STAGES, PathsConfig

    origin = tmp_path / "origin.safetensors"
    origin.write_bytes(b"first")
    cfg = load_config(PathsConfig, None, {"runs_dir": str(tmp_path / "runs"), "origins": ["zero", str(origin)],
                                          "sae.load": [{"path": _tiny_sae(tmp_path)}]})
    stages, ran = _stubbed(STAGES)
    run_stages(cfg, stages)
    ran.clear()
    st = origin.stat()
    origin.write_bytes(b"other")  # the same path, the same size and modification time
    os.utime(origin, ns=(st.st_atime_ns, st.st_mtime_ns))
    run_stages(cfg, stages)
    assert ran == ["attribute", "heldout", "single", "curves", "report"]
