r"""Integrated Policy Gradient (IPG) over SAE latents.

The maths (``../shared/ipg-method.md`` is the specification):

* Splice SAEs at layers ``L``. Run each trajectory once unmodified and record each spliced
  layer's clean latents ``f_t`` (active set ``[tokens, k]``). Along the path, every position
  ``t`` in scope gets ``x_t' = x_t + ((c - 1) * f_t) @ W_dec`` with ``f_t`` held at its clean
  value: at ``c = 1`` the model is unchanged, gradients reach the gates through ``W_dec`` and
  lower layers through ``x_t``, so several layers share one joint path.
* ``F(c) = sum_g A_g log pi(tau_g | x; c)`` over the ``G`` samples of a prompt, with ``log pi``
  summed over the generated tokens only and advantages ``A_g`` (``rloo`` by default).
* ``IPG_i(x) = (1/G) sum_k w_k dF/dc_i |_{c = alpha_k 1}`` with quadrature nodes ``alpha_k``
  and weights ``w_k`` on [0, 1] (Gauss-Legendre by default; captum's Riemann variants).
* Completeness: per trajectory, ``sum_i IPG_i(tau) = A (log pi(tau; 1) - log pi(tau; 0))`` up to
  quadrature error. We report the relative gap as ``delta``. With ``error_node`` the SAE error
  ``eps = x - dec(f)`` is gated as one more component and completeness covers it too.

How it is computed (and why it is fast):

* ``dF/dc_i = sum_t f_{t,i} (g_t . W_dec[i])`` is obtained in one backward per node as the
  gradient of a leaf ``s [rows, tokens, k]`` holding the gate values *at the active entries*,
  with the residual update done by ``embedding_bag`` over the active rows of ``W_dec``: no
  dense ``[tokens, d_sae]`` gradient exists anywhere.
* The layers up to the lowest spliced layer run once per trajectory (the clean pass); node
  passes replay the cached residual there and run only the layers above, with the nodes
  stacked along the batch dimension (``internal_batch_size`` rows per chunk, whole groups).
* ``log pi`` is computed from the final hidden states in chunks of positions (and
  rematerialized in the backward), so ``[tokens, vocab]`` logits never exist at once.
* Groups whose advantages are all zero contribute exactly zero and skip every node pass.

Assumptions: the model's logits are ``lm_head(final hidden)`` (optionally soft-capped, as in
Gemma); decoder blocks are called in order by the base model. Both hold for Llama, Qwen2,
Mistral, Gemma and GPT-2 layouts in transformers 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import IPGError
from .models import block_hidden, decoder_layers, model_fingerprint, replace_block_hidden
from .saes import as_layer_dict, decoder_matrix, encode_active, prepare_sae
from .trajectories import Trajectory, check_rewards, check_same_model, group_by_prompt

log = logging.getLogger(__name__)

Method = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
Advantage = Literal["rloo", "mean", "grpo", "none", "correct"]


@dataclass
class AttributionConfig:
    n_steps: int = 8
    method: Method = "gausslegendre"
    advantage: Advantage = "rloo"
    importance: Literal["none", "self_normalized"] = "none"
    scope: Literal["all", "generated"] = "all"
    exclude_first: bool = True  # the first token's residual is an outlier; no SAE reads it
    internal_batch_size: int | None = None  # sequences per forward/backward chunk (whole groups)
    error_node: bool = False
    gradient_checkpointing: bool = False
    importance_clip: float = 10.0
    token_maps: list[str] = field(default_factory=list)  # trajectory ids that keep per-token maps
    n_contexts: int = 3  # top activating contexts kept per latent

    def validate(self) -> None:
        if self.n_steps < 1:
            raise IPGError(f"attribution.n_steps is {self.n_steps}; it must be at least 1")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise IPGError("attribution.internal_batch_size must be positive or null")


# ---- quadrature and advantages ----------------------------------------------------------


def quadrature(n_steps: int, method: Method = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha_k`` in [0, 1] and weights ``w_k`` summing to 1 (captum's method names)."""
    k = np.arange(n_steps, dtype=np.float64)
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return (x + 1) / 2, w / 2
    if method == "riemann_left":
        return k / n_steps, np.full(n_steps, 1 / n_steps)
    if method == "riemann_right":
        return (k + 1) / n_steps, np.full(n_steps, 1 / n_steps)
    if method == "riemann_middle":
        return (k + 0.5) / n_steps, np.full(n_steps, 1 / n_steps)
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise IPGError("riemann_trapezoid needs n_steps >= 2")
        w = np.full(n_steps, 1 / (n_steps - 1))
        w[0] = w[-1] = 0.5 / (n_steps - 1)
        return k / (n_steps - 1), w
    raise IPGError(f"unknown quadrature method {method!r}; use gausslegendre or riemann_left|right|middle|trapezoid")


