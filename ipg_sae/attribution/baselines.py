r"""Baselines IPG is judged against, run through the same interface and output format.

Every method is selected with ``attribute(..., baseline=NAME)`` (config field
``attribution.baseline``; ``docs/ipg-method.md`` §6) and returns an
:class:`~ipg_sae.attribution.AttributionResult` whose
``method_name`` says which method produced it and whose ``L{l}.score`` is the method's natural
ranking score (what :func:`ipg_sae.selection.select` ranks by default).

Gradient baselines (the IPG engine with other nodes and weights; completeness is reported too):

* ``grad_x_act``: attribution patching of the likelihood. One node at ``alpha = 1`` with weight
  1, advantage 1 on correct trajectories (``reward > 0``) and 0 otherwise:
  ``sum_t f_{t,i} * d log pi(tau) / d f_{t,i}`` summed over correct trajectories, divided by
  ``G``. No path, no policy gradient.
* ``ipg_local``: IPG's own objective (policy gradient, the config's advantages) with one node at
  ``alpha = 1`` and weight 1: the gradient at the model as it is times each latent's distance to
  the path origin, ``(f - b) dF/dc`` (attribution patching). What integrating the path adds is
  measured against it.
* ``ig_likelihood``: integrated gradients of ``log pi(correct trajectory)`` along the same
  gate path, with ``n_steps`` Gauss-Legendre nodes (or the adaptive rules when ``delta_tol`` is
  set) and the same 0/1 weights. No policy gradient.

Activation baselines (one clean pass per prompt, no gradients; correlational by construction):

* ``act``: mean activation of each latent over the trajectories' in-scope tokens
  (token-weighted over the whole data set). Per-prompt rows hold each prompt's mean activation.
* ``reason_words``: ReasonScore (arXiv 2503.18878, AIRI's ``compute_score.py``). Windows of
  ``(before, after) = (1, 2)`` tokens around each occurrence of a reasoning word ("wait", "so",
  "therefore", "let me", ...) are found in the decoded text (case-insensitive, whole words). From
  global accumulators over all in-scope positions: ``mu+_i`` the mean activation inside windows,
  ``mu-_i`` elsewhere, ``m_{w,i}`` the mean activation in the windows of word ``w``;
  ``H_i = -sum_w p_{w,i} log p_{w,i} / log W`` with ``p_{w,i} = m_{w,i} / sum_w m_{w,i}`` over
  the ``W`` words that occur in the data (``H = 0`` when ``W < 2``);
  ``score_i = mu+_i / sum_j mu+_j * H_i ** alpha - mu-_i / sum_j mu-_j`` with ``alpha = 0.7``.
  No per-prompt rows exist; selection ranks by the score.
* ``random``: uniform random scores in [0, 1) for the latents active anywhere on the data (0 for
  the others), drawn from ``torch.Generator().manual_seed(seed)`` layer by layer in layer order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import IPGError
from .config import GRADIENT_METHODS, AttributionConfig
from .engine import CleanPass
from .path import quadrature
from .result import AttributionResult, reason_key


@dataclass
class Plan:
    """How a gradient method integrates: fixed ``nodes``/``weights``, or ``adaptive``; and its advantage."""

    nodes: np.ndarray | None = None
    weights: np.ndarray | None = None
    adaptive: bool = False
    advantage: str | None = None


def plan(cfg: AttributionConfig) -> Plan:
    """The quadrature and advantage kind of a gradient method (an empty plan for the others)."""
    name = cfg.baseline
    if name == "grad_x_act":
        return Plan(np.array([1.0]), np.array([1.0]), advantage="correct")
    if name == "ipg_local":
        return Plan(np.array([1.0]), np.array([1.0]), advantage=cfg.advantage)
    if name not in ("ipg", "ig_likelihood"):
        return Plan()
    advantage = cfg.advantage if name == "ipg" else "correct"
    if cfg.delta_tol is not None:
        return Plan(adaptive=True, advantage=advantage)
    nodes, weights = quadrature(cfg.n_steps, cfg.method if name == "ipg" else "gausslegendre")
    return Plan(nodes, weights, advantage=advantage)


def final_scores(result: AttributionResult, cfg: AttributionConfig) -> dict[int, torch.Tensor]:
    """Each method's natural per-latent score ``[d_sae]`` (float64), from a merged result without scores."""
    out = {}
    method_name = result.method_name
    gen = torch.Generator().manual_seed(int(cfg.seed))
    n_scope = result.prompt("n_scope").double()
    for layer in result.layers:
        if method_name in GRADIENT_METHODS:
            out[layer] = result.layer(layer, "attribution").double().mean(0)
        elif method_name == "act":
            act = result.layer(layer, "activation").double()
            out[layer] = (act * n_scope[:, None]).sum(0) / n_scope.sum().clamp(min=1)
        elif method_name == "random":
            active = result.layer(layer, "active").any(0)
            draw = torch.rand(active.numel(), generator=gen, dtype=torch.float64)
            out[layer] = torch.where(active, draw, torch.zeros_like(draw))
        elif method_name == "reason_words":
            out[layer] = reason_score(result.reason_sums(layer), cfg.reason_alpha)
        else:
            raise IPGError(f"unknown method {method_name!r}")
    return out


