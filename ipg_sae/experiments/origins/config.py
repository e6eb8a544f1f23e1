"""The origin comparison's settings (:class:`PathsConfig`; its command and YAML keep the name ``paths``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...attribution.config import AttributionConfig
from ...config import StagedJobConfig
from ...errors import IPGError
from ...sampling_config import SamplingConfig
from ...tasks import TaskConfig
from ..configs import (SAESourceConfig, check_importance_sampling, check_problems_per_batch, check_sae,
                       check_splits_disjoint)

ORIGINS = ("zero", "mean")
PATH_METHODS = ("ipg", "ipg_local")


@dataclass
class PathsConfig(StagedJobConfig):
    name: str = "paths"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=96))  # the problems attributed on
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n_samples=4, temperature=0.5,
                                                                            max_new_tokens=96, batch_size=32))
    sae: SAESourceConfig = field(default_factory=SAESourceConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)  # path_origin is set per origin
    reward: str = "correctness"
    attribute_prompts: int = 60  # the first prompts whose samples got different rewards
    origins: list[str] = field(default_factory=lambda: list(ORIGINS))
    methods: list[str] = field(default_factory=lambda: list(PATH_METHODS))  # ipg and/or ipg_local
    heldout: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=100, offset=1000))
    heldout_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n_samples=8, temperature=0.5, max_new_tokens=96, batch_size=32))
    top_latents: int = 64  # per method and origin: its top latents get a single-latent removal
    random_latents: int = 64  # and this many random latents active on the attributed data
    single_heldout_problems: int = 0  # held-out problems the single-latent removals are scored on (0: all)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    gammas: list[float] = field(default_factory=lambda: [0.0, 2.0])
    seed: int = 0
    n_bootstrap: int = 2000
    problems_per_batch: int = 8

    @property
    def rewards(self) -> list[str]:  # what the shared sampling stage scores with
        return [self.reward]

    def validate(self) -> None:
        super().validate()
        check_sae("paths", self)
        for origin in self.origins:
            if origin not in ORIGINS and not origin.endswith(".safetensors"):
                raise IPGError(f"paths.origins lists {origin!r}; use zero, mean or a .safetensors file")
        if not self.origins or len(set(self.origins)) != len(self.origins):
            raise IPGError("paths.origins must list at least one origin, each once")
        if "ipg" not in self.methods or not set(self.methods) <= set(PATH_METHODS):
            raise IPGError(f"paths.methods {self.methods}: list ipg and optionally ipg_local")
        if self.top_latents < 1 or self.random_latents < 0 or self.single_heldout_problems < 0:
            raise IPGError("paths.top_latents must be >= 1, random_latents and single_heldout_problems >= 0")
        if sorted(self.gammas) != self.gammas or self.gammas[0] != 0.0 or not all(g > 1 for g in self.gammas[1:]):
            raise IPGError(f"paths.gammas {self.gammas}: give 0 (deletion) then amplifying gammas > 1 (insertion)")
        if min(self.ks) < 1:
            raise IPGError(f"paths.ks {self.ks}: every k must be >= 1")
        check_importance_sampling("paths.heldout_sampling", self.heldout_sampling)
        check_problems_per_batch("paths.problems_per_batch", self.problems_per_batch)
        check_splits_disjoint(splits(self), on_load=True)


def splits(cfg: PathsConfig) -> dict[str, TaskConfig]:
    """The problems attributed on and the held-out problems: no problem in both (checked before any work)."""
    return {"attribution": cfg.task, "heldout": cfg.heldout}
