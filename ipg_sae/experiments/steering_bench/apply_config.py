"""The settings of ``ipg-sae steer`` (:class:`SteerApplyConfig`: a shipped recipe applied on-policy), apart from
:mod:`.apply` (which steers with torch) so that the command's flags are built and its config checked without
importing torch (``ipg-sae steer --help``, a mistyped flag or key answer at once); :mod:`.apply` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...config import JobConfig
from ...errors import IPGError
from ...sampling_config import SamplingConfig
from ...tasks import TaskConfig


@dataclass
class SteerApplyConfig(JobConfig):
    name: str = "steer"
    recipe: str = ""  # a recipe folder the steering benchmark wrote (<run>/bench/recipes/<name>)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=100))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n_samples=4, temperature=0.5,
                                                                            max_new_tokens=96, batch_size=32))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # x sampling.n_samples per problem
    reward: str = "correctness"
    n_bootstrap: int = 2000

    def validate(self) -> None:
        super().validate()
        if not self.recipe or not (Path(self.recipe) / "recipe.json").is_file():
            raise IPGError(f"{self.recipe or '(no recipe)'} is not a steering recipe folder (no recipe.json); give "
                           "one the steering benchmark wrote, e.g. runs/steering_bench/bench/recipes/ipg_step")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise IPGError("steer.seeds must list at least one seed, each once")
