"""Sharding attribution over prompts with ``torchrun`` (embarrassingly parallel).

Launch the same program on ``N`` processes (``torchrun --nproc_per_node N ...``). Rank ``r``
attributes prompts ``r, r + N, r + 2N, ...`` (prompts in first-seen order), writes its rows to
``<out_dir>/shards/rank{r}of{N}.safetensors``, and waits at a barrier; rank 0 then merges the
shards back into prompt order, computes the global scores and saves the result; the other
ranks load it, so every rank returns the same result. Per-prompt rows are copied bit for bit,
so the merged result equals a one-process run on the same machine (global sums of the
``reason_words`` baseline are added in rank order and may differ in the last bits).

Backend: ``nccl`` when CUDA is available, ``gloo`` otherwise (CPU). Each rank should put its
model on ``cuda:LOCAL_RANK``; :func:`init_distributed` selects that device. Without
``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op and ``(0, 1)`` is returned.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(timeout_minutes: float | None = None, cuda: bool | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; return ``(rank, world)``.

    ``cuda`` picks NCCL (and the device ``cuda:LOCAL_RANK``) or gloo; default: whether CUDA is
    available. On CPU the processes of one machine split its cores between them.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        # Without this each process would start one thread per core of the shared machine.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    minutes = timeout_minutes if timeout_minutes is not None else float(os.environ.get("IPG_DIST_TIMEOUT_MIN", "360"))
    # Ranks wait for the slowest one at the final barrier: the default 30 min is too short for long runs.
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    return dist.get_rank(), dist.get_world_size()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shard(items: list, rank: int | None = None, world: int | None = None) -> list:
    """The items rank ``rank`` handles: ``items[rank::world]``."""
    if rank is None or world is None:
        rank, world = rank_world()
    return items[rank::world]


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
