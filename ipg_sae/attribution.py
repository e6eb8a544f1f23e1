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

Over a data set, :func:`attribute` (captum-style names: ``n_steps``, ``method``,
``internal_batch_size``, ``return_convergence_delta``):

* groups trajectories by prompt (first-seen order) and runs :meth:`IPGEngine.attribute_group`
  per prompt; the per-prompt attribution is ``IPG_i(x) = (1/G) sum_g (per-trajectory row)``,
  stored dense float32 ``[N, d_sae]`` per layer; per-trajectory rows are kept sparse (CSR);
* reports completeness per trajectory: ``delta_abs = sum_i IPG_i(tau) (+ error nodes) -
  A (log pi(tau; 1) - log pi(tau; 0))`` and ``delta = delta_abs / |A (...)|``. With
  ``importance="self_normalized"`` the integrand is reweighted, so ``delta`` then measures how far
  the correction moves the sum, not quadrature error;
* runs the baselines of :mod:`ipg_sae.baselines` through the same loop and result format;
* checkpoints its accumulators every ``checkpoint_every`` prompts (atomic safetensors); an
  identical call (same inputs, config, model and SAEs: a hash) resumes, and the result equals an
  uninterrupted run's bit for bit (each prompt's rows are computed independently and copied);
* under ``torchrun`` splits prompts ``r::N`` over ranks and merges shards on rank 0
  (:mod:`ipg_sae.distributed`).

