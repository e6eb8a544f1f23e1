"""SAEs on the residual stream: load, validate, and splice them into a model exactly.

An SAE for layer ``l`` reads the output ``x`` of decoder block ``l``:
``f = enc(x)``, ``dec(f) = f @ W_dec + b_dec``. The splice replaces the residual by

    x' = dec(c * f) + eps,    eps = (x - dec(f)).detach()
       = x + ((c - 1) * f) @ W_dec                     (for an affine decoder)

with a gate vector ``c`` of shape ``[d_sae]`` per layer. We compute the second form:
at ``c = 1`` it returns ``x`` itself, so the spliced model equals the clean one, and moving
a gate from 1 to ``c_i`` changes the residual by exactly ``(c_i - 1) f_i W_dec[i]``.
This is sae-lens's ``use_error_term`` convention (error held at its clean value), used for
reading latents, steering and exactness checks. The attribution path of
:mod:`ipg_sae.attribution` holds the *latents* fixed instead (see ``docs/ipg-method.md``).

SAEs are sae-lens objects (``standard``, ``topk``, ``jumprelu``, and ``batchtopk`` saved as
``jumprelu``), loaded with sae-lens's own classes. The splice needs an affine decoder, so
``normalize_activations`` must be ``none`` or ``expected_average_only_in`` (folded on load)
and ``reshape_activations`` must be ``none``; other SAEs are rejected with a clear error.
``W_dec`` is taken as sae-lens's decode uses it (divided by its row norms when
``rescale_acts_by_decoder_norm`` is set).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from .errors import IPGError
from .saes_config import SAELoad, SAESpec, sae_entries, take_old_saes  # noqa: F401  (re-exported: torch-free)
from .models import block_hidden, check_layer, decoder_layers, hidden_size, replace_block_hidden

Scope = Literal["all", "generated"]

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")  # TransformerLens names: blocks.L.hook_resid_post, ...
_HF_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(\..+)?$")  # HF module paths: model.layers.N, transformer.h.N


def load_sae(spec: SAESpec | str, model: nn.Module | None = None, device: str | torch.device = "cpu", tokenizer=None):
    """Load a sae-lens SAE from a local directory or the sae-lens registry.

    Args:
        spec: an :class:`SAESpec` (``path``, or ``release`` + ``sae_id``; ``layer`` overrides
            the layer read from the SAE's ``hook_name``), or a directory path.
        model: when given, the SAE is checked against it (layer, width, architecture) and moved
            to its device and dtype.
        device: where to load the weights first.
        tokenizer: with ``model``, the SAE's explained variance on a few texts through this model is
            measured before use (``sae.ipg_explained_variance``), with a warning naming the likely
            cause (wrong layer, model or basis) when it is poor.

    Returns:
        The sae-lens ``SAE``, with ``ipg_layer`` set to the residual layer it reads.
    """
    from sae_lens import SAE

    if isinstance(spec, (str, Path)):
        spec = SAESpec(path=str(spec))
    spec.validate()
    sidecar = None  # what this project recorded when it trained the SAE (None: an SAE from elsewhere)
    if spec.path:
        path = Path(spec.path).expanduser()
        if not (path / "cfg.json").is_file():
            raise IPGError(f"{path} is not an SAE directory (no cfg.json); give a directory saved in sae-lens format")
        sidecar = check_sidecar(path)
        try:
            sae = SAE.load_from_disk(str(path), device=str(device))
        except Exception as e:  # sae-lens raises many types; the user needs one line
            raise IPGError(f"could not load SAE from {path}: {str(e).splitlines()[0][:200]}; is it a sae-lens SAE?") from None
    else:
        _check_pretrained(spec.release, spec.sae_id)
        try:
            sae = SAE.from_pretrained(spec.release, spec.sae_id, device=str(device))
        except Exception as e:
            raise IPGError(
                f"could not load SAE {spec.release}/{spec.sae_id}: {str(e).splitlines()[0][:200]}; "
                "check the release and id (sae_lens.loading.pretrained_saes_directory) and your network"
            ) from None
    where = spec.path or f"{spec.release}/{spec.sae_id}"
    _check_finite(sae, where)
    _check_basis(sae, where)
    hooked = hook_layer(sae.cfg.metadata.hook_name)  # refuses non-residual hooks, whatever `layer` says
    if spec.layer is not None and model is not None:
        check_layer(model, spec.layer, what="SAE layer")
    if spec.layer is not None and hooked is not None and spec.layer != hooked:
        raise IPGError(f"SAE {where} reads {sae.cfg.metadata.hook_name}, the output of decoder block {hooked}, but its "
                       f"entry says layer {spec.layer}; remove `layer` (it is read from hook_name) or correct it")
    layer = spec.layer if spec.layer is not None else hooked
    if layer is None:
        raise IPGError(f"cannot tell which layer SAE {where} reads (hook_name "
                       f"{sae.cfg.metadata.hook_name!r}); set `layer` in its SAE entry (the decoder block whose "
                       "output it reads)")
    sae.ipg_layer = layer
    if model is not None:
        sae = prepare_sae(sae, model, layer)
        if tokenizer is not None:
            check_fit(sae, model, tokenizer, where, trained_here=_trained_for(sidecar, model, layer))
    return sae


SIDECAR = "ipg_sae.json"  # next to cfg.json in SAE directories this project wrote


def write_sae_sidecar(sae_dir: str | Path, model_name: str, layer: int) -> None:
    """Record the weights' digest (checked on every load) and the model names next to a saved SAE."""
    from .digest import file_digest
    from .io import write_json
    from .models import hub_id

    sae_dir = Path(sae_dir)
    write_json(sae_dir / SIDECAR, {"weights_sha256": file_digest(sae_dir / "sae_weights.safetensors"),
                                   "model_name": model_name, "hub_id": hub_id(model_name), "layer": layer})


def _trained_for(side: dict | None, model: nn.Module, layer: int) -> bool:
    """Whether the SAE's sidecar says this project trained it on this model's residual at ``layer``."""
    if not side:
        return False
    ours = _short(getattr(model.config, "_name_or_path", None) or "")
    names = {_short(n) for n in (side.get("model_name"), side.get("hub_id")) if n}
    return bool(ours) and ours in names and side.get("layer") == layer


def _check_pretrained(release: str, sae_id: str) -> None:
    """A published SAE's release and id exist in sae-lens's registry (else the closest ones, in one line), and its
    files are cached or the hub answers a probe (else an error in seconds instead of a minute of retries)."""
    import difflib

    from huggingface_hub import constants, scan_cache_dir
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from .hub import unreachable as hub_unreachable

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.4)
        raise IPGError(f"sae-lens has no SAE release {release!r}; closest: {close or 'none'} (all {len(directory)}: "
                       "sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory())")
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        shown = ids if len(ids) <= 12 else difflib.get_close_matches(sae_id, ids, n=8, cutoff=0.0)
        raise IPGError(f"release {release!r} has no SAE {sae_id!r}; {'its ids' if len(ids) <= 12 else 'closest'}: "
                       f"{', '.join(shown)} ({len(ids)} in all: "
                       f"get_pretrained_saes_directory()[{release!r}].saes_map)")
    try:
        cached = any(r.repo_id == lookup.repo_id for r in scan_cache_dir().repos)
    except Exception:  # no cache directory yet
        cached = False
    if cached:
        return
    if constants.HF_HUB_OFFLINE:
        raise IPGError(f"SAE {release}/{sae_id} ({lookup.repo_id}) is not in the local Hugging Face cache and "
                       "HF_HUB_OFFLINE is set; download it once online, or give a local SAE directory (`path:`)")
    why = hub_unreachable()
    if why:
        raise IPGError(f"cannot reach the Hugging Face hub ({why}) to download SAE {release}/{sae_id} "
                       f"({lookup.repo_id}), which is not in the local cache; check your network, or give a local "
                       "SAE directory (`path:`)")


