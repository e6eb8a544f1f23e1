r"""From per-prompt attributions to a selected set of latents, with its statistics.

For each latent ``i`` of layer ``l``, over the ``N`` prompts' values ``a_n = IPG_i(x_n)``
(``docs/ipg-method.md`` §4):

* ``mean = (1/N) sum_n a_n``, ``mean_abs = (1/N) sum_n |a_n|``;
* ``std`` (sample standard deviation, ``N - 1`` in the denominator; 0 when ``N = 1``),
  ``se = std / sqrt(N)``, ``t = mean / se`` (0 when ``mean = 0``, +-inf when ``se = 0``);
* ``sign_consistency``: share of prompts with ``sign(a_n) = sign(mean)``;
* ``active_frac``: share of prompts on which the latent is active at some in-scope position.

``N`` counts the *attributed* prompts only (:func:`attributed_prompts`): a gradient method skips a
prompt whose samples all got the same reward (every advantage is 0), and its all-zero row is
not evidence about any latent, so counting it would pull every mean toward 0 and every sign
consistency toward a coin flip. The feature table states ``N`` (``n_prompts``).

Optionally each trajectory's attribution row is normalised before the per-prompt mean
(``normalize="length"``: divided by its number of generated tokens; ``"l1"``: divided by the L1
norm of its attributions over all spliced layers; rows with a zero norm stay zero).

Selection ranks latents in descending order of ``mean`` (default for gradient methods), ``t``,
``mean_abs`` or the method's natural ``score`` (default for the activation baselines: ``act``'s
mean activation, ReasonScore, the random draw), either globally or per layer. Ties are
broken by (layer, latent). Only latents active on at least one prompt are candidates, so
fewer than ``k`` may come back. Stability: the mean Jaccard index between the top-``k`` of the
full data and the top-``k`` of ``B`` bootstrap resamples of prompts (seeded).

Selections (lists of ``(layer, latent)`` pairs) are plain data: :func:`load_selection` reads
one from a feature table, a hand-written list or an attribution result.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attribution import GRADIENT_METHODS, AttributionResult
from .errors import IPGError
# the names a config chooses from live torch-free (`ipg-sae CMD --help`); re-exported here
from .selection_config import NORMALIZE, RANK_BY, Normalize, RankBy  # noqa: F401
from .steering import Selection, as_selection

log = logging.getLogger(__name__)

STAT_NAMES = ("mean", "mean_abs", "std", "se", "t", "sign_consistency", "active_frac")
TABLE_COLUMNS = ("layer", "latent", "rank", *STAT_NAMES, "n_prompts", "score", "method", "contexts")


# ---- per-prompt values and statistics ---------------------------------------------------


def per_prompt(result: AttributionResult, normalize: str = "none") -> dict[int, torch.Tensor] | None:
    """Per-prompt values ``[N, d_sae]`` (float64) per layer, after per-trajectory normalisation."""
    if normalize not in NORMALIZE:
        raise IPGError(f"unknown normalize {normalize!r}; use none, length or l1")
    values = result.attributions
    if values is None:
        return None
    if normalize == "none" or not result.is_gradient_method:
        return {layer: v.double() for layer, v in values.items()}
    n_traj = len(result.traj_ids)
    rows = {layer: result.trajectory_entries(layer) for layer in result.layers}  # never a dense [M, d_sae]
    rows = {layer: (owner, latent, values.double()) for layer, (owner, latent, values) in rows.items()}
    if normalize == "length":
        norm = result.traj("n_generated").double()
    else:  # L1 over every spliced layer of the trajectory
        norm = torch.zeros(n_traj, dtype=torch.float64)
        for owner, _, values in rows.values():
            norm.index_add_(0, owner, values.abs())
    scale = torch.where(norm > 0, 1.0 / norm.clamp(min=1e-300), torch.zeros_like(norm))
    prompt = result.traj("prompt")
    counts = torch.bincount(prompt, minlength=result.n_prompts).double().clamp(min=1)
    out = {}
    for layer, (owner, latent, values) in rows.items():
        d = result.d_sae[layer]
        flat = torch.zeros(result.n_prompts * d, dtype=torch.float64)
        flat.index_add_(0, prompt[owner] * d + latent, values * scale[owner])
        out[layer] = flat.view(result.n_prompts, d) / counts[:, None]
    return out


def _stats(values: torch.Tensor | None, active: torch.Tensor) -> dict[str, torch.Tensor]:
    n, d = active.shape
    out = {"active_frac": active.double().mean(0) if n else torch.zeros(d, dtype=torch.float64)}
    if values is None:
        for name in STAT_NAMES[:-1]:
            out[name] = torch.full((d,), math.nan, dtype=torch.float64)
        return out
    mean = values.mean(0)
    std = values.std(0, unbiased=True) if n > 1 else torch.zeros(d, dtype=torch.float64)
    se = std / math.sqrt(max(n, 1))
    t = torch.where(mean == 0, torch.zeros_like(mean), mean / se)  # x / 0 gives +-inf
    sign = torch.sign(mean)
    out.update(mean=mean, mean_abs=values.abs().mean(0), std=std, se=se, t=t,
               sign_consistency=(torch.sign(values) == sign[None]).double().mean(0))
    return out


def attributed_prompts(result: AttributionResult) -> torch.Tensor:
    """Indices of the prompts whose statistics count: for a gradient method the prompts it attributed (those
    with reward variance), for the other methods every prompt."""
    if result.is_gradient_method:
        attributed = torch.nonzero(~result.prompt("skipped").bool()).flatten()
        if len(attributed):
            return attributed
    return torch.arange(result.n_prompts)


def latent_stats(result: AttributionResult, normalize: str = "none",
                 prompts: np.ndarray | torch.Tensor | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, the statistics of section 4 as ``[d_sae]`` float64 tensors (NaN where undefined).

    ``prompts`` (indices, repeats allowed) restricts or resamples the prompts (default: the
    attributed prompts, :func:`attributed_prompts`); ``score`` is included too (the method's
    natural score, recomputed on a resample where it can be).
    """
    values = per_prompt(result, normalize)
    if prompts is None:
        attributed = attributed_prompts(result)
        sel = None if len(attributed) == result.n_prompts else attributed
    else:
        sel = torch.as_tensor(np.asarray(prompts), dtype=torch.long)
    out = {}
    for layer in result.layers:
        v = None if values is None else values[layer]
        active = result.layer(layer, "active")
        if sel is not None:
            v = None if v is None else v[sel]
            active = active[sel]
        stats = _stats(v, active)
        stats["score"] = _natural_score(result, layer, stats, sel if prompts is not None else None)
        out[layer] = stats
    return out


