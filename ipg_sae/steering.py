r"""Steering with SAE latents: scale, clamp or add selected latents while the model runs.

Three interventions on the residual ``x_t`` after decoder block ``l`` (SAE at ``l``, latents
``f_t = enc(x_t)``, decoder rows ``W_dec[i]``), applied at every position in scope, in the
prefill and at every decoding step under ``generate``; the SAE error term is never touched:

* ``scale`` (the IPG control of ``docs/ipg-method.md`` §5, the splice with ``c_i = gamma``
  on the set ``P`` and 1 elsewhere): ``x_t' = x_t + (gamma - 1) * sum_{i in P} f_{t,i} W_dec[i]``.
  ``gamma = 1`` is the clean model exactly, ``gamma = 0`` ablates the latents.
* ``clamp`` (fix a latent's activation): ``x_t' = x_t + (value - f_{t,i}) W_dec[i]``.
* ``add`` (steering-vector style, no encoding needed): ``x_t' = x_t + coef * W_dec[i]``,
  optionally only from a position on.

A fourth kind needs no SAE: :class:`VectorIntervention` (:func:`add_vector`) adds ``coef * v``
for any residual direction ``v`` (a DiffMean vector, a user's steering vector) at the positions in
scope, at a layer with or without an SAE.

All of them go through one interface, ``steer(model, saes, [Intervention(layer, latent, kind,
value), ...])``, a context manager that always removes its hooks. Several layers are steered
at once; each layer encodes its (already steered-below) residual, as the splice does.

Positions. A pre-hook on the base model reads each call's ``attention_mask``: a call with
several positions starts a new pass (its mask is the prompt mask, left padding allowed), a
single-position call continues it under the KV cache. Which positions are steered is then
decided by :class:`ipg_sae.saes.PositionScope` (the splice's own position logic): padding
and, by default, each row's first real token (its residual norm is an outlier; the
attribution excludes it too) are never touched; ``scope="generated"`` steers generated
tokens only (this needs the KV cache, as :func:`ipg_sae.sampling.sample` uses: without it every
step is a new pass and counts as prompt). ``Intervention.start`` counts real tokens from each
row's first one, so it means the same thing in every row of a left-padded batch.

Cost. Only the selected latents' activations are computed when the SAE allows it: standard
and JumpReLU latents depend only on their own encoder column, so ``f_i`` costs ``d_in``
multiply-adds per latent (checked against the full ``encode`` when the hook is built).
TopK latents depend on all pre-activations (the top-k choice), so TopK SAEs are encoded in
full. The residual update touches only the selected rows of ``W_dec``.

Selections (:data:`Selection`, a list of ``(layer, latent)`` pairs) are plain data, not tied
to a task or a model: :func:`ipg_sae.selection.load_selection` reads them from a feature
table, a hand-written list or an attribution result, and :func:`check_selection` checks one
against a model and its SAEs before any compute (the transfer case: a set found on model A
applied to model B).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from .errors import IPGError
from .models import block_hidden, check_layer, decoder_layers, hidden_size, replace_block_hidden
from .saes import PositionScope, Scope, as_layer_dict, decoder_matrix

Kind = Literal["scale", "clamp", "add"]
KINDS: tuple[str, ...] = ("scale", "clamp", "add")
Selection = list[tuple[int, int]]  # (layer, latent) pairs


@dataclass(frozen=True)
class Intervention:
    """One latent's intervention. ``value`` is gamma (scale), the clamped activation (clamp) or the coefficient (add)."""

    layer: int
    latent: int
    kind: Kind = "scale"
    value: float = 1.0
    start: int = 0  # first real-token index (0 = each row's first prompt token) it applies from


@dataclass(frozen=True, eq=False)
class VectorIntervention:
    """Add ``coef * vector`` to the residual after block ``layer`` (no SAE involved): a steering vector such as
    DiffMean, or any direction a user brings. ``vector`` is ``[d_model]``; ``start`` as for :class:`Intervention`."""

    layer: int
    vector: torch.Tensor
    coef: float = 1.0
    start: int = 0


