"""Output side: VocabProj through the final norm, TokenChange through the model, and the output score against
frequency-matched latents (see :mod:`ipg_sae.explanations`)."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..decode import head_into
from .corpus import Activations, Corpus
from .results import ExplainConfig, OutputExplanation, TokenEffect


def final_norm(model):
    """The final norm module before the LM head (None where there is none)."""
    base = model.base_model
    return getattr(base, "norm", None) or getattr(base, "ln_f", None) or getattr(base, "final_layernorm", None)


def norm_linear(model, rows: torch.Tensor) -> torch.Tensor:
    """``norm_lin(d)`` of the module docstring for each row: centred for LayerNorm, scaled by the norm's weight
    (``1 + w`` for Gemma's)."""
    norm = final_norm(model)
    if norm is None:
        return rows
    if isinstance(norm, torch.nn.LayerNorm):
        rows = rows - rows.mean(dim=-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return rows
    scale = (1.0 + weight) if "gemma" in type(norm).__name__.lower() else weight
    return rows * scale.to(rows)


@torch.no_grad()
def vocab_proj(model, sae, latents: list[int], pieces, n: int, chunk: int = 256) -> list[OutputExplanation]:
    """Each latent's top ``n`` promoted and suppressed tokens of ``W_U norm_lin(W_dec[i])``."""
    from ..saes import decoder_matrix

    unembed = model.get_output_embeddings().weight
    out = []
    for lo in range(0, len(latents), chunk):
        rows = norm_linear(model, decoder_matrix(sae)[latents[lo:lo + chunk]].to(unembed.dtype))
        effect = (rows @ unembed.T).float().cpu()
        for row in effect:
            out.append(_effects("vocab_proj", row, pieces, n))
    return out


def _effects(method: str, row: torch.Tensor, pieces, n: int, positions: int = 0) -> OutputExplanation:
    top, bottom = torch.topk(row, n), torch.topk(-row, n)
    return OutputExplanation(
        method, [TokenEffect(int(i), pieces([int(i)])[0], round(float(v), 6)) for v, i in zip(top.values, top.indices)],
        [TokenEffect(int(i), pieces([int(i)])[0], round(-float(v), 6)) for v, i in zip(bottom.values, bottom.indices)],
        positions)


def firing_contexts(acts: Activations, latent: int, held: bool, n: int) -> list[tuple[int, list[int]]]:
    """Up to ``n`` sequences of one part where the latent fires, strongest first: ``(sequence, positions)``."""
    idx, val = acts.fires.get(latent, (np.array([], dtype=int), np.array([])))
    keep = acts.held[idx] == held
    idx, val = idx[keep], val[keep]
    best: dict[int, float] = {}
    for k, v in zip(idx, val):
        s = int(acts.seq[k])
        best[s] = max(best.get(s, 0.0), float(v))
    chosen = sorted(best, key=lambda s: -best[s])[:n]
    return [(s, sorted(int(acts.pos[k]) for k in idx if acts.seq[k] == s)) for s in chosen]


def cut_contexts(corpus: Corpus, contexts, context_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Each ``(sequence, firing positions)`` as ``(tokens, positions in them)``: the tokens up to its last firing
    position, cut to the last ``context_tokens`` of them (0: all); firing positions at or before the cut's first
    token are dropped (a window's first token is an outlier position, as a sequence's first is)."""
    out = []
    for s, positions in contexts:
        end = max(positions) + 1
        lo = max(0, end - context_tokens) if context_tokens else 0
        kept = [p - lo for p in positions if p > lo]
        if kept:
            out.append((corpus.sequences[s][lo:end], kept))
    return out


@torch.no_grad()
def probability_change(model, sae, layer: int, latent: int, corpus: Corpus, contexts, gamma: float,
                       batch: int = 8, context_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """``delta(v)`` of the module docstring: the mean over the firing positions in ``contexts`` of the change of
    next-token probability when the latent is scaled by ``gamma`` at exactly those positions (each context cut
    by :func:`cut_contexts`). Returns ``(delta [vocab], number of positions)``."""
    from ..saes import PositionScope
    from ..steering import Intervention, steer

    device = next(model.parameters()).device
    total, count = None, 0
    contexts = cut_contexts(corpus, contexts, context_tokens)
    for lo in range(0, len(contexts), batch):
        chunk = contexts[lo:lo + batch]
        seqs = [tokens for tokens, _ in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        at = torch.zeros(len(seqs), width, dtype=torch.bool)
        for r, (s, (_, positions)) in enumerate(zip(seqs, chunk)):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
            at[r, positions] = True
        ids, mask, at = ids.to(device), mask.to(device), at.to(device)
        clean = torch.softmax(logits_at(model, ids, mask, at).float(), -1)
        with steer(model, {layer: sae}, [Intervention(layer, latent, "scale", gamma)], scope=PositionScope(mask=at)):
            steered = torch.softmax(logits_at(model, ids, mask, at).float(), -1)
        diff = (steered - clean).sum(0).cpu()
        total = diff if total is None else total + diff
        count += int(at.sum())
    if total is None:
        return torch.zeros(0), 0
    return total / max(1, count), count


# model -> whether its head is just the output embedding on the base model's last hidden state (checked on first use)
_PLAIN_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def logits_at(model, ids: torch.Tensor, mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The next-token logits at the positions ``at`` only (``[at.sum(), vocab]``, rows in ``at``'s order).

    The LM head runs on the base model's last hidden states at those positions, not at all of them: for a small
    model the head is a fifth of a forward pass (SmolLM2-135M: 57 of 269 MFLOP per token) and the softmax over
    the vocabulary at every position costs as much again, while TokenChange reads only the firing positions. On
    first use per model the result is compared with the model's own logits there; a model whose head does more
    than the output embedding (a logit scale, say) is answered by its full forward from then on."""
    plain = _PLAIN_HEAD.get(model)
    if plain is False:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[at]
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[at]
    logits = torch.empty(len(hidden), model.get_output_embeddings().weight.shape[0], dtype=torch.float32,
                         device=hidden.device)
    head_into(model, hidden, logits)  # the sampler's head (soft-capping included), so both read the same logits
    if plain is None:
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[at]
        tol = 1e-4 if full.dtype == torch.float32 else 2e-2
        _PLAIN_HEAD[model] = plain = bool(torch.allclose(logits.float(), full.float(), rtol=tol,
                                                         atol=tol * float(full.abs().max().clamp(min=1))))
        if not plain:
            return full
    return logits


def token_change(model, sae, layer: int, latent: int, corpus: Corpus, acts: Activations, pieces,
                 cfg: ExplainConfig) -> OutputExplanation:
    """TokenChange on the latent's strongest build contexts (see the module docstring)."""
    contexts = firing_contexts(acts, latent, held=False, n=cfg.n_contexts)
    if not contexts:
        return OutputExplanation("token_change", [], [], 0)
    delta, n = probability_change(model, sae, layer, latent, corpus, contexts, cfg.gamma, cfg.batch,
                                  cfg.context_tokens)
    return _effects("token_change", delta, pieces, cfg.n_tokens, n)


def raw_output_score(model, sae, layer: int, latent: int, corpus: Corpus, acts: Activations,
                     vocab: OutputExplanation, cfg: ExplainConfig) -> tuple[float | None, int]:
    """``sum_{v in T} delta(v)`` on held-out firing contexts, ``T`` the top ``output_top`` VocabProj tokens."""
    contexts = firing_contexts(acts, latent, held=True, n=cfg.n_contexts)
    if not contexts or not vocab.promoted:
        return None, 0
    delta, n = probability_change(model, sae, layer, latent, corpus, contexts, cfg.gamma, cfg.batch,
                                  cfg.context_tokens)
    return float(delta[[t.token for t in vocab.promoted[:cfg.output_top]]].sum()), n


def null_pool(acts: Activations, d_sae: int, cfg: ExplainConfig) -> tuple[dict[int, list[int]], np.ndarray]:
    """Latents drawn at random from each activation-frequency decile (``frequency_bins`` of :mod:`ipg_sae.nulls`,
    over build-part frequencies), ``null_per_bin`` per decile: ``({bin: latents}, the bin of every latent)`` (bin
    -1: never fires on the build part). The pool depends only on the corpus and ``cfg`` (not on which latents are
    explained), so explanations computed in several calls are compared with the same null; a latent that is in
    its own bin's pool is left out of its comparison."""
    from ..nulls import frequency_bins

    bins = frequency_bins(acts.build_frequencies(d_sae))
    rng = np.random.default_rng(cfg.seed)
    pool = {}
    for b in sorted(set(bins.tolist()) - {-1}):
        pool[int(b)] = sorted(int(i) for i in rng.permutation(np.flatnonzero(bins == b))[:cfg.null_per_bin])
    return pool, bins


def rank_in_null(score: float | None, null: list[float]) -> tuple[float | None, float | None]:
    """``(null mean, share of the null the score beats (ties half))``."""
    null = [x for x in null if x is not None]
    if score is None or not null:
        return (float(np.mean(null)) if null else None), None
    arr = np.asarray(null)
    return round(float(arr.mean()), 6), round(float(((arr < score).sum() + 0.5 * (arr == score).sum()) / len(arr)), 4)
