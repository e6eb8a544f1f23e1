"""Accumulating per-prompt results: checkpoints, resume and shard merging share one format.

An :class:`Accumulator` holds the rows one process has computed, in processing order, plus
the global accumulators (top contexts, ReasonScore sums). It is saved whole as a checkpoint
(resume) or as a shard (``torchrun``), and :func:`assemble` merges accumulators into prompt
and trajectory order. Rows are copied bit for bit, so a resumed or merged result equals an
uninterrupted one-process result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..digest import tensors_digest
from ..errors import IPGError
from ..trajectories import Trajectory
from .engine import GroupAttribution
from .result import (CONTEXT_FIELDS, CSR_FIELDS, context_key, is_per_prompt, is_per_trajectory, layer_key, map_key,
                     prompt_key, split_layer_key, traj_key)

log = logging.getLogger(__name__)

Contexts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (value, trajectory, position), each [d_sae, m]
Entries = tuple[torch.Tensor, torch.Tensor]  # one trajectory's non-zero (latents, values)


class Accumulator:
    """The rows one process has computed, in processing order, plus global accumulators."""

    def __init__(self, layers: list[int], d_sae: dict[int, int], n_contexts: int):
        self.layers, self.d_sae, self.m = layers, d_sae, n_contexts
        self.prompts: list[int] = []
        self.rows: dict[str, list[torch.Tensor]] = {}  # per-prompt keys
        self.trajs: list[int] = []
        self.trows: dict[str, list[torch.Tensor]] = {}  # per-trajectory keys
        self.entries: dict[int, list[Entries]] = {layer: [] for layer in layers}  # per-trajectory sparse rows
        self.contexts = {layer: empty_contexts(d_sae[layer], n_contexts) for layer in layers}
        self.reason: dict[str, torch.Tensor] = {}  # the reason_words baseline's global sums
        self.maps: dict[str, dict[str, torch.Tensor]] = {}
        self.seconds = 0.0
        self.tokens = 0

    @property
    def done(self) -> set[int]:
        return set(self.prompts)

    def add(self, prompt_index: int, traj_index: list[int], group: list[Trajectory], ga: GroupAttribution,
            gradient: bool, keep_attribution: bool) -> None:
        """Add one prompt's group (``traj_index``: global indices of its trajectories)."""
        G = len(group)
        self.prompts.append(prompt_index)
        gaps = ga.gaps()
        row = {prompt_key("n_scope"): torch.tensor(ga.n_scope), prompt_key("skipped"): torch.tensor(bool(ga.skipped)),
               prompt_key("n_nodes"): torch.tensor(ga.n_nodes), prompt_key("budget_hit"): torch.tensor(ga.budget_hit),
               prompt_key("delta"): gaps.max() if gaps.numel() and gradient else torch.tensor(0.0, dtype=torch.float64)}
        for layer in self.layers:
            if gradient:
                row[layer_key(layer, "attribution")] = (ga.per_traj[layer].sum(0) / G).float()
            elif keep_attribution:  # `act`: the per-prompt value is the mean activation
                row[layer_key(layer, "attribution")] = ga.activation_sum[layer].float()
            row[layer_key(layer, "active")] = ga.active[layer].bool()
            row[layer_key(layer, "activation")] = ga.activation_sum[layer].float()
            value, r, pos = ga.contexts[layer]
            glob = torch.tensor(traj_index, dtype=torch.long)
            empty = value < 0
            t = torch.where(empty, torch.full_like(r, -1), glob[r.clamp(0, G - 1)])
            p = torch.where(empty, torch.full_like(pos, -1), pos)
            self.contexts[layer] = merge_contexts(self.contexts[layer], (value.float(), t, p), self.m)
            row[layer_key(layer, "variance")] = ga.variance[layer]  # per prompt: summed in prompt order later
        for k, v in row.items():
            self.rows.setdefault(k, []).append(v)
        for g, traj in enumerate(group):
            self.trajs.append(traj_index[g])
            trow = {traj_key("prompt"): torch.tensor(prompt_index), traj_key("logp1"): ga.logp1[g],
                    traj_key("logp0"): ga.logp0[g], traj_key("advantage"): ga.advantage[g],
                    traj_key("n_generated"): torch.tensor(len(traj.completion_ids)),
                    traj_key("n_tokens"): torch.tensor(traj.n_tokens)}
            for layer in self.layers:
                a = ga.per_traj[layer][g]
                nz = a.nonzero().squeeze(1)
                trow[layer_key(layer, "traj.sum")] = a.sum()
                trow[layer_key(layer, "traj.error")] = ga.error[layer][g]
                self.entries[layer].append((nz, a[nz].float()))
            for k, v in trow.items():
                self.trows.setdefault(k, []).append(v)
        for tid, m in ga.token_maps.items():
            n = len(m["tokens"])
            self.maps[tid] = {"tokens": torch.tensor(m["tokens"], dtype=torch.long),
                              **{k: v[:n].contiguous() if k.endswith("latents") else v[:n].float().contiguous()
                                 for k, v in m.items() if k != "tokens"}}

    # -- to and from tensors -------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        t: dict[str, torch.Tensor] = {"prompts": torch.tensor(self.prompts, dtype=torch.long),
                                      "trajs": torch.tensor(self.trajs, dtype=torch.long)}
        for k, v in {**self.rows, **self.trows}.items():
            t[k] = torch.stack(v)
        for layer in self.layers:
            t.update(pack_csr(layer, self.entries[layer]))
            for name, x in zip(CONTEXT_FIELDS, self.contexts[layer]):
                t[context_key(layer, name)] = x
        t.update(self.reason)
        map_ids = sorted(self.maps)
        for i, tid in enumerate(map_ids):
            for k, v in self.maps[tid].items():
                t[map_key(i, k)] = v
        meta = {"token_map_ids": map_ids, "seconds": self.seconds, "tokens": self.tokens}
        return t, meta

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor], meta: dict, layers, d_sae, n_contexts) -> "Accumulator":
        acc = cls(layers, d_sae, n_contexts)
        acc.prompts = t["prompts"].tolist()
        acc.trajs = t["trajs"].tolist()
        acc.seconds, acc.tokens = meta.get("seconds", 0.0), meta.get("tokens", 0)
        for k, v in t.items():
            if is_per_prompt(k):
                acc.rows[k] = list(v.unbind(0))
            elif is_per_trajectory(k):
                acc.trows[k] = list(v.unbind(0))
            elif (parts := split_layer_key(k)) and parts[1].startswith("rw."):
                acc.reason[k] = v
        for layer in layers:
            acc.entries[layer] = unpack_csr(layer, t)
            acc.contexts[layer] = tuple(t[context_key(layer, name)] for name in CONTEXT_FIELDS)
        for i, tid in enumerate(meta.get("token_map_ids", [])):
            prefix = map_key(i, "")
            acc.maps[tid] = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
        return acc

    def save(self, path: Path, signature: str) -> None:
        """Write the accumulator atomically, stamped with the call's ``signature``."""
        from safetensors.torch import save_file

        from ..io import atomic_path

        t, meta = self.state()
        t = {k: v.contiguous() for k, v in t.items()}
        meta["signature"] = signature
        meta["sha256"] = tensors_digest(t)  # checked on load: an edited or damaged file is not resumed
        with atomic_path(path) as tmp:
            save_file(t, str(tmp), metadata={"state": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, signature: str | None, layers, d_sae, n_contexts) -> "Accumulator | None":
        """The accumulator saved at ``path``; None (with one warning) when it belongs to a different call,
        or is unreadable, or its tensors do not match the digest it was saved with."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("state", "{}"))
            if signature is not None and meta.get("signature") != signature:
                log.warning("checkpoint %s belongs to a different attribution call (other inputs or settings); "
                            "starting from scratch", path)
                return None
            tensors = load_file(str(path))
            if tensors_digest(tensors) != meta.get("sha256"):
                log.warning("checkpoint %s does not match its recorded digest (edited or damaged); recomputing", path)
                return None
            return cls.from_state(tensors, meta, layers, d_sae, n_contexts)
        except Exception as e:  # a cut or garbled file: safetensors raises its own error types
            log.warning("ignoring unreadable checkpoint %s (%s: %s); recomputing", path, type(e).__name__,
                        str(e)[:120])
            return None


# ---- sparse rows and contexts -------------------------------------------------------------


def pack_csr(layer: int, entries: list[Entries]) -> dict[str, torch.Tensor]:
    """Per-trajectory sparse rows of one layer as CSR tensors under their result keys."""
    indptr = torch.tensor([0] + np.cumsum([len(i) for i, _ in entries]).tolist(), dtype=torch.long)
    indices = torch.cat([i for i, _ in entries]) if entries else torch.zeros(0, dtype=torch.long)
    values = torch.cat([v for _, v in entries]) if entries else torch.zeros(0)
    return dict(zip((layer_key(layer, f) for f in CSR_FIELDS), (indptr, indices, values)))


def unpack_csr(layer: int, t: dict[str, torch.Tensor]) -> list[Entries]:
    indptr, idx, val = (t[layer_key(layer, f)] for f in CSR_FIELDS)
    return [(idx[a:b], val[a:b]) for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())]


def empty_contexts(d_sae: int, m: int) -> Contexts:
    return (torch.full((d_sae, m), -1.0), torch.full((d_sae, m), -1, dtype=torch.long),
            torch.full((d_sae, m), -1, dtype=torch.long))


def merge_contexts(a: Contexts, b: Contexts, m: int) -> Contexts:
    """Top ``m`` of the union, ordered by (value desc, trajectory asc, position asc): order-independent."""
    v, t, p = (torch.cat([x, y], dim=1) for x, y in zip(a, b))
    for key in (p, t):
        order = key.argsort(dim=1, stable=True)
        v, t, p = v.gather(1, order), t.gather(1, order), p.gather(1, order)
    order = (-v).argsort(dim=1, stable=True)
    v, t, p = v.gather(1, order), t.gather(1, order), p.gather(1, order)
    return v[:, :m].contiguous(), t[:, :m].contiguous(), p[:, :m].contiguous()


# ---- merging --------------------------------------------------------------------------------


def assemble(parts: list[Accumulator], n_prompts: int, n_trajs: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge processes' accumulators into global prompt / trajectory order."""
    states = [p.state() for p in parts]
    prompts = torch.cat([s["prompts"] for s, _ in states])
    trajs = torch.cat([s["trajs"] for s, _ in states])
    if sorted(prompts.tolist()) != list(range(n_prompts)) or sorted(trajs.tolist()) != list(range(n_trajs)):
        raise IPGError("the shards do not cover every prompt exactly once; delete the run's shards/ and rerun")
    p_order, t_order = prompts.argsort(), trajs.argsort()
    first = parts[0]
    out: dict[str, torch.Tensor] = {}
    keys = dict.fromkeys(k for s, _ in states for k in s)  # rank 0 may have had no prompts
    for k in keys:
        if not (is_per_prompt(k) or is_per_trajectory(k)):
            continue
        cat = torch.cat([s[k] for s, _ in states if k in s])  # a rank with no prompts has no rows
        out[k] = cat[p_order if is_per_prompt(k) else t_order].contiguous()
    for layer in first.layers:
        entries = [e for p in parts for e in p.entries[layer]]
        out.update(pack_csr(layer, [entries[i] for i in t_order.tolist()]))
        ctx = first.contexts[layer]
        for p in parts[1:]:
            ctx = merge_contexts(ctx, p.contexts[layer], first.m)
        for name, x in zip(CONTEXT_FIELDS, ctx):
            out[context_key(layer, name)] = x
    for k in first.reason:  # global sums, added in rank order
        out[k] = sum((p.reason[k] for p in parts[1:]), first.reason[k].clone())
    maps = {tid: m for p in parts for tid, m in p.maps.items()}
    for i, tid in enumerate(sorted(maps)):
        for k, v in maps[tid].items():
            out[map_key(i, k)] = v
    meta = {"token_map_ids": sorted(maps), "seconds": max(p.seconds for p in parts),
            "tokens": sum(p.tokens for p in parts)}
    return out, meta
