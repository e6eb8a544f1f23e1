r"""The IPG engine: the passes that attribute one prompt's group of trajectories (``docs/ipg-method.md`` §2-3).

The maths:

* Splice SAEs at layers ``L``. Run each trajectory once unmodified and record each spliced
  layer's clean latents ``f_t`` (active set ``[tokens, k]``). Along the path, every position
  ``t`` in scope gets ``x_t' = x_t + ((c - 1) * f_t) @ W_dec`` with ``f_t`` held at its clean
  value: at ``c = 1`` the model is unchanged, gradients reach the gates through ``W_dec`` and
  lower layers through ``x_t``, so several layers share one joint path.
* ``F(c) = sum_g A_g log pi(tau_g | x; c)`` over the ``G`` samples of a prompt, with ``log pi``
  summed over the generated tokens only and advantages ``A_g``.
* ``IPG_i(x) = (1/G) sum_k w_k dF/dc_i |_{c = alpha_k 1}`` with nodes ``alpha_k`` and weights
  ``w_k`` on [0, 1] (:mod:`ipg_sae.attribution.path`).
* Completeness: per trajectory, ``sum_i IPG_i(tau) = A (log pi(tau; 1) - log pi(tau; 0))`` up to
  quadrature error.
* Path origin (``attribution.path_origin``, ``docs/ipg-method.md`` §2a): the path may start at
  per-latent values ``b_i`` (mean ablation) instead of 0: latent ``i`` runs along
  ``b_i + c_i (f_{t,i} - b_i)``, so the splice adds ``(c_i - 1)(f_{t,i} - b_i) W_dec[i]``. The part
  ``(c_i - 1) f_{t,i}`` is the active-entry gate above; ``-(c_i - 1) b_i`` is the same at every
  in-scope position, so it is one dense gate per row and latent, ``o [rows, d_sae]``, added as
  ``-((o - 1) * b) @ W_dec`` at every in-scope position. ``dF/dc_i`` is the sum of both gates'
  gradients; completeness holds with ``log pi(tau; 0)`` the model at the origin. With ``error_node`` the SAE error ``eps = x - dec(f)`` is gated as one more
  component and completeness covers it too.

How it is computed (and why it is fast):

* ``dF/dc_i = sum_t f_{t,i} (g_t . W_dec[i])`` is obtained in one backward per node as the
  gradient of a leaf ``s [rows, tokens, k]`` holding the gate values *at the active entries*,
  with the residual update done by ``embedding_bag`` over the active rows of ``W_dec``: no
  dense ``[tokens, d_sae]`` gradient exists anywhere.
* The layers up to the lowest spliced layer run once per trajectory (:meth:`IPGEngine.clean_pass`);
  node passes replay the cached residual there and run only the layers above, with the nodes
  stacked along the batch dimension (``internal_batch_size`` rows per chunk, whole groups).
* ``log pi`` at the scored positions goes through a fused target log-prob head that computes
  its input gradient in the forward (:class:`_TargetLogProb`), in chunks of positions, so
  ``[tokens, vocab]`` logits never exist at once.
* Groups whose advantages are all zero contribute exactly zero and skip every node pass.

State. A pass gets everything it needs as arguments (a :class:`CleanPass`, the rows, the
node values) and returns what it computed (:class:`NodeGrads`); modules it installs in the
model for the duration of a pass are built for that pass and removed after it.

Assumptions: the model's logits are ``lm_head(final hidden)`` (optionally soft-capped, as in
Gemma); decoder blocks are called in order by the base model. Both hold for Llama, Qwen2,
Mistral, Gemma and GPT-2 layouts in transformers 5.

Precision note: Llama/Qwen2 RMSNorm computes in float32 even in a float64 model, so their
completeness gap bottoms out near 1e-6 relative (1e-8 absolute); GPT-2 (LayerNorm in float64)
reaches 1e-12.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import IPGError
from ..models import (ReplayedBlock, SkippedBlock, block_hidden, context_length, copy_mask_attributes,
                      decoder_layers, replace_block_hidden)
from ..saes import as_layer_dict, bag_dtype, bag_matrix, decoder_matrix, encode_active, prepare_sae, variance_sums
from ..trajectories import Trajectory
from .config import AttributionConfig
from .path import Advantage, advantages, simpson_weights


@dataclass
class Batch:
    """One group of trajectories as right-padded tensors ``[G, T]`` on the model's device."""

    ids: torch.Tensor
    attn: torch.Tensor
    targets: torch.Tensor  # the next token at each position
    score_mask: torch.Tensor  # positions whose *next* token is generated (scored by log pi)
    prompt_lens: torch.Tensor  # [G]
    scope: torch.Tensor  # positions that get gates