def _natural_score(result: AttributionResult, layer: int, stats: dict, sel) -> torch.Tensor:
    if sel is None:
        return result.layer(layer, "score").double()
    if result.is_gradient_method:
        return stats["mean"]
    if result.method_name == "act":
        n = result.prompt("n_scope").double()[sel]
        act = result.layer(layer, "activation").double()[sel]
        return (act * n[:, None]).sum(0) / n.sum().clamp(min=1)
    raise IPGError(f"the {result.method_name} baseline has only a global score, which cannot be resampled by prompt; "
                   "bootstrap stability needs ipg, act, grad_x_act or ig_likelihood")


def default_rank_by(result: AttributionResult) -> str:
    return "mean" if result.is_gradient_method else "score"


# ---- selection --------------------------------------------------------------------------


def _rank(stats: dict[int, dict[str, torch.Tensor]], by: str, k: int, per_layer: bool,
          active_only: bool) -> list[tuple[int, int]]:
    if by not in RANK_BY:
        raise IPGError(f"cannot rank by {by!r}; use one of {', '.join(RANK_BY)}")
    if k < 1:
        raise IPGError(f"k is {k}; select at least one latent")
    cands = []
    for layer, s in sorted(stats.items()):
        score = s[by].numpy()
        if np.isnan(score).all():
            raise IPGError(f"this result has no per-prompt values to rank by {by!r}; rank by 'score'")
        keep = ~np.isnan(score)
        if active_only:
            keep &= s["active_frac"].numpy() > 0
        latents = np.nonzero(keep)[0]
        cands.append((layer, latents, score[latents]))
    if per_layer:
        out = []
        for layer, latents, score in cands:
            order = np.lexsort((latents, -score))[:k]
            out.extend((layer, int(latents[i])) for i in order)
        return out
    layers = np.concatenate([np.full(len(lat), layer) for layer, lat, _ in cands])
    latents = np.concatenate([lat for _, lat, _ in cands])
    score = np.concatenate([sc for _, _, sc in cands])
    order = np.lexsort((latents, layers, -score))[:k]
    return [(int(layers[i]), int(latents[i])) for i in order]


