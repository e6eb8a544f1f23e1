"""The faithfulness study's settings (:class:`StudyConfig`), checked on load."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...attribution.config import AttributionConfig, Baseline
from ...config import StagedJobConfig
from ...errors import IPGError
from ...jobs_config import check_baselines
from ...sampling_config import SamplingConfig
from ...tasks import TaskConfig
from ..configs import (SAESourceConfig, check_importance_sampling, check_problems_per_batch, check_sae,
                       check_splits_disjoint)


@dataclass
class StudyConfig(StagedJobConfig):
    name: str = "study"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=96))  # the problems attributed on
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n_samples=4, temperature=0.5,
                                                                            max_new_tokens=96, batch_size=32))
    sae: SAESourceConfig = field(default_factory=SAESourceConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    rewards: list[str] = field(default_factory=lambda: ["correctness", "length"])  # one study per reward
    methods: list[Baseline] = field(default_factory=lambda: ["ipg", "act", "grad_x_act", "reason_words",
                                                               "ig_likelihood"])
    attribute_prompts: int = 60  # per reward, the first prompts whose samples got different rewards (0: all)
    heldout: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=100, offset=1000))  # never attributed
    heldout_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n_samples=8, temperature=0.5, max_new_tokens=96, batch_size=32))
    k: int = 16  # the headline set size (must be one of ks)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # deletion and insertion curves
    gammas: list[float] = field(default_factory=lambda: [0.0, 2.0])  # deletion (0) and insertion (> 1)
    null_sets: int = 50  # random sets at the headline k, per gamma, for the first reward
    other_null_sets: int = 20  # the same for the other rewards (each reward's null matches its own IPG set)
    curve_null_sets: int = 3  # random sets at every other k, per gamma (the null's band on the curves)
    push_null_sets: int = 20  # push-matched random sets at the headline k, per gamma (first reward; other_null_sets
    # after, as the other nulls) (nulls.push_matched_sets)
    policy_null_sets: int = 20  # policy-change-matched random sets, the same way (nulls.policy_matched_sets)
    permutation_sets: int = 50  # reward-permutation null sets at k, per gamma (first reward; other_null_sets after)
    null_counts: dict[str, int] = field(default_factory=dict)  # sets of each registered null with no field above
    sign_control: bool = True  # IPG's bottom k (most negative scores) beside its top k
    null_seed: int = 0
    confirm_samples: int = 4  # on-policy samples per problem and seed for the confirmation cells
    confirm_seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # x confirm_samples = 16 per problem
    confirm_null_sets: int = 5  # sets of each new null (push, permutation) confirmed on-policy, per gamma
    confirm_other_rewards: bool = True  # also sample each other reward's IPG set and sign control on-policy
    n_bootstrap: int = 2000
    min_ess: float = 0.25
    problems_per_batch: int = 8
    scope: str = "all"

    def validate(self) -> None:
        super().validate()
        check_sae("study", self)
        # imported here, not above (and after the SAE's check): they import torch, which the config's --help and
        # typos need not load (the registry of nulls is read now, so a null registered after import counts)
        from ...rewards import get_reward
        from .nulls import NULLS

        for r in self.rewards:
            get_reward(r)
        if "ipg" not in self.methods:
            raise IPGError("study.methods must include ipg: the null is matched to its set")
        check_baselines([m for m in self.methods if m != "ipg"])
        if self.k not in self.ks or min(self.ks) < 1:
            raise IPGError(f"study.k ({self.k}) must be one of study.ks {self.ks} (all >= 1)")
        if sorted(self.gammas) != self.gammas or self.gammas[0] != 0.0 or not all(g > 1 for g in self.gammas[1:]):
            raise IPGError(f"study.gammas {self.gammas}: give 0 (deletion) then amplifying gammas > 1 (insertion)")
        check_importance_sampling("study.heldout_sampling", self.heldout_sampling)
        check_problems_per_batch("study.problems_per_batch", self.problems_per_batch)
        if self.null_sets < 1 or self.other_null_sets < 1 or self.curve_null_sets < 0:
            raise IPGError("study.null_sets and study.other_null_sets must be >= 1, study.curve_null_sets >= 0")
        unknown = sorted(set(self.null_counts) - set(NULLS))
        if unknown or any(n < 0 for n in self.null_counts.values()):
            raise IPGError(f"study.null_counts: give registered nulls ({', '.join(NULLS)}) each a count >= 0"
                           + (f"; {unknown[0]!r} is not one" if unknown else ""))
        if min(self.push_null_sets, self.policy_null_sets, self.permutation_sets) < 0:
            raise IPGError("study.push_null_sets, study.policy_null_sets and study.permutation_sets must be >= 0 (0: "
                           "that null is not drawn)")
        check_splits_disjoint(splits(self), on_load=True)


def splits(cfg: StudyConfig) -> dict[str, TaskConfig]:
    """The problems attributed on and the held-out problems: no problem in both (checked before any work)."""
    return {"attribution": cfg.task, "heldout": cfg.heldout}