@dataclass
class CleanPass:
    """What the unmodified (``c = 1``) pass of a group records; read by the node passes and the baselines."""

    batch: Batch
    x_min: torch.Tensor  # residual after the lowest spliced block [G, T, d]: the node passes start here
    tuple_blocks: bool  # whether the model's decoder blocks return tuples
    logp: torch.Tensor  # [G] log pi(tau; c = 1)
    idx: dict[int, torch.Tensor]  # layer -> active latents [G, T, K]
    val: dict[int, torch.Tensor]  # layer -> their activations [G, T, K] (zero out of scope)
    recon: dict[int, torch.Tensor]  # layer -> dec(f) [G, T, d] (only with error_node)
    active: dict[int, torch.Tensor]  # layer -> [d_sae] bool: active anywhere in scope
    act_mean: dict[int, torch.Tensor]  # layer -> [d_sae] mean activation over in-scope positions
    contexts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # layer -> (value, row, pos) [d_sae, m]
    variance: dict[int, torch.Tensor]  # layer -> explained-variance sums over in-scope positions (saes.variance_sums)
    origin: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> path origin b [d_sae] (absent: zero)


@dataclass
class NodeGrads:
    """What one node pass computed, per node (dim 0) and per row of the pass (dim 1)."""

    rows: list[int]  # the group's trajectories in this pass
    latent: dict[int, torch.Tensor]  # layer -> dF/ds at the active entries [nodes, rows, T, K] (float64)
    error: dict[int, torch.Tensor]  # layer -> dF/de of the error node [nodes, rows] (error_node only)
    logp: torch.Tensor  # [nodes, rows] log pi(tau; c = alpha)
    origin: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> dF/do of the origin gate [nodes, rows, d_sae]


@dataclass
class GroupAttribution:
    """What one prompt's group of trajectories contributes."""

    per_traj: dict[int, torch.Tensor]  # layer -> [G, d_sae] (float64), sum over nodes, includes A_g
    error: dict[int, torch.Tensor]  # layer -> [G]
    logp1: torch.Tensor  # [G]
    logp0: torch.Tensor  # [G]
    advantage: torch.Tensor  # [G]
    n_tokens: int
    active: dict[int, torch.Tensor]  # layer -> [d_sae] bool: active anywhere in scope
    activation_sum: dict[int, torch.Tensor]  # layer -> [d_sae] sum of activations over scope positions / #positions
    contexts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # layer -> (value, traj_in_group, pos) [d_sae, m]
    token_maps: dict[str, dict] = field(default_factory=dict)
    skipped: bool = False
    n_scope: int = 0  # positions in scope (gated), over the whole group
    variance: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> saes.variance_sums of the clean pass
    n_nodes: int = 0  # node evaluations spent on the group (0 when skipped)
    budget_hit: bool = False  # adaptive: the node budget ran out before every gap was under the tolerance
    nodes: np.ndarray | None = None  # the rule the attribution was computed with (adaptive mode)
    weights: np.ndarray | None = None

    def gaps(self) -> torch.Tensor:
        """Relative completeness gap of each trajectory with a non-zero advantage."""
        total = sum(a.sum(1) for a in self.per_traj.values()) + sum(self.error.values())
        expected = self.advantage * (self.logp1 - self.logp0)
        live = self.advantage != 0
        return relative_gap(total[live], expected[live])