def select(result: AttributionResult, k: int, by: str | None = None, per_layer: bool = False,
           normalize: str = "none", active_only: bool = True, bottom: bool = False) -> list[tuple[int, int]]:
    """The top-``k`` latents of an attribution result, best first.

    Args:
        result: an :class:`~ipg_sae.attribution.AttributionResult` (IPG or a baseline).
        k: how many latents (per layer with ``per_layer``).
        by: ``mean`` | ``t`` | ``mean_abs`` | ``score``; default: ``mean`` for gradient methods,
            the method's natural ``score`` for the activation baselines.
        per_layer: ``k`` latents in each layer instead of ``k`` overall.
        normalize: ``none`` | ``length`` | ``l1``: per-trajectory normalisation before aggregating.
        active_only: only latents active on at least one prompt are candidates (fewer than ``k``
            may come back).
        bottom: the ``k`` lowest instead (most negative first): the sign control, whose removal
            should raise the reward where the top set's lowers it.

    Returns:
        A list of ``(layer, latent)`` pairs, ties broken by (layer, latent).
    """
    by = by or default_rank_by(result)
    stats = latent_stats(result, normalize)
    if bottom:
        stats = {layer: {**s, by: -s[by]} for layer, s in stats.items()}
    return _rank(stats, by, k, per_layer, active_only)