def advantages(rewards: torch.Tensor, kind: Advantage = "rloo") -> torch.Tensor:
    """Per-sample advantages of one group of rewards ``[G]`` (float64)."""
    r = rewards.to(torch.float64)
    g = r.numel()
    if kind == "none":
        return r.clone()
    if kind == "correct":  # likelihood baselines: weight 1 on rewarded samples only
        return (r > 0).to(torch.float64)
    if g < 2 or torch.all(r == r[0]):
        return torch.zeros_like(r)
    if kind == "rloo":
        return r - (r.sum() - r) / (g - 1)
    if kind == "mean":
        return r - r.mean()
    if kind == "grpo":
        return (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    raise IPGError(f"unknown advantage {kind!r}; use rloo, mean, grpo or none")


# ---- results ----------------------------------------------------------------------------


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


# ---- the engine -------------------------------------------------------------------------


class IPGEngine:
    """Attributes groups of trajectories of one model through SAEs at one or more layers."""

    def __init__(self, model: nn.Module, saes, cfg: AttributionConfig | None = None, pad_id: int = 0):
        self.model = model
        self.cfg = cfg or AttributionConfig()
        self.cfg.validate()
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
        self.max_positions = _max_positions(model)
        self.param = next(model.parameters())

    # -- public --------------------------------------------------------------------------

    def attribute_group(self, group: list[Trajectory], nodes: np.ndarray, weights: np.ndarray,
                        advantage: Advantage | None = None, keep_maps: set[str] = frozenset()) -> GroupAttribution:
        cfg = self.cfg
        rewards = torch.tensor([t.reward for t in group], dtype=torch.float64)
        adv = advantages(rewards, advantage or cfg.advantage)
        ids, attn, targets, score_mask, prompt_lens = self._batch(group)
        scope = self._scope_mask(attn, prompt_lens)
        clean = self._clean_pass(ids, attn, targets, score_mask, scope)
        G = len(group)
        result = GroupAttribution(
            per_traj={layer: torch.zeros(G, sae.cfg.d_sae, dtype=torch.float64) for layer, sae in self.saes.items()},
            error={layer: torch.zeros(G, dtype=torch.float64) for layer in self.layers},
            logp1=clean["logp"].double().cpu(), logp0=clean["logp"].double().cpu(), advantage=adv,
            n_tokens=int(attn.sum()), active=clean["active"], activation_sum=clean["act_mean"],
            contexts=clean["contexts"],
        )
        if torch.all(adv == 0):
            result.skipped = True  # F is identically zero: every gradient is zero
            return result
        rows = [g for g in range(G) if adv[g] != 0 or cfg.importance != "none"]
        maps = {g: {layer: torch.zeros_like(clean["val"][layer][g], dtype=torch.float64) for layer in self.layers}
                for g in range(G) if group[g].id in keep_maps}
        with self._upper_only(clean["x_min"]):
            result.logp0 = self._logp_at(0.0, clean, ids, attn, targets, score_mask).double().cpu()
            for chunk in self._node_chunks(len(nodes), len(rows)):
                self._node_pass(chunk, nodes, weights, rows, adv, clean, ids, attn, targets, score_mask, result, maps)
        for g, per_layer in maps.items():
            result.token_maps[group[g].id] = {
                "tokens": ids[g][attn[g].bool()].tolist(),
                **{f"L{layer}.latents": clean["idx"][layer][g].cpu() for layer in self.layers},
                **{f"L{layer}.attribution": per_layer[layer] for layer in self.layers},
            }
        return result

    # -- passes --------------------------------------------------------------------------

    def _batch(self, group: list[Trajectory]):
        seqs = [t.prompt_ids + t.completion_ids for t in group]
        T = max(len(s) for s in seqs)
        if self.max_positions and T > self.max_positions:
            long = max(group, key=lambda t: t.n_tokens)
            raise IPGError(f"trajectory {long.id} has {long.n_tokens} tokens but the model's context is "
                           f"{self.max_positions}; sample with a smaller max_new_tokens")
        device = self.param.device
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros(len(seqs), T, dtype=torch.long)
        score = torch.zeros(len(seqs), T, dtype=torch.bool)  # positions whose *next* token is generated
        for i, (t, s) in enumerate(zip(group, seqs)):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
            score[i, len(t.prompt_ids) - 1:len(s) - 1] = True
        targets = torch.roll(ids, -1, dims=1)
        prompt_lens = torch.tensor([len(t.prompt_ids) for t in group])
        return ids.to(device), attn.to(device), targets.to(device), score.to(device), prompt_lens.to(device)

    def _scope_mask(self, attn: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(attn.shape[1], device=attn.device)[None, :]
        keep = attn.bool()
        if self.cfg.exclude_first:
            keep &= pos != 0  # right padding: every row starts at position 0
        if self.cfg.scope == "generated":
            keep &= pos >= prompt_lens[:, None]
        return keep

    @torch.no_grad()
    def _clean_pass(self, ids, attn, targets, score_mask, scope) -> dict:
        residuals: dict[int, torch.Tensor] = {}
        tuple_out: dict[int, bool] = {}

        def make_hook(layer):
            def hook(_m, _i, out):
                residuals[layer] = block_hidden(out)
                tuple_out[layer] = isinstance(out, tuple)
            return hook

        handles = [self.blocks[layer].register_forward_hook(make_hook(layer)) for layer in self.layers]
        try:
            hidden = self.base(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        self._tuple_blocks = tuple_out[self.l_min]
        out = {"x_min": residuals[self.l_min], "logp": self._seq_logprobs(hidden, targets, score_mask),
               "idx": {}, "val": {}, "recon": {}, "active": {}, "act_mean": {}, "contexts": {}}
        out["scope"] = scope
        n_scope = scope.sum().clamp(min=1)
        for layer, sae in self.saes.items():
            x = residuals[layer]
            idx, val = encode_active(sae, x)
            val = val * scope[..., None].to(val.dtype)  # out-of-scope positions get no gates
            out["idx"][layer], out["val"][layer] = idx, val
            if self.cfg.error_node:
                recon = F.embedding_bag(idx.flatten(0, 1), self.w_dec[layer], per_sample_weights=val.flatten(0, 1),
                                        mode="sum").view_as(x) + sae.b_dec
                out["recon"][layer] = recon  # dec(f) with the clean latents: constant on the path
            flat_idx, flat_val = idx.flatten(), val.flatten().float()
            d = sae.cfg.d_sae
            out["active"][layer] = torch.zeros(d, dtype=torch.bool, device=x.device).index_fill_(
                0, flat_idx[flat_val > 0], True).cpu()
            out["act_mean"][layer] = (torch.zeros(d, device=x.device).index_add_(0, flat_idx, flat_val)
                                      / n_scope).double().cpu()
            out["contexts"][layer] = _top_contexts(idx, val, d, self.cfg.n_contexts)
        return out

    def _seq_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
        """Sum of log-probs of the scored target tokens per row, computed in position chunks."""
        B, T, _ = hidden.shape
        vocab = self.head.weight.shape[0]
        step = max(1, (1 << 25) // max(1, B * vocab))  # ~32M logits per chunk
        total = hidden.new_zeros(B, dtype=torch.promote_types(hidden.dtype, torch.float32))
        for start in range(0, T, step):
            sl = slice(start, start + step)
            if not score_mask[:, sl].any():
                continue
            args = (hidden[:, sl], targets[:, sl], score_mask[:, sl])
            if torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_logprobs, *args, use_reentrant=False)
            else:
                total = total + self._chunk_logprobs(*args)
        return total

    def _chunk_logprobs(self, h, tgt, mask):
        logits = self.head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 log-softmax is too coarse
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        lp = torch.log_softmax(logits, dim=-1).gather(-1, tgt[..., None]).squeeze(-1)
        return (lp * mask).sum(-1)

    @contextlib.contextmanager
    def _upper_only(self, x_min: torch.Tensor) -> Iterator[None]:
        """Replace the blocks up to ``l_min`` by a replay of the cached residual there."""
        originals = {i: self.blocks[i] for i in range(self.l_min + 1)}
        self._replay = _Replay(x_min, self._tuple_blocks)
        try:
            for i in range(self.l_min):
                self.blocks[i] = _Skip(originals[i], self._tuple_blocks)
            self.blocks[self.l_min] = self._replay
            if self.cfg.gradient_checkpointing:
                for i in range(self.l_min + 1, len(self.blocks)):
                    originals[i] = self.blocks[i]
                    self.blocks[i] = _Checkpointed(originals[i])
            yield
        finally:
            for i, block in originals.items():
                self.blocks[i] = block

    def _node_chunks(self, n_nodes: int, n_rows: int) -> list[list[int]]:
        ibs = self.cfg.internal_batch_size
        per_chunk = n_nodes if ibs is None else max(1, ibs // max(1, n_rows))
        return [list(range(i, min(i + per_chunk, n_nodes))) for i in range(0, n_nodes, per_chunk)]

    def _logp_at(self, alpha: float, clean, ids, attn, targets, score_mask) -> torch.Tensor:
        rows = list(range(ids.shape[0]))
        with torch.no_grad(), self._gated(clean, rows, [alpha], requires_grad=False):
            self._replay.repeat = 1
            hidden = self.base(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            return self._seq_logprobs(hidden, targets, score_mask)

    def _node_pass(self, chunk, nodes, weights, rows, adv, clean, ids, attn, targets, score_mask, result, maps):
        alphas = [float(nodes[k]) for k in chunk]
        n_rep = len(chunk)
        sel = torch.tensor(rows, device=ids.device)
        rep = lambda t: t[sel].repeat(n_rep, *([1] * (t.dim() - 1)))  # noqa: E731  node-major stacking
        with self._gated(clean, rows, alphas, requires_grad=True) as leaves:
            self._replay.repeat, self._replay.rows = n_rep, sel
            hidden = self.base(input_ids=rep(ids), attention_mask=rep(attn), use_cache=False).last_hidden_state
            logp = self._seq_logprobs(hidden, rep(targets), rep(score_mask)).view(n_rep, len(rows))
            coef = adv[rows].to(logp.device, torch.float64)[None, :].expand(n_rep, -1)
            if self.cfg.importance == "self_normalized":
                coef = coef * self._importance(logp.detach().double(), clean["logp"][sel].double())
            objective = (coef.to(logp.dtype) * logp).sum()
            objective.backward()
        self._replay.rows = None
        w = torch.tensor([weights[k] for k in chunk], dtype=torch.float64)
        for layer in self.layers:
            grad = leaves[layer].grad.double().view(n_rep, len(rows), *leaves[layer].shape[1:])
            idx = clean["idx"][layer][sel]
            per_row = (grad * w.to(grad.device)[:, None, None, None]).sum(0)  # [rows, T, K]
            for j, g in enumerate(rows):
                result.per_traj[layer][g].index_add_(0, idx[j].flatten().cpu(), per_row[j].flatten().cpu())
                if g in maps:
                    maps[g][layer] += per_row[j].cpu()
            if self.cfg.error_node:
                eg = leaves[f"err{layer}"].grad.double().view(n_rep, len(rows))
                result.error[layer][rows] += (eg * w.to(eg.device)[:, None]).sum(0).cpu()

    def _importance(self, logp_k: torch.Tensor, logp_1: torch.Tensor) -> torch.Tensor:
        """Self-normalized weights exp(logp_k - logp_1) per group, mean 1, clipped."""
        log_r = logp_k - logp_1[None, :]
        r = torch.softmax(log_r, dim=1) * log_r.shape[1]
        return r.clamp(max=self.cfg.importance_clip)

    @contextlib.contextmanager
    def _gated(self, clean, rows, alphas, requires_grad: bool):
        """Install the frozen-latent splice at every layer, with gate leaves at ``alphas`` (node-major)."""
        sel = torch.tensor(rows, device=self.param.device)
        n_rep = len(alphas)
        alpha_rows = torch.tensor(alphas, device=self.param.device, dtype=self.param.dtype).repeat_interleave(len(rows))
        leaves: dict = {}
        handles = []
        for layer in self.layers:
            idx = clean["idx"][layer][sel].repeat(n_rep, 1, 1)
            val = clean["val"][layer][sel].repeat(n_rep, 1, 1).to(self.param.dtype)
            s = alpha_rows[:, None, None].expand_as(val).clone().requires_grad_(requires_grad)
            leaves[layer] = s
            err = None
            if self.cfg.error_node:
                err = alpha_rows.clone().requires_grad_(requires_grad)
                leaves[f"err{layer}"] = err
            recon = scope = None
            if self.cfg.error_node:
                recon = clean["recon"][layer][sel].repeat(n_rep, 1, 1)
                scope = clean["scope"][sel].repeat(n_rep, 1)[..., None]
            update = _FrozenSplice(self.w_dec[layer], idx, val, s, err, recon, scope)
            if layer == self.l_min:
                self._replay.update = update
            else:
                handles.append(self.blocks[layer].register_forward_hook(update.hook))
        try:
            yield leaves
        finally:
            self._replay.update = None
            for h in handles:
                h.remove()


class _FrozenSplice:
    """``x' = x + sum_j (s_tj - 1) val_tj W_dec[idx_tj]  (+ (e - 1) eps)`` with clean latents.

    ``eps = x - dec(f)`` uses the current pass's ``x`` and the frozen reconstruction, so at
    ``c = 0, e = 0`` only ``b_dec`` is left, at every layer of the path.
    """

    def __init__(self, w_dec, idx, val, s, err=None, recon=None, scope=None):
        self.w_dec, self.idx, self.val, self.s = w_dec, idx, val, s
        self.err, self.recon, self.scope = err, recon, scope

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, T, K = self.idx.shape
        coef = (self.s - 1.0) * self.val
        delta = F.embedding_bag(self.idx.reshape(B * T, K), self.w_dec.to(x.dtype),
                                per_sample_weights=coef.reshape(B * T, K).to(x.dtype), mode="sum")
        out = x + delta.view(B, T, -1)
        if self.err is not None:
            eps = (x - self.recon.to(x.dtype)) * self.scope.to(x.dtype)
            out = out + (self.err - 1.0).to(x.dtype)[:, None, None] * eps
        return out

    def hook(self, _module, _inputs, output):
        return replace_block_hidden(output, self(block_hidden(output)))


class _Replay(nn.Module):
    """Stands in for the lowest spliced block: returns the cached clean residual (spliced)."""

    def __init__(self, x_min: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.x_min, self.as_tuple = x_min, as_tuple
        self.repeat, self.rows, self.update = 1, None, None

    def forward(self, hidden_states=None, *args, **kwargs):
        x = self.x_min if self.rows is None else self.x_min[self.rows]
        x = x.repeat(self.repeat, 1, 1)
        if self.update is not None:
            x = self.update(x)
        return (x,) if self.as_tuple else x


class _Skip(nn.Module):
    """Stands in for a block below the lowest spliced layer: its output is never used."""

    def __init__(self, original: nn.Module, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        for attr in ("attention_type", "layer_type", "is_sliding"):  # read by some models' mask logic
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states=None, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class _Checkpointed(nn.Module):
    """Recompute a block in the backward instead of storing its activations."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        for attr in ("attention_type", "layer_type", "is_sliding"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def _max_positions(model: nn.Module) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(model.config, key, None)
        if v:
            return int(v)
    return None


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