def check_entry(spec: SAESpec, config, model_name: str) -> None:
    """Before any work: an SAE entry fits the model whose config (``transformers`` config, no weights) is given.

    A local SAE's ``cfg.json`` and sidecar are read (the weights' recorded digest checked); a published SAE is looked
    up in sae-lens's registry, must be cached or the hub reachable, and its config is read where sae-lens can give it
    (offline too, for releases whose config it infers: then a width that cannot fit is the reason given first); a
    registry naming another model is a warning (names differ between TransformerLens and the hub). Then the hook
    must be the residual stream, the layer in range, ``d_in`` the model's hidden size."""
    import logging

    from .io import read_json
    from .models import config_sizes

    spec.validate()
    unavailable = None
    if spec.path:
        path = Path(spec.path).expanduser()
        where = str(path)
        if not (path / "cfg.json").is_file():
            raise IPGError(f"SAE {path} is not an SAE directory (no cfg.json); give a directory saved in sae-lens format")
        check_sidecar(path)
        try:
            cfg = read_json(path / "cfg.json")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise IPGError(f"{path}/cfg.json cannot be read as JSON ({type(e).__name__}); give an intact SAE "
                           "directory") from None
    else:
        from huggingface_hub import constants
        from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        where = f"{spec.release}/{spec.sae_id}"
        try:
            _check_pretrained(spec.release, spec.sae_id)
        except IPGError as e:  # offline and not cached: its inferred config may still show that it cannot fit
            if not (constants.HF_HUB_OFFLINE and "not in the local" in str(e)):
                raise
            unavailable = e
        trained_on = get_pretrained_saes_directory()[spec.release].model
        if trained_on and _short(trained_on) not in {_short(n) for n in (model_name, getattr(
                config, "_name_or_path", "") or "") if n}:
            logging.getLogger(__name__).warning(
                "SAE %s was published for model %r, but the job's model is %r: its latents may not fit this "
                "model's residual stream", where, trained_on, model_name)
        try:
            cfg = load_sae_config_from_huggingface(spec.release, spec.sae_id)
        except Exception:  # sae-lens could not say without downloading: checked again when it is loaded
            cfg = {}
    if not isinstance(cfg, dict):
        raise IPGError(f"{where}/cfg.json is not a JSON object; give an intact SAE directory")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    hooked = hook_layer(hook)  # refuses non-residual hooks
    d_model, n = config_sizes(config)
    layer = spec.layer if spec.layer is not None else hooked
    if spec.layer is not None and hooked is not None and spec.layer != hooked:
        raise IPGError(f"SAE {where} reads {hook}, the output of decoder block {hooked}, but its entry says layer "
                       f"{spec.layer}; remove `layer` (it is read from hook_name) or correct it")
    d_in = cfg.get("d_in")
    if d_model is not None and isinstance(d_in, int) and d_in != d_model:
        raise IPGError(f"SAE {where} has d_in {d_in}, but model {model_name!r} has hidden size {d_model}: it was "
                       "trained for another model; give an SAE of this model")
    if n is not None and layer is not None and not 0 <= layer < n:
        raise IPGError(f"SAE {where} reads layer {layer}, but model {model_name!r} has {n} decoder layers "
                       f"(0..{n - 1}); give an SAE for one of them")
    if unavailable is not None:
        raise unavailable
    if layer is None and cfg:
        raise IPGError(f"cannot tell which layer SAE {where} reads (hook_name {hook!r}); set `layer` in its SAE entry")


