r"""The attribution result format: :class:`AttributionResult`, its files, and its tensor key scheme.

This module is the only one that knows how tensors are named (``L{layer}.{name}``,
``prompt.{name}``, ``traj.{name}``, ``map.{i}.{name}``): everything else builds and reads
them through :func:`layer_key`, :func:`prompt_key`, :func:`traj_key`, :func:`map_key` and the
accessors of :class:`AttributionResult`.

On disk a result is two files in its run directory, written atomically:
``attribution.safetensors`` (exactly the tensors below) and ``attribution.json`` (method,
layers, widths, prompt and trajectory ids, the config, the model fingerprint, the SAEs, the
summary).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..digest import tensors_digest
from ..errors import IPGError
from .config import GRADIENT_METHODS

RESULT_FILE = "attribution.safetensors"
SIDECAR_FILE = "attribution.json"
FORMAT = "ipg-sae/attribution/2"  # 2: content digest, per-prompt node counts and gaps, traj.prompt

# Per-prompt tensors of one layer ([N, d_sae]) and per-trajectory scalars of one layer ([M]).
LAYER_PROMPT_FIELDS = ("attribution", "active", "activation", "variance")
LAYER_TRAJ_FIELDS = ("traj.sum", "traj.error")
CSR_FIELDS = ("traj.indptr", "traj.indices", "traj.values")  # per-trajectory rows, sparse
CONTEXT_FIELDS = ("value", "traj", "pos")
_LAYER_KEY = re.compile(r"^L(-?\d+)\.(.+)$")


def layer_key(layer: int, name: str) -> str:
    return f"L{layer}.{name}"


def split_layer_key(key: str) -> tuple[int, str] | None:
    """``(layer, name)`` of a per-layer key, None for any other key."""
    m = _LAYER_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def prompt_key(name: str) -> str:
    return f"prompt.{name}"


def traj_key(name: str) -> str:
    return f"traj.{name}"


def map_key(i: int, name: str) -> str:
    return f"map.{i}.{name}"


def context_key(layer: int, name: str) -> str:
    return layer_key(layer, f"ctx.{name}")


def reason_key(layer: int, name: str) -> str:
    return layer_key(layer, f"rw.{name}")


def is_per_prompt(key: str) -> bool:
    """Whether a key holds one row per prompt (as opposed to one per trajectory, or global)."""
    if key.startswith("prompt."):
        return True
    parts = split_layer_key(key)
    return parts is not None and parts[1] in LAYER_PROMPT_FIELDS


def is_per_trajectory(key: str) -> bool:
    if key.startswith("traj."):
        return True
    parts = split_layer_key(key)
    return parts is not None and parts[1] in LAYER_TRAJ_FIELDS


@dataclass
class AttributionResult:
    """Attributions of one method over a set of prompts, with everything selection needs.

    Tensors live in ``tensors`` under flat names (the safetensors file holds exactly these):

    * per prompt (``N`` rows, in ``prompt_ids`` order): ``L{l}.attribution [N, d_sae]`` float32
      (``IPG_i(x_n) = (1/G) sum_k w_k dF/dc_i``; for ``act`` the per-prompt mean activation; absent
      for ``reason_words`` and ``random``, which have no per-prompt decomposition),
      ``L{l}.active [N, d_sae]`` bool (active at some in-scope position), ``L{l}.activation
      [N, d_sae]`` float32 (mean activation over the prompt's in-scope positions),
      ``prompt.n_scope``, ``prompt.skipped`` (zero advantage: no node pass ran),
      ``prompt.n_nodes`` (node evaluations spent), ``prompt.delta`` (the largest relative
      completeness gap of its trajectories), ``prompt.budget_hit`` (adaptive mode: the finest
      rule did not reach ``delta_tol``);
    * per trajectory (``M`` rows, in ``traj_ids`` order): ``traj.prompt`` (row of its prompt),
      ``traj.logp1``, ``traj.logp0`` (``log pi(tau)`` at ``c = 1`` and ``c = 0``),
      ``traj.advantage``, ``traj.n_generated``, ``traj.n_tokens``, ``L{l}.traj.sum`` (sum of its
      latent attributions at layer ``l``), ``L{l}.traj.error`` (its error-node attribution, zero
      without ``error_node``) and its attribution row as CSR (``L{l}.traj.indptr``,
      ``.indices``, ``.values``);
    * per prompt and layer: ``L{l}.variance [N, 3 + d_in]`` (explained-variance sums of the SAE over
      the prompt's in-scope positions: ``[n, sum |x|^2, sum |x - recon|^2, sum x]``, see
      :attr:`explained_variance`);
    * per latent: ``L{l}.score [d_sae]`` float64, the method's natural ranking score (the mean
      over prompts for gradient methods, mean activation for ``act``, ReasonScore, or the random
      draw), and the top activating contexts ``L{l}.ctx.value|traj|pos [d_sae, m]`` (value -1
      and index -1 where a latent has fewer than ``m`` activations);
    * with a path origin other than zero (``attribution.path_origin``): ``L{l}.origin [d_sae]``
      float64, where each latent's path started (:attr:`origin`);
    * per-token maps for the trajectories in ``meta["token_map_ids"]``: ``map.{i}.tokens [T]``,
      ``map.{i}.L{l}.latents [T, K]`` (the active latents at each position),
      ``map.{i}.L{l}.activation [T, K]`` (their activations, zero out of scope) and
      ``map.{i}.L{l}.attribution [T, K]`` (their IPG contributions at that position).
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

    def layer(self, layer: int, name: str) -> torch.Tensor:
        """The tensor ``name`` of ``layer`` (e.g. ``attribution``, ``active``, ``score``)."""
        return self.tensors[layer_key(layer, name)]

    def _per_layer(self, name: str) -> dict[int, torch.Tensor]:
        return {layer: self.layer(layer, name) for layer in self.layers}

    @property
    def attributions(self) -> dict[int, torch.Tensor] | None:
        """Per-prompt values ``[N, d_sae]`` per layer, or None for methods without them."""
        if layer_key(self.layers[0], "attribution") not in self.tensors:
            return None
        return self._per_layer("attribution")

    @property
    def score(self) -> dict[int, torch.Tensor]:
        return self._per_layer("score")

    @property
    def origin(self) -> dict[int, torch.Tensor]:
        """Per layer, where the path started ``[d_sae]`` (zeros when it started at zero)."""
        return {layer: self.tensors.get(layer_key(layer, "origin"), torch.zeros(self.d_sae[layer], dtype=torch.float64))
                for layer in self.layers}

    @property
    def active(self) -> dict[int, torch.Tensor]:
        return self._per_layer("active")

    @property
    def activation(self) -> dict[int, torch.Tensor]:
        return self._per_layer("activation")

    @property
    def contexts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return {layer: tuple(self.tensors[context_key(layer, n)] for n in CONTEXT_FIELDS) for layer in self.layers}

    @property
    def explained_variance(self) -> dict[int, float]:
        """How much of the residual variance each layer's SAE explains on the attributed trajectories."""
        from ..saes import explained_variance

        return {layer: explained_variance(self.tensors[layer_key(layer, "variance")].sum(0)) for layer in self.layers
                if layer_key(layer, "variance") in self.tensors}

    def reason_sums(self, layer: int) -> dict[str, torch.Tensor]:
        """The ``reason_words`` baseline's accumulators of one layer, by name."""
        prefix = reason_key(layer, "")
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def prompt(self, name: str) -> torch.Tensor:
        """A per-prompt tensor: ``n_scope``, ``skipped``, ``n_nodes``, ``delta`` or ``budget_hit``."""
        return self.tensors[prompt_key(name)]

    def traj(self, name: str) -> torch.Tensor:
        """A per-trajectory tensor: ``prompt``, ``logp1``, ``logp0``, ``advantage``, ``n_generated``, ``n_tokens``."""
        return self.tensors[traj_key(name)]

    @property
    def error(self) -> dict[int, torch.Tensor] | None:
        """Per-trajectory error-node attribution per layer (None unless ``error_node``)."""
        if not self.meta.get("config", {}).get("error_node"):
            return None
        return self._per_layer("traj.error")

    @property
    def expected(self) -> torch.Tensor:
        """``A * (log pi(tau; 1) - log pi(tau; 0))`` per trajectory: what completeness says the sum is."""
        return self.traj("advantage") * (self.traj("logp1") - self.traj("logp0"))

    @property
    def total(self) -> torch.Tensor:
        """Per trajectory, the sum of its attributions over all layers (plus the error nodes)."""
        total = sum(self.layer(layer, "traj.sum") for layer in self.layers)
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

    def trajectory_entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The non-zero per-trajectory attributions of one layer: ``(trajectory, latent, value)``, each ``[nnz]``."""
        indptr = self.layer(layer, "traj.indptr")
        owner = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr.diff())
        return owner, self.layer(layer, "traj.indices"), self.layer(layer, "traj.values")

    def per_trajectory(self, layer: int) -> torch.Tensor:
        """Dense per-trajectory attributions ``[M, d_sae]`` (float32) of one layer."""
        owner, latent, value = self.trajectory_entries(layer)
        out = torch.zeros(len(self.traj_ids), self.d_sae[layer], dtype=torch.float32)
        out[owner, latent] = value
        return out

    @property
    def token_maps(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for i, tid in enumerate(self.meta.get("token_map_ids", [])):
            prefix = map_key(i, "")
            out[tid] = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return out

    # -- files ---------------------------------------------------------------------------

    def save(self, run_dir: str | Path) -> Path:
        """Write ``attribution.safetensors`` and ``attribution.json`` into ``run_dir`` (atomically)."""
        from safetensors.torch import save_file

        from ..io import atomic_path, write_json

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        digest = tensors_digest(tensors)
        with atomic_path(run_dir / RESULT_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "method": self.method_name, "sha256": digest})
        write_json(run_dir / SIDECAR_FILE, {
            "format": FORMAT, "method": self.method_name, "layers": self.layers,
            "d_sae": {str(k): v for k, v in self.d_sae.items()}, **self.meta,
            "prompt_ids": self.prompt_ids, "trajectory_ids": self.traj_ids, "tensors_sha256": digest,
        })
        return run_dir / RESULT_FILE

    @classmethod
    def load(cls, run_dir: str | Path) -> "AttributionResult":
        """Read a result written by :meth:`save` (``run_dir`` or its ``attribution.safetensors``)."""
        from safetensors.torch import load_file

        from ..io import read_json

        run_dir = Path(run_dir)
        if run_dir.name == RESULT_FILE:
            run_dir = run_dir.parent
        st, js = run_dir / RESULT_FILE, run_dir / SIDECAR_FILE
        if not st.is_file() or not js.is_file():
            raise IPGError(f"no attribution result in {run_dir} (needs {RESULT_FILE} and {SIDECAR_FILE}); "
                           "run `ipg-sae attribute` first or fix the path")
        try:
            meta = read_json(js)
        except (ValueError, UnicodeDecodeError) as e:
            raise IPGError(f"{js} is corrupt ({type(e).__name__}); rerun `ipg-sae attribute` to rewrite it") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise IPGError(f"{js} is not an attribution result of this ipg-sae version (format {found!r}, expected "
                           f"{FORMAT!r}); rerun `ipg-sae attribute`")
        try:
            tensors = load_file(str(st))
        except Exception as e:  # safetensors raises its own error type for a cut or garbled file
            raise IPGError(f"{st} is unreadable ({type(e).__name__}: {str(e)[:80]}); rerun `ipg-sae attribute` to "
                           "rewrite it") from None
        if tensors_digest(tensors) != meta.get("tensors_sha256"):
            raise IPGError(f"{st} does not match the digest recorded in {js.name}: the file was changed or damaged "
                           "after it was written; rerun `ipg-sae attribute` to rewrite it")
        meta = dict(meta)
        meta.pop("tensors_sha256", None)
        method, layers, d_sae, prompt_ids, traj_ids = _check_sidecar(meta, tensors, js)
        for key in ("method", "layers", "d_sae", "prompt_ids", "trajectory_ids", "format"):
            meta.pop(key, None)
        return cls(method, layers, d_sae, prompt_ids, traj_ids, tensors, meta)


def _check_sidecar(meta: dict, tensors: dict, js: Path) -> tuple:
    """The sidecar's structural fields, checked once on read against the format (one line naming the field)."""
    def bad(name: str, want: str) -> IPGError:
        return IPGError(f"{js}: `{name}` must be {want}, found {meta.get(name)!r:.60}; the file was edited or "
                        "damaged: rerun `ipg-sae attribute` to rewrite it")

    def ints(values) -> list[int] | None:
        try:
            return [int(v) for v in values] if isinstance(values, list) else None
        except (TypeError, ValueError):
            return None

    if not isinstance(meta.get("method"), str) or not meta["method"]:
        raise bad("method", "the attribution method's name")
    layers = ints(meta.get("layers"))
    if not layers:
        raise bad("layers", "a non-empty list of layer numbers")
    d_sae_raw = meta.get("d_sae")
    if not isinstance(d_sae_raw, dict) or ints(list(d_sae_raw)) is None or ints(list(d_sae_raw.values())) is None:
        raise bad("d_sae", "a mapping of layer to SAE width")
    d_sae = {int(k): int(v) for k, v in d_sae_raw.items()}
    for name in ("prompt_ids", "trajectory_ids"):
        values = meta.get(name)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad(name, "a list of ids")
    for name, n_rows, is_row in (("prompt_ids", len(meta["prompt_ids"]), is_per_prompt),
                                 ("trajectory_ids", len(meta["trajectory_ids"]), is_per_trajectory)):
        if len(set(meta[name])) != n_rows:
            raise bad(name, "a list of distinct ids")
        for key, tensor in tensors.items():
            rows = tensor.shape[0] if tensor.dim() else None
            if key.endswith(".traj.indptr"):
                rows = rows - 1 if name == "trajectory_ids" else None
            elif not is_row(key):
                continue
            if rows is not None and rows != n_rows:
                raise bad(name, f"one id per row of {RESULT_FILE} ({key} has {rows} rows, the list {n_rows} ids)")
    for name, kind, want in (("model", dict, "an object (the model's fingerprint)"),
                             ("config", dict, "an object (the attribution settings)"),
                             ("summary", dict, "an object of summary numbers"),
                             ("saes", list, "a list of objects, one per SAE layer"),
                             ("token_map_ids", list, "a list of trajectory ids")):
        if name in meta and not isinstance(meta[name], kind):
            raise bad(name, want)
    if not all(isinstance(s, dict) and isinstance(s.get("layer"), int) for s in meta.get("saes", [])):
        raise bad("saes", "a list of objects, one per SAE layer, each with its `layer`")
    if not all(isinstance(t, str) for t in meta.get("token_map_ids", [])):
        raise bad("token_map_ids", "a list of trajectory ids")
    for layer in layers:
        if layer not in d_sae:
            raise bad("d_sae", f"a width for every layer (layer {layer} has none)")
        if not any(k.startswith(f"L{layer}.") for k in tensors):
            raise IPGError(f"{js} names layer {layer} but {RESULT_FILE} holds no tensors for it; rerun `ipg-sae "
                           "attribute` to rewrite both")
    return meta["method"], layers, d_sae, meta["prompt_ids"], meta["trajectory_ids"]
