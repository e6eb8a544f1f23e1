r"""Steering recipes built from sampled trajectories: DiffMean vectors and the IPG-weighted step.

**DiffMean** (the residual-stream baseline practitioners reach for; AxBench, SEAL, ThinkEdit):
at layer ``l``, with ``m_g`` the mean residual over trajectory ``g``'s completion tokens and
``A_g`` its advantage within its prompt's group (reward minus the group mean),

    v = sum_g A_g m_g / (sum_g |A_g| / 2),

the advantage-weighted mean of the residual. For 0/1 rewards in one group it is exactly the mean
of the rewarded trajectories minus the mean of the others (high-reward minus low-reward); over
several groups each group's difference is weighted by how mixed it is. It is applied with
:func:`ipg_sae.steering.add_vector` at a coefficient ``alpha * residual_norm``, the mean residual
norm over the same tokens, so ``alpha`` means the same thing at every layer.

**DiffMean projected on the SAE** (:func:`project_on_latents`): the least-squares part of ``v`` in the
span of the selected latents' decoder rows, and the share of ``||v||^2`` it carries: how much of
what separates high- from low-reward reasoning the selected features hold.

**IPG-weighted step**: every latent with a score, scaled by ``c_i = 1 + eta * score_i / max|score|``
(a policy-gradient step in feature scalings, no top-k cut; clipped at 0, where a latent is
removed). ``eta = 0`` is the clean model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attribution import AttributionResult, advantages
from .errors import IPGError
from .models import capture_residuals
from .selection import latent_stats
from .steering import Intervention
from .trajectories import Trajectory, prompt_groups


@dataclass
class DiffMean:
    layer: int
    vector: torch.Tensor  # [d_model]
    residual_norm: float  # mean ||x_t|| over the completion tokens it was computed on
    n_trajectories: int


@torch.no_grad()
def diffmean(model, trajectories: Sequence[Trajectory], layer: int) -> DiffMean:
    """The DiffMean vector of ``trajectories`` (teacher-forced, completion tokens only) at ``layer``."""
    ids, groups = prompt_groups([t.prompt_id for t in trajectories])
    device = next(model.parameters()).device
    means, norms, count = [], 0.0, 0
    for t in trajectories:
        tokens = torch.tensor([t.prompt_ids + t.completion_ids], device=device)
        x = capture_residuals(model, tokens, None, [layer])[layer][0, len(t.prompt_ids):].double()
        means.append(x.mean(0))
        norms += float(x.norm(dim=-1).sum())
        count += x.shape[0]
    rewards = torch.tensor([float(t.reward) for t in trajectories], dtype=torch.float64)
    if not bool(torch.isfinite(rewards).all()):
        raise IPGError("a trajectory's reward is NaN or infinite; DiffMean needs finite rewards")
    advantage = torch.zeros_like(rewards)
    for idx in groups:
        advantage[idx] = advantages(rewards[idx], "mean")
    if not bool((advantage != 0).any()):
        raise IPGError(f"no prompt's samples got different rewards ({len(ids)} prompts): DiffMean needs high- and "
                       "low-reward trajectories of the same prompt; sample more per prompt or more prompts")
    stacked = torch.stack(means)
    vector = (advantage[:, None] * stacked).sum(0) / (advantage.abs().sum() / 2)
    return DiffMean(layer, vector.float().cpu(), norms / max(count, 1), len(trajectories))


def ipg_weighted_step(result: AttributionResult, eta: float) -> list[Intervention]:
    """``scale`` interventions with ``c_i = max(0, 1 + eta * score_i / max|score|)`` for every latent with a non-zero
    mean score over the attributed prompts (IPG's ranking statistic)."""
    if eta < 0:
        raise IPGError(f"eta is {eta}; the IPG-weighted step takes eta >= 0 (0 = the clean model)")
    stats = latent_stats(result)
    peak = max(float(s["mean"].nan_to_num().abs().max()) for s in stats.values())
    if peak == 0:
        raise IPGError("every latent's IPG score is zero; nothing to step along (attribute prompts with reward "
                       "variance)")
    out = []
    for layer, s in sorted(stats.items()):
        score = s["mean"].nan_to_num()
        for latent in torch.nonzero(score != 0).flatten().tolist():
            gamma = max(0.0, 1.0 + eta * float(score[latent]) / peak)
            out.append(Intervention(int(layer), int(latent), "scale", gamma))
    return out


@dataclass
class Projection:
    vector: torch.Tensor  # [d_model]: the part of the vector in the span of the latents' decoder rows
    coefficients: torch.Tensor  # [k]: per latent, in the order given
    captured: float  # ||projection||^2 / ||vector||^2, in [0, 1]


def project_on_latents(vector: torch.Tensor, sae, latents: Sequence[int]) -> Projection:
    """The least-squares reconstruction of ``vector`` from the decoder rows of ``latents`` (one SAE)."""
    from .saes import decoder_matrix

    if not latents:
        raise IPGError("project_on_latents needs at least one latent")
    rows = decoder_matrix(sae)[torch.as_tensor(list(latents))].detach().double()  # [k, d_model]
    v = torch.as_tensor(vector).detach().double().flatten()
    if rows.shape[1] != v.shape[0]:
        raise IPGError(f"the vector has {v.shape[0]} entries but the SAE's decoder rows have {rows.shape[1]}")
    coef = torch.linalg.lstsq(rows.T, v[:, None]).solution[:, 0]
    projected = rows.T @ coef
    norm = float(v @ v)
    return Projection(projected.float(), coef.float(), float(projected @ projected) / norm if norm else 0.0)