def check_sidecar(path: str | Path) -> dict | None:
    """An SAE this project wrote must still have the weights it was written with; returns its sidecar (``None``
    for an SAE from elsewhere). A sidecar that is not a JSON object, or whose weights differ, is one line."""
    from .digest import file_digest
    from .io import read_json

    path = Path(path)
    side_path = path / SIDECAR
    if not side_path.is_file():
        return None  # an SAE from elsewhere: nothing recorded to check against
    try:
        side = read_json(side_path)
    except (ValueError, UnicodeDecodeError):
        raise IPGError(f"{side_path} is corrupt (not JSON); delete it (the SAE then loads unchecked) or retrain "
                       "the SAE") from None
    if not isinstance(side, dict):
        raise IPGError(f"{side_path} is corrupt: it holds a JSON {_json_kind(side)}, not an object; delete it (the "
                       "SAE then loads unchecked) or retrain the SAE")
    expected = side.get("weights_sha256")
    model_name = side.get("model_name")
    if model_name is not None and not (isinstance(model_name, str) and model_name.strip()):
        raise IPGError(f"{side_path}: model_name is {model_name!r}, not a model name; fix it or retrain the SAE")
    if not isinstance(expected, str) or len(expected) != 64:
        raise IPGError(f"{side_path} records no weights_sha256 (it is empty or was stripped), so the SAE's weights "
                       "cannot be checked; retrain the SAE, or delete the sidecar to load it unchecked as an SAE "
                       "from elsewhere")
    weights = path / "sae_weights.safetensors"
    if weights.is_file() and file_digest(weights) != expected:
        raise IPGError(f"{weights} is not the file that was trained (its sha256 differs from the one recorded in "
                       f"{SIDECAR}): it was changed or damaged; retrain the SAE or restore the file")
    return side


