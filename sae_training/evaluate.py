"""Held-out evaluation of SAEs: reconstruction, sparsity, and the LM's loss with the SAE in place.

For each layer, on held-out rows (at the trained positions only: not the first token, not
padding):

* ``explained_variance`` = 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2, plus ``mse`` and ``cossim``;
* ``l0`` (mean active latents per token) and ``never_fired_fraction`` (latents silent on
  every held-out token: an upper bound on dead latents for a small held-out set);
* the LM's next-token cross-entropy with the residual replaced by the SAE reconstruction
  (no error term), unchanged, and zero-ablated, and
  ``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` ("CE loss recovered").

Attention-sink outliers (norm above ``max_norm_ratio`` x the batch median, see
:mod:`sae_training.activations`) are left alone by the splice and the ablation and are not
counted in the reconstruction metrics, as they are not trained on.

The clean and zero-ablated losses and the held-out residuals do not depend on the SAE:
:func:`reference` computes them once per run, and later evaluations only run the
spliced forward. CE is averaged over predictions made *from* trained positions (the
positions the splice changes) of real next tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ipg_sae.models import block_hidden, decoder_layers, replace_block_hidden

from .activations import inliers, trim
from .data import TokenRows

Edit = Callable[[torch.Tensor], torch.Tensor]  # residuals [n, d] at trained positions -> replacement


@dataclass
class EvalReference:
    ce_clean: float
    ce_zero: dict[int, float]
    acts: dict[int, torch.Tensor]  # held-out residuals at trained positions, [n, d] float32 on the CPU
    max_norm_ratio: float = 0.0


@torch.no_grad()
def reference(model, rows: TokenRows, layers: list[int], batch_size: int, max_norm_ratio: float = 0.0) -> EvalReference:
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def keep(layer):
        def read(x):
            captured[layer].append(x[inliers(x, max_norm_ratio)].float().cpu())
            return x
        return read

    ce_clean = _cross_entropy(model, rows, batch_size, {layer: keep(layer) for layer in layers})
    zero = _skip_outliers(torch.zeros_like, max_norm_ratio)
    ce_zero = {layer: _cross_entropy(model, rows, batch_size, {layer: zero}) for layer in layers}
    return EvalReference(ce_clean, ce_zero, {layer: torch.cat(parts) for layer, parts in captured.items()},
                         max_norm_ratio)


def _skip_outliers(edit: Edit, max_norm_ratio: float) -> Edit:
    """``edit`` applied to the inlier rows only; outliers keep their value."""
    def apply(x: torch.Tensor) -> torch.Tensor:
        keep = inliers(x, max_norm_ratio)
        if keep.all():
            return edit(x)
        out = x.clone()
        out[keep] = edit(x[keep])
        return out
    return apply


@torch.no_grad()
def evaluate(model, saes: dict, rows: TokenRows, ref: EvalReference, batch_size: int,
             scales: dict[int, float | None] | None = None) -> dict[int, dict[str, float]]:
    """Metrics per layer. ``scales``: input scaling each SAE was trained with (None = none)."""
    scales = scales or {}
    out = {}
    for layer, sae in saes.items():
        was_training = sae.training
        sae.eval()
        try:
            metrics = _reconstruction_metrics(sae, scales.get(layer), ref.acts[layer])
            recon = _skip_outliers(_reconstructor(sae, scales.get(layer)), ref.max_norm_ratio)
            ce_sae = _cross_entropy(model, rows, batch_size, {layer: recon})
        finally:
            sae.train(was_training)
        ce_clean, ce_zero = ref.ce_clean, ref.ce_zero[layer]
        denominator = ce_zero - ce_clean
        metrics.update(
            ce_loss_without_sae=ce_clean,
            ce_loss_with_sae=ce_sae,
            ce_loss_with_ablation=ce_zero,
            ce_loss_score=(ce_zero - ce_sae) / denominator if denominator else float("nan"),
        )
        out[layer] = metrics
    return out


def wandb_metrics(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """One layer's held-out metrics under sae-lens's evaluation groups, each named ``heldout_<metric>``
    (``reconstruction_quality/heldout_explained_variance``): the training loop logs sae-lens's metrics of each
    training batch too (``metrics/train_batch_explained_variance``), and a run's summary must not show the two
    explained variances under confusable names."""
    groups = {
        "ce_loss_score": "model_performance_preservation", "ce_loss_with_sae": "model_performance_preservation",
        "ce_loss_without_sae": "model_performance_preservation",
        "ce_loss_with_ablation": "model_performance_preservation",
        "explained_variance": "reconstruction_quality", "mse": "reconstruction_quality",
        "cossim": "reconstruction_quality", "l0": "sparsity", "never_fired_fraction": "sparsity",
        "dead_fraction": "sparsity",
    }
    return {f"{prefix}{groups[k]}/heldout_{k}": v for k, v in metrics.items() if k in groups}


def _encode_decode(sae, x: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction in the input's units, latents) for residuals ``x``."""
    xs = x.to(sae.W_dec.dtype)
    if scale:
        xs = xs * scale
    f = sae.encode(xs)
    x_hat = sae.decode(f)
    return (x_hat / scale if scale else x_hat).to(x.dtype), f


def _reconstructor(sae, scale: float | None) -> Edit:
    return lambda x: _encode_decode(sae, x, scale)[0]


def _reconstruction_metrics(sae, scale: float | None, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    device = sae.W_dec.device
    mean = acts.mean(0).to(device)
    sse = sst = cos = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    for start in range(0, acts.shape[0], batch):
        x = acts[start:start + batch].to(device)
        x_hat, f = _encode_decode(sae, x, scale)
        x_hat = x_hat.float()
        sse += (x - x_hat).pow(2).sum().item()
        sst += (x - mean).pow(2).sum().item()
        cos += F.cosine_similarity(x, x_hat, dim=-1).sum().item()
        active = f != 0
        l0 += active.sum().item()
        fired |= active.any(0)
    n = acts.shape[0]
    return {
        "explained_variance": 1.0 - sse / sst if sst else float("nan"),
        "mse": sse / (n * acts.shape[1]),
        "cossim": cos / n,
        "l0": l0 / n,
        "never_fired_fraction": 1.0 - fired.float().mean().item(),
        "n_tokens": n,
    }


def _cross_entropy(model, rows: TokenRows, batch_size: int, edits: dict[int, Edit]) -> float:
    """Mean next-token CE with ``edits[layer]`` applied to block ``layer``'s output at trained positions."""
    device = next(model.parameters()).device
    blocks = decoder_layers(model)
    current: dict[str, torch.Tensor] = {}

    def make_hook(edit: Edit):
        def hook(_module, _inputs, output):
            x = block_hidden(output)
            mask = current["mask"]
            new = x.clone()
            new[mask] = edit(x[mask])
            return replace_block_hidden(output, new)
        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(edit)) for layer, edit in edits.items()]
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = trim(rows[start:start + batch_size])
            tokens, attention = batch.tokens.to(device), batch.attention.to(device)
            current["mask"] = batch.mask.to(device)
            logits = model(input_ids=tokens, attention_mask=None if bool(attention.all()) else attention,
                           use_cache=False).logits
            # Predictions made from trained positions, of real next tokens.
            scored = current["mask"][:, :-1] & attention[:, 1:].bool()
            ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            total += ce[scored.flatten()].sum().item()
            count += int(scored.sum())
    finally:
        for h in handles:
            h.remove()
    return total / max(count, 1)
