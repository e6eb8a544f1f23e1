r"""What a latent is, read off the model and its SAE: its direct effect on the logits, its nearest latents,
and its activations on the attributed trajectories.

* :func:`logit_effect` — ``(W_dec[i] * s) @ W_U^T`` with ``s`` the final norm's elementwise scale:
  what latent ``i`` writes to each logit directly (no later layer in between);
  :func:`logit_effects` gives many latents' top promoted and suppressed tokens at once.
* :func:`nearest_latents` — the latents of the same SAE whose decoder directions have the largest
  cosine similarity with latent ``i``'s.
* :func:`encode_trajectories` — every trajectory through the model and its SAEs once: each latent's
  activation frequency (share of positions, all but the first, where ``f_i > 0``), the activation
  values of chosen latents, and their activation at every position of chosen trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def final_norm_scale(model) -> torch.Tensor | None:
    """The elementwise scale of the final norm before the LM head (None where there is none)."""
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None) or getattr(base, "final_layernorm", None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    return (1.0 + weight) if "gemma" in type(norm).__name__.lower() else weight


def _directions(model, sae, latents: list[int]) -> torch.Tensor:
    """``W_dec[latents] * s``: the latents' decoder rows as the LM head sees them (after the final norm's scale)."""
    from .saes import decoder_matrix

    rows = decoder_matrix(sae)[latents].to(model.get_output_embeddings().weight.dtype)
    scale = final_norm_scale(model)
    return rows * scale.to(rows) if scale is not None else rows


@torch.no_grad()
def logit_effect(model, sae, latent: int) -> torch.Tensor:
    """``(W_dec[i] * final-norm scale) @ W_U^T``: what the latent writes to each logit, directly."""
    return model.get_output_embeddings().weight @ _directions(model, sae, [latent])[0]


@torch.no_grad()
def logit_effects(model, sae, latents: list[int], n: int, chunk: int = 256) -> list[dict]:
    """:func:`logit_effect` of many latents at once: each one's top ``n`` promoted and suppressed token ids."""
    unembed = model.get_output_embeddings().weight
    out = []
    for start in range(0, len(latents), chunk):
        rows = _directions(model, sae, latents[start:start + chunk])
        effect = (rows @ unembed.T).float()
        top, bottom = torch.topk(effect, n, dim=1), torch.topk(-effect, n, dim=1)
        for j in range(len(rows)):
            out.append({"promoted": [[int(i), round(float(v), 4)] for v, i in zip(top.values[j], top.indices[j])],
                        "suppressed": [[int(i), round(-float(v), 4)] for v, i in zip(bottom.values[j],
                                                                                  bottom.indices[j])]})
    return out


@torch.no_grad()
def nearest_latents(sae, latents: list[int], n: int, chunk: int = 512) -> list[list[tuple[int, float]]]:
    """Each latent's ``n`` nearest latents of the same SAE by cosine similarity of their decoder rows."""
    from .saes import decoder_matrix

    w = decoder_matrix(sae).float()
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = []
    for start in range(0, len(latents), chunk):
        idx = torch.tensor(latents[start:start + chunk])
        cos = w[idx] @ w.T
        cos[torch.arange(len(idx)), idx] = -2.0  # not itself
        top = torch.topk(cos, min(n, w.shape[0] - 1), dim=1)
        out += [[(int(i), round(float(c), 4)) for c, i in zip(top.values[j], top.indices[j])] for j in range(len(idx))]
    return out


@dataclass
class Encoded:
    frequency: dict = field(default_factory=dict)  # (layer, latent) -> share of positions where it fires
    values: dict = field(default_factory=dict)  # (layer, latent) -> its non-zero activations (panel latents)
    windows: dict = field(default_factory=dict)  # (trajectory id, layer, latent) -> its activation at every position


@torch.no_grad()
def encode_trajectories(model, saes, result, by_id, acc, detail, batch: int = 8) -> Encoded:
    """The attributed trajectories through the model and its SAEs once: every latent's activation frequency
    (over every position but the first, as attribution reads them), the panel latents' activation values,
    and their activations around each of their top contexts (the per-token shading of the windows)."""
    from .models import capture_residuals

    out = Encoded()
    layers = sorted(layer for layer in result.layers if layer in (saes or {}))
    if model is None or not layers:
        return out
    wanted: dict[str, list[tuple[int, int]]] = {}
    for key in detail:
        for tid, _, _ in acc.get(key, []):
            wanted.setdefault(tid, []).append(key)
    trajectories = [by_id[tid] for tid in result.traj_ids if tid in by_id]
    counts = {layer: torch.zeros(saes[layer].cfg.d_sae, dtype=torch.float64) for layer in layers}
    positions = 0
    device = next(model.parameters()).device
    for start in range(0, len(trajectories), batch):
        chunk = trajectories[start:start + batch]
        seqs = [list(t.prompt_ids) + list(t.completion_ids) for t in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        res = capture_residuals(model, ids.to(device), mask.to(device), layers)
        for row, (t, seq) in enumerate(zip(chunk, seqs)):
            positions += len(seq) - 1
            for layer in layers:
                sae = saes[layer]
                f = sae.encode(res[layer][row, :len(seq)].to(sae.dtype)).float().cpu()
                f[0] = 0  # the first position is not read (as in attribution)
                counts[layer] += (f > 0).sum(0).double()
                for lay, latent in detail:
                    if lay == layer:
                        on = f[:, latent]
                        out.values.setdefault((layer, latent), []).extend(on[on > 0].tolist())
                for lay, latent in wanted.get(t.id, []):
                    if lay == layer:
                        out.windows[(t.id, layer, latent)] = f[:, latent].tolist()
    for layer, c in counts.items():
        for latent in torch.nonzero(c).flatten().tolist():
            out.frequency[(layer, latent)] = float(c[latent]) / max(1, positions)
    return out
