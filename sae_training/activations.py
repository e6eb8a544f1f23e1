"""Residual-stream activations for SAE training: computed in fixed chunks, cached, shuffled.

The training rows are cut into chunks of ``chunk_sequences`` rows. Chunk ``i`` is always
the same rows, so its activations can be cached on disk (safetensors, one file per layer
and chunk, keyed by a hash of the model and of the chunk's tokens) and reused across
epochs and runs. One LM forward per batch of rows serves every requested layer, and
``capture_residuals`` stops the forward at the last of them.

Batches come from blocks of ``buffer_chunks`` chunks: a block's activations are shuffled
together with a generator seeded by (seed, block number), and cut into batches; the few
tokens left over at a block's end are dropped. How many batches each block gives is
known from the masks alone (no LM needed), so the batch for any step can be found from
the step count: a resumed run recomputes (or reloads) its current block and continues
exactly where the killed run was. Epochs repeat the blocks with fresh shuffles.

With several processes, process ``r`` of ``W`` takes chunks ``r, r+W, r+2W, ...``: each runs
the LM on its own data and the chunk files stay valid for any number of processes.

Attention sinks: besides a sequence's first token, models put residuals of ~100x the usual
norm on a few other early tokens, e.g. at the start of packed rows cut from mid-document
(SmolLM2: ~8% of packed rows). One such vector outweighs thousands of ordinary tokens in the
loss, so each batch drops positions whose norm exceeds ``max_norm_ratio`` x the batch median.
The rule depends only on the batch, so the data order stays a function of the step.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from ipg_sae.errors import IPGError
from ipg_sae.io import atomic_path
from ipg_sae.models import capture_residuals, model_fingerprint

from .data import TokenRows

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def inliers(x: torch.Tensor, max_norm_ratio: float) -> torch.Tensor:
    """Rows of ``x [n, d]`` whose norm is at most ``max_norm_ratio`` x the median (all rows when 0)."""
    if not max_norm_ratio or x.shape[0] == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    norms = x.float().norm(dim=-1)
    return norms <= max_norm_ratio * norms.median()


def model_key(model, tokenizer) -> str:
    """Identify the model's weights and tokenizer for the cache (different weights: different key)."""
    h = hashlib.sha256(json.dumps(model_fingerprint(model, tokenizer), sort_keys=True).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            # A strided sample of every tensor: any fine-tune or dtype change alters it, and
            # it costs milliseconds where hashing all weights would cost a second per GB.
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


class ActivationCache:
    """Chunk activations on disk: ``<root>/<model_key>/layer_<L>/<chunk_key>.safetensors``."""

    def __init__(self, root: str | Path, model_key: str, dtype: str):
        self.root = Path(root) / model_key
        self.dtype = dtype

    def path(self, layer: int, rows: TokenRows) -> Path:
        return self.root / f"layer_{layer}" / f"{rows.digest()[:24]}-{self.dtype}.safetensors"

    def load(self, layer: int, rows: TokenRows) -> torch.Tensor | None:
        path = self.path(layer, rows)
        if not path.is_file():
            return None
        try:
            acts = load_file(str(path))["acts"]
        except Exception as e:  # a damaged cache file is recomputed, never trusted
            log.warning("activation cache file %s is unreadable (%s); recomputing it", path, e)
            return None
        if acts.shape[0] != rows.n_valid():
            log.warning("activation cache file %s has %d rows, expected %d; recomputing it", path, acts.shape[0],
                        rows.n_valid())
            return None
        return acts

    def save(self, layer: int, rows: TokenRows, acts: torch.Tensor) -> None:
        with atomic_path(self.path(layer, rows)) as tmp:
            save_file({"acts": acts.contiguous()}, str(tmp))


@torch.no_grad()
def compute_residuals(model, rows: TokenRows, layers: list[int], lm_batch_size: int,
                      dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Residuals at the masked positions of ``rows`` for each layer: ``{layer: [n_valid, d]}`` on the CPU."""
    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(rows), lm_batch_size):
        batch = trim(rows[start:start + lm_batch_size])
        # An all-ones attention mask is the same as none, and none keeps the fast attention path.
        attention = None if bool(batch.attention.all()) else batch.attention.to(device)
        residuals = capture_residuals(model, batch.tokens.to(device), attention, layers)
        mask = batch.mask.to(device)
        for layer in layers:
            out[layer].append(residuals[layer][mask].to("cpu", dtype))
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def trim(rows: TokenRows) -> TokenRows:
    """Drop the padding columns that no row of ``rows`` needs (right padding)."""
    length = int(rows.attention.sum(1).max()) if len(rows) else 0
    return rows if length == rows.tokens.shape[1] else TokenRows(rows.tokens[:, :length], rows.attention[:, :length],
                                                                    rows.mask[:, :length])


class ActivationSource:
    """The activations of chunk ``i`` of the training rows, from the cache or the LM."""

    def __init__(self, model, rows: TokenRows, layers: list[int], chunk_sequences: int, lm_batch_size: int,
                 dtype: str = "float32", cache: ActivationCache | None = None):
        self.model, self.rows, self.layers = model, rows, sorted(layers)
        self.chunk_sequences, self.lm_batch_size = chunk_sequences, lm_batch_size
        self.dtype = DTYPES[dtype]
        self.cache = cache
        self.n_chunks = -(-len(rows) // chunk_sequences)
        self.lm_tokens = 0  # tokens run through the LM (0 when everything came from the cache)

    def chunk_rows(self, i: int) -> TokenRows:
        return self.rows[i * self.chunk_sequences:(i + 1) * self.chunk_sequences]

    def chunk_valid(self, i: int) -> int:
        return self.chunk_rows(i).n_valid()

    def chunk(self, i: int) -> dict[int, torch.Tensor]:
        rows = self.chunk_rows(i)
        if self.cache is not None:
            cached = {layer: self.cache.load(layer, rows) for layer in self.layers}
            if all(acts is not None for acts in cached.values()):
                return cached
        acts = compute_residuals(self.model, rows, self.layers, self.lm_batch_size, self.dtype)
        self.lm_tokens += int(rows.attention.sum())
        if self.cache is not None:
            for layer in self.layers:
                self.cache.save(layer, rows, acts[layer])
        return acts


class ActivationStream:
    """Training batches in a fixed order: the batch of step ``s`` depends only on ``s``."""

    def __init__(self, source: ActivationSource, batch_size: int, buffer_chunks: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, max_norm_ratio: float = 0.0):
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.max_norm_ratio = max_norm_ratio
        self.dropped = 0  # positions dropped as attention-sink outliers
        mine = list(range(rank, source.n_chunks, world_size))
        self.blocks = [mine[j:j + buffer_chunks] for j in range(0, len(mine), buffer_chunks)]
        counts = [sum(source.chunk_valid(c) for c in block) // batch_size for block in self.blocks]
        self.block_batches = counts
        self.steps_per_epoch = sum(counts)
        if self.steps_per_epoch == 0:
            valid = sum(source.chunk_valid(c) for c in mine)
            raise IPGError(f"no block of {buffer_chunks} chunks in process {rank}'s share of the training data "
                           f"({valid} tokens in all) fills one batch of {batch_size} tokens; add data, raise "
                           "buffer_chunks or chunk_sequences, or lower batch_size_tokens")
        self._memo: tuple[int, dict[int, torch.Tensor]] | None = None  # the last block loaded
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)

    def locate(self, step: int) -> tuple[int, int]:
        """(global block number, batch within the block) of ``step``; block numbers count on across epochs."""
        epoch, within = divmod(step, self.steps_per_epoch)
        block = bisect.bisect_right(self._starts, within) - 1
        while self.block_batches[block] == 0:  # a block too small for one batch is skipped
            block += 1
        return epoch * len(self.blocks) + block, within - self._starts[block]

    def load_block(self, global_block: int) -> dict[int, torch.Tensor]:
        """The shuffled activations of a block (the last one is kept, so loading it twice is free)."""
        if self._memo is not None and self._memo[0] == global_block:
            return self._memo[1]
        self._memo = None  # free the previous block before computing the next
        block = self.blocks[global_block % len(self.blocks)]
        parts = [self.source.chunk(c) for c in block]
        acts = {layer: torch.cat([p[layer] for p in parts]) for layer in self.source.layers}
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + global_block)
            n = next(iter(acts.values())).shape[0]
            perm = torch.randperm(n, generator=gen)  # one order for all layers: a batch is the same tokens
            acts = {layer: a[perm] for layer, a in acts.items()}
        self._memo = (global_block, acts)
        return acts

    def _drop_outliers(self, x: torch.Tensor) -> torch.Tensor:
        keep = inliers(x, self.max_norm_ratio)
        if keep.all():
            return x
        self.dropped += int((~keep).sum())
        return x[keep]

    def batches(self, start_step: int = 0) -> Iterator[dict[int, torch.Tensor]]:
        """Batches for steps ``start_step, start_step + 1, ...`` (cycling over epochs without end)."""
        block, offset = self.locate(start_step)
        while True:
            n = self.block_batches[block % len(self.blocks)]
            if n:
                acts = self.load_block(block)
                for j in range(offset, n):
                    sl = slice(j * self.batch_size, (j + 1) * self.batch_size)
                    yield {layer: self._drop_outliers(a[sl]) for layer, a in acts.items()}
                del acts
            block, offset = block + 1, 0