def _json_kind(value: object) -> str:
    return {type(None): "null", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")


# TransformerLens's from_pretrained defaults; only center_writing_weights changes the residual stream
# itself (it removes the mean over d_model from everything written to it), and only for LayerNorm models.
_TL_DEFAULTS = {"center_writing_weights": True}


def _check_basis(sae, where: str) -> None:
    """Refuse an SAE trained on a TransformerLens model whose residual stream is centred: the HF model's is not."""
    meta = sae.cfg.metadata
    cls = getattr(meta, "model_class_name", None)
    tl_hook = (getattr(meta, "hook_name", None) or "").startswith("blocks.")
    if not (cls in ("HookedTransformer", "HookedSAETransformer") or (cls is None and tl_hook)):
        return  # trained on the plain HF model (as sae_training does), or nothing says otherwise
    kwargs = {**_TL_DEFAULTS, **(getattr(meta, "model_from_pretrained_kwargs", None) or {})}
    if kwargs.get("center_writing_weights") and not _uses_rmsnorm(getattr(meta, "model_name", None)):
        raise IPGError(f"SAE {where} was trained on a TransformerLens model with center_writing_weights (its "
                       "default): that residual stream has its mean over d_model removed, the plain HF model's has "
                       "not, and the splice cannot convert between them exactly. Use an SAE trained on the HF model "
                       "(ipg-sae train-sae) or one trained with model_from_pretrained_kwargs "
                       "{center_writing_weights: false}")


def _uses_rmsnorm(model_name: str | None) -> bool:
    """TransformerLens never centres writing weights of RMSNorm models (Llama, Gemma, Qwen, Mistral, ...)."""
    name = (model_name or "").lower()
    return any(f in name for f in ("llama", "gemma", "qwen", "mistral", "smollm", "mixtral", "phi-3", "olmo"))


def _check_finite(sae, where: str) -> None:
    for name, p in sae.named_parameters():
        bad = int((~torch.isfinite(p)).sum())
        if bad:
            raise IPGError(f"SAE {where} has {bad} non-finite values (NaN or inf) in {name}; the weights are broken: "
                           "retrain the SAE or restore its file")


def hook_layer(hook: str | None) -> int | None:
    """The decoder block whose *output* is the residual an SAE with this ``hook_name`` reads.

    ``blocks.L.hook_resid_post`` and HF paths (``model.layers.L``, ``transformer.h.L``) read block
    ``L``'s output; ``blocks.L.hook_resid_pre`` reads block ``L``'s input, which is block ``L - 1``'s
    output. Returns None for a name that says nothing (then the SAE entry must give ``layer``);
    refuses the residual sites the splice cannot reach (the embedding output, the middle of a
    block) and every non-residual hook (attention or MLP outputs, ``hook_z``, ...), whose
    activations do not live in the residual stream.
    """
    hook = (hook or "").strip()
    if not hook:
        return None
    m = _TL_HOOK.match(hook)
    if m:
        layer, site = int(m.group(1)), m.group(2)
        if site == "hook_resid_post":
            return layer
        if site == "hook_resid_pre":
            if layer == 0:
                raise IPGError(f"the SAE reads {hook}, the embedding output: the splice works on decoder block "
                               "outputs, so SAEs on blocks.0.hook_resid_pre are not supported; use a later layer")
            return layer - 1
        if site == "hook_resid_mid":
            raise IPGError(f"the SAE reads {hook}, the residual between attention and MLP inside block {layer}: no "
                           "module boundary exposes it, so the exact splice cannot reach it; use a resid_pre or "
                           "resid_post SAE")
        raise IPGError(f"the SAE reads {hook}, which is not the residual stream (IPG splices SAEs on the residual "
                       "stream only); use an SAE trained on hook_resid_post or hook_resid_pre")
    m = _HF_BLOCK.search(hook)
    if m:
        if m.group(2):
            raise IPGError(f"the SAE reads {hook}, a submodule of a decoder block, not the residual stream; use an "
                           "SAE trained on the block's output (e.g. model.layers.N)")
        return int(m.group(1))
    return None


def sae_layer(sae) -> int | None:
    """The decoder block whose output the SAE reads, from ``cfg.metadata.hook_name`` (see :func:`hook_layer`)."""
    if getattr(sae, "ipg_layer", None) is not None:
        return sae.ipg_layer
    return hook_layer(sae.cfg.metadata.hook_name)


def prepare_sae(sae, model: nn.Module, layer: int | None = None):
    """Check ``sae`` against ``model`` before any compute, then move it to the model's device and dtype."""
    layer = sae_layer(sae) if layer is None else layer
    if layer is None:
        raise IPGError("the SAE does not say which layer it reads; pass `layer` explicitly")
    check_layer(model, layer, what="SAE layer")
    d_model = hidden_size(model)
    if sae.cfg.d_in != d_model:
        raise IPGError(f"SAE d_in is {sae.cfg.d_in} but the model's hidden size is {d_model}: "
                       "this SAE was trained for a different model")
    if sae.cfg.reshape_activations != "none":
        raise IPGError(f"SAE reshape_activations={sae.cfg.reshape_activations!r} is not a residual-stream SAE")
    if sae.cfg.normalize_activations not in ("none", "expected_average_only_in"):
        raise IPGError(f"SAE normalize_activations={sae.cfg.normalize_activations!r} is not supported by the exact "
                       "splice (needs an affine decoder); fold the normalization into the weights first")
    sae_model = sae.cfg.metadata.model_name
    our_model = getattr(model.config, "_name_or_path", None)
    if sae_model and our_model and _short(sae_model) != _short(our_model):
        warnings.warn(f"SAE was trained on {sae_model!r} but the model is {our_model!r}", stacklevel=2)
    param = next(model.parameters())
    sae = sae.to(device=param.device, dtype=param.dtype)
    sae.requires_grad_(False)
    sae.eval()
    sae.ipg_layer = layer
    _check_affine_decoder(sae)
    return sae


def _short(name: str) -> str:
    return Path(str(name).rstrip("/")).name.lower()


def decoder_matrix(sae) -> torch.Tensor:
    """``W_dec`` as sae-lens's decode applies it: ``dec(f) = f @ decoder_matrix + b_dec``."""
    w = sae.W_dec
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=-1, keepdim=True)
    return w