def add_vector(layer: int, vector, coef: float = 1.0, start: int = 0) -> VectorIntervention:
    """Add ``coef * vector`` at ``layer`` from real-token index ``start`` on."""
    return VectorIntervention(int(layer), torch.as_tensor(vector).detach().flatten(), float(coef), int(start))


def scale(selection: Iterable[tuple[int, int]], gamma: float) -> list[Intervention]:
    """Scale every latent of ``selection`` by ``gamma`` (IPG's control)."""
    return [Intervention(int(l), int(i), "scale", float(gamma)) for l, i in selection]


def scale_about(selection: Iterable[tuple[int, int]], gamma: float,
                origin: dict[tuple[int, int], float] | None = None) -> list[Intervention]:
    """Scale every latent of ``selection`` by ``gamma`` about its ``origin`` value (0 where not given):
    ``f' = b + gamma (f - b)``, i.e. :func:`scale` plus ``add`` of ``(1 - gamma) b W_dec[i]``. At ``gamma = 0``
    each latent is set to ``b`` (mean ablation when ``b`` is its mean): the removal IPG's path with
    ``attribution.path_origin`` measures."""
    selection = [(int(l), int(i)) for l, i in selection]
    out = scale(selection, gamma)
    for layer, latent in selection:
        b = float((origin or {}).get((layer, latent), 0.0))
        if b != 0.0 and gamma != 1.0:
            out.append(Intervention(layer, latent, "add", (1.0 - float(gamma)) * b))
    return out


def clamp(selection: Iterable[tuple[int, int]], value: float) -> list[Intervention]:
    """Clamp every latent of ``selection`` to ``value``."""
    return [Intervention(int(l), int(i), "clamp", float(value)) for l, i in selection]


def add(selection: Iterable[tuple[int, int]], coef: float, start: int = 0) -> list[Intervention]:
    """Add ``coef * W_dec[i]`` for every latent of ``selection`` from real-token index ``start`` on."""
    return [Intervention(int(l), int(i), "add", float(coef), int(start)) for l, i in selection]


# ---- checks ----------------------------------------------------------------------------


def check_selection(model: nn.Module, saes, selection: Iterable[tuple[int, int]] | Iterable[Intervention]) -> None:
    """Raise :class:`IPGError` unless every ``(layer, latent)`` can be steered on ``model`` with ``saes``.

    Catches what goes wrong when a set is moved to another model: an SAE whose ``d_in`` is not
    the model's hidden size, a layer the model does not have or no SAE reads, a latent index
    beyond the SAE's width.
    """
    saes = as_layer_dict(saes)
    d_model = hidden_size(model)
    for item in selection:
        if isinstance(item, VectorIntervention):
            check_layer(model, item.layer, what="steering vector layer")
            if item.vector.shape != (d_model,) or not bool(torch.isfinite(item.vector).all()):
                raise IPGError(f"the steering vector at layer {item.layer} has shape {tuple(item.vector.shape)}; it must "
                               f"be a finite [{d_model}] vector (the model's hidden size)")
            continue
        layer, latent = (item.layer, item.latent) if isinstance(item, Intervention) else item
        check_layer(model, int(layer), what="selected layer")
        if layer not in saes:
            raise IPGError(f"latent ({layer}, {latent}) is at layer {layer} but SAEs were given only for layers "
                           f"{sorted(saes)}; add an SAE for layer {layer}")
        if saes[layer].cfg.d_in != d_model:
            raise IPGError(f"the SAE at layer {layer} has d_in {saes[layer].cfg.d_in} but the model's hidden size is "
                           f"{d_model}: a set transfers only between models of the same width; use SAEs for this model")
        d_sae = saes[layer].cfg.d_sae
        if not 0 <= int(latent) < d_sae:
            raise IPGError(f"latent ({layer}, {latent}) is out of range: the SAE at layer {layer} has {d_sae} latents "
                           f"(0..{d_sae - 1}); was the set selected with a wider SAE?")