Precision note: Llama/Qwen2 RMSNorm computes in float32 even in a float64 model, so their
completeness gap bottoms out near 1e-6 relative (1e-8 absolute); GPT-2 (LayerNorm in float64)
reaches 1e-12.
"""

from __future__ import annotations

import contextlib
import json
import dataclasses
import logging
import math
import time
import warnings
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


Baseline = Literal["ipg", "act", "reason_words", "grad_x_act", "ig_likelihood", "random"]
METHOD_NAMES: tuple[str, ...] = ("ipg", "act", "reason_words", "grad_x_act", "ig_likelihood", "random")
GRADIENT_METHODS: tuple[str, ...] = ("ipg", "grad_x_act", "ig_likelihood")  # per-prompt attributions, completeness
# ReasonScore's vocabulary (arXiv 2503.18878, extraction/reason_tokens.json), lower case; multi-word entries allowed.
REASON_WORDS: tuple[str, ...] = ("wait", "hmm", "so", "therefore", "let me", "alternatively", "however", "but",
                                 "check", "verify", "maybe", "perhaps", "actually", "thus", "instead")


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
    baseline: Baseline = "ipg"  # which method produces the scores: IPG itself or one of the baselines
    checkpoint_every: int = 8  # prompts between checkpoints (when a checkpoint path is given)
    seed: int = 0  # the `random` baseline's seed; recorded with every result
    reason_words: list[str] = field(default_factory=lambda: list(REASON_WORDS))  # `reason_words` baseline
    reason_window: list[int] = field(default_factory=lambda: [1, 2])  # tokens before / after a reasoning word
    reason_alpha: float = 0.7  # entropy exponent of ReasonScore

    def validate(self) -> None:
        if self.n_steps < 1:
            raise IPGError(f"attribution.n_steps is {self.n_steps}; it must be at least 1")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise IPGError("attribution.internal_batch_size must be positive or null")
        if self.baseline not in METHOD_NAMES:
            raise IPGError(f"unknown attribution baseline {self.baseline!r}; use one of {', '.join(METHOD_NAMES)}")
        if self.advantage not in ("rloo", "mean", "grpo", "none", "correct"):
            raise IPGError(f"unknown advantage {self.advantage!r}; use rloo, mean, grpo or none")
        if self.importance not in ("none", "self_normalized"):
            raise IPGError(f"unknown importance {self.importance!r}; use none or self_normalized")
        if self.scope not in ("all", "generated"):
            raise IPGError(f"attribution.scope is {self.scope!r}; use all or generated")
        quadrature(self.n_steps, self.method)  # rejects unknown methods and trapezoid with one step
        if self.checkpoint_every < 1:
            raise IPGError(f"attribution.checkpoint_every is {self.checkpoint_every}; it must be at least 1")
        if self.n_contexts < 1:
            raise IPGError("attribution.n_contexts must be at least 1")
        if self.importance_clip <= 0:
            raise IPGError("attribution.importance_clip must be positive")
        if len(self.reason_window) != 2 or min(self.reason_window) < 0:
            raise IPGError(f"attribution.reason_window is {self.reason_window}; give [before, after], two counts >= 0")
        if not self.reason_words and self.baseline == "reason_words":
            raise IPGError("attribution.reason_words is empty; list the reasoning words to score against")


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
    n_scope: int = 0  # positions in scope (gated), over the whole group


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
        result, clean = self.observe_group(group, adv)
        ids, attn, targets, score_mask = clean["ids"], clean["attn"], clean["targets"], clean["score_mask"]
        G = len(group)
        if torch.all(adv == 0):
            return result  # F is identically zero: every gradient is zero (result.skipped is set)
        result.skipped = False
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

    def observe_group(self, group: list[Trajectory], adv: torch.Tensor | None = None) -> tuple[GroupAttribution, dict]:
        """The clean pass only: a zero attribution (marked ``skipped``) and the clean record.

        The record holds the batch (``ids``, ``attn``, ``targets``, ``score_mask``, ``scope``) and
        each layer's active set (``idx``, ``val`` of shape ``[G, T, K]``, zero out of scope), which
        the activation baselines read.
        """
        ids, attn, targets, score_mask, prompt_lens = self._batch(group)
        scope = self._scope_mask(attn, prompt_lens)
        clean = self._clean_pass(ids, attn, targets, score_mask, scope)
        clean.update(ids=ids, attn=attn, targets=targets, score_mask=score_mask)
        G = len(group)
        adv = torch.zeros(G, dtype=torch.float64) if adv is None else adv
        result = GroupAttribution(
            per_traj={layer: torch.zeros(G, sae.cfg.d_sae, dtype=torch.float64) for layer, sae in self.saes.items()},
            error={layer: torch.zeros(G, dtype=torch.float64) for layer in self.layers},
            logp1=clean["logp"].double().cpu(), logp0=clean["logp"].double().cpu(), advantage=adv,
            n_tokens=int(attn.sum()), active=clean["active"], activation_sum=clean["act_mean"],
            contexts=clean["contexts"], n_scope=int(scope.sum()), skipped=True,
        )
        return result, clean

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


# =========================================================================================
# The driver: many prompts, baselines, results on disk, resume, shards
# =========================================================================================


class IPGWarning(UserWarning):
    """Something the user should know about a finished attribution (e.g. nothing to attribute)."""


RESULT_FILE = "attribution.safetensors"
SIDECAR_FILE = "attribution.json"
_FORMAT = "ipg-sae/attribution/1"


@dataclass
class AttributionResult:
    """Attributions of one method over a set of prompts, with everything selection needs.

    Tensors live in ``tensors`` under flat names (the safetensors file holds exactly these):

    * per prompt (``N`` rows, in ``prompt_ids`` order): ``L{l}.attribution [N, d_sae]`` float32
      (``IPG_i(x_n) = (1/G) sum_k w_k dF/dc_i``; for ``act`` the per-prompt mean activation; absent
      for ``reason_words`` and ``random``, which have no per-prompt decomposition),
      ``L{l}.active [N, d_sae]`` bool (active at some in-scope position), ``L{l}.activation
      [N, d_sae]`` float32 (mean activation over the prompt's in-scope positions),
      ``prompt.n_scope``, ``prompt.skipped`` (zero advantage: no node pass ran);
    * per trajectory (``M`` rows, in ``traj_ids`` order): ``traj.prompt`` (row of its prompt),
      ``traj.logp1``, ``traj.logp0`` (``log pi(tau)`` at ``c = 1`` and ``c = 0``),
      ``traj.advantage``, ``traj.n_generated``, ``L{l}.traj.sum`` (sum of its latent
      attributions at layer ``l``), ``L{l}.traj.error`` (its error-node attribution, zero
      without ``error_node``) and its attribution row as CSR (``L{l}.traj.indptr``,
      ``.indices``, ``.values``);
    * per latent: ``L{l}.score [d_sae]`` float64, the method's natural ranking score (the mean
      over prompts for gradient methods, mean activation for ``act``, ReasonScore, or the random
      draw), and the top activating contexts ``L{l}.ctx.value|traj|pos [d_sae, m]`` (value -1
      and index -1 where a latent has fewer than ``m`` activations);
    * per-token maps for the trajectories in ``meta["token_map_ids"]``: ``map.{i}.tokens [T]``,
      ``map.{i}.L{l}.latents [T, K]`` and ``map.{i}.L{l}.attribution [T, K]``.
    """

    method_name: str
    layers: list[int]
    d_sae: dict[int, int]
    prompt_ids: list[str]
    traj_ids: list[str]
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    # -- views ---------------------------------------------------------------------------

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_gradient_method(self) -> bool:
        return self.method_name in GRADIENT_METHODS

    @property
    def attributions(self) -> dict[int, torch.Tensor] | None:
        """Per-prompt values ``[N, d_sae]`` per layer, or None for methods without them."""
        if f"L{self.layers[0]}.attribution" not in self.tensors:
            return None
        return {layer: self.tensors[f"L{layer}.attribution"] for layer in self.layers}

    @property
    def score(self) -> dict[int, torch.Tensor]:
        return {layer: self.tensors[f"L{layer}.score"] for layer in self.layers}

    @property
    def active(self) -> dict[int, torch.Tensor]:
        return {layer: self.tensors[f"L{layer}.active"] for layer in self.layers}

    @property
    def activation(self) -> dict[int, torch.Tensor]:
        return {layer: self.tensors[f"L{layer}.activation"] for layer in self.layers}

    @property
    def contexts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return {layer: (self.tensors[f"L{layer}.ctx.value"], self.tensors[f"L{layer}.ctx.traj"],
                        self.tensors[f"L{layer}.ctx.pos"]) for layer in self.layers}

    @property
    def error(self) -> dict[int, torch.Tensor] | None:
        """Per-trajectory error-node attribution per layer (None unless ``error_node``)."""
        if not self.meta.get("config", {}).get("error_node"):
            return None
        return {layer: self.tensors[f"L{layer}.traj.error"] for layer in self.layers}

    @property
    def expected(self) -> torch.Tensor:
        """``A * (log pi(tau; 1) - log pi(tau; 0))`` per trajectory: what completeness says the sum is."""
        t = self.tensors
        return t["traj.advantage"] * (t["traj.logp1"] - t["traj.logp0"])

    @property
    def total(self) -> torch.Tensor:
        """Per trajectory, the sum of its attributions over all layers (plus the error nodes)."""
        total = sum(self.tensors[f"L{layer}.traj.sum"] for layer in self.layers)
        if self.error is not None:
            total = total + sum(self.error.values())
        return total

    @property
    def delta_abs(self) -> torch.Tensor:
        """Signed completeness gap per trajectory: ``total - expected`` (NaN for activation baselines)."""
        if not self.is_gradient_method:
            return torch.full((len(self.traj_ids),), float("nan"), dtype=torch.float64)
        return self.total - self.expected

    @property
    def delta(self) -> torch.Tensor:
        """Relative completeness gap per trajectory: ``(total - expected) / |expected|`` (0 where both are 0)."""
        gap, expected = self.delta_abs, self.expected.abs()
        rel = gap / expected
        return torch.where(expected == 0, torch.where(gap == 0, torch.zeros_like(gap), gap.sign() * math.inf), rel) \
            if self.is_gradient_method else gap

    def per_trajectory(self, layer: int) -> torch.Tensor:
        """Dense per-trajectory attributions ``[M, d_sae]`` (float32) of one layer."""
        t = self.tensors
        indptr = t[f"L{layer}.traj.indptr"]
        rows = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr.diff())
        out = torch.zeros(len(indptr) - 1, self.d_sae[layer], dtype=torch.float32)
        out[rows, t[f"L{layer}.traj.indices"]] = t[f"L{layer}.traj.values"]
        return out

    @property
    def token_maps(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for i, tid in enumerate(self.meta.get("token_map_ids", [])):
            prefix = f"map.{i}."
            out[tid] = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return out

    # -- files ---------------------------------------------------------------------------

    def save(self, run_dir: str | Path) -> Path:
        """Write ``attribution.safetensors`` and ``attribution.json`` into ``run_dir`` (atomically)."""
        from safetensors.torch import save_file

        from .io import atomic_path, write_json

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        with atomic_path(run_dir / RESULT_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "method": self.method_name})
        write_json(run_dir / SIDECAR_FILE, {
            "format": _FORMAT, "method": self.method_name, "layers": self.layers,
            "d_sae": {str(k): v for k, v in self.d_sae.items()}, **self.meta,
            "prompt_ids": self.prompt_ids, "trajectory_ids": self.traj_ids,
        })
        return run_dir / RESULT_FILE

    @classmethod
    def load(cls, run_dir: str | Path) -> "AttributionResult":
        from safetensors.torch import load_file

        from .io import read_json

        run_dir = Path(run_dir)
        if run_dir.name == RESULT_FILE:
            run_dir = run_dir.parent
        st, js = run_dir / RESULT_FILE, run_dir / SIDECAR_FILE
        if not st.is_file() or not js.is_file():
            raise IPGError(f"no attribution result in {run_dir} (needs {RESULT_FILE} and {SIDECAR_FILE}); "
                           "run `ipg-sae attribute` first or fix the path")
        meta = read_json(js)
        if meta.get("format") != _FORMAT:
            raise IPGError(f"{js} is not an ipg-sae attribution result (format {meta.get('format')!r})")
        tensors = load_file(str(st))
        meta = dict(meta)
        method = meta.pop("method")
        layers = [int(x) for x in meta.pop("layers")]
        d_sae = {int(k): int(v) for k, v in meta.pop("d_sae").items()}
        prompt_ids, traj_ids = meta.pop("prompt_ids"), meta.pop("trajectory_ids")
        meta.pop("format", None)
        return cls(method, layers, d_sae, prompt_ids, traj_ids, tensors, meta)


# ---- per-process accumulation (checkpoints and shards share one format) ------------------


class _Accumulator:
    """The rows one process has computed, in processing order, plus global accumulators.

    Saved whole as a checkpoint (resume) or a shard (``torchrun``); rows are copied bit for bit,
    so a resumed or merged result equals an uninterrupted one.
    """

    def __init__(self, layers: list[int], d_sae: dict[int, int], n_contexts: int, n_words: int):
        self.layers, self.d_sae, self.m, self.n_words = layers, d_sae, n_contexts, n_words
        self.prompts: list[int] = []
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.trajs: list[int] = []
        self.trows: dict[str, list[torch.Tensor]] = {}
        self.contexts = {layer: _empty_contexts(d_sae[layer], n_contexts) for layer in layers}
        self.reason: dict[str, torch.Tensor] = {}
        self.maps: dict[str, dict[str, torch.Tensor]] = {}
        self.seconds = 0.0
        self.tokens = 0

    @property
    def done(self) -> set[int]:
        return set(self.prompts)

    def add(self, prompt_index: int, traj_index: list[int], group: list[Trajectory], ga: GroupAttribution,
            gradient: bool, keep_attribution: bool) -> None:
        G = len(group)
        self.prompts.append(prompt_index)
        row = {"prompt.n_scope": torch.tensor(ga.n_scope), "prompt.skipped": torch.tensor(bool(ga.skipped))}
        for layer in self.layers:
            if gradient:
                row[f"L{layer}.attribution"] = (ga.per_traj[layer].sum(0) / G).float()
            elif keep_attribution:  # `act`: the per-prompt value is the mean activation
                row[f"L{layer}.attribution"] = ga.activation_sum[layer].float()
            row[f"L{layer}.active"] = ga.active[layer].bool()
            row[f"L{layer}.activation"] = ga.activation_sum[layer].float()
            value, r, pos = ga.contexts[layer]
            glob = torch.tensor(traj_index, dtype=torch.long)
            empty = value < 0
            t = torch.where(empty, torch.full_like(r, -1), glob[r.clamp(0, G - 1)])
            p = torch.where(empty, torch.full_like(pos, -1), pos)
            self.contexts[layer] = _merge_contexts(self.contexts[layer], (value.float(), t, p), self.m)
        for k, v in row.items():
            self.rows.setdefault(k, []).append(v)
        for g, traj in enumerate(group):
            self.trajs.append(traj_index[g])
            trow = {"traj.logp1": ga.logp1[g], "traj.logp0": ga.logp0[g], "traj.advantage": ga.advantage[g],
                    "traj.n_generated": torch.tensor(len(traj.completion_ids)),
                    "traj.n_tokens": torch.tensor(traj.n_tokens)}
            for layer in self.layers:
                a = ga.per_traj[layer][g]
                nz = a.nonzero().squeeze(1)
                trow[f"L{layer}.traj.sum"] = a.sum()
                trow[f"L{layer}.traj.error"] = ga.error[layer][g]
                trow[f"L{layer}.traj.nz"] = (nz, a[nz].float())
            for k, v in trow.items():
                self.trows.setdefault(k, []).append(v)
        for tid, m in ga.token_maps.items():
            n = len(m["tokens"])
            self.maps[tid] = {"tokens": torch.tensor(m["tokens"], dtype=torch.long),
                              **{k: v[:n].contiguous() if k.endswith("latents") else v[:n].float().contiguous()
                                 for k, v in m.items() if k != "tokens"}}

    # -- to and from tensors -------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        t: dict[str, torch.Tensor] = {"prompts": torch.tensor(self.prompts, dtype=torch.long),
                                      "trajs": torch.tensor(self.trajs, dtype=torch.long)}
        for k, v in self.rows.items():
            t[k] = torch.stack(v)
        for k, v in self.trows.items():
            if k.endswith(".nz"):
                base = k[:-3]
                t[base + ".indptr"] = torch.tensor([0] + np.cumsum([len(i) for i, _ in v]).tolist(), dtype=torch.long)
                t[base + ".indices"] = torch.cat([i for i, _ in v]) if v else torch.zeros(0, dtype=torch.long)
                t[base + ".values"] = torch.cat([x for _, x in v]) if v else torch.zeros(0)
            else:
                t[k] = torch.stack(v)
        for layer in self.layers:
            for name, x in zip(("value", "traj", "pos"), self.contexts[layer]):
                t[f"L{layer}.ctx.{name}"] = x
        t.update(self.reason)
        map_ids = sorted(self.maps)
        for i, tid in enumerate(map_ids):
            for k, v in self.maps[tid].items():
                t[f"map.{i}.{k}"] = v
        meta = {"token_map_ids": map_ids, "seconds": self.seconds, "tokens": self.tokens}
        return t, meta

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor], meta: dict, layers, d_sae, n_contexts, n_words) -> "_Accumulator":
        acc = cls(layers, d_sae, n_contexts, n_words)
        acc.prompts = t["prompts"].tolist()
        acc.trajs = t["trajs"].tolist()
        acc.seconds, acc.tokens = meta.get("seconds", 0.0), meta.get("tokens", 0)
        for k, v in t.items():
            if k.startswith("prompt.") or (k.startswith("L") and k.split(".", 1)[1] in
                                           ("attribution", "active", "activation")):
                acc.rows[k] = list(v.unbind(0))
            elif k.startswith("traj.") or k.endswith((".traj.sum", ".traj.error")):
                acc.trows[k] = list(v.unbind(0))
            elif k.endswith(".traj.indptr"):
                base = k[:-len(".indptr")]
                idx, val = t[base + ".indices"], t[base + ".values"]
                acc.trows[base + ".nz"] = [(idx[a:b], val[a:b]) for a, b in zip(v[:-1].tolist(), v[1:].tolist())]
            elif ".rw." in k:
                acc.reason[k] = v
        for layer in layers:
            acc.contexts[layer] = tuple(t[f"L{layer}.ctx.{name}"] for name in ("value", "traj", "pos"))
        for i, tid in enumerate(meta.get("token_map_ids", [])):
            prefix = f"map.{i}."
            acc.maps[tid] = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
        return acc

    def save(self, path: Path, signature: str) -> None:
        from safetensors.torch import save_file

        from .io import atomic_path

        t, meta = self.state()
        meta["signature"] = signature
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in t.items()}, str(tmp), metadata={"state": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, signature: str | None, layers, d_sae, n_contexts, n_words) -> "_Accumulator | None":
        """The accumulator saved at ``path``, or None when it belongs to a different call."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("state", "{}"))
            if signature is not None and meta.get("signature") != signature:
                return None
            return cls.from_state(load_file(str(path)), meta, layers, d_sae, n_contexts, n_words)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable checkpoint %s (%s)", path, e)
            return None


