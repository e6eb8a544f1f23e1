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
* ``push`` (:func:`push_matched_sets`) — each latent drawn from its ten nearest neighbours (same
  layer) in *push*: the mean over the held-out completion tokens of ``|f_i| * ||W_dec[i]||``,
  how far switching the latent off moves the residual stream where the policy acts (0 where it
  does not fire). Controls for size, layers and how hard the set pushes the policy, which
  frequency does not: frequency is counted mostly on prompt tokens and ignores activation size
  and decoder norm. A set that beats this null moved the outcome by *which* direction it
  pushed, not by how far. (The study reports the realised push of every cell, mean ``|log
  pi'/pi|`` and ESS, beside the evaluated set's, so the match can be checked where it counts.)
* ``policy`` (:func:`policy_matched_sets`) — matched on *first-order policy change*, latent by
  latent and as a set. With ``g_i(tau) = d log pi(tau) / d gamma_i`` on the held-out samples
  (:func:`ipg_sae.faithfulness.policy_change`; removing latent ``i`` moves ``log pi(tau)`` by
  ``-g_i(tau)`` to first order), each latent is drawn from the ten nearest neighbours (same layer)
  of one template latent in ``mean_tau |g_i(tau)|``, and the set is then moved, one latent swap
  at a time among those neighbours, until its own change ``mean_tau |sum_{i in S} g_i(tau)|``
  is within ``tolerance`` (5%) of the template's. Latent by latent is not enough: a
  gradient-ranked set picks latents that move each sample's log-probability the same way, so
  their changes add, where random latents' partly cancel (on the default model, policy-matched
  sets matched latent by latent moved the samples 1.3-1.6 per sample against IPG's 2.4). Push
  counts the residual stream; this counts what the policy does with it. A set that beats this
  null moved the outcome by the direction of its change of the policy, not by its size.

Not a random draw, so not in :data:`NULLS`: the reward-permutation null
(:func:`ipg_sae.selection.permuted_rankings`), IPG's own selection rerun with each prompt's
rewards shuffled. It controls for everything the selection does except the reward.

A new kind of null: a function with this signature and its name in :data:`NULLS` (the one list of
kinds: ``eval.null`` is checked against it on load), anything it matches on as a field of
:class:`LatentPool`, and a test that the drawn sets match the template on that measure.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import IPGError

log = logging.getLogger(__name__)

Selection = list[tuple[int, int]]
NullKind = str  # a key of NULLS (below), the one list of kinds


@dataclass
class LatentPool:
    """What a null draws from and matches on, per layer."""

    d_sae: dict[int, int]  # the SAE's width at each layer
    active: dict[int, Any] | None = None  # per-layer mask (or counts) of latents active on the data; > 0 = active
    frequencies: dict[int, np.ndarray] | None = None  # per-layer activation frequency of every latent
    push: dict[int, np.ndarray] | None = None  # per-layer mean |f_i| * ||W_dec[i]|| on completion tokens
    policy: dict[int, np.ndarray] | None = None  # per-layer first-order |log pi'/pi| of removing each latent alone
    # per-layer signed d log pi(tau) / d gamma_i, [n_samples, d_sae]: a set's first-order change is its columns' sum
    policy_per_sample: dict[int, np.ndarray] | None = None

    def __post_init__(self):
        if self.policy is None and self.policy_per_sample is not None:
            self.policy = {layer: np.abs(g).mean(0) for layer, g in self.policy_per_sample.items()}

    @classmethod
    def of(cls, saes: dict, active: dict[int, Any] | None = None, frequencies: dict[int, np.ndarray] | None = None,
           push: dict[int, np.ndarray] | None = None, policy: dict[int, np.ndarray] | None = None,
           policy_per_sample: dict[int, np.ndarray] | None = None) -> "LatentPool":
        return cls({layer: int(sae.cfg.d_sae) for layer, sae in saes.items()}, active, frequencies, push, policy,
                   policy_per_sample)


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
    """Bin index of each latent by a non-negative measure (activation frequency, push): quantile bins over the
    latents where it is positive, -1 where it is zero."""
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
    _check_layers(template, pool.frequencies, "activation frequencies")
    bins = {layer: frequency_bins(f, n_bins) for layer, f in pool.frequencies.items()}

    def candidates(layer: int, i: int, excluded: set) -> np.ndarray:
        target = int(bins[layer][i])
        alive = bins[layer] >= 0 if target >= 0 else bins[layer] < 0
        found = np.array([], dtype=int)
        for width in range(n_bins):  # widen to neighbouring bins only when the bin is exhausted
            near = np.abs(bins[layer] - target) <= width if target >= 0 else alive
            found = np.array([c for c in np.flatnonzero(near & alive) if (layer, int(c)) not in excluded], dtype=int)
            if len(found):
                break
        return found

    return _latent_by_latent(template, n, seed, candidates)