def _check_interventions(interventions: Sequence[Intervention]) -> None:
    seen: dict[tuple[int, int], str] = {}
    for iv in interventions:
        if isinstance(iv, VectorIntervention):
            continue
        if iv.kind not in KINDS:
            raise IPGError(f"intervention kind {iv.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if iv.kind == "add":
            continue  # an added direction composes with anything
        key = (iv.layer, iv.latent)
        if key in seen:
            raise IPGError(f"latent {key} has two interventions ({seen[key]} and {iv.kind}); give each latent at "
                           "most one scale or clamp")
        seen[key] = iv.kind


# ---- positions ---------------------------------------------------------------------------


def steered_positions(scope: str, exclude_first: bool, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Which tokens of a prompt segment a scope steers, from their real-token ``positions`` and which are ``real``
    (not padding): none under ``generated``; under ``all`` every real token but, with ``exclude_first``, each
    sequence's first. (Generated tokens are steered under both: pass ``all`` for them.)"""
    if scope == "generated":
        return torch.zeros_like(real, dtype=torch.bool)
    keep = real.bool().clone()
    if exclude_first:
        keep &= positions != 0
    return keep


class _Positions:
    """Which positions of the current forward call are steered, shared by all layer hooks.

    Updated by a forward pre-hook on the base model, which sees each call's 2-D
    ``attention_mask`` (the decoder blocks only see 4-D masks).
    """

    def __init__(self, scope: PositionScope | Scope, exclude_first: bool):
        self.fixed = scope if isinstance(scope, PositionScope) else None
        self.kind = scope if isinstance(scope, str) else "all"
        self.exclude_first = exclude_first
        self.offset, self.calls = 0, 0
        self.scope: PositionScope | None = None
        self.first: torch.Tensor | None = None  # each row's first real position
        self.keep: torch.Tensor | None = None  # [batch, length] bool
        self.index: torch.Tensor | None = None  # [batch, length] real-token index
        self.given: tuple[torch.Tensor, torch.Tensor] | None = None  # set by the caller for its next call

    def next_call(self, keep: torch.Tensor, index: torch.Tensor) -> None:
        """Say which positions the next forward call steers (``keep [batch, length]``) and their
        real-token index: for callers that feed a sequence in segments over a KV cache, where a
        call's own attention mask cannot say where in the sequence it starts."""
        self.given = (keep.bool(), index.long())

    def pre_hook(self, _module, args, kwargs):
        if self.given is not None:
            (self.keep, self.index), self.given = self.given, None
            self.calls += 1
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        batch, length = ref.shape[:2]
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        # Several positions = a new prefill or teacher-forced pass; one = the next decoding step.
        if self.calls == 0 or length > 1:
            self.offset = 0
            prompt_mask = mask if mask is not None and mask.shape[1] == length else None
            self.scope = self.fixed or PositionScope(scope=self.kind, prompt_len=length, prompt_mask=prompt_mask,
                                                     exclude_first=self.exclude_first)
            self.first = (prompt_mask.float().argmax(dim=1) if prompt_mask is not None
                          else torch.zeros(batch, dtype=torch.long, device=ref.device))
        start = self.offset
        self.offset, self.calls = start + length, self.calls + 1
        self.keep = self.scope.positions(start, length, batch, ref.device)
        pos = torch.arange(start, start + length, device=ref.device)
        self.index = pos[None, :] - self.first.to(ref.device)[:, None]
        return None

    def prompt_keep(self, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Which prompt tokens this scope steers, given their real-token ``positions`` and which are ``real`` (not
        padding): for callers that feed prompts in segments through :meth:`next_call`."""
        if self.fixed is not None:
            raise IPGError("a fixed PositionScope names absolute positions of one pass; a sampler that feeds "
                           "prompts in segments needs scope 'all' or 'generated'")
        return steered_positions(self.kind, self.exclude_first, positions, real)

    def current(self, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep is None or self.keep.shape != (batch, length):
            raise IPGError("steering hooks saw a forward call that did not go through the model's base module; "
                           "call the model (or model.generate) itself inside steer()")
        return self.keep.to(device), self.index.to(device)


def _base_module(model: nn.Module) -> nn.Module:
    """The module that receives ``input_ids``/``attention_mask`` and calls the decoder blocks."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


# ---- encoding only what is needed --------------------------------------------------------


class _LatentEncoder:
    """``f[..., latents]`` of an SAE: from the latents' own encoder columns when exact, else a full encode."""

    def __init__(self, sae, latents: list[int]):
        self.sae = sae
        self.latents = torch.tensor(latents, dtype=torch.long, device=sae.W_dec.device)
        self.partial = False
        if _elementwise(sae):
            self.w_enc = sae.W_enc[:, self.latents].detach()
            self.b_enc = sae.b_enc[self.latents].detach()
            self.threshold = sae.threshold[self.latents].detach() if hasattr(sae, "threshold") else None
            self.partial = self._matches_full_encode()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.partial:
            return self.sae.encode(x.to(self.sae.dtype))[..., self.latents]
        sae_in = self.sae.process_sae_in(x)
        pre = sae_in @ self.w_enc + self.b_enc
        f = self.sae.activation_fn(pre)
        if self.threshold is not None:
            f = f * (pre > self.threshold).to(f.dtype)
        return f

    @torch.no_grad()
    def _matches_full_encode(self) -> bool:
        # Guards the partial path against SAE variants that only look elementwise.
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, self.sae.cfg.d_in, generator=gen) * torch.logspace(-1, 1, 8)[:, None]
        x = x.to(self.sae.W_dec)
        self.partial = True
        try:
            ok = torch.allclose(self(x), self.sae.encode(x)[..., self.latents], rtol=1e-4, atol=1e-5)
        except Exception:
            ok = False
        return ok


def _elementwise(sae) -> bool:
    """True for SAEs whose latent i depends only on encoder column i (standard, JumpReLU)."""
    from sae_lens import JumpReLUSAE, StandardSAE

    return type(sae) in (StandardSAE, JumpReLUSAE) and getattr(sae.cfg, "architecture", lambda: "")() in (
        "standard", "jumprelu")


# ---- the hooks -----------------------------------------------------------------------------


class _SteerHook:
    """Forward hook on one decoder block applying that layer's interventions."""

    def __init__(self, sae, interventions: list, positions: _Positions):
        self.positions = positions
        vectors = [iv for iv in interventions if isinstance(iv, VectorIntervention)]
        self.vectors = [(iv.vector, iv.coef, iv.start) for iv in vectors]
        interventions = [iv for iv in interventions if not isinstance(iv, VectorIntervention)]
        self.has_latents = bool(interventions)
        if not self.has_latents:
            return
        device = sae.W_dec.device
        latents = [iv.latent for iv in interventions]
        kinds = [iv.kind for iv in interventions]
        self.w_rows = decoder_matrix(sae)[torch.tensor(latents, device=device)].detach()  # [n, d_in]
        self.value = torch.tensor([iv.value for iv in interventions], dtype=self.w_rows.dtype, device=device)
        self.start = torch.tensor([iv.start for iv in interventions], device=device)
        self.is_scale = torch.tensor([k == "scale" for k in kinds], device=device)
        self.is_clamp = torch.tensor([k == "clamp" for k in kinds], device=device)
        # Columns that need the latent's activation, and an encoder for just those latents.
        self.encoded = [j for j, k in enumerate(kinds) if k != "add"]
        self.encoder = _LatentEncoder(sae, [latents[j] for j in self.encoded]) if self.encoded else None

    def __call__(self, _module, _inputs, output):
        x = block_hidden(output)
        batch, length = x.shape[:2]
        keep, index = self.positions.current(batch, length, x.device)
        for vector, coef, start in self.vectors:  # (x itself is kept for the latents' encoding below)
            applies = (keep & (index >= start)).to(x.dtype)[..., None]
            output = replace_block_hidden(output, block_hidden(output) + coef * applies * vector.to(x))
        if not self.has_latents:
            return output
        dtype = self.w_rows.dtype
        f = torch.zeros(batch, length, len(self.value), dtype=dtype, device=x.device)
        if self.encoder is not None:
            f[..., self.encoded] = self.encoder(x).to(dtype)
        coef = torch.where(self.is_scale, (self.value - 1.0) * f,
                           torch.where(self.is_clamp, self.value - f, self.value.expand_as(f)))
        applies = keep[..., None] & (index[..., None] >= self.start)
        delta = (coef * applies.to(dtype)) @ self.w_rows
        return replace_block_hidden(output, block_hidden(output) + delta.to(x.dtype))


@contextlib.contextmanager
def steer(model: nn.Module, saes, interventions: Sequence[Intervention], scope: PositionScope | Scope = "all",
          exclude_first: bool = True) -> Iterator[None]:
    """Apply ``interventions`` to every forward call of ``model`` inside the block (prefill and decoding).

    Args:
        model: the causal LM to steer (its decoder blocks get forward hooks).
        saes: ``{layer: SAE}`` (or a list of SAEs that know their layer); only layers with
            interventions get hooks.
        interventions: from :func:`scale`, :func:`clamp` or :func:`add` (checked against the
            model and SAEs before anything is installed).
        scope: ``"all"``, ``"generated"`` or an explicit :class:`~ipg_sae.saes.PositionScope`
            (e.g. a teacher-forced ``mask``).
        exclude_first: leave each row's first real token alone (its residual is an outlier).

    Returns:
        A context manager; hooks are removed on exit, also when the body raises. It yields a
        handle whose ``next_call(keep, index)`` fixes the steered positions of the next forward
        call, for callers that feed a sequence in segments over a KV cache.
    """
    interventions = list(interventions)
    saes = as_layer_dict(saes)
    _check_interventions(interventions)
    check_selection(model, saes, interventions)
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)
    positions = _Positions(scope, exclude_first)
    blocks = decoder_layers(model)
    handles = []
    try:
        handles.append(_base_module(model).register_forward_pre_hook(positions.pre_hook, with_kwargs=True))
        for layer, ivs in sorted(by_layer.items()):
            handles.append(blocks[layer].register_forward_hook(_SteerHook(saes.get(layer), ivs, positions)))
        yield positions
    finally:
        for h in handles:
            h.remove()


def steering(model: nn.Module, saes, interventions: Sequence[Intervention], scope: PositionScope | Scope = "all",
             exclude_first: bool = True) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable entering :func:`steer`: ``sample(..., intervention=steering(...))``."""
    return functools.partial(steer, model, saes, list(interventions), scope=scope, exclude_first=exclude_first)


@torch.no_grad()
def generate(model: nn.Module, saes, interventions: Sequence[Intervention], scope: PositionScope | Scope = "all",
             exclude_first: bool = True, **generate_kwargs) -> Any:
    """``model.generate(**generate_kwargs)`` with ``interventions`` applied at every step."""
    with steer(model, saes, interventions, scope=scope, exclude_first=exclude_first):
        return model.generate(**generate_kwargs)


# ---- selections --------------------------------------------------------------------------


def _whole(value) -> int:
    """``value`` as an int when it is one exactly (``5``, ``"5"``, ``5.0``); ValueError for ``5.7``, ``True``, ``"x"``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    return operator.index(value)


def as_selection(pairs: Iterable, where: str = "selection") -> Selection:
    """Normalize ``[(layer, latent)]``, ``[[l, i]]``, ``[{"layer": l, "latent": i}]`` or ``["l:i"]`` to a Selection."""
    out: Selection = []
    for n, item in enumerate(pairs):
        try:
            if isinstance(item, dict):
                pair = (item["layer"], item["latent"])
            elif isinstance(item, str):
                parts = re.split(r"[:,/\s]+", item.strip())
                if len(parts) != 2:
                    raise ValueError
                pair = tuple(parts)
            else:
                pair = tuple(item)
                if len(pair) != 2:
                    raise ValueError
            layer, latent = (_whole(v) for v in pair)
        except (KeyError, TypeError, ValueError):
            raise IPGError(f"{where}: entry {n} ({item!r}) is not a (layer, latent) pair of whole numbers; write it as "
                           "[layer, latent] or 'layer:latent'") from None
        out.append((layer, latent))
    if len(set(out)) != len(out):
        raise IPGError(f"{where} lists a (layer, latent) pair twice; remove the duplicate")
    return out
