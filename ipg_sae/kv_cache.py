"""A KV cache of fixed rows (slots), for :func:`ipg_sae.decode.decode_loop`.

transformers' default cache concatenates at every decoding step, copying every layer's whole
cache each time (a quarter of a 96-token decode of the default model, profiled). Here each
layer owns a ``[slots, heads, capacity, dim]`` buffer: a decoding step writes one column for
every slot in place, and the layer's ``keys``/``values`` are views of the filled columns.

Rows come and go without copying the cache: a finished sample frees its slot and a new
sample's prompt (prefilled elsewhere) is written into it, right-aligned so that it ends at the
current column. Which columns each slot may attend to is the caller's mask (a slot's columns
before its prompt are stale). When the columns run out, :meth:`SlotLayer.shift` drops the
oldest ones that no slot still reads.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import IPGError


class SlotLayer(DynamicLayer):
    """A full-attention cache layer over a buffer of ``slots`` rows and ``capacity`` columns, filled up to
    ``length`` (every slot shares the column a step writes)."""

    def __init__(self, slots: int, capacity: int, length: int = 0):
        super().__init__()
        self.slots, self.capacity, self.length = slots, capacity, length
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        if self.buffers is None:
            self.buffers = tuple(x.new_zeros(self.slots, x.shape[1], self.capacity, x.shape[3]) for x in (keys, values))

    def update(self, key_states, value_states, *args, **kwargs):
        self._allocate(key_states, value_states)
        n = key_states.shape[-2]
        if key_states.shape[0] != self.slots:
            raise IPGError(f"the slot cache has {self.slots} rows; a call with {key_states.shape[0]} came")
        if self.length + n > self.capacity:
            raise IPGError(f"the KV cache holds {self.capacity} positions; {self.length + n} were asked for")
        self.buffers[0][..., self.length:self.length + n, :] = key_states
        self.buffers[1][..., self.length:self.length + n, :] = value_states
        self.length += n
        return self._views()

    def insert(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys``/``values`` (``[len(slots), heads, width, dim]``) into ``slots``, ending at the current
        column (the next step's token follows them)."""
        self._allocate(keys, values)
        width = keys.shape[-2]
        if width > self.length:
            raise IPGError(f"a prompt of {width} positions does not fit before column {self.length}")
        self.buffers[0][slots, :, self.length - width:self.length] = keys
        self.buffers[1][slots, :, self.length - width:self.length] = values
        self._views()

    def shift(self, n: int) -> None:
        """Drop the first ``n`` columns (no slot reads them any more)."""
        if self.buffers is not None and n > 0:
            for b in self.buffers:
                b[..., :self.length - n, :] = b[..., n:self.length, :].clone()
        self.length -= n
        self._views()

    def _views(self):
        if self.buffers is not None:
            self.keys, self.values = (b[..., :self.length, :] for b in self.buffers)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.slots = len(indices)
        if self.buffers is not None:
            self.buffers = tuple(b[indices] for b in self.buffers)
            self._views()


def slot_cache(model, slots: int, capacity: int, length: int) -> DynamicCache | None:
    """A cache of :class:`SlotLayer` s for ``model``, or None when its layers are not all plain full-attention
    ones (sliding windows, linear attention)."""
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [SlotLayer(slots, capacity, length) for _ in cache.layers]
    return cache


def repeated(cache: DynamicCache, n: int) -> DynamicCache:
    """A copy of ``cache`` with each row repeated ``n`` times (a shared prefix's cache for ``n`` continuations)."""
    out = copy.deepcopy(cache)
    if n > 1:
        out.batch_repeat_interleave(n)
    return out


def layer_states(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` of a cache (``[batch, heads, length, dim]``)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def attention_mask(key_real: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, 1, q_len, kv_len]``: a query sees the real keys up to itself (and itself, so padding stays finite)."""
    rows, kv = key_real.shape
    past = kv - q_len
    q_pos = past + torch.arange(q_len, device=key_real.device)
    k_pos = torch.arange(kv, device=key_real.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    allowed = causal[None] & (key_real[:, None, :] | (k_pos[None, None, :] == q_pos[None, :, None]))
    mask = torch.zeros(rows, 1, q_len, kv, dtype=dtype, device=key_real.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