def permuted_rankings(result: AttributionResult, k: int, n: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """The reward-permutation null: ``n`` top-``k`` sets IPG would select had each attributed prompt's rewards been
    shuffled among its samples (:func:`reward_permutations`, :func:`permuted_ranking`).

    The sets come from the same gradients and the same selection (``mean`` over the attributed
    prompts, active latents only) with the reward information removed, so a set that beats them
    was picked *because of the reward*, not for how hard it pushes the policy.
    """
    if n < 1:
        raise IPGError(f"the reward-permutation null needs at least one permutation (got {n})")
    return [permuted_ranking(result, order, k) for order in reward_permutations(result, n, seed)]


def reward_permutations(result: AttributionResult, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` orders of the trajectories (``[M]`` indices): trajectory ``t`` takes the reward (and so the advantage)
    of ``order[t]``, a random shuffle within each attributed prompt's group (groups stay mixed)."""
    owner_prompt = result.traj("prompt").long()
    groups = [torch.nonzero(owner_prompt == p).flatten() for p in attributed_prompts(result).tolist()]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        order = torch.arange(len(result.traj_ids))
        for idx in groups:
            order[idx] = idx[torch.as_tensor(rng.permutation(len(idx)))]
        out.append(order)
    return out


def permuted_ranking(result: AttributionResult, order: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """IPG's top ``k`` had trajectory ``t`` got the advantage of trajectory ``order[t]`` (same prompt)
    (:func:`permuted_stats`, ranked as :func:`select` ranks IPG)."""
    return _rank(permuted_stats(result, order), "mean", k, False, True)


def permuted_stats(result: AttributionResult, order: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """IPG's per-latent statistics (as :func:`latent_stats`, without ``score``) had trajectory ``t`` got the
    advantage of trajectory ``order[t]`` (same prompt).

    IPG is linear in the advantages (``a_{g,i} = A_g * u_{g,i}``, ``u`` the path integral of
    ``d log pi(tau_g) / d c_i`` times the activation), so each stored per-trajectory row gives
    ``u_{g,i} = a_{g,i} / A_g`` and the permuted per-prompt scores are ``sum_g A_{order(g)} u_{g,i} / G``:
    no model pass. Exact for the quadrature nodes the attribution used; a recomputation on
    shuffled rewards under adaptive quadrature may refine other nodes (equal within its tolerance).
    """
    if result.method_name != "ipg":
        raise IPGError(f"the reward-permutation null re-weights IPG's per-trajectory rows; got a {result.method_name} "
                       "result")
    advantage, owner_prompt = result.traj("advantage").double(), result.traj("prompt").long()
    attributed = attributed_prompts(result)
    in_groups = torch.isin(owner_prompt, attributed)
    zero = torch.nonzero(in_groups & (advantage == 0)).flatten()
    if len(zero):
        raise IPGError(f"trajectory {result.traj_ids[int(zero[0])]} of an attributed prompt has advantage 0, so its "
                       "stored row cannot be rescaled; the reward-permutation null from stored rows needs non-zero "
                       "advantages (true for 0/1 rewards with rloo, mean or grpo advantages); recompute the "
                       "attribution on shuffled rewards instead")
    if bool((owner_prompt[order] != owner_prompt).any()):
        raise IPGError("a reward permutation may only move rewards within a prompt's group")
    shuffled = advantage[order]
    size = torch.bincount(owner_prompt, minlength=result.n_prompts).double()
    stats = {}
    for layer in result.layers:
        owner, latent, value = result.trajectory_entries(layer)
        d = result.d_sae[layer]
        flat = torch.zeros(result.n_prompts * d, dtype=torch.float64)
        weight = shuffled[owner] / advantage[owner] / size[owner_prompt[owner]]
        flat.index_add_(0, owner_prompt[owner] * d + latent, value.double() * weight)
        stats[layer] = _stats(flat.view(result.n_prompts, d)[attributed], result.layer(layer, "active")[attributed])
    return stats


def bootstrap_stability(result: AttributionResult, k: int, n_boot: int = 100, by: str | None = None,
                        per_layer: bool = False, normalize: str = "none", seed: int = 0) -> dict:
    """Mean Jaccard index of the top-``k`` between the full data and ``n_boot`` prompt resamples."""
    by = by or default_rank_by(result)
    values = per_prompt(result, normalize)  # computed once; resamples index into it
    reference = set(_rank(latent_stats(result, normalize), by, k, per_layer, True))
    rng = np.random.default_rng(seed)
    pool = attributed_prompts(result)  # resample the prompts the statistics count
    n = len(pool)
    scores = []
    for _ in range(n_boot):
        sel = pool[torch.as_tensor(rng.integers(0, n, size=n), dtype=torch.long)]
        stats = {}
        for layer in result.layers:
            v = None if values is None else values[layer][sel]
            s = _stats(v, result.layer(layer, "active")[sel])
            s["score"] = _natural_score(result, layer, s, sel)
            stats[layer] = s
        top = set(_rank(stats, by, k, per_layer, True))
        union = reference | top
        scores.append(len(reference & top) / len(union) if union else 1.0)
    arr = np.array(scores)
    return {"jaccard_mean": float(arr.mean()) if n_boot else math.nan,
            "jaccard_std": float(arr.std()) if n_boot else math.nan,
            "n_boot": n_boot, "k": k, "by": by, "per_layer": per_layer, "seed": seed, "jaccard": arr.tolist()}


# ---- the feature table ------------------------------------------------------------------


def feature_table(result: AttributionResult, tokenizer, trajectories, k: int | None = 50, by: str | None = None,
                  per_layer: bool = False, normalize: str = "none", latents: list[tuple[int, int]] | None = None,
                  window: tuple[int, int] = (8, 3)) -> list[dict]:
    """One row per selected latent: statistics, score, and decoded top-activating contexts.

    ``latents`` gives the rows explicitly (in that order); otherwise the top ``k`` by ``by``
    (all active latents when ``k`` is None). Contexts look like ``"...3 + 5 = [8]. The..."``:
    ``window[0]`` tokens before the activating token (in brackets) and ``window[1]`` after.
    """
    by = by or default_rank_by(result)
    stats = latent_stats(result, normalize)
    n_prompts = len(attributed_prompts(result))
    if latents is None:
        if k is None:
            k = sum(int(s["active_frac"].gt(0).sum()) for s in stats.values()) or 1
        latents = _rank(stats, by, k, per_layer, True)
    by_id = {t.id: t for t in trajectories}
    neuronpedia = {s["layer"]: s.get("neuronpedia_id") for s in result.meta.get("saes", [])}
    rows, rank_in_layer = [], {}
    for i, (layer, latent) in enumerate(latents):
        rank_in_layer[layer] = rank_in_layer.get(layer, 0) + 1
        s = stats[layer]
        row = {"layer": layer, "latent": latent, "rank": rank_in_layer[layer] if per_layer else i + 1}
        for name in STAT_NAMES:
            row[name] = float(s[name][latent])
        row["n_prompts"] = n_prompts  # the statistics' denominator: the attributed prompts
        row["score"] = float(s["score"][latent])
        row["method"] = result.method_name
        row["contexts"] = " | ".join(_contexts(result, layer, latent, tokenizer, by_id, window))
        if any(neuronpedia.values()):
            row["neuronpedia"] = neuronpedia_url(neuronpedia.get(layer), latent)
        rows.append(row)
    return rows


def neuronpedia_url(neuronpedia_id: str | None, latent: int) -> str:
    """The latent's page on Neuronpedia ("" when its SAE has no ``neuronpedia_id``)."""
    return f"https://www.neuronpedia.org/{neuronpedia_id}/{latent}" if neuronpedia_id else ""


def _contexts(result, layer, latent, tokenizer, by_id, window) -> list[str]:
    value, traj, pos = (x[latent] for x in result.contexts[layer])
    out = []
    for v, t, p in zip(value.tolist(), traj.tolist(), pos.tolist()):
        if v < 0 or t < 0:
            continue
        tr = by_id.get(result.traj_ids[t])
        if tr is None:
            continue
        ids = list(tr.prompt_ids) + list(tr.completion_ids)
        if p >= len(ids):
            continue
        left = tokenizer.decode(ids[max(0, p - window[0]):p])
        mid = tokenizer.decode(ids[p:p + 1])
        right = tokenizer.decode(ids[p + 1:p + 1 + window[1]])
        lead = mid[:len(mid) - len(mid.lstrip())]  # "= [8]" rather than "=[ 8]" for byte-level BPE pieces
        text = f"...{left}{lead}[{mid.lstrip()}]{right}... ({v:.3g})"
        out.append(text.replace("\r", "\\r").replace("\n", "\\n").replace("|", "¦"))
    return out


def write_feature_table(path: str | Path, rows: list[dict]) -> Path:
    """Write the table as CSV atomically (``path`` may be a run directory: then ``features.csv``)."""
    from .io import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".csv" and (path.is_dir() or not path.suffix):
        path = path / "features.csv"
    columns = list(rows[0]) if rows else list(TABLE_COLUMNS)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return path


def read_feature_table(path: str | Path) -> list[dict]:
    """The rows of a feature table CSV (``path`` may be a run directory holding ``features.csv``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "features.csv"
    if not path.is_file():
        raise IPGError(f"feature table {path} not found; run `ipg-sae attribute` first or fix the path")
    rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    if not rows or not {"layer", "latent"} <= set(rows[0]):
        raise IPGError(f"{path} is not a feature table: it needs columns `layer` and `latent` (and `rank`)")
    return rows


# ---- selections from files and results ----------------------------------------------------


def load_selection(source: Any, k: int | None = None) -> Selection:
    """The first ``k`` latents of ``source`` as ``(layer, latent)`` pairs, best first.

    Args:
        source: a list of pairs; a feature table CSV (columns ``layer``, ``latent``, and ``rank``
            when present, lower is better); a hand-written list file (``.json``/``.yaml``/
            ``.txt``, pairs or ``layer:latent`` lines); a directory holding ``features.csv`` or a
            saved attribution result; or an attribution/baseline result object (its top-``k``
            by :func:`select`).
        k: how many latents (None: all of them; required for a result object).

    Returns:
        The selection, a list of ``(layer, latent)`` pairs.
    """
    if k is not None and k < 1:
        raise IPGError(f"set size k is {k}; it must be at least 1 (or null for the whole selection)")
    if isinstance(source, (str, Path)):
        pairs = _load_selection_path(Path(source).expanduser(), k)
    elif isinstance(source, (list, tuple)):
        pairs = as_selection(source)
    else:
        pairs = _select_from_result(source, k)
    if not pairs:
        raise IPGError(f"the selection from {_describe(source)} is empty; select at least one latent")
    if k is not None and len(pairs) < k:
        raise IPGError(f"the selection from {_describe(source)} has {len(pairs)} latents but k={k} were asked for; "
                       "lower k or select more latents")
    return pairs[:k] if k is not None else pairs


def _select_from_result(result: Any, k: int | None) -> Selection:
    if k is None:
        raise IPGError(f"a set is selected from {type(result).__name__} by its top-k latents; give k (the set size)")
    return as_selection(select(result, k), where=f"the top-{k} latents of {type(result).__name__}")


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__


def _load_selection_path(path: Path, k: int | None) -> Selection:
    if path.is_dir():
        if (path / "features.csv").is_file():
            return _ranked(path / "features.csv")
        try:
            result = AttributionResult.load(path)
        except IPGError:
            raise
        except Exception as e:
            raise IPGError(f"{path} holds neither features.csv nor a loadable attribution result "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); point at a feature "
                           "table or an attribution run directory") from None
        return _select_from_result(result, k)
    if not path.is_file():
        raise IPGError(f"selection file {path} not found; give a features.csv, a .json/.yaml/.txt list of "
                       "(layer, latent) pairs, or a run directory")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if path.name == "attribution.safetensors":
            return _load_selection_path(path.parent, k)
        raise IPGError(f"{path} is a tensor file, not a selection; give its attribution run directory, a "
                       "features.csv, or a .json/.yaml/.txt list of (layer, latent) pairs")
    if suffix == ".csv":
        return _ranked(path)
    text = _read_text(path)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IPGError(f"{path}: not valid JSON ({e.msg}); fix the file") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise IPGError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file, e.g. "
                           "[[12, 345], [12, 7]]") from None
    else:
        data = [line.split("#")[0].strip() for line in text.splitlines()]
        data = [line for line in data if line]
    if isinstance(data, dict):  # {"selection": [...]} or {"latents": [...]}
        data = data.get("selection", data.get("latents", data.get("features")))
    if not isinstance(data, list):
        raise IPGError(f"{path} does not hold a list of (layer, latent) pairs; write e.g. [[12, 345], [12, 7]]")
    return as_selection(data, where=str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise IPGError(f"{path} is not UTF-8 text (is it a binary file?); give a features.csv or a "
                       ".json/.yaml/.txt list of (layer, latent) pairs") from None


def _ranked(path: Path) -> Selection:
    """A feature table's latents in rank order (file order where ranks tie or are missing)."""
    rows = read_feature_table(path)
    if "rank" in rows[0] and all(r["rank"] not in ("", None) for r in rows):
        ranks = []
        for i, r in enumerate(rows, 2):  # line 1 is the header
            try:
                rank = float(r["rank"])
            except ValueError:
                rank = math.nan
            if not math.isfinite(rank):
                raise IPGError(f"{path}:{i}: rank {r['rank']!r} is not a finite number; write a number (1 = best) or "
                               "leave the rank column empty")
            ranks.append(rank)
        order = sorted(range(len(rows)), key=ranks.__getitem__)  # stable: ties keep file order
        rows = [rows[i] for i in order]
    return as_selection(rows, where=str(path))


# ---- W&B --------------------------------------------------------------------------------


def log_to_wandb(run, table_rows: list[dict], result: AttributionResult, prefix: str = "attribution") -> None:
    """Log the feature table, a histogram of scores per layer and summary numbers to W&B.

    ``run`` is a ``wandb`` run, an :class:`ipg_sae.tracking.Tracker`, or None (nothing happens).
    W&B failures are logged and never raised.
    """
    if run is None:
        return
    columns = list(table_rows[0]) if table_rows else list(TABLE_COLUMNS)
    data = [[row.get(c) for c in columns] for row in table_rows]
    hists = {}
    for layer in result.layers:
        score = result.layer(layer, "score")
        active = result.layer(layer, "active").any(0)
        vals = score[active & torch.isfinite(score)].numpy()
        if vals.size:
            hists[f"{prefix}/score_hist/L{layer}"] = vals
    summary = {f"{prefix}/{k}": v for k, v in result.meta.get("summary", {}).items()
               if isinstance(v, (int, float)) and v is not None}
    try:
        if hasattr(run, "table") and hasattr(run, "histogram"):  # ipg_sae.tracking.Tracker
            run.table(f"{prefix}/features", columns, data)
            for key, vals in hists.items():
                run.histogram(key, vals)
            run.summary(summary)
            return
        import wandb

        payload = {f"{prefix}/features": wandb.Table(columns=columns, data=data)}
        payload.update({key: wandb.Histogram(vals) for key, vals in hists.items()})
        run.log(payload)
        run.summary.update(summary)
    except Exception as e:  # W&B must never take a run down
        log.warning("W&B logging of the attribution failed (%s: %s); local files are unaffected", type(e).__name__, e)


__all__ = ["STAT_NAMES", "TABLE_COLUMNS", "attributed_prompts", "per_prompt", "latent_stats", "select", "bootstrap_stability",
           "feature_table", "write_feature_table", "read_feature_table", "load_selection", "log_to_wandb",
           "default_rank_by",
           "GRADIENT_METHODS"]
