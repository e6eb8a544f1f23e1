from dataclasses import dataclass, field
from typing import Literal

import pytest

from ipg_sae.config import load_config
from ipg_sae.errors import IPGError
from ipg_sae.jobs import SampleJobConfig


@dataclass
class Inner:
    x: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    required: str
    inner: Inner = field(default_factory=Inner)
    ratio: float = 0.5
    tags: list[str] = field(default_factory=list)
    maybe: int | None = None


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_nested_and_coerces(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "required: r\ninner: {x: 3, mode: b}\nratio: 1\ntags: [a]\n"))
    assert cfg.inner.x == 3 and cfg.inner.mode == "b" and cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert cfg.tags == ["a"] and cfg.maybe is None


def test_unknown_field_names_path_and_file(tmp_path):
    p = write(tmp_path, "required: r\ninner: {y: 3}\n")
    with pytest.raises(IPGError, match=r"c\.yaml.*unknown field `inner\.y`.*valid fields here: mode, x"):
        load_config(Outer, p)


def test_missing_required_field(tmp_path):
    with pytest.raises(IPGError, match=r"missing required field `required`"):
        load_config(Outer, write(tmp_path, "ratio: 0.1\n"))


@pytest.mark.parametrize("text,match", [
    ("required: r\nratio: fast\n", r"field `ratio` is 'fast'; expected float"),
    ("required: r\ninner: {mode: c}\n", r"field `inner\.mode` is 'c'; choose one of 'a', 'b'"),
    ("required: r\ninner: {x: 1.5}\n", r"field `inner\.x` is 1\.5; expected int"),
    ("required: r\ninner: 3\n", r"`inner` must be a mapping"),
    ("required: [1\n", r"not valid YAML"),
])
def test_type_errors(tmp_path, text, match):
    with pytest.raises(IPGError, match=match):
        load_config(Outer, write(tmp_path, text))


def test_missing_file():
    with pytest.raises(IPGError, match="config file .* not found"):
        load_config(Outer, "/nonexistent.yaml")


def test_overrides_win_and_are_validated(tmp_path):
    p = write(tmp_path, "required: r\ninner: {x: 3}\n")
    cfg = load_config(Outer, p, {"inner.x": 7, "ratio": 0.25})
    assert cfg.inner.x == 7 and cfg.ratio == 0.25
    with pytest.raises(IPGError, match="command-line overrides: unknown field `inner.z`"):
        load_config(Outer, p, {"inner.z": 1})


def test_every_shipped_config_loads():
    from pathlib import Path

    from ipg_sae.attribution import AttributionConfig
    from ipg_sae.jobs import AttributeJobConfig, EvaluateJobConfig
    from ipg_sae.experiments.pipeline import PipelineConfig
    from sae_training.config import TrainSAEConfig

    from ipg_sae.experiments.origins import PathsConfig
    from ipg_sae.experiments.steering_bench import SteeringBenchConfig
    from ipg_sae.experiments.study import StudyConfig

    kinds = {"paths_": PathsConfig, "steering_bench_": SteeringBenchConfig,"sample_": SampleJobConfig, "attribute_": AttributeJobConfig, "evaluate_": EvaluateJobConfig,
             "sae_": TrainSAEConfig, "demo": PipelineConfig, "quickstart": PipelineConfig, "pipeline_": PipelineConfig,
             "study_": StudyConfig}
    loaded = 0
    for path in sorted(Path("configs").rglob("*.yaml")):
        if path.parent.name == "sections":
            load_config(AttributionConfig, path)
        else:
            (cls,) = [c for prefix, c in kinds.items() if path.name.startswith(prefix)]
            load_config(cls, path)
        loaded += 1
    assert loaded >= 6


def test_job_validation_runs(tmp_path):
    with pytest.raises(IPGError, match="sampling.n_samples"):
        load_config(SampleJobConfig, None, {"sampling.n_samples": 0})


@dataclass
class WithSection:
    inner: Inner = field(default_factory=lambda: Inner(x=5, mode="b"))


def test_partial_section_keeps_the_fields_own_defaults(tmp_path):
    cfg = load_config(WithSection, write(tmp_path, "inner: {x: 7}\n"))
    assert cfg.inner.x == 7 and cfg.inner.mode == "b"  # mode comes from the field's default, not Inner's


def test_pipeline_eval_task_stays_held_out():
    from ipg_sae.experiments.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, None, {"evaluation.task.n_problems": 3, "sae.load": [{"path": "x"}]})
    assert cfg.evaluation.task.offset == 1000 and cfg.evaluation.sampling.n_samples == 1
