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

import numpy as np
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
    device = next(model.parameters()).device
    means, norms, count = [], 0.0, 0
    for t in trajectories:
        tokens = torch.tensor([t.prompt_ids + t.completion_ids], device=device)
        x = capture_residuals(model, tokens, None, [layer])[layer][0, len(t.prompt_ids):].double()
        means.append(x.mean(0))
        norms += float(x.norm(dim=-1).sum())
        count += x.shape[0]
    advantage = _advantages(trajectories)
    stacked = torch.stack(means)
    vector = (advantage[:, None] * stacked).sum(0) / (advantage.abs().sum() / 2)
    return DiffMean(layer, vector.float().cpu(), norms / max(count, 1), len(trajectories))


def ipg_weighted_step(result: AttributionResult, eta: float) -> list[Intervention]:
    """``scale`` interventions with ``c_i = max(0, 1 + eta * score_i / max|score|)`` for every latent with a non-zero
    mean score over the attributed prompts (IPG's ranking statistic)."""
    return weighted_step(step_scores(result), eta, result.method_name)


def step_scores(result: AttributionResult) -> dict[int, torch.Tensor]:
    """Per layer, the ``[d_sae]`` scores a weighted step steps along: the ranking statistic :func:`select` uses
    (the mean over attributed prompts for a gradient method, the natural score otherwise; NaN as 0)."""
    from .selection import default_rank_by

    by = default_rank_by(result)
    return {layer: s[by].nan_to_num().double() for layer, s in latent_stats(result).items()}


def weighted_step(scores: dict[int, torch.Tensor], eta: float, what: str = "ipg") -> list[Intervention]:
    """The weighted step along any per-latent ``scores`` (``{layer: [d_sae]}``): every latent with a non-zero score
    scaled by ``c_i = max(0, 1 + eta * score_i / max|score|)`` (same format whatever the scores: IPG's, a
    baseline's, permuted, shuffled, or DiffMean in the latent basis)."""
    if eta < 0:
        raise IPGError(f"eta is {eta}; the IPG-weighted step takes eta >= 0 (0 = the clean model)")
    peak = max(float(s.abs().max()) if s.numel() else 0.0 for s in scores.values())
    if peak == 0:
        raise IPGError(f"every latent's {what} score is zero; nothing to step along (attribute prompts with reward "
                       "variance)")
    out = []
    for layer, score in sorted(scores.items()):
        for latent in torch.nonzero(score != 0).flatten().tolist():
            gamma = max(0.0, 1.0 + eta * float(score[latent]) / peak)
            out.append(Intervention(int(layer), int(latent), "scale", gamma))
    return out


def permuted_step_scores(result: AttributionResult, order: torch.Tensor) -> dict[int, torch.Tensor]:
    """IPG's step scores had trajectory ``t`` got the reward of ``order[t]`` (same prompt), exactly from the stored
    per-trajectory rows (:func:`ipg_sae.selection.permuted_stats`): the step's reward-permutation null."""
    from .selection import permuted_stats

    return {layer: s["mean"].nan_to_num() for layer, s in permuted_stats(result, order).items()}


def shuffled_scores(scores: dict[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """The same non-zero score values assigned to a random draw of the scored latents (a permutation of the
    values among them, over every layer): the step's score-shuffle null (same magnitudes, no information about
    which latent)."""
    slots = [(layer, i) for layer, s in sorted(scores.items()) for i in torch.nonzero(s != 0).flatten().tolist()]
    values = torch.tensor([float(scores[layer][i]) for layer, i in slots], dtype=torch.float64)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(slots)))
    out = {layer: torch.zeros_like(s, dtype=torch.float64) for layer, s in scores.items()}
    for (layer, i), v in zip(slots, values[perm].tolist()):
        out[layer][i] = v
    return out


@torch.no_grad()
def latent_diffmean(model, saes: dict, trajectories: Sequence[Trajectory]) -> dict[int, torch.Tensor]:
    """DiffMean in the latent basis: per SAE layer, ``w = sum_g A_g m_g / (sum_g |A_g| / 2)`` with ``m_g`` the
    mean SAE latent activation over trajectory ``g``'s completion tokens and ``A_g`` its advantage in its prompt's
    group (as :func:`diffmean`, in the SAE's basis): the step's weights for the DiffMean-in-latent-basis step."""
    layers = sorted(saes)
    device = next(model.parameters()).device
    means: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for t in trajectories:
        tokens = torch.tensor([t.prompt_ids + t.completion_ids], device=device)
        xs = capture_residuals(model, tokens, None, layers)
        for layer in layers:
            x = xs[layer][0, len(t.prompt_ids):]
            sae = saes[layer]
            means[layer].append(sae.encode(x.to(sae.dtype)).double().mean(0).cpu())
    advantage = _advantages(trajectories)
    return {layer: ((advantage[:, None] * torch.stack(means[layer])).sum(0) / (advantage.abs().sum() / 2)).float()
            for layer in layers}


def _advantages(trajectories: Sequence[Trajectory]) -> torch.Tensor:
    ids, groups = prompt_groups([t.prompt_id for t in trajectories])
    rewards = torch.tensor([float(t.reward) for t in trajectories], dtype=torch.float64)
    if not bool(torch.isfinite(rewards).all()):
        raise IPGError("a trajectory's reward is NaN or infinite; DiffMean needs finite rewards")
    advantage = torch.zeros_like(rewards)
    for idx in groups:
        advantage[idx] = advantages(rewards[idx], "mean")
    if not bool((advantage != 0).any()):
        raise IPGError(f"no prompt's samples got different rewards ({len(ids)} prompts): DiffMean needs high- and "
                       "low-reward trajectories of the same prompt; sample more per prompt or more prompts")
    return advantage


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
