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

import torch
from torch import nn

from .. import distributed
from ..digest import FORMAT_VERSION, key_dict, module_digest
from ..errors import IPGError
from ..models import model_fingerprint, vocab_size
from ..trajectories import Trajectory, check_rewards, check_same_model, group_by_prompt
from . import baselines
from .accumulate import Accumulator, assemble
from .config import REASON_WORDS, AttributionConfig
from .engine import GroupAttribution, IPGEngine
from .path import Advantage, Method, advantages
from .result import AttributionResult, layer_key

log = logging.getLogger(__name__)


LOW_EXPLAINED_VARIANCE = 0.5  # below this an SAE's reconstruction is reported as suspect


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
    delta_tol: float | None = None,
    max_nodes: int = 33,
    path_origin: str = "zero",
):
    """Attribute the rewards of ``trajectories`` to the latents of ``saes`` with IPG (or a baseline).

    Args:
        model: a causal LM (frozen); its decoder blocks host the splice.
        saes: ``{layer: SAE}`` (sae-lens SAEs), or a list of SAEs that know their layer.
        trajectories: ``G`` sampled, rewarded trajectories per prompt (grouped by ``prompt_id``).
        n_steps: quadrature nodes on the path ``c = alpha * 1`` (fixed-count mode).
        method: quadrature rule of the fixed-count mode: ``gausslegendre`` or
            ``riemann_left|right|middle|trapezoid``.
        advantage: ``rloo`` | ``mean`` | ``grpo`` | ``none`` | ``correct``.
        importance: ``none`` or ``self_normalized`` (off-policy correction at each node).
        scope: ``all`` positions or ``generated`` ones get gates.
        internal_batch_size: sequences per forward/backward chunk (None: all nodes at once).
        return_convergence_delta: also return the per-trajectory relative completeness gap.
        error_node: gate the SAE error term as one more component.
        gradient_checkpointing: recompute blocks in the backward (long trajectories).
        token_maps: trajectory ids whose per-token attributions are kept (["*"]: every trajectory).
        baseline: ``None``/``"ipg"`` or one of ``act``, ``reason_words``, ``grad_x_act``,
            ``ig_likelihood``, ``ipg_local``, ``random`` (:mod:`ipg_sae.attribution.baselines`).
        checkpoint_path: save the accumulators there every ``checkpoint_every`` prompts; an
            identical call resumes from them.
        progress: show a progress bar.
        callback: called with a dict of statistics after each prompt.
        seed: seed of the ``random`` baseline (recorded with every result).
        tokenizer: lets the call refuse trajectories sampled by another model; needed by
            ``reason_words``. ``fingerprint`` (a :func:`ipg_sae.models.model_fingerprint`) works too.
        out_dir: save the result there (``attribution.safetensors`` + ``attribution.json``); under
            ``torchrun`` it is required and also holds the ranks' shards.
        delta_tol: adaptive mode: per prompt, bisect composite Simpson panels where the completeness
            gap is until every trajectory's relative gap is at most ``delta_tol``.
        max_nodes: the adaptive budget of nodes per prompt; prompts that reach it are reported
            (``result.meta["summary"]["budget_hit"]``).
        path_origin: where the path starts: ``zero``, ``mean`` (each latent's mean activation over
            the attributed tokens) or a safetensors file of ``L<layer>`` tensors ``[d_sae]``.

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
        reason_window=list(reason_window), reason_alpha=reason_alpha, delta_tol=delta_tol, max_nodes=max_nodes,
        path_origin=path_origin,
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
    _check_inputs(trajectories, cfg, tokenizer, vocab_size(model))
    if fingerprint is None and tokenizer is not None:
        fingerprint = model_fingerprint(model, tokenizer)
    if fingerprint is not None:
        check_same_model(trajectories, fingerprint)
    elif any(t.model for t in trajectories):
        raise IPGError("the trajectories record the model that sampled them but no tokenizer was given; "
                       "pass tokenizer= (or fingerprint=) so attribute can check they match this model")

    quad = baselines.plan(cfg)
    groups = group_by_prompt(trajectories)
    if cfg.is_gradient_method:
        _check_something_to_attribute(groups, quad.advantage)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    engine = IPGEngine(model, saes, cfg, pad_id=pad_id or 0)
    if cfg.is_gradient_method:
        engine.set_origin(origin_values(cfg, engine, list(groups.values()), progress))
    layers = engine.layers
    d_sae = {layer: int(engine.saes[layer].cfg.d_sae) for layer in layers}
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
    keep_maps = {t.id for t in trajectories} if "*" in cfg.token_maps else set(cfg.token_maps)
    todo = [i for i in mine if i not in acc.done]
    bar = _progress_bar(len(mine), len(mine) - len(todo), progress and distributed.is_main(), cfg.baseline)
    nodes_spent = attributed = 0  # the bar shows the running mean of nodes per attributed prompt
    try:
        for n_done, pi in enumerate(todo, len(mine) - len(todo) + 1):
            group = groups[prompt_ids[pi]]
            start = time.perf_counter()
            if gradient and quad.adaptive:
                ga = engine.attribute_group_adaptive(group, cfg.delta_tol, cfg.max_nodes, advantage=quad.advantage,
                                                     keep_maps=keep_maps)
            elif gradient:
                ga = engine.attribute_group(group, quad.nodes, quad.weights, advantage=quad.advantage,
                                            keep_maps=keep_maps)
            else:
                ga, clean = engine.observe_group(group)
                if reason is not None:
                    reason.add(clean, group)
            acc.add(pi, [traj_index[t.id] for t in group], group, ga, gradient, keep_attribution=cfg.baseline == "act")
            seconds = time.perf_counter() - start
            acc.seconds += seconds
            acc.tokens += ga.n_tokens
            nodes_spent += ga.n_nodes
            attributed += not ga.skipped
            if ga.budget_hit:
                log.warning("prompt %s: completeness gap %.2e after %d nodes, above delta_tol %g (the node budget "
                            "max_nodes is reached)", prompt_ids[pi], float(ga.gaps().max()), ga.n_nodes, cfg.delta_tol)
            checkpointed = ckpt is not None and (n_done % cfg.checkpoint_every == 0 or n_done == len(mine))
            if checkpointed:
                acc.save(ckpt, signature)
            stats = _group_stats(cfg.baseline, prompt_ids[pi], pi, n_done, len(mine), ga, seconds, checkpointed)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{stats['tokens_per_s']:.0f}", delta=f"{stats['delta']:.1e}",
                                nodes=f"{nodes_spent / max(1, attributed):.1f}")
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


def origin_values(cfg: AttributionConfig, engine: IPGEngine, groups: list[list[Trajectory]],
                  progress: bool = False) -> dict[int, torch.Tensor] | None:
    """Where the path starts, per layer ``[d_sae]``: None at ``zero``; the mean activation over the attributed
    tokens at ``mean``; a file's ``L<layer>`` tensors otherwise."""
    if cfg.path_origin == "zero":
        return None
    if cfg.path_origin == "mean":
        return engine.mean_activation(groups, progress=progress and distributed.is_main())
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(cfg.path_origin)
    if not path.is_file():
        raise IPGError(f"attribution.path_origin names {path}, which does not exist; give zero, mean or a safetensors "
                       "file with one [d_sae] tensor per layer named L<layer>")
    try:
        values = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise IPGError(f"attribution.path_origin: {path} is not a readable safetensors file ({e})") from None
    missing = [layer for layer in engine.layers if f"L{layer}" not in values]
    if missing:
        raise IPGError(f"attribution.path_origin: {path} has no tensor L{missing[0]} (it has {sorted(values)}); give "
                       "one [d_sae] tensor per attributed layer")
    return {layer: values[f"L{layer}"].double() for layer in engine.layers}