def relative_gap(total: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``|total - expected| / |expected|`` (0 where both are 0, inf where only ``expected`` is)."""
    gap = (total - expected).abs()
    scale = expected.abs()
    return torch.where(scale == 0, torch.where(gap == 0, torch.zeros_like(gap), torch.full_like(gap, math.inf)),
                       gap / scale.clamp(min=1e-300))


@dataclass
class _NodeRows:
    """One node's contribution per row of its pass: dense latent sums, error-node gradients, token maps."""

    latent: dict[int, torch.Tensor]  # layer -> [rows, d_sae] float64
    error: dict[int, torch.Tensor]  # layer -> [rows]
    maps: dict[int, dict[int, torch.Tensor]]  # row in the pass -> layer -> [T, K]
    total: torch.Tensor  # [rows] dF/dalpha: the sum over latents (and error nodes)
    logp: torch.Tensor  # [rows] log pi(tau; alpha) at this node


class IPGEngine:
    """Attributes groups of trajectories of one model through SAEs at one or more layers."""

    def __init__(self, model: nn.Module, saes, cfg: AttributionConfig | None = None, pad_id: int = 0):
        self.model = model
        self.cfg = cfg or AttributionConfig()
        self.saes = {layer: prepare_sae(sae, model, layer) for layer, sae in as_layer_dict(saes).items()}
        if not self.saes:
            raise IPGError("no SAE given: attribution needs at least one SAE layer")
        self.layers = sorted(self.saes)
        self.l_min = self.layers[0]
        self.w_dec = {layer: decoder_matrix(sae).detach() for layer, sae in self.saes.items()}
        self.pad_id = pad_id
        self.blocks = decoder_layers(model)
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.max_positions = context_length(model)
        self.param = next(model.parameters())
        self.w_bag = {layer: bag_matrix(w, self.param.dtype) for layer, w in self.w_dec.items()}  # cast once
        self.origin: dict[int, torch.Tensor] = {}  # layer -> the path's origin b [d_sae] (set_origin; empty: zero)

    def set_origin(self, origin: dict[int, torch.Tensor] | None) -> None:
        """Start the path at per-latent values ``origin[layer] [d_sae]`` (None or all zero: at 0)."""
        self.origin = {}
        for layer, values in (origin or {}).items():
            d = self.saes[layer].cfg.d_sae
            values = torch.as_tensor(values).detach().flatten()
            if values.numel() != d or not bool(torch.isfinite(values).all()):
                raise IPGError(f"the path origin for layer {layer} has {values.numel()} values (or non-finite ones); "
                               f"the SAE there has {d} latents: give one finite value per latent")
            if bool((values != 0).any()):
                self.origin[layer] = values.to(self.param.device, torch.float64)

    @torch.no_grad()
    def mean_activation(self, groups: list[list[Trajectory]], progress: bool = False) -> dict[int, torch.Tensor]:
        """Each latent's mean activation over the in-scope tokens of ``groups`` (zeros counted): the ``mean``
        path origin, i.e. mean ablation over the attributed data."""
        from tqdm.auto import tqdm

        sums = {layer: torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for layer, sae in self.saes.items()}
        n = 0
        for group in tqdm(groups, desc="path origin (mean)", unit="prompt", disable=not progress):
            clean = self.clean_pass(self.batch(group))
            n_scope = int(clean.batch.scope.sum())
            for layer in self.layers:
                sums[layer] += clean.act_mean[layer] * n_scope
            n += n_scope
        if n == 0:
            raise IPGError("no token is in the attribution scope, so there is no mean activation to start the path at")
        return {layer: s / n for layer, s in sums.items()}

    # -- one group -----------------------------------------------------------------------

    def attribute_group(self, group: list[Trajectory], nodes: np.ndarray, weights: np.ndarray,
                        advantage: Advantage | None = None, keep_maps: set[str] = frozenset()) -> GroupAttribution:
        """IPG of one prompt's trajectories with the quadrature ``(nodes, weights)``.

        ``advantage`` overrides the config's kind (the likelihood baselines use ``correct``);
        ``keep_maps`` lists trajectory ids whose per-token attributions are kept.
        """
        cfg = self.cfg
        rewards = torch.tensor([t.reward for t in group], dtype=torch.float64)
        adv = advantages(rewards, advantage or cfg.advantage)
        result, clean = self.observe_group(group, adv)
        if torch.all(adv == 0):
            return result  # F is identically zero: every gradient is zero (result.skipped is set)
        result.skipped = False
        rows = [g for g in range(len(group)) if adv[g] != 0 or cfg.importance != "none"]
        maps = {g: {layer: torch.zeros_like(clean.val[layer][g], dtype=torch.float64) for layer in self.layers}
                for g in range(len(group)) if group[g].id in keep_maps}
        result.logp0 = self.logp_at(clean, 0.0).double().cpu()
        for chunk in self.node_chunks(len(nodes), len(rows)):
            grads = self.node_pass(clean, [float(nodes[k]) for k in chunk], rows, adv)
            self._add_weighted(result, maps, clean, grads, [weights[k] for k in chunk])
        result.n_nodes = len(nodes)
        self._keep_maps(result, group, clean, maps)
        return result

    def attribute_group_adaptive(self, group: list[Trajectory], delta_tol: float, max_nodes: int = 33,
                                 advantage: Advantage | None = None,
                                 keep_maps: set[str] = frozenset()) -> GroupAttribution:
        """IPG of one prompt's trajectories to a stated accuracy: adaptive composite Simpson.

        The path starts as one panel ``[0, 1]`` (nodes 0, 1/2, 1). Every node pass also gives
        ``log pi(tau; alpha)`` at its node, so each panel ``[a, b]`` has an exact target,
        ``A (log pi(b) - log pi(a))``, for the sum of its latents' attributions: its error is
        known, not estimated. While some trajectory's relative gap over the whole path exceeds
        ``delta_tol``, the panel with the largest error is bisected (two new nodes, its quarter
        points; every node evaluated so far is kept). At ``max_nodes`` the group stops and is
        marked ``budget_hit``. The attribution is the composite Simpson rule of the final panels
        (``path.simpson_weights``), the same numbers a fixed rule with those nodes would give.
        """
        cfg = self.cfg
        rewards = torch.tensor([t.reward for t in group], dtype=torch.float64)
        adv = advantages(rewards, advantage or cfg.advantage)
        result, clean = self.observe_group(group, adv)
        if torch.all(adv == 0):
            return result
        result.skipped = False
        rows = [g for g in range(len(group)) if adv[g] != 0 or cfg.importance != "none"]
        map_rows = [j for j, g in enumerate(rows) if group[g].id in keep_maps]
        result.logp0 = self.logp_at(clean, 0.0).double().cpu()
        a_rows = adv[rows]
        ends = {0.0: result.logp0[rows], 1.0: result.logp1[rows]}  # log pi of the rows at the ends of the path
        expected = a_rows * (ends[1.0] - ends[0.0])
        seen: dict[float, _NodeRows] = {}

        def evaluate(alphas: list[float]) -> None:
            new = [a for a in alphas if a not in seen]
            for chunk in self.node_chunks(len(new), len(rows)):
                grads = self.node_pass(clean, [new[k] for k in chunk], rows, adv)
                for n, k in enumerate(chunk):
                    seen[new[k]] = self._node_rows(clean, grads, n, map_rows)

        def logp(alpha: float) -> torch.Tensor:
            return ends[alpha] if alpha in ends else seen[alpha].logp

        panels = [(0.0, 1.0)]
        evaluate([0.0, 0.5, 1.0])
        while True:
            total = torch.zeros(len(rows), dtype=torch.float64)
            errors = []
            for a, b in panels:
                h, m = (b - a) / 6, (a + b) / 2
                estimate = h * (seen[a].total + 4 * seen[m].total + seen[b].total)
                total += estimate
                errors.append(((estimate - a_rows * (logp(b) - logp(a))).abs() / expected.abs().clamp(min=1e-12)).max())
            gaps = relative_gap(total, expected)
            if bool((gaps <= delta_tol).all()):
                break
            if len(seen) + 2 > max_nodes:
                result.budget_hit = True
                break
            a, b = panels.pop(max(range(len(panels)), key=lambda i: float(errors[i])))
            m = (a + b) / 2
            panels += [(a, m), (m, b)]
            evaluate([(a + m) / 2, (m + b) / 2])
        nodes, weights = simpson_weights(panels)
        self._combine(result, [seen[float(x)] for x in nodes], weights, rows)
        result.n_nodes = len(seen)
        result.nodes, result.weights = nodes, weights
        maps = {g: {layer: torch.zeros_like(clean.val[layer][g], dtype=torch.float64) for layer in self.layers}
                for g in range(len(group)) if group[g].id in keep_maps}  # rows without a pass stay zero
        for j in map_rows:
            maps[rows[j]] = {layer: sum(float(w) * seen[float(x)].maps[j][layer] for x, w in zip(nodes, weights))
                             for layer in self.layers}
        self._keep_maps(result, group, clean, maps)
        return result

    def _node_rows(self, clean: CleanPass, grads: NodeGrads, n: int, map_rows: list[int]) -> "_NodeRows":
        """Node ``n`` of a pass, reduced to dense per-row latent sums ``[rows, d_sae]`` and the row totals."""
        sel = torch.tensor(grads.rows, device=self.param.device)
        latent, maps = {}, {j: {} for j in map_rows}
        for layer in self.layers:
            grad = grads.latent[layer][n]  # [rows, T, K]
            idx = clean.idx[layer][sel]
            dense = torch.zeros(len(grads.rows), self.saes[layer].cfg.d_sae, dtype=torch.float64)
            for j in range(len(grads.rows)):
                dense[j].index_add_(0, idx[j].flatten().cpu(), grad[j].flatten().cpu())
                if j in maps:
                    maps[j][layer] = grad[j].cpu()
            if layer in grads.origin:
                dense += grads.origin[layer][n].cpu()
            latent[layer] = dense
        error = {layer: grads.error[layer][n].cpu() for layer in grads.error}
        total = sum(d.sum(1) for d in latent.values()) + sum(error.values())  # dF/dalpha of each row
        return _NodeRows(latent=latent, error=error, maps=maps, total=total, logp=grads.logp[n].double().cpu())

    def _combine(self, result: GroupAttribution, nodes: list["_NodeRows"], weights: np.ndarray, rows: list[int]) -> None:
        """Set each row's attribution to ``sum_k w_k * node_k``."""
        for layer in self.layers:
            total = sum(float(w) * node.latent[layer] for node, w in zip(nodes, weights))
            result.per_traj[layer][rows] = total
            if self.cfg.error_node:
                result.error[layer][rows] = sum(float(w) * node.error[layer] for node, w in zip(nodes, weights))

    def _keep_maps(self, result: GroupAttribution, group: list[Trajectory], clean: CleanPass, maps: dict) -> None:
        for g, per_layer in maps.items():
            result.token_maps[group[g].id] = {
                "tokens": clean.batch.ids[g][clean.batch.attn[g].bool()].tolist(),
                **{f"L{layer}.latents": clean.idx[layer][g].cpu() for layer in self.layers},
                **{f"L{layer}.activation": clean.val[layer][g].cpu() for layer in self.layers},
                **{f"L{layer}.attribution": per_layer[layer] for layer in self.layers},
            }

    def observe_group(self, group: list[Trajectory], adv: torch.Tensor | None = None) -> tuple[GroupAttribution, CleanPass]:
        """The clean pass only: a zero attribution (marked ``skipped``) and the clean record."""
        clean = self.clean_pass(self.batch(group))
        G = len(group)
        adv = torch.zeros(G, dtype=torch.float64) if adv is None else adv
        result = GroupAttribution(
            per_traj={layer: torch.zeros(G, sae.cfg.d_sae, dtype=torch.float64) for layer, sae in self.saes.items()},
            error={layer: torch.zeros(G, dtype=torch.float64) for layer in self.layers},
            logp1=clean.logp.double().cpu(), logp0=clean.logp.double().cpu(), advantage=adv,
            n_tokens=int(clean.batch.attn.sum()), active=clean.active, activation_sum=clean.act_mean,
            contexts=clean.contexts, n_scope=int(clean.batch.scope.sum()), skipped=True, variance=clean.variance,
        )
        return result, clean

    def _add_weighted(self, result: GroupAttribution, maps: dict, clean: CleanPass, grads: NodeGrads,
                      weights: list[float]) -> None:
        """Add ``sum_k w_k * grad_k`` of a node pass to each trajectory's row (and token map)."""
        rows = grads.rows
        sel = torch.tensor(rows, device=self.param.device)
        w = torch.tensor(weights, dtype=torch.float64)
        for layer in self.layers:
            grad = grads.latent[layer]
            idx = clean.idx[layer][sel]
            per_row = (grad * w.to(grad.device)[:, None, None, None]).sum(0)  # [rows, T, K]
            for j, g in enumerate(rows):
                result.per_traj[layer][g].index_add_(0, idx[j].flatten().cpu(), per_row[j].flatten().cpu())
                if g in maps:
                    maps[g][layer] += per_row[j].cpu()
            if layer in grads.origin:
                og = grads.origin[layer]
                result.per_traj[layer][rows] += (og * w.to(og.device)[:, None, None]).sum(0).cpu()
            if self.cfg.error_node:
                eg = grads.error[layer]
                result.error[layer][rows] += (eg * w.to(eg.device)[:, None]).sum(0).cpu()

    # -- inputs --------------------------------------------------------------------------

    def batch(self, group: list[Trajectory]) -> Batch:
        seqs = [t.prompt_ids + t.completion_ids for t in group]
        T = max(len(s) for s in seqs)
        if self.max_positions and T > self.max_positions:
            long = max(group, key=lambda t: t.n_tokens)
            raise IPGError(f"trajectory {long.id} has {long.n_tokens} tokens but the model's context is "
                           f"{self.max_positions}; sample with a smaller max_new_tokens")
        device = self.param.device
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros(len(seqs), T, dtype=torch.long)
        score = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, (t, s) in enumerate(zip(group, seqs)):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
            score[i, len(t.prompt_ids) - 1:len(s) - 1] = True
        targets = torch.roll(ids, -1, dims=1)
        prompt_lens = torch.tensor([len(t.prompt_ids) for t in group])
        ids, attn, prompt_lens = ids.to(device), attn.to(device), prompt_lens.to(device)
        return Batch(ids=ids, attn=attn, targets=targets.to(device), score_mask=score.to(device),
                     prompt_lens=prompt_lens, scope=self._scope_mask(attn, prompt_lens))

    def _scope_mask(self, attn: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(attn.shape[1], device=attn.device)[None, :]
        keep = attn.bool()
        if self.cfg.exclude_first:
            keep &= pos != 0  # right padding: every row starts at position 0
        if self.cfg.scope == "generated":
            keep &= pos >= prompt_lens[:, None]
        return keep

    def node_chunks(self, n_nodes: int, n_rows: int) -> list[list[int]]:
        """Node indices per pass: all nodes in one pass, or ``internal_batch_size`` rows at most."""
        ibs = self.cfg.internal_batch_size
        per_chunk = n_nodes if ibs is None else max(1, ibs // max(1, n_rows))
        return [list(range(i, min(i + per_chunk, n_nodes))) for i in range(0, n_nodes, per_chunk)]

    # -- passes --------------------------------------------------------------------------

    @torch.no_grad()
    def clean_pass(self, batch: Batch) -> CleanPass:
        """Run the model unmodified; record the residual below the path and each layer's active set."""
        residuals: dict[int, torch.Tensor] = {}
        tuple_out: dict[int, bool] = {}

        def make_hook(layer):
            def hook(_m, _i, out):
                residuals[layer] = block_hidden(out)
                tuple_out[layer] = isinstance(out, tuple)
            return hook

        handles = [self.blocks[layer].register_forward_hook(make_hook(layer)) for layer in self.layers]
        try:
            hidden = self.base(input_ids=batch.ids, attention_mask=batch.attn, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        clean = CleanPass(batch=batch, x_min=residuals[self.l_min], tuple_blocks=tuple_out[self.l_min],
                          logp=self._seq_logprobs(hidden, batch.targets, batch.score_mask),
                          idx={}, val={}, recon={}, active={}, act_mean={}, contexts={}, variance={},
                          origin=self.origin)
        scope = batch.scope
        n_scope = scope.sum().clamp(min=1)
        for layer, sae in self.saes.items():
            x = residuals[layer]
            idx, val = encode_active(sae, x)
            val = val * scope[..., None].to(val.dtype)  # out-of-scope positions get no gates
            clean.idx[layer], clean.val[layer] = idx, val
            recon = F.embedding_bag(idx.flatten(0, 1), self.w_dec[layer], per_sample_weights=val.flatten(0, 1),
                                    mode="sum").view_as(x) + sae.b_dec
            if self.cfg.error_node:
                clean.recon[layer] = recon  # dec(f) with the clean latents: constant on the path
            clean.variance[layer] = variance_sums(x[scope], recon[scope])  # how well the SAE explains this data
            flat_idx, flat_val = idx.flatten(), val.flatten().float()
            d = sae.cfg.d_sae
            clean.active[layer] = torch.zeros(d, dtype=torch.bool, device=x.device).index_fill_(
                0, flat_idx[flat_val > 0], True).cpu()
            clean.act_mean[layer] = (torch.zeros(d, device=x.device).index_add_(0, flat_idx, flat_val)
                                     / n_scope).double().cpu()
            clean.contexts[layer] = _top_contexts(idx, val, d, self.cfg.n_contexts)
        return clean

    @torch.no_grad()
    def logp_at(self, clean: CleanPass, alpha: float) -> torch.Tensor:
        """``log pi(tau; c = alpha * 1)`` of every trajectory of the group (no gradients)."""
        b = clean.batch
        rows = list(range(b.ids.shape[0]))
        with self._path_pass(clean, rows, [alpha], requires_grad=False):
            hidden = self.base(input_ids=b.ids, attention_mask=b.attn, use_cache=False).last_hidden_state
            return self._seq_logprobs(hidden, b.targets, b.score_mask)

    def node_pass(self, clean: CleanPass, alphas: list[float], rows: list[int], adv: torch.Tensor) -> NodeGrads:
        """One forward + backward with the nodes ``alphas`` stacked on the batch dimension (node-major)."""
        b = clean.batch
        n_rep = len(alphas)
        sel = torch.tensor(rows, device=b.ids.device)
        rep = lambda t: t[sel].repeat(n_rep, *([1] * (t.dim() - 1)))  # noqa: E731  node-major stacking
        with self._path_pass(clean, rows, alphas, requires_grad=True) as leaves:
            hidden = self.base(input_ids=rep(b.ids), attention_mask=rep(b.attn), use_cache=False).last_hidden_state
            logp = self._seq_logprobs(hidden, rep(b.targets), rep(b.score_mask)).view(n_rep, len(rows))
            coef = adv[rows].to(logp.device, torch.float64)[None, :].expand(n_rep, -1)
            if self.cfg.importance == "self_normalized":
                coef = coef * self._importance(logp.detach().double(), clean.logp[sel].double())
            objective = (coef.to(logp.dtype) * logp).sum()
            objective.backward()
        latent = {layer: leaves[layer].grad.double().view(n_rep, len(rows), *leaves[layer].shape[1:])
                  for layer in self.layers}
        error = ({layer: leaves[f"err{layer}"].grad.double().view(n_rep, len(rows)) for layer in self.layers}
                 if self.cfg.error_node else {})
        origin = {layer: leaves[f"origin{layer}"].grad.double().view(n_rep, len(rows), -1) for layer in clean.origin}
        return NodeGrads(rows=list(rows), latent=latent, error=error, logp=logp.detach(), origin=origin)

    def _importance(self, logp_k: torch.Tensor, logp_1: torch.Tensor) -> torch.Tensor:
        """Self-normalized weights exp(logp_k - logp_1) per group, mean 1, clipped."""
        log_r = logp_k - logp_1[None, :]
        r = torch.softmax(log_r, dim=1) * log_r.shape[1]
        return r.clamp(max=self.cfg.importance_clip)

    @contextlib.contextmanager
    def _path_pass(self, clean: CleanPass, rows: list[int], alphas: list[float], requires_grad: bool) -> Iterator[dict]:
        """For one pass: the blocks below the path skipped, the cached residual replayed at ``l_min``,
        the frozen-latent splice at every layer with gate leaves at ``alphas`` (node-major), the
        blocks above checkpointed when configured. Yields the gate leaves; restores the model after."""
        device = self.param.device
        sel = torch.tensor(rows, device=device)
        n_rep = len(alphas)
        alpha_rows = torch.tensor(alphas, device=device, dtype=self.param.dtype).repeat_interleave(len(rows))
        leaves: dict = {}
        splices: dict[int, _FrozenSplice] = {}
        for layer in self.layers:
            idx = clean.idx[layer][sel].repeat(n_rep, 1, 1)
            val = clean.val[layer][sel].repeat(n_rep, 1, 1).to(self.param.dtype)
            s = alpha_rows[:, None, None].expand_as(val).clone().requires_grad_(requires_grad)
            leaves[layer] = s
            err = recon = origin = None
            scope = clean.batch.scope[sel].repeat(n_rep, 1)[..., None]
            if self.cfg.error_node:
                err = alpha_rows.clone().requires_grad_(requires_grad)
                leaves[f"err{layer}"] = err
                recon = clean.recon[layer][sel].repeat(n_rep, 1, 1)
            if layer in clean.origin:
                gate = alpha_rows[:, None].expand(-1, self.w_dec[layer].shape[0]).clone().requires_grad_(requires_grad)
                leaves[f"origin{layer}"] = gate
                origin = (clean.origin[layer].to(self.param.dtype), gate)
            splices[layer] = _FrozenSplice(self.w_dec[layer], idx, val, s, err, recon, scope, origin, self.w_bag[layer])
        originals = {i: self.blocks[i] for i in range(self.l_min + 1)}
        handles = []
        try:
            for i in range(self.l_min):
                self.blocks[i] = SkippedBlock(originals[i], clean.tuple_blocks)
            x = clean.x_min[sel].repeat(n_rep, 1, 1)
            self.blocks[self.l_min] = ReplayedBlock(originals[self.l_min], clean.tuple_blocks, x, splices[self.l_min])
            if self.cfg.gradient_checkpointing:
                for i in range(self.l_min + 1, len(self.blocks)):
                    originals[i] = self.blocks[i]
                    self.blocks[i] = _Checkpointed(originals[i])
            for layer in self.layers[1:]:
                handles.append(self.blocks[layer].register_forward_hook(splices[layer].hook))  # the wrapper, if any
            yield leaves
        finally:
            for h in handles:
                h.remove()
            for i, block in originals.items():
                self.blocks[i] = block

    # -- the head ------------------------------------------------------------------------

    def _seq_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
        """Sum of log-probs of the scored target tokens per row.

        Only the scored (generated) positions go through the LM head. With gradients on and a
        frozen head, ``_TargetLogProb`` computes d logp / d h in the same chunked pass that
        computes logp (one head matmul pair per position, no recompute); otherwise the chunks
        are checkpointed. Either way ``[tokens, vocab]`` logits never exist at once.
        """
        B = hidden.shape[0]
        rows, pos = score_mask.nonzero(as_tuple=True)
        h, tgt = hidden[rows, pos], targets[rows, pos]
        total = hidden.new_zeros(B, dtype=torch.promote_types(hidden.dtype, torch.float32))
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        if torch.is_grad_enabled() and frozen and type(self.head) is nn.Linear:
            lp = _TargetLogProb.apply(h, tgt, weight, bias, self.softcap)
            return total.index_add(0, rows, lp.to(total.dtype))
        step = _head_chunk(weight.shape[0])
        for start in range(0, rows.numel(), step):
            sl = slice(start, start + step)
            if torch.is_grad_enabled():
                lp = checkpoint(self._token_logprobs, h[sl], tgt[sl], use_reentrant=False)
            else:
                lp = self._token_logprobs(h[sl], tgt[sl])
            total = total.index_add(0, rows[sl], lp.to(total.dtype))
        return total

    def _token_logprobs(self, h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 log-softmax is too coarse
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)


def _head_chunk(vocab: int) -> int:
    return max(1, (1 << 25) // max(1, vocab))  # ~32M logits per chunk


class _TargetLogProb(torch.autograd.Function):
    """``log softmax(cap * tanh(h W^T / cap) + b)[target]`` per row, with its input gradient
    computed in the forward.

    d logp / d z = onehot(target) - softmax(z) (times ``1 - tanh^2`` under a softcap), so
    d logp / d h = (onehot - p) W needs the same logits the forward already built. Saving that
    ``[positions, d_model]`` gradient instead of recomputing the logits in the backward saves
    one head matmul per position: the head is the largest matmul of a small model. The
    head must be frozen (its own gradient is not computed).
    """

    @staticmethod
    def forward(ctx, h, tgt, weight, bias, softcap):
        out_dtype = torch.promote_types(h.dtype, torch.float32)
        lp = torch.empty(h.shape[0], dtype=out_dtype, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        step = _head_chunk(weight.shape[0])
        for start in range(0, h.shape[0], step):
            sl = slice(start, start + step)
            z = F.linear(h[sl], weight, bias).to(out_dtype)
            if softcap:
                t = torch.tanh(z / softcap)
                z = t * softcap
            lse = torch.logsumexp(z, dim=-1)
            t_idx = tgt[sl, None]
            lp[sl] = z.gather(-1, t_idx).squeeze(-1) - lse
            if grad_h is None:
                continue
            dz = torch.exp(z.sub_(lse[:, None])).neg_()  # -softmax, in place of the logits
            dz.scatter_add_(-1, t_idx, torch.ones_like(t_idx, dtype=dz.dtype))
            if softcap:
                dz.mul_(1 - t * t)
            grad_h[sl] = (dz.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return lp

    @staticmethod
    def backward(ctx, grad_lp):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_lp[:, None].to(grad_h.dtype), None, None, None, None


class _FrozenSplice:
    """``x' = x + sum_j (s_tj - 1) val_tj W_dec[idx_tj]  (+ (e - 1) eps)  (- ((o - 1) * b) @ W_dec)`` with clean
    latents.

    ``eps = x - dec(f)`` uses the current pass's ``x`` and the frozen reconstruction, so at
    ``c = 0, e = 0`` only ``b_dec`` is left, at every layer of the path. With a path origin
    ``b`` (``origin = (b, o)``, ``o`` the dense gate ``[rows, d_sae]``), every in-scope position
    also gets ``-((o - 1) * b) @ W_dec``: at ``c = 0`` each latent sits at ``b_i`` instead of 0.
    """

    def __init__(self, w_dec, idx, val, s, err=None, recon=None, scope=None, origin=None, w_bag=None):
        self.w_dec, self.idx, self.val, self.s, self.w_bag = w_dec, idx, val, s, w_bag  # w_bag: see bag_matrix
        self.err, self.recon, self.scope, self.origin = err, recon, scope, origin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, T, K = self.idx.shape
        coef = (self.s - 1.0) * self.val
        w_bag = self.w_bag if self.w_bag is not None and self.w_bag.dtype == bag_dtype(x.dtype) \
            else bag_matrix(self.w_dec, x.dtype)
        delta = F.embedding_bag(self.idx.reshape(B * T, K), w_bag,
                                per_sample_weights=coef.reshape(B * T, K).to(w_bag.dtype), mode="sum")
        out = x + delta.view(B, T, -1).to(x.dtype)
        if self.err is not None:
            eps = (x - self.recon.to(x.dtype)) * self.scope.to(x.dtype)
            out = out + (self.err - 1.0).to(x.dtype)[:, None, None] * eps
        if self.origin is not None:
            b, o = self.origin
            shift = -((o - 1.0) * b.to(o.dtype)) @ self.w_dec.to(o.dtype)  # [rows, d]
            out = out + shift.to(x.dtype)[:, None, :] * self.scope.to(x.dtype)
        return out

    def hook(self, _module, _inputs, output):
        return replace_block_hidden(output, self(block_hidden(output)))


class _Checkpointed(nn.Module):
    """Recompute a block in the backward instead of storing its activations."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        copy_mask_attributes(self, block)

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


@torch.no_grad()
def _top_contexts(idx, val, d_sae, m):
    """Per latent, the ``m`` largest activations in the group and where they are (row, position)."""
    B, T, K = idx.shape
    flat_val = val.reshape(-1).float()
    flat_idx = idx.reshape(-1)
    where = torch.arange(B * T, device=idx.device).repeat_interleave(K)
    values = torch.full((d_sae, m), -1.0, device=idx.device)
    locs = torch.full((d_sae, m), -1, dtype=torch.long, device=idx.device)
    remaining = flat_val.clone()
    for j in range(m):  # m rounds of a scatter-argmax
        best = torch.full((d_sae,), -1.0, device=idx.device).scatter_reduce(0, flat_idx, remaining, "amax")
        hit = (remaining == best[flat_idx]) & (remaining > 0)
        pos = torch.full((d_sae,), -1, dtype=torch.long, device=idx.device)
        pos.scatter_(0, flat_idx[hit], where[hit])
        values[:, j] = best.clamp(min=-1.0)
        locs[:, j] = pos
        remaining = torch.where(hit, torch.full_like(remaining, -1.0), remaining)
    values[locs < 0] = -1.0
    return values.cpu(), (locs // T).cpu(), (locs % T).cpu()
