"""The steering benchmark's settings (:class:`SteeringBenchConfig`), its methods and their groups, and its
problem splits."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...attribution.config import AttributionConfig
from ...config import StagedJobConfig
from ...errors import IPGError
from ...sampling_config import SamplingConfig
from ...tasks import TaskConfig
from ..configs import SAESourceConfig, check_importance_sampling, check_problems_per_batch, check_sae
from .grid import SHIPPED_METHODS, SHIPPED_NULLS, BenchGrid

METHODS = SHIPPED_METHODS  # the shipped methods (the default of `methods`); the registry may hold more
NULL_RECIPES = SHIPPED_NULLS


@dataclass
class SteeringBenchConfig(StagedJobConfig):
    name: str = "steering_bench"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=112))  # the problems attributed on
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n_samples=4, temperature=0.5,
                                                                            max_new_tokens=96, batch_size=32))
    attribute_prompts: int = 60
    attribution_dir: str | None = None  # an existing attribution run of these problems (ipg + baselines/) to reuse
    sae: SAESourceConfig = field(default_factory=SAESourceConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    reward: str = "correctness"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    nulls: list[str] = field(default_factory=lambda: list(NULL_RECIPES))
    grid: BenchGrid = field(default_factory=BenchGrid)
    dev: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=50, offset=2000))
    dev_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n_samples=8, temperature=0.5, max_new_tokens=96, batch_size=32))
    dev_on_policy_samples: int = 4  # per dev problem, for settings whose off-policy ESS is below min_ess
    min_ess: float = 0.5  # the ESS floor (fraction of G) for scoring a setting off-policy on dev
    test: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=100, offset=3000))
    transfer: list[TaskConfig] = field(default_factory=lambda: [TaskConfig(level=2, n_problems=100, offset=3000)])
    eval_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n_samples=4, temperature=0.5, max_new_tokens=96, batch_size=32))
    eval_seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # x eval_sampling.n_samples per problem
    capability_task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=8, offset=20000))
    capability_levels: list[int] = field(default_factory=lambda: [1, 2, 3])  # held-out documents of the SAE corpus
    capability_max_tokens: int = 256
    match_reference: str = "ipg_step"  # push matching: every recipe also at the setting whose off-task KL/token
    match_texts: int = 24  # ... matches this method's chosen one's, on the first this many off-task documents,
    match_rtol: float = 0.1  # ... within this relative tolerance (no matching: "" or a reference not in methods)
    match_methods: list[str] = field(default_factory=list)  # the methods matched (empty: every one with a knob)
    test_only: list[str] = field(default_factory=list)  # recipes run on test only: methods, or "@push" for all matched
    offtask_texts: int = 0  # off-task English documents for the capability cost (ipg_sae/data; 0 = all, ~26.7k tokens)
    n_bootstrap: int = 2000
    seed: int = 0
    problems_per_batch: int = 8

    @property
    def rewards(self) -> list[str]:  # what the shared sampling stage scores with
        return [self.reward]

    def validate(self) -> None:
        super().validate()
        check_sae("steering_bench", self)
        # imported here, not above (and after the SAE's check): they import torch, which a config's --help or typo
        # need not load
        from ...rewards import get_reward
        from .recipes import KINDS, group, methods

        get_reward(self.reward)
        tuned, nulls = methods(), group("null")  # read now: a recipe registered after import counts
        unknown = [m for m in self.methods if m not in tuned] + [n for n in self.nulls if n not in nulls]
        if unknown:
            raise IPGError(f"steering_bench lists {unknown[0]!r}; methods are {', '.join(tuned)} and nulls "
                           f"{', '.join(nulls)}")
        for name in self.nulls:
            if KINDS[name].mirrors not in self.methods:
                raise IPGError(f"the {name} null mirrors {KINDS[name].mirrors}'s chosen setting: add "
                               f"{KINDS[name].mirrors} to methods")
        for name in self.methods:
            n = len(KINDS[name].settings(self.grid))
            if not 1 <= n <= self.grid.max_settings:
                raise IPGError(f"steering_bench.grid gives {name} {n} settings; every method gets 1 to "
                               f"grid.max_settings ({self.grid.max_settings}): shorten its lists")
        if not 1 <= self.grid.test_draws <= self.grid.dev_draws:
            raise IPGError(f"steering_bench.grid.test_draws is {self.grid.test_draws}: the step's nulls run 1 to "
                           f"grid.dev_draws ({self.grid.dev_draws}) of their dev draws on test")
        check_importance_sampling("steering_bench.dev_sampling", self.dev_sampling)
        check_problems_per_batch("steering_bench.problems_per_batch", self.problems_per_batch)
        if not self.eval_seeds or len(set(self.eval_seeds)) != len(self.eval_seeds):
            raise IPGError("steering_bench.eval_seeds must list at least one seed, each once")
        if self.match_reference and self.match_reference not in methods():
            raise IPGError(f"steering_bench.match_reference {self.match_reference!r} is not a steering method; name "
                           "one (it is matched only when in methods), or \"\" for no push matching")
        if not 0 < self.match_rtol < 1 or self.match_texts < 1:
            raise IPGError("steering_bench.match_rtol must be in (0, 1) and match_texts at least 1")
        if not self.transfer:
            raise IPGError("steering_bench.transfer must list at least one task (another task family)")


def splits(cfg: SteeringBenchConfig) -> dict[str, TaskConfig]:
    """Every split by name: attribution, dev, test, transfer-1.. (checked disjoint before any work)."""
    out = {"attribution": cfg.task, "dev": cfg.dev, "test": cfg.test}
    out.update({f"transfer-{i + 1}": t for i, t in enumerate(cfg.transfer)})
    return out