def _check_inputs(trajectories: list[Trajectory], cfg: AttributionConfig, tokenizer, vocab: int) -> None:
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
        tokens = t.prompt_ids + t.completion_ids
        if any(not isinstance(i, int) or not 0 <= i < vocab for i in tokens):
            bad = next(i for i in tokens if not isinstance(i, int) or not 0 <= i < vocab)
            raise IPGError(f"trajectory {t.id} has token id {bad!r}, outside this model's vocabulary (0..{vocab - 1}); "
                           "it was sampled with another tokenizer, or the file is damaged")
    if cfg.baseline == "reason_words" and tokenizer is None:
        raise IPGError("the reason_words baseline finds reasoning words in the text: pass tokenizer=")
    unknown_maps = set(cfg.token_maps) - ids_seen - {"*"}
    if unknown_maps:
        raise IPGError(f"token_maps asks for trajectory {sorted(unknown_maps)[0]!r}, which is not among the trajectories")


def _check_something_to_attribute(groups: dict[str, list[Trajectory]], advantage: str) -> None:
    """Refuse a data set on which every advantage is zero: F is identically 0 and any selection would be arbitrary."""
    for group in groups.values():
        if bool((advantages(torch.tensor([t.reward for t in group], dtype=torch.float64), advantage) != 0).any()):
            return
    n = len(groups)
    if advantage == "correct":
        raise IPGError(f"nothing to attribute: none of the {n} prompts has a trajectory with a positive reward, which "
                       "this likelihood baseline scores; sample more trajectories or drop the baseline")
    if advantage == "none":
        raise IPGError(f"nothing to attribute: every reward of the {n} prompts is 0; check the reward function")
    raise IPGError(f"nothing to attribute: no prompt has reward variance (within each of the {n} prompts every "
                   "sample got the same reward, so every advantage is 0); sample more per prompt (sampling.n_samples), "
                   "raise sampling.temperature, or use problems the model sometimes solves")