def _empty_contexts(d_sae: int, m: int):
    return (torch.full((d_sae, m), -1.0), torch.full((d_sae, m), -1, dtype=torch.long),
            torch.full((d_sae, m), -1, dtype=torch.long))


def _merge_contexts(a, b, m: int):
    """Top ``m`` of the union, ordered by (value desc, trajectory asc, position asc): order-independent."""
    v, t, p = (torch.cat([x, y], dim=1) for x, y in zip(a, b))
    for key in (p, t):
        order = key.argsort(dim=1, stable=True)
        v, t, p = v.gather(1, order), t.gather(1, order), p.gather(1, order)
    order = (-v).argsort(dim=1, stable=True)
    v, t, p = v.gather(1, order), t.gather(1, order), p.gather(1, order)
    return v[:, :m].contiguous(), t[:, :m].contiguous(), p[:, :m].contiguous()


def _assemble(parts: list[_Accumulator], n_prompts: int, n_trajs: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge processes' accumulators into global prompt / trajectory order."""
    states = [p.state() for p in parts]
    prompts = torch.cat([s["prompts"] for s, _ in states])
    trajs = torch.cat([s["trajs"] for s, _ in states])
    if sorted(prompts.tolist()) != list(range(n_prompts)) or sorted(trajs.tolist()) != list(range(n_trajs)):
        raise IPGError("the shards do not cover every prompt exactly once; delete the run's shards/ and rerun")
    p_order, t_order = prompts.argsort(), trajs.argsort()
    first = parts[0]
    out: dict[str, torch.Tensor] = {}
    for k in states[0][0]:
        if k in ("prompts", "trajs") or k.startswith("map.") or ".ctx." in k or ".rw." in k:
            continue
        if k.endswith((".indptr", ".indices", ".values")):
            continue
        cat = torch.cat([s[k] for s, _ in states if k in s])  # a rank with no prompts has no rows
        if k.startswith("prompt.") or k.split(".", 1)[1] in ("attribution", "active", "activation"):
            out[k] = cat[p_order].contiguous()
        else:
            out[k] = cat[t_order].contiguous()
    for layer in first.layers:
        nz = [x for p in parts for x in p.trows.get(f"L{layer}.traj.nz", [])]
        nz = [nz[i] for i in t_order.tolist()]
        out[f"L{layer}.traj.indptr"] = torch.tensor([0] + np.cumsum([len(i) for i, _ in nz]).tolist(), dtype=torch.long)
        out[f"L{layer}.traj.indices"] = torch.cat([i for i, _ in nz]) if nz else torch.zeros(0, dtype=torch.long)
        out[f"L{layer}.traj.values"] = torch.cat([v for _, v in nz]) if nz else torch.zeros(0)
        ctx = first.contexts[layer]
        for p in parts[1:]:
            ctx = _merge_contexts(ctx, p.contexts[layer], first.m)
        for name, x in zip(("value", "traj", "pos"), ctx):
            out[f"L{layer}.ctx.{name}"] = x
    for k in first.reason:  # global sums, added in rank order
        out[k] = sum((p.reason[k] for p in parts[1:]), first.reason[k].clone())
    maps = {tid: m for p in parts for tid, m in p.maps.items()}
    map_ids = sorted(maps)
    for i, tid in enumerate(map_ids):
        for k, v in maps[tid].items():
            out[f"map.{i}.{k}"] = v
    meta = {"token_map_ids": map_ids, "seconds": max(p.seconds for p in parts), "tokens": sum(p.tokens for p in parts)}
    return out, meta


# ---- attribute() --------------------------------------------------------------------------


def attribute(
    model: nn.Module,
    saes,
    trajectories: list[Trajectory],
    n_steps: int = 8,
    method: Method = "gausslegendre",
    advantage: Advantage = "rloo",
    importance: Literal["none", "self_normalized"] = "none",
    scope: Literal["all", "generated"] = "all",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    error_node: bool = False,
    gradient_checkpointing: bool = False,
    token_maps=(),
    baseline: str | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 8,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    seed: int = 0,
    *,
    tokenizer=None,
    fingerprint: dict | None = None,
    out_dir: str | Path | None = None,
    exclude_first: bool = True,
    importance_clip: float = 10.0,
    n_contexts: int = 3,
    reason_words=None,
    reason_window=(1, 2),
    reason_alpha: float = 0.7,
    sae_sources: dict | None = None,
):
    """Attribute ``trajectories`` (``G`` per prompt) to the latents of ``saes`` ({layer: SAE}).

    ``baseline`` picks the method: ``None``/``"ipg"`` (IPG, this module's docstring), or one of
    the baselines of :mod:`ipg_sae.baselines` (``act``, ``reason_words``, ``grad_x_act``,
    ``ig_likelihood``, ``random``); every method returns the same :class:`AttributionResult`.
    ``tokenizer`` (or ``fingerprint``) lets the call refuse trajectories sampled by another
    model; ``reason_words`` needs the tokenizer. ``out_dir`` saves the result there
    (``attribution.safetensors`` + ``attribution.json``); under ``torchrun`` it is required and
    also holds the ranks' shards. With ``checkpoint_path``, the accumulators are saved every
    ``checkpoint_every`` prompts and an identical call resumes from them. ``callback(stats)`` is
    called after each prompt. Returns the result, or ``(result, result.delta)`` with
    ``return_convergence_delta`` (captum's convention; ``delta`` is the relative gap).
    """
    cfg = AttributionConfig(
        n_steps=n_steps, method=method, advantage=advantage, importance=importance, scope=scope,
        exclude_first=exclude_first, internal_batch_size=internal_batch_size, error_node=error_node,
        gradient_checkpointing=gradient_checkpointing, importance_clip=importance_clip,
        token_maps=list(token_maps or []), n_contexts=n_contexts, baseline=baseline or "ipg",
        checkpoint_every=checkpoint_every, seed=seed,
        reason_words=list(REASON_WORDS if reason_words is None else reason_words),
        reason_window=list(reason_window), reason_alpha=reason_alpha,
    )
    cfg.validate()
    return _run(model, saes, trajectories, cfg, return_convergence_delta=return_convergence_delta,
                checkpoint_path=checkpoint_path, progress=progress, callback=callback, tokenizer=tokenizer,
                fingerprint=fingerprint, out_dir=out_dir, sae_sources=sae_sources)


def attribute_from_config(model, saes, trajectories, cfg: AttributionConfig, **runtime):
    """:func:`attribute` with the settings of a config (``runtime``: tokenizer, out_dir, checkpoint_path, ...)."""
    return attribute(model, saes, trajectories, **dataclasses.asdict(cfg), **runtime)


def _run(model, saes, trajectories, cfg: AttributionConfig, *, return_convergence_delta, checkpoint_path, progress,
         callback, tokenizer, fingerprint, out_dir, sae_sources):
    from . import baselines, distributed

    method_name = cfg.baseline
    gradient = method_name in GRADIENT_METHODS
    # -- inputs -------------------------------------------------------------------------
    if not trajectories:
        raise IPGError("no trajectories to attribute; sample some first (`ipg-sae sample`) or fix the path")
    check_rewards(trajectories)
    ids_seen: set[str] = set()
    for t in trajectories:
        if t.id in ids_seen:
            raise IPGError(f"trajectory id {t.id!r} appears twice; trajectory ids must be unique")
        ids_seen.add(t.id)
        if not t.prompt_ids:
            raise IPGError(f"trajectory {t.id} has no prompt tokens; every trajectory needs its prompt_ids")
    if fingerprint is None and tokenizer is not None:
        fingerprint = model_fingerprint(model, tokenizer)
    if fingerprint is not None:
        check_same_model(trajectories, fingerprint)
    elif any(t.model for t in trajectories):
        raise IPGError("the trajectories record the model that sampled them but no tokenizer was given; "
                       "pass tokenizer= (or fingerprint=) so attribute can check they match this model")
    if method_name == "reason_words" and tokenizer is None:
        raise IPGError("the reason_words baseline finds reasoning words in the text: pass tokenizer=")
    unknown_maps = set(cfg.token_maps) - ids_seen
    if unknown_maps:
        raise IPGError(f"token_maps asks for trajectory {sorted(unknown_maps)[0]!r}, which is not among the trajectories")

    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    engine = IPGEngine(model, saes, cfg, pad_id=pad_id or 0)
    layers = engine.layers
    d_sae = {layer: int(engine.saes[layer].cfg.d_sae) for layer in layers}
    groups = group_by_prompt(trajectories)
    prompt_ids = list(groups)
    ordered = [t for g in groups.values() for t in g]
    traj_ids = [t.id for t in ordered]
    traj_index = {t.id: i for i, t in enumerate(ordered)}
    row_of_prompt = {pid: i for i, pid in enumerate(prompt_ids)}
    traj_prompt = [row_of_prompt[t.prompt_id] for t in ordered]

    rank, world = distributed.init_distributed()
    if world > 1 and out_dir is None:
        raise IPGError(f"attribution across {world} processes needs out_dir (a directory all ranks can write) for the shards")
    mine = list(range(rank, len(prompt_ids), world))
    n_words = len(cfg.reason_words)
    signature = _signature(cfg, engine, ordered, rank, world)

    # -- resume ---------------------------------------------------------------------------
    ckpt = None
    if checkpoint_path is not None:
        ckpt = Path(checkpoint_path)
        if world > 1:
            ckpt = ckpt.with_name(f"{ckpt.stem}.rank{rank}of{world}{ckpt.suffix}")
    acc = None
    if ckpt is not None and ckpt.is_file():
        acc = _Accumulator.load(ckpt, signature, layers, d_sae, cfg.n_contexts, n_words)
        if acc is None:
            log.warning("checkpoint %s belongs to a different attribution call; starting from scratch", ckpt)
        elif not acc.done <= set(mine):
            log.warning("checkpoint %s holds other prompts than this call's; starting from scratch", ckpt)
            acc = None
        else:
            log.info("resuming from %s: %d of %d prompts done", ckpt, len(acc.prompts), len(mine))
    if acc is None:
        acc = _Accumulator(layers, d_sae, cfg.n_contexts, n_words)
    reason = baselines.ReasonWords(tokenizer, cfg, layers, d_sae, acc.reason) if method_name == "reason_words" else None

    # -- the loop -------------------------------------------------------------------------
    nodes, weights, adv_kind = baselines.plan(cfg)
    keep_maps = set(cfg.token_maps)
    todo = [i for i in mine if i not in acc.done]
    bar = _progress_bar(len(mine), len(mine) - len(todo), progress and distributed.is_main(), method_name)
    try:
        for n_done, pi in enumerate(todo, len(mine) - len(todo) + 1):
            group = groups[prompt_ids[pi]]
            start = time.perf_counter()
            if gradient:
                ga = engine.attribute_group(group, nodes, weights, advantage=adv_kind, keep_maps=keep_maps)
            else:
                ga, clean = engine.observe_group(group)
                if reason is not None:
                    reason.add(clean, group)
            acc.add(pi, [traj_index[t.id] for t in group], group, ga, gradient, keep_attribution=method_name == "act")
            seconds = time.perf_counter() - start
            acc.seconds += seconds
            acc.tokens += ga.n_tokens
            checkpointed = False
            if ckpt is not None and (n_done % cfg.checkpoint_every == 0 or n_done == len(mine)):
                acc.save(ckpt, signature)
                checkpointed = True
            stats = _group_stats(method_name, prompt_ids[pi], pi, n_done, len(mine), ga, seconds, checkpointed)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{stats['tokens_per_s']:.0f}", delta=f"{stats['delta']:.1e}")
            if callback is not None:
                callback(stats)
    finally:
        if bar is not None:
            bar.close()

    # -- merge, finish, save ---------------------------------------------------------------
    if world > 1:
        shard = Path(out_dir) / "shards" / f"rank{rank}of{world}.safetensors"
        acc.save(shard, signature)
        distributed.barrier()
        if distributed.is_main():
            parts = [_Accumulator.load(Path(out_dir) / "shards" / f"rank{r}of{world}.safetensors", None, layers, d_sae,
                                       cfg.n_contexts, n_words) for r in range(world)]
            if any(p is None for p in parts):
                raise IPGError(f"a shard under {Path(out_dir) / 'shards'} is missing or unreadable; rerun the attribution")
            result = _finish(parts, cfg, engine, prompt_ids, traj_ids, traj_prompt, fingerprint, sae_sources, world)
            result.save(out_dir)
        distributed.barrier()
        if not distributed.is_main():
            result = AttributionResult.load(out_dir)
    else:
        result = _finish([acc], cfg, engine, prompt_ids, traj_ids, traj_prompt, fingerprint, sae_sources, world)
        if out_dir is not None:
            result.save(out_dir)
    if return_convergence_delta:
        return result, result.delta
    return result


def _finish(parts, cfg, engine, prompt_ids, traj_ids, traj_prompt, fingerprint, sae_sources, world) -> AttributionResult:
    from . import baselines

    tensors, run_meta = _assemble(parts, len(prompt_ids), len(traj_ids))
    layers = engine.layers
    d_sae = {layer: int(engine.saes[layer].cfg.d_sae) for layer in layers}
    method_name = cfg.baseline
    for layer, score in baselines.final_scores(method_name, tensors, layers, cfg).items():
        tensors[f"L{layer}.score"] = score
    meta = {
        "config": dataclasses.asdict(cfg),
        "model": fingerprint or {"name": getattr(engine.model.config, "_name_or_path", "")},
        "saes": [_sae_info(layer, engine.saes[layer], (sae_sources or {}).get(layer)) for layer in layers],
        "git_commit": _git_commit(),
        "seed": cfg.seed,
        "world_size": world,
        "token_map_ids": run_meta["token_map_ids"],
    }
    result = AttributionResult(method_name, layers, d_sae, list(prompt_ids), list(traj_ids), tensors, meta)
    result.meta["summary"] = _summary(result, run_meta)
    if result.is_gradient_method and bool(tensors["prompt.skipped"].all()):
        msg = ("nothing to attribute: every prompt's advantages are zero (all rewards equal within each group"
               + (", or no correct trajectory" if cfg.advantage == "correct" or method_name != "ipg" else "")
               + "); the attributions are all zero. Sample more trajectories per prompt or use a reward that varies")
        log.warning(msg)
        warnings.warn(msg, IPGWarning, stacklevel=4)
    return result


def _summary(result: AttributionResult, run_meta: dict) -> dict:
    t = result.tensors
    out = {"method": result.method_name, "n_prompts": result.n_prompts, "n_trajectories": len(result.traj_ids),
           "tokens": int(run_meta["tokens"]),
           "seconds": round(float(run_meta["seconds"]), 3),
           "tokens_per_s": round(run_meta["tokens"] / run_meta["seconds"], 1) if run_meta["seconds"] else None}
    if result.is_gradient_method:
        out["n_skipped_prompts"] = int(t["prompt.skipped"].sum())  # zero advantage: no node pass
        live = (t["traj.advantage"] != 0)
        rel = result.delta.abs()[live]
        out["delta_max"] = float(rel.max()) if rel.numel() else 0.0
        out["delta_median"] = float(rel.median()) if rel.numel() else 0.0
        out["delta_abs_max"] = float(result.delta_abs.abs().max()) if len(result.traj_ids) else 0.0
    for layer in result.layers:
        out[f"L{layer}.active_latents"] = int(t[f"L{layer}.active"].any(0).sum())
    return out


def _group_stats(method_name, prompt_id, prompt_index, done, total, ga: GroupAttribution, seconds, checkpointed) -> dict:
    G = len(ga.logp1)
    per_traj_total = sum(ga.per_traj[layer].sum(1) for layer in ga.per_traj) + sum(ga.error.values())
    expected = ga.advantage * (ga.logp1 - ga.logp0)
    live = ga.advantage != 0
    gap = (per_traj_total - expected).abs()
    rel = (gap[live] / expected[live].abs().clamp(min=1e-300)) if live.any() else torch.zeros(0)
    active_abs, n_active = 0.0, 0
    for layer, a in ga.per_traj.items():
        mask = ga.active[layer]
        active_abs += float((a.sum(0) / G).abs()[mask].sum())
        n_active += int(mask.sum())
    return {
        "method": method_name, "prompt_id": prompt_id, "prompt_index": prompt_index, "done": done, "total": total,
        "n_trajectories": G, "n_tokens": ga.n_tokens, "seconds": seconds,
        "tokens_per_s": ga.n_tokens / seconds if seconds > 0 else 0.0,
        "delta": float(rel.max()) if rel.numel() else 0.0, "delta_abs": float(gap.max()) if G else 0.0,
        "mean_abs_attribution": active_abs / max(1, n_active), "skipped": bool(ga.skipped),
        "checkpointed": checkpointed,
    }


def _progress_bar(total: int, initial: int, enabled: bool, method_name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"attribute ({method_name})", unit="prompt", dynamic_ncols=True)


def _signature(cfg: AttributionConfig, engine: IPGEngine, ordered: list[Trajectory], rank: int, world: int) -> str:
    """A hash of everything that determines the result: a checkpoint resumes only the same call."""
    import hashlib

    h = hashlib.sha256()
    conf = dataclasses.asdict(cfg)
    conf.pop("checkpoint_every")
    h.update(json.dumps(conf, sort_keys=True).encode())
    h.update(json.dumps([rank, world, engine.model.config.to_json_string(use_diff=False)]).encode())
    h.update(str([float(p.double().sum()) for p in list(engine.model.parameters())[:4]]).encode())
    for layer in engine.layers:
        w = engine.w_dec[layer].double()
        h.update(json.dumps([layer, list(w.shape), float(w.sum()), float(w.abs().sum())]).encode())
    for t in ordered:
        h.update(json.dumps([t.id, t.prompt_id, t.sample_index, float(t.reward), t.prompt_ids, t.completion_ids]).encode())
    return h.hexdigest()


def _sae_info(layer: int, sae, source) -> dict:
    meta = getattr(sae.cfg, "metadata", None)
    info = {"layer": layer, "architecture": sae.cfg.architecture(), "d_in": int(sae.cfg.d_in),
            "d_sae": int(sae.cfg.d_sae), "hook_name": getattr(meta, "hook_name", None),
            "model_name": getattr(meta, "model_name", None)}
    source = source or getattr(sae, "ipg_source", None)
    if source is not None:
        info["source"] = source if isinstance(source, (str, dict)) else str(source)
    return info


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
