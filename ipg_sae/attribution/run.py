r"""The driver: attribute a data set of trajectories, with baselines, files, resume and shards.

Over a data set (:func:`run_attribution`; :func:`attribute` is its captum-style keyword
wrapper: ``n_steps``, ``method``, ``internal_batch_size``, ``return_convergence_delta``):

* groups trajectories by prompt (first-seen order) and runs the engine per prompt
  (:meth:`~ipg_sae.attribution.engine.IPGEngine.attribute_group`); the per-prompt attribution is
  ``IPG_i(x) = (1/G) sum_g (per-trajectory row)``, stored dense float32 ``[N, d_sae]`` per layer;
  per-trajectory rows are kept sparse (CSR);
* reports completeness per trajectory: ``delta_abs = sum_i IPG_i(tau) (+ error nodes) -
  A (log pi(tau; 1) - log pi(tau; 0))`` and ``delta = delta_abs / |A (...)|``. With
  ``importance="self_normalized"`` the integrand is reweighted, so ``delta`` then measures how far
  the correction moves the sum, not quadrature error;
* runs the baselines of :mod:`ipg_sae.attribution.baselines` through the same loop and result format;
* checkpoints its accumulators every ``checkpoint_every`` prompts (atomic safetensors); an
  identical call (same inputs, config, model and SAEs: a hash) resumes, and the result equals an
  uninterrupted run's bit for bit (each prompt's rows are computed independently and copied);
* under ``torchrun`` splits prompts ``r::N`` over ranks and merges shards on rank 0
  (:mod:`ipg_sae.distributed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable

from torch import nn

from .. import distributed
from ..errors import IPGError
from ..models import model_fingerprint
from ..trajectories import Trajectory, check_rewards, check_same_model, group_by_prompt
from . import baselines
from .accumulate import Accumulator, assemble
from .config import REASON_WORDS, AttributionConfig
from .engine import GroupAttribution, IPGEngine
from .path import Advantage, Method
from .result import AttributionResult, layer_key

log = logging.getLogger(__name__)


class IPGWarning(UserWarning):
    """Something the user should know about a finished attribution (e.g. nothing to attribute)."""


def attribute(
    model: nn.Module,
    saes,
    trajectories: list[Trajectory],
    n_steps: int = 8,
    method: Method = "gausslegendre",
    advantage: Advantage = "rloo",
    importance: str = "none",
    scope: str = "all",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    error_node: bool = False,
    gradient_checkpointing: bool = False,
    token_maps=(),
    baseline: str | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 8,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    seed: int = 0,
    *,
    tokenizer=None,
    fingerprint: dict | None = None,
    out_dir: str | Path | None = None,
    exclude_first: bool = True,
    importance_clip: float = 10.0,
    n_contexts: int = 3,
    reason_words=None,
    reason_window=(1, 2),
    reason_alpha: float = 0.7,
    sae_sources: dict | None = None,
):
    """Attribute the rewards of ``trajectories`` to the latents of ``saes`` with IPG (or a baseline).

    Args:
        model: a causal LM (frozen); its decoder blocks host the splice.
        saes: ``{layer: SAE}`` (sae-lens SAEs), or a list of SAEs that know their layer.
        trajectories: ``G`` sampled, rewarded trajectories per prompt (grouped by ``prompt_id``).
        n_steps: quadrature nodes on the path ``c = alpha * 1``.
        method: quadrature rule: ``gausslegendre`` or ``riemann_left|right|middle|trapezoid``.
        advantage: ``rloo`` | ``mean`` | ``grpo`` | ``none`` | ``correct``.
        importance: ``none`` or ``self_normalized`` (off-policy correction at each node).
        scope: ``all`` positions or ``generated`` ones get gates.
        internal_batch_size: sequences per forward/backward chunk (None: all nodes at once).
        return_convergence_delta: also return the per-trajectory relative completeness gap.
        error_node: gate the SAE error term as one more component.
        gradient_checkpointing: recompute blocks in the backward (long trajectories).
        token_maps: trajectory ids whose per-token attributions are kept.
        baseline: ``None``/``"ipg"`` or one of ``act``, ``reason_words``, ``grad_x_act``,
            ``ig_likelihood``, ``random`` (:mod:`ipg_sae.attribution.baselines`).
        checkpoint_path: save the accumulators there every ``checkpoint_every`` prompts; an
            identical call resumes from them.
        progress: show a progress bar.
        callback: called with a dict of statistics after each prompt.
        seed: seed of the ``random`` baseline (recorded with every result).
        tokenizer: lets the call refuse trajectories sampled by another model; needed by
            ``reason_words``. ``fingerprint`` (a :func:`ipg_sae.models.model_fingerprint`) works too.
        out_dir: save the result there (``attribution.safetensors`` + ``attribution.json``); under
            ``torchrun`` it is required and also holds the ranks' shards.

    Returns:
        An :class:`~ipg_sae.attribution.AttributionResult`, or ``(result, result.delta)`` with
        ``return_convergence_delta`` (captum's convention; ``delta`` is the relative gap).
    """
    cfg = AttributionConfig(
        n_steps=n_steps, method=method, advantage=advantage, importance=importance, scope=scope,
        exclude_first=exclude_first, internal_batch_size=internal_batch_size, error_node=error_node,
        gradient_checkpointing=gradient_checkpointing, importance_clip=importance_clip,
        token_maps=list(token_maps or []), n_contexts=n_contexts, baseline=baseline or "ipg",
        checkpoint_every=checkpoint_every, seed=seed,
        reason_words=list(REASON_WORDS if reason_words is None else reason_words),
        reason_window=list(reason_window), reason_alpha=reason_alpha,
    )
    result = run_attribution(model, saes, trajectories, cfg, checkpoint_path=checkpoint_path, progress=progress,
                             callback=callback, tokenizer=tokenizer, fingerprint=fingerprint, out_dir=out_dir,
                             sae_sources=sae_sources)
    return (result, result.delta) if return_convergence_delta else result


def run_attribution(model: nn.Module, saes, trajectories: list[Trajectory], cfg: AttributionConfig, *,
                    checkpoint_path: str | Path | None = None, progress: bool = True,
                    callback: Callable[[dict], None] | None = None, tokenizer=None, fingerprint: dict | None = None,
                    out_dir: str | Path | None = None, sae_sources: dict | None = None) -> AttributionResult:
    """:func:`attribute` with the settings of a (valid by construction) :class:`AttributionConfig`."""
    _check_inputs(trajectories, cfg, tokenizer)
    if fingerprint is None and tokenizer is not None:
        fingerprint = model_fingerprint(model, tokenizer)
    if fingerprint is not None:
        check_same_model(trajectories, fingerprint)
    elif any(t.model for t in trajectories):
        raise IPGError("the trajectories record the model that sampled them but no tokenizer was given; "
                       "pass tokenizer= (or fingerprint=) so attribute can check they match this model")

    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    engine = IPGEngine(model, saes, cfg, pad_id=pad_id or 0)
    layers = engine.layers
    d_sae = {layer: int(engine.saes[layer].cfg.d_sae) for layer in layers}
    groups = group_by_prompt(trajectories)
    prompt_ids = list(groups)
    ordered = [t for g in groups.values() for t in g]
    traj_index = {t.id: i for i, t in enumerate(ordered)}

    rank, world = distributed.init_distributed()
    if world > 1 and out_dir is None:
        raise IPGError(f"attribution across {world} processes needs out_dir (a directory all ranks can write) for the shards")
    mine = list(range(rank, len(prompt_ids), world))
    signature = _signature(cfg, engine, ordered, rank, world)
    ckpt = _checkpoint_file(checkpoint_path, rank, world)
    acc = _resume(ckpt, signature, mine, layers, d_sae, cfg.n_contexts) or Accumulator(layers, d_sae, cfg.n_contexts)

    # -- the loop -------------------------------------------------------------------------
    gradient = cfg.is_gradient_method
    reason = baselines.ReasonWords(tokenizer, cfg, layers, d_sae, acc.reason) if cfg.baseline == "reason_words" else None
    nodes, weights, adv_kind = baselines.plan(cfg)
    keep_maps = set(cfg.token_maps)
    todo = [i for i in mine if i not in acc.done]
    bar = _progress_bar(len(mine), len(mine) - len(todo), progress and distributed.is_main(), cfg.baseline)
    try:
        for n_done, pi in enumerate(todo, len(mine) - len(todo) + 1):
            group = groups[prompt_ids[pi]]
            start = time.perf_counter()
            if gradient:
                ga = engine.attribute_group(group, nodes, weights, advantage=adv_kind, keep_maps=keep_maps)
            else:
                ga, clean = engine.observe_group(group)
                if reason is not None:
                    reason.add(clean, group)
            acc.add(pi, [traj_index[t.id] for t in group], group, ga, gradient, keep_attribution=cfg.baseline == "act")
            seconds = time.perf_counter() - start
            acc.seconds += seconds
            acc.tokens += ga.n_tokens
            checkpointed = ckpt is not None and (n_done % cfg.checkpoint_every == 0 or n_done == len(mine))
            if checkpointed:
                acc.save(ckpt, signature)
            stats = _group_stats(cfg.baseline, prompt_ids[pi], pi, n_done, len(mine), ga, seconds, checkpointed)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{stats['tokens_per_s']:.0f}", delta=f"{stats['delta']:.1e}")
            if callback is not None:
                callback(stats)
    finally:
        if bar is not None:
            bar.close()

    # -- merge, finish, save ---------------------------------------------------------------
    finish = dict(cfg=cfg, engine=engine, prompt_ids=prompt_ids, traj_ids=[t.id for t in ordered],
                  fingerprint=fingerprint, sae_sources=sae_sources, world=world)
    if world == 1:
        result = _finish([acc], **finish)
        if out_dir is not None:
            result.save(out_dir)
        return result
    shards = Path(out_dir) / "shards"
    acc.save(shards / f"rank{rank}of{world}.safetensors", signature)
    distributed.barrier()
    if distributed.is_main():
        parts = [Accumulator.load(shards / f"rank{r}of{world}.safetensors", None, layers, d_sae, cfg.n_contexts)
                 for r in range(world)]
        if any(p is None for p in parts):
            raise IPGError(f"a shard under {shards} is missing or unreadable; rerun the attribution")
        _finish(parts, **finish).save(out_dir)
    distributed.barrier()
    return AttributionResult.load(out_dir)


def attribute_from_config(model, saes, trajectories, cfg: AttributionConfig, **runtime) -> AttributionResult:
    """Same as :func:`run_attribution` (``runtime``: tokenizer, out_dir, checkpoint_path, progress, ...)."""
    return run_attribution(model, saes, trajectories, cfg, **runtime)


def _check_inputs(trajectories: list[Trajectory], cfg: AttributionConfig, tokenizer) -> None:
    if not trajectories:
        raise IPGError("no trajectories to attribute; sample some first (`ipg-sae sample`) or fix the path")
    check_rewards(trajectories)
    ids_seen: set[str] = set()
    for t in trajectories:
        if t.id in ids_seen:
            raise IPGError(f"trajectory id {t.id!r} appears twice; trajectory ids must be unique")
        ids_seen.add(t.id)
        if not t.prompt_ids:
            raise IPGError(f"trajectory {t.id} has no prompt tokens; every trajectory needs its prompt_ids")
    if cfg.baseline == "reason_words" and tokenizer is None:
        raise IPGError("the reason_words baseline finds reasoning words in the text: pass tokenizer=")
    unknown_maps = set(cfg.token_maps) - ids_seen
    if unknown_maps:
        raise IPGError(f"token_maps asks for trajectory {sorted(unknown_maps)[0]!r}, which is not among the trajectories")


def _checkpoint_file(checkpoint_path, rank: int, world: int) -> Path | None:
    if checkpoint_path is None:
        return None
    ckpt = Path(checkpoint_path)
    return ckpt.with_name(f"{ckpt.stem}.rank{rank}of{world}{ckpt.suffix}") if world > 1 else ckpt


def _resume(ckpt: Path | None, signature: str, mine: list[int], layers, d_sae, n_contexts) -> Accumulator | None:
    """The checkpoint's accumulator when it belongs to this very call, else None (start from scratch)."""
    if ckpt is None or not ckpt.is_file():
        return None
    acc = Accumulator.load(ckpt, signature, layers, d_sae, n_contexts)
    if acc is None:
        log.warning("checkpoint %s belongs to a different attribution call; starting from scratch", ckpt)
        return None
    if not acc.done <= set(mine):
        log.warning("checkpoint %s holds other prompts than this call's; starting from scratch", ckpt)
        return None
    log.info("resuming from %s: %d of %d prompts done", ckpt, len(acc.prompts), len(mine))
    return acc


def _finish(parts: list[Accumulator], cfg: AttributionConfig, engine: IPGEngine, prompt_ids, traj_ids, fingerprint,
            sae_sources, world) -> AttributionResult:
    tensors, run_meta = assemble(parts, len(prompt_ids), len(traj_ids))
    layers = engine.layers
    d_sae = {layer: int(engine.saes[layer].cfg.d_sae) for layer in layers}
    meta = {
        "config": dataclasses.asdict(cfg),
        "model": fingerprint or {"name": getattr(engine.model.config, "_name_or_path", "")},
        "saes": [_sae_info(layer, engine.saes[layer], (sae_sources or {}).get(layer)) for layer in layers],
        "git_commit": _git_commit(),
        "seed": cfg.seed,
        "world_size": world,
        "token_map_ids": run_meta["token_map_ids"],
    }
    result = AttributionResult(cfg.baseline, layers, d_sae, list(prompt_ids), list(traj_ids), tensors, meta)
    for layer, score in baselines.final_scores(result, cfg).items():
        tensors[layer_key(layer, "score")] = score
    result.meta["summary"] = _summary(result, run_meta)
    if result.is_gradient_method and bool(result.prompt("skipped").all()):
        msg = ("nothing to attribute: every prompt's advantages are zero (all rewards equal within each group"
               + (", or no correct trajectory" if cfg.advantage == "correct" or cfg.baseline != "ipg" else "")
               + "); the attributions are all zero. Sample more trajectories per prompt or use a reward that varies")
        log.warning(msg)
        warnings.warn(msg, IPGWarning, stacklevel=4)
    return result


def _summary(result: AttributionResult, run_meta: dict) -> dict:
    out = {"method": result.method_name, "n_prompts": result.n_prompts, "n_trajectories": len(result.traj_ids),
           "tokens": int(run_meta["tokens"]),
           "seconds": round(float(run_meta["seconds"]), 3),
           "tokens_per_s": round(run_meta["tokens"] / run_meta["seconds"], 1) if run_meta["seconds"] else None}
    if result.is_gradient_method:
        out["n_skipped_prompts"] = int(result.prompt("skipped").sum())  # zero advantage: no node pass
        live = result.traj("advantage") != 0
        rel = result.delta.abs()[live]
        out["delta_max"] = float(rel.max()) if rel.numel() else 0.0
        out["delta_median"] = float(rel.median()) if rel.numel() else 0.0
        out["delta_abs_max"] = float(result.delta_abs.abs().max()) if len(result.traj_ids) else 0.0
    for layer in result.layers:
        out[f"L{layer}.active_latents"] = int(result.layer(layer, "active").any(0).sum())
    return out


def _group_stats(method_name, prompt_id, prompt_index, done, total, ga: GroupAttribution, seconds, checkpointed) -> dict:
    G = len(ga.logp1)
    per_traj_total = sum(ga.per_traj[layer].sum(1) for layer in ga.per_traj) + sum(ga.error.values())
    expected = ga.advantage * (ga.logp1 - ga.logp0)
    live = ga.advantage != 0
    gap = (per_traj_total - expected).abs()
    rel = (gap[live] / expected[live].abs().clamp(min=1e-300)) if live.any() else gap.new_zeros(0)
    active_abs, n_active = 0.0, 0
    for layer, a in ga.per_traj.items():
        mask = ga.active[layer]
        active_abs += float((a.sum(0) / G).abs()[mask].sum())
        n_active += int(mask.sum())
    return {
        "method": method_name, "prompt_id": prompt_id, "prompt_index": prompt_index, "done": done, "total": total,
        "n_trajectories": G, "n_tokens": ga.n_tokens, "seconds": seconds,
        "tokens_per_s": ga.n_tokens / seconds if seconds > 0 else 0.0,
        "delta": float(rel.max()) if rel.numel() else 0.0, "delta_abs": float(gap.max()) if G else 0.0,
        "mean_abs_attribution": active_abs / max(1, n_active), "skipped": bool(ga.skipped),
        "checkpointed": checkpointed,
    }


def _progress_bar(total: int, initial: int, enabled: bool, method_name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"attribute ({method_name})", unit="prompt", dynamic_ncols=True)


def _signature(cfg: AttributionConfig, engine: IPGEngine, ordered: list[Trajectory], rank: int, world: int) -> str:
    """A hash of everything that determines the result: a checkpoint resumes only the same call."""
    h = hashlib.sha256()
    conf = dataclasses.asdict(cfg)
    conf.pop("checkpoint_every")
    h.update(json.dumps(conf, sort_keys=True).encode())
    h.update(json.dumps([rank, world, engine.model.config.to_json_string(use_diff=False)]).encode())
    h.update(str([float(p.double().sum()) for p in list(engine.model.parameters())[:4]]).encode())
    for layer in engine.layers:
        w = engine.w_dec[layer].double()
        h.update(json.dumps([layer, list(w.shape), float(w.sum()), float(w.abs().sum())]).encode())
    for t in ordered:
        h.update(json.dumps([t.id, t.prompt_id, t.sample_index, float(t.reward), t.prompt_ids, t.completion_ids]).encode())
    return h.hexdigest()


def _sae_info(layer: int, sae, source) -> dict:
    meta = getattr(sae.cfg, "metadata", None)
    info = {"layer": layer, "architecture": sae.cfg.architecture(), "d_in": int(sae.cfg.d_in),
            "d_sae": int(sae.cfg.d_sae), "hook_name": getattr(meta, "hook_name", None),
            "model_name": getattr(meta, "model_name", None)}
    source = source or getattr(sae, "ipg_source", None)
    if source is not None:
        info["source"] = source if isinstance(source, (str, dict)) else str(source)
    return info


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
