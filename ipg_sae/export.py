"""Interop with TransformerLens and sae-lens: an SAE trained here, used there at the same residual.

* :func:`export_for_transformer_lens` writes a copy of an SAE with TransformerLens hook names.
* :func:`transformer_lens_bridge` wraps the loaded Hugging Face model in sae-lens's
  ``SAETransformerBridge`` (TransformerLens 3.x's ``TransformerBridge``: raw HF weights, so the
  residual is the model's own) and loads exported SAEs for it. ``bridge.run_with_cache_with_saes(
  ids, saes=saes)`` then caches ``blocks.L.hook_out.hook_sae_acts_post``.
* :func:`round_trip` checks an export: the bridge's residual at the SAE's block equals the HF
  model's, and the exported SAE's activations there equal this project's (both exact in float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import IPGError


def export_for_transformer_lens(sae_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of an SAE this project trained, named the way TransformerLens tools expect.

    The copy's ``hook_name`` is ``blocks.L.hook_resid_post`` (the same residual as the HF model's
    block ``L`` output; sae-lens's ``SAETransformerBridge`` attaches it at ``blocks.L.hook_out``),
    its ``model_name`` the model's hub id, and ``model_from_pretrained_kwargs`` turn off the weight
    processing that would change the residual basis. The weights are copied unchanged.
    :func:`transformer_lens_bridge` loads it on the model (TransformerLens 3.x's
    ``HookedSAETransformer.from_pretrained_no_processing`` does not know SmolLM2 or
    Qwen2.5-Math; the bridge wraps the Hugging Face model itself).
    """
    import json
    import shutil

    from .io import write_json
    from .models import hub_id
    from .saes import hook_layer

    sae_dir, out_dir = Path(sae_dir), Path(out_dir)
    cfg = json.loads((sae_dir / "cfg.json").read_text(encoding="utf-8"))
    meta = dict(cfg.get("metadata") or {})
    layer = hook_layer(meta.get("hook_name"))
    if layer is None:
        raise IPGError(f"{sae_dir}/cfg.json does not say which layer the SAE reads (hook_name); cannot export it")
    meta.update(hook_name=f"blocks.{layer}.hook_resid_post", model_class_name="HookedTransformer",
                model_name=hub_id(meta.get("model_name") or "") or meta.get("model_name"),
                model_from_pretrained_kwargs={"center_writing_weights": False, "center_unembed": False,
                                              "fold_ln": False})
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sae_dir / "sae_weights.safetensors", out_dir / "sae_weights.safetensors")
    write_json(out_dir / "cfg.json", {**cfg, "metadata": meta})
    return out_dir


def transformer_lens_bridge(model, tokenizer, model_name: str, sae_dirs=()):
    """``(bridge, saes)``: sae-lens's ``SAETransformerBridge`` over ``model`` and the SAEs exported to ``sae_dirs``.

    ``model_name`` is what the bridge reads the architecture from: a hub id or the local model
    directory (for the offline default, the directory its GGUF was dequantized into).
    """
    try:
        from sae_lens import SAE, SAETransformerBridge
    except ImportError:
        raise IPGError("the TransformerLens bridge needs sae-lens with transformer-lens 3 (pip install "
                       "'transformer-lens>=3'); both are pinned by this project's install") from None
    device = next(model.parameters()).device
    bridge = SAETransformerBridge.boot_transformers(model_name, hf_model=model, tokenizer=tokenizer, device=device)
    return bridge, [SAE.load_from_disk(str(d), device=str(device)) for d in sae_dirs]


@torch.no_grad()
def round_trip(model, tokenizer, model_name: str, sae_dir: str | Path, exported: str | Path,
               text: str = "The sum of 3 and 4 is 7.") -> dict:
    """Max absolute differences between the bridge and this project on ``text``: the residual at the SAE's block
    and the SAE's activations there (0.0 and 0.0 when the export is exact)."""
    from .models import capture_residuals
    from .saes import load_sae

    ours = load_sae(str(sae_dir), model)
    layer = ours.ipg_layer
    bridge, (tl_sae,) = transformer_lens_bridge(model, tokenizer, model_name, [exported])
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    _, cache = bridge.run_with_cache_with_saes(ids, saes=[tl_sae])
    residual = capture_residuals(model, ids, torch.ones_like(ids), [layer])[layer]
    hook = f"blocks.{layer}.hook_out"
    return {"layer": layer, "residual": float((cache[f"{hook}.hook_sae_input"] - residual).abs().max()),
            "activations": float((cache[f"{hook}.hook_sae_acts_post"] - ours.encode(residual)).abs().max()),
            "hook": f"{hook}.hook_sae_acts_post", "exported": str(exported),
            "model_name": json.loads((Path(exported) / "cfg.json").read_text())["metadata"].get("model_name")}
