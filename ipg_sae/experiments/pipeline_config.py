"""The pipeline's settings (:class:`PipelineConfig`), apart from :mod:`.pipeline` (which runs the stages with
torch and re-exports it) so that ``ipg-sae pipeline --help``, a mistyped flag or a config file's typo answer
without importing torch. Part of the pipeline experiment (``tests/test_architecture.py`` counts it so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..attribution.config import AttributionConfig, Baseline
from ..config import StagedJobConfig
from ..errors import IPGError
from ..evaluation_config import EvalConfig
from ..explain_config import ExplainStageConfig
from ..explorer_config import ExplorerConfig
from ..jobs_config import check_baselines
from ..sampling_config import SamplingConfig
from ..selection_config import SelectionConfig
from ..splits import disjoint_splits
from ..tasks import TaskConfig
from .configs import SAESourceConfig, check_sae


@dataclass
class PipelineConfig(StagedJobConfig):
    name: str = "pipeline"
    task: TaskConfig = field(default_factory=TaskConfig)  # the problems attributed on
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: str = "correctness"  # correctness | length | neg_length | module.path:function
    sae: SAESourceConfig = field(default_factory=SAESourceConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    baselines: list[Baseline] = field(default_factory=lambda: ["act", "grad_x_act"])  # attributed beside IPG
    evaluate_baselines: list[Baseline] | None = None  # baselines whose sets are also steered (default: all but random)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)  # its task must be held out from `task`
    explain: ExplainStageConfig = field(default_factory=ExplainStageConfig)  # explanations of the explorer's panels
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)  # the feature explorer page

    def validate(self) -> None:
        super().validate()
        check_sae("pipeline", self)
        unknown = set(self.evaluate_baselines or []) - set(self.baselines)
        if unknown:
            raise IPGError(f"evaluate_baselines lists {sorted(unknown)}, which are not in `baselines`; add them there")
        check_baselines(self.baselines)
        # imported here, not above (and after the torch-free checks): it imports torch, which the config's --help
        # and typos need not load
        from ..rewards import get_reward

        get_reward(self.reward)
        # Every stage's config is built (and so checked) now, before the first stage runs (the SAE's in check_sae).
        dataclasses.replace(self.evaluation, k=self.evaluation.k or self.selection.k, reward=self.reward).validate()
        if all(t.name == "arithmetic" or t.path for t in (self.task, self.evaluation.task)):  # cheap to load here
            # by id and by question text: generated level-1 problems repeat questions across windows
            disjoint_splits({"attribution": self.task, "evaluation": self.evaluation.task})