def _checkpoint_file(checkpoint_path, rank: int, world: int) -> Path | None:
    if checkpoint_path is None:
        return None
    ckpt = Path(checkpoint_path)
    return ckpt.with_name(f"{ckpt.stem}.rank{rank}of{world}{ckpt.suffix}") if world > 1 else ckpt


def _resume(ckpt: Path | None, signature: str, mine: list[int], layers, d_sae, n_contexts) -> Accumulator | None:
    """The checkpoint's accumulator when it belongs to this very call, else None (start from scratch)."""
    if ckpt is None or not ckpt.is_file():
        return None
    acc = Accumulator.load(ckpt, signature, layers, d_sae, n_contexts)  # says why when it returns None
    if acc is None:
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
    for layer, origin in engine.origin.items():
        tensors[layer_key(layer, "origin")] = origin.cpu()
    result.meta["summary"] = _summary(result, run_meta)
    for layer, ev in result.explained_variance.items():
        log.info("the SAE at layer %d explains %.3f of the residual variance on these trajectories", layer, ev)
        if not ev >= LOW_EXPLAINED_VARIANCE:
            msg = (f"the SAE at layer {layer} explains only {ev:.3f} of the residual variance on these trajectories: "
                   "it may be broken, or made for another layer or model; its attributions describe that SAE")
            log.warning(msg)
            warnings.warn(msg, IPGWarning, stacklevel=4)
    if result.meta["summary"].get("n_budget_hit"):
        n = result.meta["summary"]["n_budget_hit"]
        warnings.warn(f"{n} of {result.n_prompts} prompts ended above delta_tol {cfg.delta_tol} at the node budget "
                      f"(max_nodes {cfg.max_nodes}); see summary['budget_hit'] for their gaps", IPGWarning, stacklevel=4)
    return result


