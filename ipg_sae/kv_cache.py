"""A KV cache that appends in place, for :func:`ipg_sae.sampling.decode_loop`.

transformers' default cache concatenates at every decoding step, copying every layer's whole
cache each time (a quarter of a 96-token decode of the default model, profiled). Here each layer
owns a ``[batch, heads, capacity, dim]`` buffer: a step writes its keys and values in place and
the layer's ``keys``/``values`` are views of the filled part. Dropping finished rows and
repeating a prompt's cache for its samples index the buffers.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import IPGError


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer over a buffer with room for ``capacity`` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.buffers is None:
            batch, heads, _, dim = key_states.shape
            self.buffers = tuple(x.new_empty(batch, heads, self.capacity, dim) for x in (key_states, value_states))
        if self.length + n > self.capacity:
            raise IPGError(f"the KV cache holds {self.capacity} positions; {self.length + n} were asked for")
        self.buffers[0][..., self.length:self.length + n, :] = key_states
        self.buffers[1][..., self.length:self.length + n, :] = value_states
        self.length += n
        return self._views()

    def _views(self):
        self.keys, self.values = (b[..., :self.length, :] for b in self.buffers)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.buffers is not None:
            self.buffers = tuple(b.repeat_interleave(repeats, dim=0) for b in self.buffers)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buffers is not None:
            self.buffers = tuple(b[indices] for b in self.buffers)
            self._views()


def preallocated_cache(model, capacity: int) -> DynamicCache | None:
    """A cache of :class:`PreallocatedLayer` s for ``model``, or None (the model's own cache) when its layers are
    not all plain full-attention ones (sliding windows, linear attention)."""
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache
