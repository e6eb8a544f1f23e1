"""The configs of the single-step jobs (sample, attribute, evaluate, explore, export), apart from
:mod:`ipg_sae.jobs` so that a command's flags are built and its config file checked without importing torch
(``ipg-sae CMD --help``, a mistyped flag or key answer at once); ``jobs`` re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attribution.config import AttributionConfig, Baseline
from .config import JobConfig
from .errors import IPGError
from .evaluation_config import EvalConfig
from .explorer_config import ExplorerConfig
from .saes_config import SAELoad, SAESpec, take_old_saes
from .sampling_config import SamplingConfig
from .selection_config import SelectionConfig
from .tasks import TaskConfig
from .tracking import WandbConfig


@dataclass
class SampleJobConfig(JobConfig):
    name: str = "sample"
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: str = "correctness"  # correctness | length | neg_length | module.path:function

    def validate(self) -> None:
        super().validate()
        from .rewards import get_reward  # imports torch: only once the config is otherwise valid

        get_reward(self.reward)  # an unknown name or a function that cannot be imported fails here, before any work


@dataclass
class AttributeJobConfig(JobConfig):
    name: str = "attribute"
    sae: SAELoad = field(default_factory=SAELoad)  # sae: {load: [{path: dir} or {release, sae_id}, ...]}, one per layer
    saes: list[SAESpec] | None = None  # deprecated spelling of sae.load (moved there, with a warning)
    trajectories: str | None = None  # default: runs/<name>/trajectories.jsonl
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    baselines: list[Baseline] = field(default_factory=list)  # also run these (act, reason_words, grad_x_act, ...)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def validate(self) -> None:
        super().validate()
        if not self.sae.load:
            raise IPGError("no SAE given: add an entry under `sae: {load: [...]}` (path: <sae dir>, or release + "
                           "sae_id)")
        check_baselines(self.baselines)

    def __post_init__(self) -> None:
        take_old_saes(self)


def check_baselines(names: list[str]) -> None:
    if "ipg" in names:
        raise IPGError("`baselines` lists ipg, which always runs; list only the baselines")
    if len(set(names)) != len(names):
        raise IPGError(f"`baselines` {names} lists a baseline twice; list each once")


@dataclass
class EvaluateJobConfig(JobConfig):
    name: str = "evaluate"
    sae: SAELoad = field(default_factory=SAELoad)  # sae: {load: [...]}, as in attribute and the pipeline
    saes: list[SAESpec] | None = None  # deprecated spelling of sae.load (moved there, with a warning)
    # Sets to compare: name -> a source load_selection accepts (result dir, features.csv, "layer:latent" list).
    sets: dict[str, Any] = field(default_factory=dict)
    attribution_dir: str | None = None  # its prompt ids are checked for overlap; its active latents seed random sets
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        take_old_saes(self)


@dataclass
class ExploreJobConfig:
    run_dir: str = ""  # the attribution run to explore (a directory with attribution.safetensors)
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)  # what the page shows
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # let the run's model run its own code (the run's own trust_remote_code is never used: only for runs you trust)
    trust_remote_code: bool = False

    def validate(self) -> None:
        if not self.run_dir or not (Path(self.run_dir) / "attribution.json").is_file():
            raise IPGError(f"{self.run_dir or '(no run_dir)'} is not an attribution run (no attribution.json); give "
                           "the run directory of `ipg-sae attribute` or `ipg-sae pipeline`, e.g. runs/demo")


@dataclass
class ExportJobConfig:
    sae: str = ""  # the SAE directory to export (one this project trained, e.g. runs/demo/sae/layer_15)
    out_dir: str | None = None  # where the copy goes (default: <run>/export/layer_L for <run>/sae/layer_L)
    model: str | None = None  # the model it reads (default: the one named in the SAE's ipg_sae.json)
    check: bool = True  # load the model and compare the bridge's residual and activations with this project's
    force: bool = False  # replace files in out_dir that an earlier export of this SAE did not write

    def validate(self) -> None:
        if not self.sae or not (Path(self.sae) / "cfg.json").is_file():
            raise IPGError(f"{self.sae or '(no SAE)'} is not an SAE directory (no cfg.json); give one, e.g. "
                           "runs/demo/sae/layer_15")