def reason_score(acc: dict[str, torch.Tensor], alpha: float = 0.7) -> torch.Tensor:
    """ReasonScore from the global accumulators of one layer (see the module docstring)."""
    mu_pos = acc["pos_sum"] / acc["pos_n"].clamp(min=1)
    mu_neg = acc["neg_sum"] / acc["neg_n"].clamp(min=1)
    occurs = acc["word_n"] > 0
    words = int(occurs.sum())
    if words >= 2:
        m = acc["word_sum"][occurs] / acc["word_n"][occurs][:, None]  # [W, d]
        m = m.clamp(min=0)
        p = m / m.sum(0, keepdim=True).clamp(min=1e-300)
        plogp = torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p))
        entropy = -plogp.sum(0) / math.log(words)
    else:
        entropy = torch.zeros_like(mu_pos)
    pos = mu_pos / mu_pos.sum().clamp(min=1e-300)
    neg = mu_neg / mu_neg.sum().clamp(min=1e-300)
    return pos * entropy.clamp(min=0) ** alpha - neg


class ReasonWords:
    """Accumulates ReasonScore's activation sums group by group (into ``store``, float64)."""

    def __init__(self, tokenizer, cfg: AttributionConfig, layers: list[int], d_sae: dict[int, int],
                 store: dict[str, torch.Tensor]):
        self.tokenizer = tokenizer
        self.words = [w.strip().lower() for w in cfg.reason_words]
        self.before, self.after = int(cfg.reason_window[0]), int(cfg.reason_window[1])
        self.layers = layers
        self.store = store
        self._pieces: dict[int, str] = {}
        self.patterns = [re.compile(r"(?<![A-Za-z])" + r"\s+".join(map(re.escape, w.split())) + r"(?![A-Za-z])",
                                    re.IGNORECASE) for w in self.words]
        W = len(self.words)
        for layer in layers:
            d = d_sae[layer]
            for name, shape in (("pos_sum", (d,)), ("neg_sum", (d,)), ("word_sum", (W, d)),
                                ("pos_n", ()), ("neg_n", ()), ("word_n", (W,))):
                store.setdefault(reason_key(layer, name), torch.zeros(shape, dtype=torch.float64))

    def piece(self, token_id: int) -> str:
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tokenizer.decode([token_id])
        return self._pieces[token_id]

    def windows(self, token_ids: list[int]) -> torch.Tensor:
        """``[W, T]`` bool: positions within the window of an occurrence of each word."""
        pieces = [self.piece(int(i)) for i in token_ids]
        owner = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])  # token of each character
        text = "".join(pieces)
        out = torch.zeros(len(self.words), len(pieces), dtype=torch.bool)
        for w, pattern in enumerate(self.patterns):
            for m in pattern.finditer(text):
                first, last = int(owner[m.start()]), int(owner[m.end() - 1])
                out[w, max(0, first - self.before):last + self.after + 1] = True
        return out

    @torch.no_grad()
    def add(self, clean: CleanPass, group) -> None:
        b = clean.batch
        ids, attn, scope = b.ids.cpu(), b.attn.cpu(), b.scope.cpu()
        G, T = ids.shape
        words = torch.zeros(len(self.words), G, T, dtype=torch.bool)
        for g in range(G):
            n = int(attn[g].sum())
            words[:, g, :n] = self.windows(ids[g, :n].tolist())
        words &= scope[None]
        pos = words.any(0)
        neg = scope & ~pos
        for layer in self.layers:
            idx, val = clean.idx[layer].cpu(), clean.val[layer].cpu().double()
            s = {name: self.store[reason_key(layer, name)] for name in ("pos_sum", "neg_sum", "word_sum", "pos_n",
                                                                       "neg_n", "word_n")}
            d = s["pos_sum"].numel()
            s["pos_sum"] += _masked_sum(idx, val, pos, d)
            s["neg_sum"] += _masked_sum(idx, val, neg, d)
            s["pos_n"] += float(pos.sum())
            s["neg_n"] += float(neg.sum())
            for w in range(len(self.words)):
                if words[w].any():
                    s["word_sum"][w] += _masked_sum(idx, val, words[w], d)
                    s["word_n"][w] += float(words[w].sum())


def _masked_sum(idx: torch.Tensor, val: torch.Tensor, mask: torch.Tensor, d: int) -> torch.Tensor:
    """Per-latent sum of activations over the positions in ``mask`` (active sets ``[G, T, K]``)."""
    return torch.zeros(d, dtype=torch.float64).index_add_(0, idx[mask].reshape(-1), val[mask].reshape(-1))
