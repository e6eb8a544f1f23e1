r"""Comparison sets (nulls): random latent sets that an evaluated set is measured against.

A null answers "would any set like this one do the same?", and "like this one" is what it
controls for. Every kind is one function with the same signature,
``draw(template, n, seed, pool) -> list of n sets``, registered in :data:`NULLS` under the name
a config uses; each set has the template's number of latents at each of its layers, never
contains a template latent, and is a pure function of ``(template, n, seed, pool)`` (so a
resumed run draws the same sets).

* ``uniform`` (:func:`uniform_sets`) — latents drawn uniformly among those active on the data
  (or all of a layer's latents when no activity is known). Controls for set size and layers.
* ``frequency`` (:func:`frequency_matched_sets`) — each latent drawn from the same layer and
  activation-frequency decile as one latent of the template. Controls for size, layers and how
  often the latents fire: a set of rare or dead latents trivially does nothing.

A new kind of null: a function with this signature, a name in :data:`NullKind` and
:data:`NULLS`, anything it matches on as a field of :class:`LatentPool`, and a test that the
drawn sets match the template on that measure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from .errors import IPGError

Selection = list[tuple[int, int]]
NullKind = Literal["uniform", "frequency"]


@dataclass
class LatentPool:
    """What a null draws from and matches on, per layer."""

    d_sae: dict[int, int]  # the SAE's width at each layer
    active: dict[int, Any] | None = None  # per-layer mask (or counts) of latents active on the data; > 0 = active
    frequencies: dict[int, np.ndarray] | None = None  # per-layer activation frequency of every latent

    @classmethod
    def of(cls, saes: dict, active: dict[int, Any] | None = None,
           frequencies: dict[int, np.ndarray] | None = None) -> "LatentPool":
        return cls({layer: int(sae.cfg.d_sae) for layer, sae in saes.items()}, active, frequencies)


def uniform_sets(template: Sequence[tuple[int, int]], n: int, seed: int, pool: LatentPool) -> list[Selection]:
    """``n`` sets with ``template``'s number of latents at each of its layers, drawn uniformly without
    replacement among the active latents (all latents when ``pool.active`` is None)."""
    per_layer = Counter(layer for layer, _ in template)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        draw: Selection = []
        for layer, count in sorted(per_layer.items()):
            candidates = _candidates(layer, pool, {i for l, i in template if l == layer})
            if len(candidates) < count:
                raise IPGError(f"layer {layer} has {len(candidates)} candidate latents for a random set but the target "
                               f"set has {count} there; lower k or give a wider `active` mask")
            draw += [(layer, int(i)) for i in sorted(rng.choice(candidates, size=count, replace=False))]
        out.append(draw)
    return out


def _candidates(layer: int, pool: LatentPool, exclude: set[int]) -> np.ndarray:
    if layer not in pool.d_sae:
        raise IPGError(f"the target set has latents at layer {layer} but no SAE was given for it")
    d_sae = pool.d_sae[layer]
    if pool.active is None:
        mask = np.ones(d_sae, dtype=bool)
    else:
        if layer not in pool.active:
            raise IPGError(f"`active` has no entry for layer {layer}; give a mask for every layer of the target set")
        mask = np.asarray(_to_numpy(pool.active[layer])).reshape(-1) > 0
        if mask.shape[0] != d_sae:
            raise IPGError(f"`active` for layer {layer} has {mask.shape[0]} entries but the SAE has {d_sae} latents")
    mask[list(exclude)] = False
    return np.flatnonzero(mask)


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def frequency_bins(freq: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Bin index of each latent by activation frequency: quantile bins over the active latents, -1 for dead ones."""
    freq = np.asarray(freq, dtype=float)
    bins = np.full(freq.shape, -1)
    active = freq > 0
    if not active.any():
        return bins
    edges = np.quantile(freq[active], np.linspace(0, 1, n_bins + 1)[1:-1])
    bins[active] = np.searchsorted(edges, freq[active], side="right")
    return bins


def frequency_matched_sets(template: Sequence[tuple[int, int]], n: int, seed: int, pool: LatentPool,
                           n_bins: int = 10) -> list[Selection]:
    """``n`` sets, each latent drawn from the same layer and activation-frequency bin as one latent of
    ``template`` (without replacement, never a template latent).

    Active latents are matched with active ones of the same frequency decile (the nearest deciles
    when one runs out); a latent of the set that never fires on the data is matched with one that
    never fires.
    """
    if pool.frequencies is None:
        raise IPGError("a frequency-matched null needs the latents' activation frequencies on the data")
    rng = np.random.default_rng(seed)
    bins = {layer: frequency_bins(f, n_bins) for layer, f in pool.frequencies.items()}
    chosen = {(layer, i) for layer, i in template}
    for layer, _ in template:
        if layer not in bins:
            raise IPGError(f"no activation frequencies for layer {layer}; the null needs them for every layer of the set")
    out = []
    for _ in range(n):
        taken: set[tuple[int, int]] = set()
        draw = []
        for layer, i in template:
            target = int(bins[layer][i])
            alive = bins[layer] >= 0 if target >= 0 else bins[layer] < 0
            candidates: np.ndarray = np.array([], dtype=int)
            for width in range(n_bins):  # widen to neighbouring bins only when the bin is exhausted
                near = np.abs(bins[layer] - target) <= width if target >= 0 else alive
                cand = np.flatnonzero(near & alive)
                candidates = np.array([c for c in cand if (layer, int(c)) not in chosen and (layer, int(c)) not in taken])
                if len(candidates):
                    break
            if not len(candidates):
                raise IPGError(f"layer {layer} has too few active latents to draw a random set of this size")
            pick = int(rng.choice(candidates))
            taken.add((layer, pick))
            draw.append((layer, pick))
        out.append(draw)
    return out


NULLS: dict[str, Callable[[Sequence[tuple[int, int]], int, int, LatentPool], list[Selection]]] = {
    "uniform": uniform_sets,
    "frequency": frequency_matched_sets,
}


def draw_sets(kind: NullKind, template: Sequence[tuple[int, int]], n: int, seed: int,
              pool: LatentPool) -> list[Selection]:
    """``n`` comparison sets of the given ``kind`` for ``template`` (see :data:`NULLS`)."""
    if kind not in NULLS:
        raise IPGError(f"unknown null {kind!r}; use one of {sorted(NULLS)}")
    return NULLS[kind](template, n, seed, pool)