def push_matched_sets(template: Sequence[tuple[int, int]], n: int, seed: int, pool: LatentPool,
                      n_near: int = 10) -> list[Selection]:
    """``n`` sets, each latent drawn from the ``n_near`` latents of the same layer nearest in push (mean
    ``|f_i| * ||W_dec[i]||`` over the held-out completion tokens) to one latent of ``template``, never a template
    latent or one already drawn; latents that never fire there are matched with latents that never fire there.

    Nearest neighbours rather than quantile bins: pushes are heavy-tailed, and a gradient-ranked set
    sits in the tail, where one bin spans a factor of ten.
    """
    if pool.push is None:
        raise IPGError("a push-matched null needs each latent's push on the held-out completions (LatentPool.push)")
    return _nearest_matched(template, n, seed, pool.push, "push values", n_near)


def policy_matched_sets(template: Sequence[tuple[int, int]], n: int, seed: int, pool: LatentPool,
                        n_near: int = 10, tolerance: float = 0.05, max_swaps: int = 20000) -> list[Selection]:
    """``n`` sets, each latent drawn from the ``n_near`` latents of the same layer nearest in first-order policy
    change (the mean over the held-out samples of ``|d log pi(tau) / d gamma_i|``,
    :func:`ipg_sae.faithfulness.policy_change`) to one latent of ``template``, as :func:`push_matched_sets`; then,
    when ``pool.policy_per_sample`` is known, each set's own first-order change (:func:`set_policy_change`) is
    brought within ``tolerance`` of the template's by swapping one latent at a time for another of the same
    template latent's neighbours, keeping a swap when it moves the set's change closer (at most ``max_swaps``
    tries per set; a set still outside then is kept with a warning naming how far it is).
    """
    if pool.policy is None:
        raise IPGError("a policy-change-matched null needs each latent's first-order policy change on the held-out "
                       "samples (LatentPool.policy)")
    template = [(int(layer), int(i)) for layer, i in template]
    _check_layers(template, pool.policy, "policy changes")
    nearest = _Nearest(pool.policy, template, n_near)
    draws = _latent_by_latent(template, n, seed, nearest.free)
    if pool.policy_per_sample is None:
        return draws
    _check_layers(template, pool.policy_per_sample, "per-sample policy changes")
    target = set_policy_change(template, pool)
    rng = np.random.default_rng([seed, 1])
    return [_match_set_change(template, draw, nearest, pool.policy_per_sample, target, tolerance, max_swaps, rng)
            for draw in draws]


def set_policy_change(latents: Sequence[tuple[int, int]], pool: LatentPool) -> float:
    """A set's first-order policy change on the held-out samples: ``mean_tau |sum_{i in S} d log pi(tau) / d
    gamma_i|`` (removing the set moves ``log pi(tau)`` by minus the inner sum, to first order)."""
    if pool.policy_per_sample is None:
        raise IPGError("a set's policy change needs the per-sample derivatives (LatentPool.policy_per_sample)")
    return float(np.abs(_column_sum(latents, pool.policy_per_sample)).mean())


def _column_sum(latents: Sequence[tuple[int, int]], per_sample: dict[int, np.ndarray]) -> np.ndarray:
    n = len(next(iter(per_sample.values())))
    return sum((per_sample[layer][:, i] for layer, i in latents), np.zeros(n))


