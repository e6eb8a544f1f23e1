"""Data-parallel SAE training with ``torchrun``: process group, DDP around sae-lens SAEs.

Launched by ``torchrun --nproc_per_node N -m sae_training CONFIG``, every process loads the
LM, computes activations for its own share of the data, and trains the same SAEs; DDP
averages the gradients, so the SAEs stay identical. sae-lens's ``SAETrainer`` calls
``sae.training_forward_pass(step_input=...)``; :func:`wrap_ddp` points that attribute of
the SAE instance at a DDP module whose forward runs the class's own training pass, so the
trainer's backward goes through DDP's gradient all-reduce without changing sae-lens.
Process 0 writes files and logs; the others wait at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ipg_sae.distributed import barrier, destroy, init_distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        barrier()

    def broadcast_object(self, obj):
        """Process 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor


def setup(model_device: str) -> Dist:
    """Join the process group when launched by torchrun; a single process otherwise."""
    cuda = model_device.startswith("cuda") or (model_device == "auto" and torch.cuda.is_available())
    rank, world = init_distributed(cuda=cuda)
    return Dist(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def model_device_for(d: Dist, device: str) -> str:
    """Each process's LM device: its own GPU under torchrun."""
    if d.enabled and (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{d.local_rank}"
    return device


class _TrainingPass(nn.Module):
    """A module whose forward is the SAE class's own ``training_forward_pass``."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, step_input):
        return type(self.sae).training_forward_pass(self.sae, step_input)


def wrap_ddp(sae, d: Dist):
    """Route ``sae.training_forward_pass`` through DDP; returns the DDP module (None when single-process)."""
    if not d.enabled:
        return None
    device_ids = [sae.W_dec.device.index] if sae.W_dec.device.type == "cuda" else None
    # Construction broadcasts process 0's parameters and buffers, so every copy starts equal.
    ddp = nn.parallel.DistributedDataParallel(_TrainingPass(sae), device_ids=device_ids)
    sae.training_forward_pass = lambda step_input: ddp(step_input)
    return ddp


def shutdown(d: Dist) -> None:
    if d.enabled:
        destroy()
