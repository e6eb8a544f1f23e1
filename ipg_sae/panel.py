"""The off-policy panel: one pool of unsteered samples, and what any steered set would do on them.

Every experiment that estimates effects off-policy (the study's cells, the origin comparison's removals and
curves, the steering benchmark's dev tuning) builds one :class:`OffPolicyPanel` per pool of samples: the
teacher-forced scorer (:class:`ipg_sae.faithfulness.TrajectoryScorer`), the cells it stores
(:class:`ipg_sae.cells.LogprobCells`: every off-policy cell goes through them, keyed by content) and the samples'
unsteered log-probabilities. :meth:`OffPolicyPanel.effect` is the one call that turns a set, a gamma and an
origin into a typed estimate (:class:`ipg_sae.faithfulness.CellEstimate`: per-problem values and ESS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .cells import CellStore, Inputs, LogprobCells
from .faithfulness import CellEstimate, TrajectoryScorer, estimate
from .trajectories import Trajectory, prompt_groups


@dataclass
class OffPolicyPanel:
    cells: LogprobCells
    samples: list[Trajectory]
    problem_ids: list[str]
    groups: list[list[int]]  # each problem's sample indices
    base: torch.Tensor  # every sample's log-probability under the unsteered model

    @classmethod
    def build(cls, model, saes, samples: Sequence[Trajectory], temperature: float, store: Path | str,
              scope: str = "all", problems_per_batch: int = 8, exclude_first: bool = True,
              inputs: Inputs | None = None) -> "OffPolicyPanel":
        """A panel on ``samples`` (drawn at ``temperature``), its cells kept in ``store``."""
        samples = list(samples)
        scorer = TrajectoryScorer(model, samples, temperature, saes=saes, problems_per_batch=problems_per_batch,
                                  scope=scope, exclude_first=exclude_first)
        cells = LogprobCells(CellStore(store), scorer, inputs or Inputs.of(model, saes), samples, temperature, scope)
        problem_ids, groups = prompt_groups([t.prompt_id for t in samples])
        return cls(cells, samples, problem_ids, groups, cells.logprobs([], 1.0))

    @property
    def scorer(self) -> TrajectoryScorer:
        return self.cells.scorer

    def logprobs(self, latents: Sequence[Sequence[int]], gamma: float, origin: dict | None = None,
                 name: str | None = None) -> torch.Tensor:
        """Every sample's log-probability with ``latents`` scaled by ``gamma`` (about ``origin``): a stored cell."""
        return self.cells.logprobs(latents, gamma, name=name, origin=origin)

    def effect(self, latents: Sequence[Sequence[int]], gamma: float, values: torch.Tensor,
               origin: dict | None = None, name: str | None = None) -> CellEstimate:
        """The self-normalised importance estimate, per problem, of ``values`` (one per sample: a reward, the
        length, ...) under the steered policy."""
        return estimate(self.base, self.logprobs(latents, gamma, origin, name), values, self.groups)

    def estimate(self, logp: torch.Tensor, values: torch.Tensor) -> CellEstimate:
        """The estimate of ``values`` under a policy whose log-probabilities of the samples are ``logp``."""
        return estimate(self.base, logp, values, self.groups)