def bag_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a splice's decoder bag (``embedding_bag`` over ``W_dec`` rows) runs in for residuals of ``dtype``:
    float32 in half precision (CUDA has no half-precision backward for its per-sample weights, and float32 sums
    the k rows more exactly)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def bag_matrix(w_dec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_dec`` in :func:`bag_dtype` (a d_sae x d copy in half precision: make it once, not per pass)."""
    return w_dec.to(bag_dtype(dtype))


@torch.no_grad()
def _check_affine_decoder(sae) -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.rand(2, sae.cfg.d_sae, generator=gen).to(sae.W_dec)
    expected = f @ decoder_matrix(sae) + sae.b_dec
    got = sae.decode(f)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
        raise IPGError(f"SAE architecture {sae.cfg.architecture()!r} decodes non-linearly; the splice supports "
                       "standard, topk and jumprelu SAEs")


# ---- how well an SAE explains the data -------------------------------------------------


def variance_sums(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Sums from which explained variance is computed, additive over batches: ``[n, sum |x|^2,
    sum |x - recon|^2, sum x (d values)]`` in float64, for residuals ``x`` and reconstructions ``[n, d]``."""
    x, recon = x.double().reshape(-1, x.shape[-1]), recon.double().reshape(-1, x.shape[-1])
    head = torch.stack([torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                        (x * x).sum(), ((x - recon) ** 2).sum()])
    return torch.cat([head, x.sum(0)]).cpu()


def explained_variance(sums: torch.Tensor) -> float:
    """``1 - sum |x - recon|^2 / sum |x - mean(x)|^2`` from :func:`variance_sums` (NaN without data)."""
    n, sq, sse, total = float(sums[0]), float(sums[1]), float(sums[2]), sums[3:]
    if n == 0:
        return math.nan
    var = sq - float((total * total).sum()) / n
    return 1.0 - sse / var if var > 0 else math.nan


# Short texts an SAE's explained variance is measured on before use (plain prose, a worked problem, code):
# enough to tell an SAE that fits the model's residual stream (EV near 1) from one that does not.
CHECK_TEXTS = (
    "The river wound through the valley, past farms and small villages, until it reached the sea.",
    "Tom has 12 apples and buys 7 more. 12 + 7 = 19. The answer is 19.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "In 1969, astronauts landed on the Moon for the first time, watched by millions on television.",
    "Question: What is 15% of 80? Answer: 0.15 * 80 = 12, so the answer is 12.",
    "She opened the letter slowly, read it twice, and then smiled for the first time that week.",
)
POOR_FIT = 0.5  # explained variance below this: the SAE does not describe this model's residual there


@torch.no_grad()
def explained_variance_on(sae, model: nn.Module, tokenizer, texts=CHECK_TEXTS) -> float:
    """The SAE's explained variance on the residual it reads, over ``texts`` (first token left out)."""
    from .models import capture_residuals

    layer = sae_layer(sae)
    sums = None
    device = next(model.parameters()).device
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        x = capture_residuals(model, ids, None, [layer])[layer][0, 1:]
        recon = sae.decode(sae.encode(x.to(sae.dtype)))
        part = variance_sums(x, recon)
        sums = part if sums is None else sums + part
    return explained_variance(sums)


def check_fit(sae, model: nn.Module, tokenizer, where: str, trained_here: bool = False) -> float:
    """Measure the SAE on the model before use; warn, naming the likely causes, when it fits poorly.

    ``trained_here``: this project trained the SAE on this model at this layer (its sidecar says so), which
    rules out the wrong layer, model or basis; a low fit on the generic check texts then only says that it
    was trained on a narrower distribution, so it is logged, not warned about. Attribution reports every
    SAE's fit on the trajectories at hand either way.
    """
    import logging

    ev = explained_variance_on(sae, model, tokenizer)
    sae.ipg_explained_variance = ev
    if ev >= POOR_FIT:
        return ev
    if trained_here:
        logging.getLogger(__name__).info(
            "SAE %s explains %.2f of the residual variance on generic check texts (prose, code, arithmetic): it was "
            "trained here on a narrower distribution; attribution reports its fit on your trajectories", where, ev)
        return ev
    meta = sae.cfg.metadata
    msg = (f"SAE {where} explains only {ev:.2f} of the residual variance of this model at layer {sae_layer(sae)} "
           f"on generic check texts (trained on {getattr(meta, 'model_name', None)!r}, hook "
           f"{getattr(meta, 'hook_name', None)!r}): likely the wrong layer, a different model or checkpoint, or a "
           "processed residual basis (or an SAE trained on a narrow domain: attribution reports its fit on your data)")
    warnings.warn(msg, stacklevel=2)
    logging.getLogger(__name__).warning(msg)
    return ev


# ---- active sets ------------------------------------------------------------------------


@torch.no_grad()
def encode_active(sae, x: torch.Tensor, max_active: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x [..., d_in]`` and return the active set ``(indices, values)`` of shape ``[..., K]``.

    ``K`` is the largest number of active latents at any position (``k`` for TopK); positions
    with fewer are padded with value 0 (index 0), which contributes nothing.
    """
    f = sae.encode(x.to(sae.dtype))
    n_active = int((f != 0).sum(-1).max()) if f.numel() else 0
    k = max(1, n_active if max_active is None else min(max_active, n_active))
    values, indices = f.topk(k, dim=-1)
    return indices, values


# ---- the runtime splice -----------------------------------------------------------------


@dataclass
class PositionScope:
    """Which positions get gates: all positions, or generated ones only.

    ``prompt_mask`` ([batch, prompt_len], 1 = real token, left padding allowed) marks padding
    and each row's first token, which are excluded when ``exclude_first`` (its residual norm
    is tens of times larger than elsewhere; sae-lens and sparsify exclude BOS the same way).
    ``mask`` ([batch, total_len]) overrides everything for teacher-forced passes.
    """

    scope: Scope = "all"
    prompt_len: int | None = None
    prompt_mask: torch.Tensor | None = None
    exclude_first: bool = True
    mask: torch.Tensor | None = None

    def positions(self, start: int, length: int, batch: int, device) -> torch.Tensor:
        """Boolean ``[batch, length]`` mask for absolute positions ``start .. start+length-1``."""
        pos = torch.arange(start, start + length, device=device)
        if self.mask is not None:
            return self.mask[:, start:start + length].to(device=device, dtype=torch.bool)
        keep = torch.ones(batch, length, dtype=torch.bool, device=device)
        prompt_len = self.prompt_len if self.prompt_len is not None else (
            self.prompt_mask.shape[1] if self.prompt_mask is not None else None)
        if self.scope == "generated":
            if prompt_len is None:
                raise IPGError("scope='generated' needs the prompt length (prompt_len or prompt_mask)")
            keep &= (pos >= prompt_len)[None, :]
        if self.prompt_mask is not None:
            pm = self.prompt_mask.to(device=device, dtype=torch.bool)
            in_prompt = pos < pm.shape[1]
            real = torch.ones_like(keep)
            real[:, in_prompt] = pm[:, pos[in_prompt]]
            keep &= real
            if self.exclude_first:
                first = pm.float().argmax(dim=1)  # index of each row's first real token
                keep &= pos[None, :] != first[:, None]
        elif self.exclude_first:
            keep &= (pos != 0)[None, :]
        return keep


LatentReader = Callable[[int, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def splice(
    model: nn.Module,
    saes: dict[int, nn.Module] | list,
    gates: dict[int, torch.Tensor] | None = None,
    scope: PositionScope | Scope = "all",
    read: LatentReader | None = None,
) -> Iterator[None]:
    """Install SAEs at their layers: ``x' = x + ((c - 1) * f) @ W_dec`` at positions in scope.

    ``gates`` maps layer -> ``[d_sae]`` (default all ones; may require grad). ``read(layer, f,
    in_scope)`` receives the dense latents ``f [batch, T, d_sae]`` of every forward call
    (prefill and each decoding step under ``generate``). Hooks are removed on exit, also when
    the body raises.
    """
    saes = as_layer_dict(saes)
    scope = scope if isinstance(scope, PositionScope) else PositionScope(scope=scope)
    blocks = decoder_layers(model)
    handles = []
    try:
        for layer, sae in saes.items():
            check_layer(model, layer, what="SAE layer")
            gate = None if gates is None else gates.get(layer)
            handles.append(blocks[layer].register_forward_hook(_SpliceHook(layer, sae, gate, scope, read)))
        yield
    finally:
        for h in handles:
            h.remove()


def as_layer_dict(saes) -> dict[int, nn.Module]:
    if isinstance(saes, dict):
        return dict(sorted(saes.items()))
    out = {}
    for sae in saes:
        layer = sae_layer(sae)
        if layer is None:
            raise IPGError("an SAE in the list does not say its layer; pass a dict {layer: sae}")
        out[layer] = sae
    return dict(sorted(out.items()))


class _SpliceHook:
    """Forward hook on one decoder block. Tracks absolute positions across decoding steps."""

    def __init__(self, layer, sae, gate, scope: PositionScope, read):
        self.layer, self.sae, self.gate, self.scope, self.read = layer, sae, gate, scope, read
        self.offset = 0
        self.calls = 0
        self.w_dec = decoder_matrix(sae)

    def __call__(self, _module, _inputs, output):
        x = block_hidden(output)
        batch, length = x.shape[:2]
        # A call with several positions is a new prefill or teacher-forced pass; single
        # positions continue a generation whose KV cache holds the earlier ones.
        if self.calls == 0 or length > 1:
            self.offset = 0
        start, self.offset, self.calls = self.offset, self.offset + length, self.calls + 1
        in_scope = self.scope.positions(start, length, batch, x.device)
        f = self.sae.encode(x.to(self.sae.dtype))
        if self.read is not None:
            self.read(self.layer, f.detach(), in_scope)
        if self.gate is None:
            return output
        scale = (self.gate.to(f.dtype) - 1.0) * f * in_scope[..., None].to(f.dtype)
        delta = scale @ self.w_dec.to(f.dtype)
        return replace_block_hidden(output, x + delta.to(x.dtype))


def gates_for(saes: dict[int, nn.Module], value: float = 1.0, device=None) -> dict[int, torch.Tensor]:
    """A gate vector per layer filled with ``value``."""
    return {layer: torch.full((sae.cfg.d_sae,), float(value), device=device or sae.W_dec.device,
                              dtype=sae.W_dec.dtype) for layer, sae in saes.items()}


def load_saes(specs: list[SAESpec], model, tokenizer=None) -> dict:
    """One SAE per layer; with ``tokenizer``, each is measured on the model first (``saes.check_fit``)."""
    saes = {}
    for spec in specs:
        sae = load_sae(spec, model, tokenizer=tokenizer)
        if sae.ipg_layer in saes:
            raise IPGError(f"two SAEs for layer {sae.ipg_layer}; give one SAE per layer")
        saes[sae.ipg_layer] = sae
    return saes
