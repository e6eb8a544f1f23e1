"""What an evaluation is asked to do (:class:`EvalConfig`) and the estimators' names, apart from
:mod:`ipg_sae.evaluation` so that a config is built and checked without importing torch (``ipg-sae CMD --help``,
a mistyped flag or key answer at once); ``evaluation`` re-exports these names and fills :data:`ESTIMATORS`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

from .errors import IPGError
from .nulls import NULLS, NullKind
from .sampling_config import SamplingConfig
from .tasks import TaskConfig


def _closest(name: str, registry) -> str:
    """`` (did you mean `x`?)`` for the registered name closest to a mistyped one, else nothing."""
    import difflib

    close = difflib.get_close_matches(str(name), list(registry), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


# An estimator's name: a key of `ESTIMATORS`, the one list of estimators; `EvalConfig.validate` checks it.
Estimator = str
# The built-in estimators' names, known here without torch; ipg_sae.evaluation gives each its function (and refuses
# to load when its functions and these names differ). A plugin adds its own entry to the same dict.
BUILT_IN_ESTIMATORS: tuple[str, ...] = ("importance", "sampling")
ESTIMATORS: dict[str, Callable | None] = dict.fromkeys(BUILT_IN_ESTIMATORS)


@dataclass
class EvalConfig:
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.5, 2.0, 3.0])  # scales of the set (0 removes it)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # sampling seeds, shared by all conditions
    k: int | None = None  # set size: the first k latents of each set (None = each set as given)
    target: str = "ipg"  # the set under test; random sets copy its size and layers
    n_random_sets: int = 3  # random draws (0 = no random control)
    random_seed: int = 0  # seed of the random sets
    scope: Literal["all", "generated"] = "all"  # steer prompt and generated tokens, or generated only
    # importance: sample the unsteered policy once and score every (set, gamma) on those samples (off-policy,
    # cheap: many sets); sampling: sample every cell under its steering (on-policy: for confirmation)
    estimator: Estimator = "importance"
    # the random sets' null (ipg_sae.nulls): None = frequency-matched for importance, uniform among the latents
    # active in the attribution for sampling (the sampler has no activation frequencies of the held-out samples)
    null: NullKind | None = None
    min_ess: float = 0.25  # importance: flag cells whose mean effective sample size is below this fraction of G
    problems_per_batch: int = 8  # importance: problems scored together (memory grows with it)
    # The held-out problems (the caller loads them): not the attribution's, so a different offset/seed.
    task: TaskConfig = field(default_factory=lambda: TaskConfig(offset=1000))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n_samples=1, temperature=0.7,
                                                                             max_new_tokens=256))
    reward: str = "correctness"  # what the set was selected for: decides the primary metric of the verdict
    n_bootstrap: int = 2000  # bootstrap replicates of every interval
    confidence: float = 0.95  # interval level
    # Degenerate output: an n-gram (n <= max_ngram) repeated repeat_times times in a row over at least
    # repeat_min_span tokens (so a single token must repeat repeat_min_span times), or empty, or unparseable.
    repeat_times: int = 4
    repeat_min_span: int = 12
    max_ngram: int = 20

    def validate(self) -> None:
        if not self.gammas or not all(math.isfinite(g) for g in self.gammas):
            raise IPGError("eval.gammas must be a non-empty list of finite numbers, e.g. [0, 0.5, 1.5, 2, 3]")
        if any(g < 0 for g in self.gammas):
            raise IPGError(f"eval.gammas {self.gammas} has a negative gamma: scaling a latent's contribution by a "
                           "negative factor is not the method's control (0 removes it, 1 is no change, > 1 amplifies); "
                           "use gammas >= 0")
        if len(set(self.gammas)) != len(self.gammas):
            raise IPGError(f"eval.gammas {self.gammas} lists a gamma twice; remove the duplicate")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise IPGError(f"eval.seeds {self.seeds} must be a non-empty list of distinct seeds")
        if self.k is not None and self.k < 1:
            raise IPGError(f"eval.k is {self.k}; give a set size >= 1 or null for the sets as given")
        if self.n_random_sets < 0:
            raise IPGError("eval.n_random_sets must be >= 0")
        if not 0 < self.confidence < 1:
            raise IPGError(f"eval.confidence is {self.confidence}; give a level in (0, 1), e.g. 0.95")
        if self.n_bootstrap < 100:
            raise IPGError(f"eval.n_bootstrap is {self.n_bootstrap}; use at least 100 (2000 is usual)")
        if self.repeat_times < 2 or self.repeat_min_span < 2 or self.max_ngram < 1:
            raise IPGError("eval.repeat_times and eval.repeat_min_span must be >= 2 and eval.max_ngram >= 1")
        self.sampling.validate()
        if self.null is not None and self.null not in NULLS:
            raise IPGError(f"eval.null {self.null!r} is not a registered null{_closest(self.null, NULLS)}; give one "
                           f"of {', '.join(NULLS)} (or null for the estimator's default)")
        if self.estimator not in ESTIMATORS:
            raise IPGError(f"eval.estimator {self.estimator!r} is not a registered estimator"
                           f"{_closest(self.estimator, ESTIMATORS)}; give one of {', '.join(ESTIMATORS)}")
        if self.estimator == "importance":
            if self.sampling.temperature <= 0 or self.sampling.top_p != 1:
                raise IPGError("eval.estimator importance reweights samples of the unsteered policy, which needs a "
                               "full-support sampler: set eval.sampling.temperature > 0 and top_p 1, or use "
                               "eval.estimator: sampling")
            if not 0 < self.min_ess <= 1 or self.problems_per_batch < 1:
                raise IPGError("eval.min_ess must be in (0, 1] and eval.problems_per_batch >= 1")
        elif self.null == "frequency":
            raise IPGError("eval.null frequency matches the held-out samples' activation frequencies, which only the "
                           "importance estimator measures; use eval.null: uniform or eval.estimator: importance")
        if self.sampling.temperature == 0 and len(self.seeds) > 1:
            logging.getLogger("ipg_sae.evaluation").warning(  # its logger before the move
                "eval: greedy decoding (temperature 0) gives the same samples for every seed; one seed is enough")


    @property
    def null_kind(self) -> NullKind:
        return self.null or ("frequency" if self.estimator == "importance" else "uniform")
