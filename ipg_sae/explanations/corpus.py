"""The corpus an explanation is built from and scored on, and where each latent fires in it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import IPGError


@dataclass
class Corpus:
    """Token sequences, each in the build part or held out; positions before ``start[j]`` are not read."""

    sequences: list[list[int]]
    held: list[bool]
    start: list[int]


def split_corpus(sequences: list[list[int]], groups: list[str] | None = None, held_out: float = 0.5,
                 seed: int = 0, start: list[int] | None = None) -> Corpus:
    """Assign whole groups (e.g. the samples of one prompt) to the build or the held-out part at random; with
    one group per sequence by default. Both parts are non-empty when there are at least two groups."""
    groups = groups or [str(j) for j in range(len(sequences))]
    names = sorted(set(groups))
    if len(names) < 2:
        raise IPGError(f"the explanation corpus has {len(names)} prompt group(s); give at least two so that some "
                       "are held out for scoring")
    order = np.random.default_rng(seed).permutation(len(names))
    n_held = min(len(names) - 1, max(1, round(held_out * len(names))))
    held_names = {names[j] for j in order[:n_held]}
    return Corpus([list(map(int, s)) for s in sequences], [g in held_names for g in groups],
                  list(start) if start is not None else [1] * len(sequences))


@dataclass
class Activations:
    """Flat positions of a corpus and, per latent, where it fires: ``ids[k]`` is the token at flat position
    ``k`` (sequence ``seq[k]``, position ``pos[k]``); ``fires[latent] = (flat positions, activations)``."""

    ids: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    held: np.ndarray  # bool per flat position
    fires: dict[int, tuple[np.ndarray, np.ndarray]]
    offsets: np.ndarray  # flat index of each sequence's position 0
    readable: np.ndarray  # bool per flat position: at or after its sequence's start (and never position 0)

    def build_frequency(self, latent: int) -> float:
        """Share of build positions where the latent fires."""
        idx, _ = self.fires.get(latent, (np.array([], dtype=int), None))
        return float((~self.held[idx]).sum()) / max(1, int((~self.held).sum()))

    def build_frequencies(self, d_sae: int) -> np.ndarray:
        """:meth:`build_frequency` of every latent ``0 .. d_sae - 1`` at once."""
        n = max(1, int((~self.held).sum()))
        out = np.zeros(d_sae)
        for latent, (idx, _) in self.fires.items():
            if latent < d_sae:
                out[latent] = float((~self.held[idx]).sum()) / n
        return out


@torch.no_grad()
def encode_corpus(model, sae, layer: int, corpus: Corpus, batch: int = 8) -> Activations:
    """Every read position of ``corpus`` through the model up to ``layer`` and the SAE; kept sparse (only
    ``f > 0``) so a wide SAE on a long corpus fits in memory."""
    from ..models import capture_residuals

    device = next(model.parameters()).device
    flat_ids, flat_seq, flat_pos, offsets = [], [], [], []
    rows, cols, vals = [], [], []
    total = 0
    for lo in range(0, len(corpus.sequences), batch):
        chunk = corpus.sequences[lo:lo + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
        res = capture_residuals(model, ids.to(device), mask.to(device), [layer])[layer]
        for r, s in enumerate(chunk):
            j = lo + r
            offsets.append(total)
            f = sae.encode(res[r, :len(s)].to(sae.dtype)).float().cpu()
            f[:max(1, corpus.start[j])] = 0
            p, i = torch.nonzero(f > 0, as_tuple=True)
            rows.append(p.numpy() + total)
            cols.append(i.numpy())
            vals.append(f[p, i].numpy())
            flat_ids += s
            flat_seq += [j] * len(s)
            flat_pos += range(len(s))
            total += len(s)
    rows_a, cols_a, vals_a = (np.concatenate(x) if x else np.array([]) for x in (rows, cols, vals))
    order = np.argsort(cols_a, kind="stable")
    rows_a, cols_a, vals_a = rows_a[order], cols_a[order], vals_a[order]
    fires = {}
    for latent, first, count in zip(*np.unique(cols_a, return_index=True, return_counts=True)):
        fires[int(latent)] = (rows_a[first:first + count].astype(int), vals_a[first:first + count])
    seq = np.asarray(flat_seq, dtype=int)
    pos = np.asarray(flat_pos, dtype=int)
    readable = pos >= np.asarray([max(1, corpus.start[j]) for j in seq], dtype=int) if len(seq) else pos > 0
    held = np.asarray([corpus.held[j] for j in seq], dtype=bool)
    return Activations(np.asarray(flat_ids, dtype=int), seq, pos, held, fires, np.asarray(offsets, dtype=int), readable)