def _match_set_change(template, draw: Selection, nearest: _Nearest, per_sample: dict, target: float,
                      tolerance: float, max_swaps: int, rng: np.random.Generator) -> Selection:
    """``draw`` with latents swapped (slot ``j`` only for one of the nearest neighbours of template latent ``j`` not
    in the template or the set) until its set change is within ``tolerance`` of ``target``; greedy: a swap is kept
    when it moves the change closer."""
    draw = list(draw)
    chosen = set(template)
    total = _column_sum(draw, per_sample)
    miss = abs(np.abs(total).mean() - target)
    for _ in range(max_swaps):
        if miss <= tolerance * target:
            return draw
        slot = int(rng.integers(len(draw)))
        layer = draw[slot][0]
        pick = int(rng.choice(nearest.free(*template[slot], chosen | set(draw) - {draw[slot]})))
        if pick == draw[slot][1]:
            continue
        trial = total - per_sample[layer][:, draw[slot][1]] + per_sample[layer][:, pick]
        trial_miss = abs(np.abs(trial).mean() - target)
        if trial_miss < miss:
            draw[slot], total, miss = (layer, pick), trial, trial_miss
    log.warning("policy-matched null: a set's first-order policy change stays %.3g from the template's %.3g after "
                "%d swaps (tolerance %.0f%%); kept as drawn", miss, target, max_swaps, 100 * tolerance)
    return draw


def _nearest_matched(template: Sequence[tuple[int, int]], n: int, seed: int, measure: dict, what: str,
                     n_near: int) -> list[Selection]:
    """Latent by latent, among the ``n_near`` nearest in ``log measure`` (zero matched with zero)."""
    _check_layers(template, measure, what)
    nearest = _Nearest(measure, template, n_near)
    return _latent_by_latent(template, n, seed, nearest.free)


class _Nearest:
    """Each template latent's neighbours in ``log measure`` (same layer), nearest first: the ``n_near`` nearest that
    are not excluded (every latent where the measure is zero, when it is zero for the template latent)."""

    def __init__(self, measure: dict, template: Sequence[tuple[int, int]], n_near: int):
        self.n_near, self.order = n_near, {}
        for layer, i in template:
            size = np.asarray(measure[layer], dtype=float)
            if size[i] <= 0:
                self.order[(layer, i)] = (np.flatnonzero(size <= 0), False)
            else:
                alive = np.flatnonzero(size > 0)
                distance = np.abs(np.log(size[alive]) - np.log(size[i]))
                self.order[(layer, i)] = (alive[np.argsort(distance, kind="stable")], True)

    def free(self, layer: int, i: int, excluded: set) -> np.ndarray:
        order, capped = self.order[(layer, i)]
        out = []
        for j in order:
            if (layer, int(j)) not in excluded:
                out.append(int(j))
                if capped and len(out) == self.n_near:
                    break
        return np.array(out, dtype=int)


def _check_layers(template: Sequence[tuple[int, int]], measure: dict, what: str) -> None:
    for layer, _ in template:
        if layer not in measure:
            raise IPGError(f"no {what} for layer {layer}; the null needs them for every layer of the set")


def _latent_by_latent(template: Sequence[tuple[int, int]], n: int, seed: int,
                      candidates: Callable[[int, int, set], np.ndarray]) -> list[Selection]:
    """``n`` sets, each drawing one latent per template latent among ``candidates(layer, latent, excluded)``
    (``excluded``: the template and the latents this set already holds)."""
    rng = np.random.default_rng(seed)
    chosen = {(layer, i) for layer, i in template}
    out = []
    for _ in range(n):
        taken: set[tuple[int, int]] = set()
        draw = []
        for layer, i in template:
            found = candidates(layer, i, chosen | taken)
            if not len(found):
                raise IPGError(f"layer {layer} has too few active latents to draw a matched random set of this size")
            pick = int(rng.choice(found))
            taken.add((layer, pick))
            draw.append((layer, pick))
        out.append(draw)
    return out


NULLS: dict[str, Callable[[Sequence[tuple[int, int]], int, int, LatentPool], list[Selection]]] = {
    "uniform": uniform_sets,
    "frequency": frequency_matched_sets,
    "push": push_matched_sets,
    "policy": policy_matched_sets,
}


def draw_sets(kind: NullKind, template: Sequence[tuple[int, int]], n: int, seed: int,
              pool: LatentPool) -> list[Selection]:
    """``n`` comparison sets of the given ``kind`` for ``template`` (see :data:`NULLS`)."""
    if kind not in NULLS:
        raise IPGError(f"unknown null {kind!r}; use one of {sorted(NULLS)}")
    return NULLS[kind](template, n, seed, pool)
