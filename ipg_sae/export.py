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
import os
from pathlib import Path
from typing import Callable

import torch

from .errors import IPGError


EXPORT_MARKER = "ipg_sae_export.json"  # in an export: which SAE it copies (so a rerun may replace it)
_WRITES = ("cfg.json", "sae_weights.safetensors", EXPORT_MARKER)  # every file an export writes


def default_export_dir(sae_dir: str | Path) -> Path:
    """Where ``ipg-sae export`` writes by default: outside every folder a job owns. An SAE a run trained
    (``<run>/sae/layer_L``) goes to ``<run>/export/layer_L`` (never inside ``sae/``, which the SAE stage owns); any
    other SAE folder to ``<sae>_transformer_lens`` beside it."""
    sae_dir = Path(sae_dir)
    if sae_dir.parent.name == "sae":
        return sae_dir.parent.parent / "export" / sae_dir.name
    return sae_dir.parent / f"{sae_dir.name}_transformer_lens"


def export_for_transformer_lens(sae_dir: str | Path, out_dir: str | Path, force: bool = False,
                                check: Callable[[Path], None] | None = None) -> Path:
    """A copy of an SAE this project trained, named the way TransformerLens tools expect.

    The copy's ``hook_name`` is ``blocks.L.hook_resid_post`` (the same residual as the HF model's
    block ``L`` output; sae-lens's ``SAETransformerBridge`` attaches it at ``blocks.L.hook_out``),
    its ``model_name`` the model's hub id, and ``model_from_pretrained_kwargs`` turn off the weight
    processing that would change the residual basis. The weights are copied unchanged.
    :func:`transformer_lens_bridge` loads it on the model (TransformerLens 3.x's
    ``HookedSAETransformer.from_pretrained_no_processing`` does not know SmolLM2 or
    Qwen2.5-Math; the bridge wraps the Hugging Face model itself).

    Nothing is written before the source is checked (:func:`check_source`: its recorded weights digest,
    that it loads, finite weights) and the target is known to be free (:func:`check_target`: ``force``
    lets it replace files that are not an earlier export of this SAE). The copy is assembled in a
    temporary folder beside ``out_dir``; ``check(folder)``, when given, runs on it there; only then do
    its files replace those in ``out_dir`` (so a failed check leaves no copy behind).
    """
    import shutil
    import tempfile

    from .digest import file_digest
    from .io import make_dir, write_json
    from .models import hub_id
    from .saes import SIDECAR, hook_layer

    sae_dir, out_dir = Path(sae_dir), Path(out_dir)
    cfg = check_source(sae_dir)
    check_target(sae_dir, out_dir, force)
    meta = dict(cfg.get("metadata") or {})
    layer = hook_layer(meta.get("hook_name"))
    if layer is None:
        raise IPGError(f"{sae_dir}/cfg.json does not say which layer the SAE reads (hook_name); cannot export it")
    meta.update(hook_name=f"blocks.{layer}.hook_resid_post", model_class_name="HookedTransformer",
                model_name=hub_id(meta.get("model_name") or "") or meta.get("model_name"),
                model_from_pretrained_kwargs={"center_writing_weights": False, "center_unembed": False,
                                              "fold_ln": False})
    make_dir(out_dir.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        shutil.copyfile(sae_dir / "sae_weights.safetensors", staging / "sae_weights.safetensors")
        write_json(staging / "cfg.json", {**cfg, "metadata": meta})
        write_json(staging / EXPORT_MARKER, {"source": str(sae_dir.resolve()),
                                              "weights_sha256": file_digest(staging / "sae_weights.safetensors")})
        if check is not None:
            check(staging)
        make_dir(out_dir)
        for name in _WRITES:
            os.replace(staging / name, out_dir / name)
        if force:  # a sidecar left by another SAE would describe weights this folder no longer holds
            (out_dir / SIDECAR).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def check_source(sae_dir: Path) -> dict:
    """The SAE's ``cfg.json``, once the SAE is known intact: its sidecar's weights digest matches (a damaged or
    edited SAE this project trained is refused, whether or not the export is checked afterwards), it loads
    with sae-lens, and its weights are finite."""
    from .io import read_json
    from .saes import load_sae

    try:
        cfg = read_json(sae_dir / "cfg.json")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise IPGError(f"{sae_dir}/cfg.json cannot be read as JSON ({type(e).__name__}); give an intact SAE "
                       "directory") from None
    if not isinstance(cfg, dict):
        raise IPGError(f"{sae_dir}/cfg.json is not a JSON object; give an intact SAE directory")
    load_sae(sae_dir)  # the sidecar's digest, the weights' format and finiteness (IPGError in one line)
    return cfg


def check_target(sae_dir: Path, out_dir: Path, force: bool) -> None:
    """Refuse to write into a folder holding files that an earlier export of this same SAE did not write (another
    SAE, another export, anything else) unless ``force``; never into the SAE's own folder."""
    from .io import read_json

    if out_dir.exists() and not out_dir.is_dir():
        raise IPGError(f"--out_dir {out_dir} is a file, not a folder; give a folder path")
    if out_dir.resolve() == sae_dir.resolve():
        raise IPGError(f"--out_dir {out_dir} is the SAE's own folder; the export would overwrite it, give another "
                       "folder")
    if not out_dir.is_dir():
        return
    present = sorted(p.name for p in out_dir.iterdir())
    try:
        marker = read_json(out_dir / EXPORT_MARKER)
    except (OSError, ValueError, UnicodeDecodeError):
        marker = None
    ours = isinstance(marker, dict) and marker.get("source") == str(sae_dir.resolve())
    foreign = [name for name in present if not (ours and name in _WRITES)]
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise IPGError(f"--out_dir {out_dir} already holds files this export of {sae_dir} did not write ({shown}); "
                       "give an empty or new folder, or pass --force true to replace the export's files there")


def transformer_lens_bridge(model, tokenizer, model_name: str, sae_dirs=()):
    """``(bridge, saes)``: sae-lens's ``SAETransformerBridge`` over ``model`` and the SAEs exported to ``sae_dirs``.

    ``model_name`` is what the bridge reads the architecture from: a hub id or the local model
    directory (for the offline default, the directory its GGUF was dequantized into).
    """
    try:
        from sae_lens import SAETransformerBridge
    except ImportError:
        raise IPGError("the TransformerLens bridge needs sae-lens with transformer-lens 3 (pip install "
                       "'transformer-lens>=3'); both are pinned by this project's install") from None
    device = next(model.parameters()).device
    bridge = SAETransformerBridge.boot_transformers(model_name, hf_model=model, tokenizer=tokenizer, device=device)
    return bridge, [load_exported(d, device=str(device)) for d in sae_dirs]


def load_exported(sae_dir: str | Path, device: str = "cpu"):
    """An exported SAE loaded with sae-lens, without its advice to load the model through
    ``HookedSAETransformer.from_pretrained_no_processing`` (which does not know this project's models; the bridge
    is the way here)."""
    import warnings

    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*non-empty model_from_pretrained_kwargs", category=UserWarning)
        return SAE.load_from_disk(str(sae_dir), device=device)


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