def _summary(result: AttributionResult, run_meta: dict) -> dict:
    out = {"method": result.method_name, "n_prompts": result.n_prompts, "n_trajectories": len(result.traj_ids),
           "tokens": int(run_meta["tokens"]),
           "seconds": round(float(run_meta["seconds"]), 3),
           "tokens_per_s": round(run_meta["tokens"] / run_meta["seconds"], 1) if run_meta["seconds"] else None}
    if result.is_gradient_method:
        out["n_skipped_prompts"] = int(result.prompt("skipped").sum())  # zero advantage: no node pass
        attributed = ~result.prompt("skipped")
        nodes = result.prompt("n_nodes")[attributed].double()
        out["mean_nodes"] = round(float(nodes.mean()), 3) if nodes.numel() else 0.0
        budget = result.prompt("budget_hit").nonzero().flatten().tolist()
        out["n_budget_hit"] = len(budget)
        out["budget_hit"] = [{"prompt_id": result.prompt_ids[i], "delta": float(result.prompt("delta")[i]),
                              "n_nodes": int(result.prompt("n_nodes")[i])} for i in budget]
        live = result.traj("advantage") != 0
        rel = result.delta.abs()[live]
        out["delta_max"] = float(rel.max()) if rel.numel() else 0.0
        out["delta_median"] = float(rel.median()) if rel.numel() else 0.0
        out["delta_abs_max"] = float(result.delta_abs.abs().max()) if len(result.traj_ids) else 0.0
    for layer in result.layers:
        out[f"L{layer}.active_latents"] = int(result.layer(layer, "active").any(0).sum())
    for layer, ev in result.explained_variance.items():
        out[f"L{layer}.explained_variance"] = round(ev, 4)
    return out


def _group_stats(method_name, prompt_id, prompt_index, done, total, ga: GroupAttribution, seconds, checkpointed) -> dict:
    G = len(ga.logp1)
    per_traj_total = sum(ga.per_traj[layer].sum(1) for layer in ga.per_traj) + sum(ga.error.values())
    expected = ga.advantage * (ga.logp1 - ga.logp0)
    gap = (per_traj_total - expected).abs()
    rel = ga.gaps()
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
        "checkpointed": checkpointed, "n_nodes": ga.n_nodes, "budget_hit": ga.budget_hit,
    }


def _progress_bar(total: int, initial: int, enabled: bool, method_name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"attribute ({method_name})", unit="prompt", dynamic_ncols=True)


def _signature(cfg: AttributionConfig, engine: IPGEngine, ordered: list[Trajectory], rank: int, world: int) -> str:
    """A hash of everything that determines the result: a checkpoint resumes only the same call."""
    h = hashlib.sha256()
    conf = key_dict(cfg)
    conf.pop("checkpoint_every")
    h.update(json.dumps([FORMAT_VERSION, conf], sort_keys=True).encode())
    h.update(json.dumps([rank, world, engine.model.config.to_json_string(use_diff=False)]).encode())
    h.update(module_digest(engine.model).encode())  # every weight, bit for bit
    for layer in engine.layers:
        h.update(json.dumps([layer, module_digest(engine.saes[layer])]).encode())
    for layer, origin in sorted(engine.origin.items()):  # the path's start (absent at zero: keys as before)
        h.update(json.dumps(["origin", layer]).encode() + origin.cpu().numpy().tobytes())
    for t in ordered:
        h.update(json.dumps([t.id, t.prompt_id, t.sample_index, float(t.reward), t.prompt_ids, t.completion_ids]).encode())
    return h.hexdigest()


def _sae_info(layer: int, sae, source) -> dict:
    meta = getattr(sae.cfg, "metadata", None)
    info = {"layer": layer, "architecture": sae.cfg.architecture(), "d_in": int(sae.cfg.d_in),
            "d_sae": int(sae.cfg.d_sae), "hook_name": getattr(meta, "hook_name", None),
            "model_name": getattr(meta, "model_name", None),
            "neuronpedia_id": getattr(meta, "neuronpedia_id", None)}  # e.g. gpt2-small/0-res-jb
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
