r"""Cells: one steering condition's outcome, computed once and stored under what determines it.

A *cell* is one intervention (a set of latents scaled by ``gamma``, or none) measured with one
estimator on one set of samples: the trajectories sampled under it (``sampling``, on-policy,
per seed) or the log-probabilities of shared unsteered samples under it (``importance``,
off-policy). Its *key* holds everything the outcome depends on: the model's weights digest,
the digests of the SAEs at the steered layers, the latents and ``gamma``, the samples (or the
sampling settings, seed, problems and prompts), the reward, the steering scope and
``FORMAT_VERSION``.

:class:`CellStore` is content-addressed: a cell lives in ``<dir>/<label>.<digest of key>.jsonl``,
so changing any setting adds new cells beside the old ones and changing it back finds the old
ones again; nothing is ever deleted to invalidate it. The first line of a cell file is
``{"cell": key, "sha256": digest of the lines below}``; the lines below are the payload. A cell
is reused only when its header's key equals the wanted key and its body matches its digest; a
cell that is damaged in any way (truncated, edited, not UTF-8, not the expected structure) is
recomputed with a one-line warning. The digest catches accidents, not edits: whoever edits a
body and recomputes its sha256 gets their edit reused (see the README's trust paragraph).

``gamma = 1`` and the empty set are the unsteered model exactly (:func:`is_unsteered`): they
are never computed as cells of their own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
import torch

from .digest import FORMAT_VERSION, json_digest, module_digest, text_digest
from .io import write_text
from .errors import IPGError
from .trajectories import Trajectory, trajectory_from_row

log = logging.getLogger(__name__)

T = TypeVar("T")
BASE = "none"  # the unsteered condition's set name


def is_unsteered(latents: Sequence, gamma: float | None) -> bool:
    """True when scaling ``latents`` by ``gamma`` leaves the model as it is (no latents, or gamma 1)."""
    return not latents or gamma is None or gamma == 1.0


def safe_label(name: str) -> str:
    """``name`` with every character a file name could trip on replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


@dataclass(frozen=True)
class Cell:
    """One (set, gamma, seed) condition; ``seed`` is -1 for an off-policy cell (it rests on every seed's samples)."""

    set: str  # BASE for no steering
    gamma: float | None
    seed: int

    @property
    def name(self) -> str:
        if self.set == BASE:
            return f"{BASE}__s{self.seed}"
        return f"{safe_label(self.set)}__g{self.gamma:g}__s{self.seed}"


@dataclass
class Inputs:
    """The digests of the model's and the SAEs' weights, computed once per run: every key holds them."""

    weights: str
    saes: dict[int, str]

    @classmethod
    def of(cls, model, saes: dict) -> "Inputs":
        return cls(module_digest(model), {layer: module_digest(sae) for layer, sae in saes.items()})

    def steered(self, latents: Sequence[Sequence[int]]) -> dict:
        """The part of a key that the steered latents' weights determine."""
        return {"weights": self.weights,
                "saes": {str(layer): self.saes[layer] for layer in sorted({int(p[0]) for p in latents})}}


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a payload becomes the lines of a cell file and back (``decode`` may raise on damaged lines)."""

    encode: Callable[[T], list[str]]
    decode: Callable[[list[str]], T]


def _decode_trajectories(lines: list[str]) -> list[Trajectory]:
    return [trajectory_from_row(json.loads(r), f"cell row {i}") for i, r in enumerate(lines, 1)]


def _decode_logprobs(lines: list[str]) -> torch.Tensor:
    values = json.loads(lines[0]) if len(lines) == 1 else None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError("not a list of log-probabilities")
    return torch.tensor(values, dtype=torch.float64)


def _decode_matrix(lines: list[str]) -> torch.Tensor:
    rows = [json.loads(r) for r in lines]
    if not rows or any(not isinstance(r, list) or len(r) != len(rows[0]) for r in rows):
        raise ValueError("not a matrix: rows of equal length")
    return torch.tensor(rows, dtype=torch.float64)


TRAJECTORIES: Codec[list[Trajectory]] = Codec(lambda ts: [json.dumps(dataclasses.asdict(t)) for t in ts],
                                              _decode_trajectories)
LOGPROBS: Codec[torch.Tensor] = Codec(lambda logp: [json.dumps(logp.tolist())], _decode_logprobs)
MATRIX: Codec[torch.Tensor] = Codec(lambda m: [json.dumps(row) for row in m.tolist()], _decode_matrix)  # a line per row


class CellStore:
    """Cells under ``directory`` (None: nothing is stored, every cell is computed)."""

    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory is not None else None

    def path(self, label: str, key: dict) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / f"{safe_label(label)}.{json_digest(_canonical(key))[:16]}.jsonl"

    def fetch(self, label: str, key: dict, compute: Callable[[], T], codec: Codec[T], name: str | None = None) -> T:
        """The cell's payload: read back when a saved cell has exactly this key and intact lines, else computed
        (and saved). The log (which calls the cell ``name``, default ``label``) says which, and why a saved cell
        with this label was not used."""
        key = _canonical({**key, "format": FORMAT_VERSION})
        path = self.path(label, key)
        if path is not None:
            if path.is_file():
                saved = self._read(path, key, codec)
                if saved is not None:
                    log.info("cell %s: reused (same model weights, SAEs, set, gamma, samples and settings)",
                             name or label)
                    return saved
            else:
                self._explain_miss(label, key)
        value = compute()
        if path is not None:
            body = codec.encode(value)
            header = {"cell": key, "sha256": text_digest("\n".join(body))}
            write_text(path, "\n".join([json.dumps(header)] + body) + "\n")
        return value

    def _read(self, path: Path, key: dict, codec: Codec[T]) -> T | None:
        """The payload, or None (and why, in the log) when the file is damaged or edited."""
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            header = json.loads(lines[0]) if lines else None
            if not isinstance(header, dict) or header.get("cell") != key:
                raise ValueError("its header is not this cell's")
            if text_digest("\n".join(lines[1:])) != header.get("sha256"):
                log.warning("cell %s: %s does not match its recorded digest (edited or damaged); recomputing it",
                            _label_of(path), path)
                return None
            return codec.decode(lines[1:])
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, IPGError) as e:
            log.warning("cell %s: %s is damaged (%s); recomputing it", _label_of(path), path, e)
            return None

    def _explain_miss(self, label: str, key: dict) -> None:
        """When cells with this label exist for other keys, say which settings differ (they stay on disk)."""
        if self.dir is None or not self.dir.is_dir():
            return
        for other in sorted(self.dir.glob(f"{safe_label(label)}.*.jsonl")):
            try:
                with open(other, encoding="utf-8") as f:
                    saved = json.loads(f.readline()).get("cell")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                continue
            if isinstance(saved, dict):
                differ = sorted(k for k in set(key) | set(saved) if saved.get(k) != key.get(k))
                log.warning("cell %s: the saved one was computed with other %s; recomputing it (the saved one is "
                            "kept)", label, ", ".join(differ))
                return


def _label_of(path: Path) -> str:
    """A cell file's label (its name without ``.<digest>.jsonl``; labels may hold dots, as in ``g0.5``)."""
    return path.name.rsplit(".", 2)[0]


def _canonical(key: dict) -> dict:
    """The key as it reads back from JSON (tuples become lists, int keys strings)."""
    return json.loads(json.dumps(key))


def samples_digest(trajectories: Sequence[Trajectory]) -> str:
    """What an off-policy cell depends on of its samples: their ids and tokens."""
    return json_digest([[t.id, t.prompt_ids, t.completion_ids] for t in trajectories])


class LogprobCells:
    """Off-policy cells on one pool of unsteered samples: every sample's log-probability under an intervention.

    The key holds the latents (sorted) and gamma but not the set's name, so two sets with the same
    latents share one cell; the file label is ``logp_g<gamma>_<digest of the latents>`` (``none``
    unsteered), so a cell of the same latents computed under other settings is named in the log.
    """

    def __init__(self, store: CellStore, scorer, inputs: Inputs, samples: Sequence[Trajectory], temperature: float,
                 scope: str):
        self.store, self.scorer, self.inputs = store, scorer, inputs
        self.context = {"estimator": "importance", "samples": samples_digest(samples), "temperature": temperature,
                        "scope": scope}

    def logprobs(self, latents: Sequence[Sequence[int]], gamma: float, name: str | None = None,
                 origin: dict[tuple[int, int], float] | None = None) -> torch.Tensor:
        """``log pi'(tau)`` of every sample with ``latents`` scaled by ``gamma`` (the unsteered model when that is
        no change), read back from the store when saved. With ``origin``, each latent is scaled about its origin
        value (:func:`ipg_sae.steering.scale_about`: ``gamma = 0`` sets it there); the key then holds those values."""
        from .steering import scale_about

        if is_unsteered(latents, gamma):
            latents, gamma = [], 1.0
        steer_by = [(int(l), int(i)) for l, i in latents]  # in the caller's order (the sum's order)
        about = {p: float(origin[p]) for p in steer_by if origin and float(origin.get(p, 0.0)) != 0.0}
        key = {**self.context, "latents": sorted(map(list, steer_by)), "gamma": float(gamma),
               **self.inputs.steered(steer_by)}
        if about:  # absent otherwise, so cells scaled about zero keep the keys they always had
            key["origin"] = sorted([l, i, v] for (l, i), v in about.items())
        label = BASE if not steer_by else f"logp_g{gamma:g}_{json_digest(key['latents'])[:8]}"
        if about:
            label += f"_o{json_digest(key['origin'])[:6]}"
        compute = lambda: self.scorer.logprobs(scale_about(steer_by, gamma, about) if steer_by else [])  # noqa: E731
        return self.store.fetch(label, key, compute, LOGPROBS, name=name)

    def steered(self, recipe: dict, interventions: Sequence, latents: Sequence[Sequence[int]], label: str,
                name: str | None = None) -> torch.Tensor:
        """``log pi'(tau)`` of every sample under any steering (vectors, clamps, scaled sets) that ``recipe``
        describes in full (its scope included); the key holds ``recipe``, the samples, the temperature and the weights
        ``latents`` read, not this panel's scope (the recipe's own), so the steering benchmark's cells keep the keys
        they always had."""
        key = {"estimator": "importance", "samples": self.context["samples"], "recipe": recipe,
               "temperature": self.context["temperature"], **self.inputs.steered(latents)}
        return self.store.fetch(label, key, lambda: self.scorer.logprobs(list(interventions)), LOGPROBS, name=name)

    def policy_change(self, progress: bool = False) -> dict[int, np.ndarray]:
        """Each SAE layer's first-order policy change per sample and latent, ``d log pi(tau) / d gamma_i`` signed,
        ``[n_samples, d_sae]`` (:meth:`ipg_sae.faithfulness.TrajectoryScorer.latent_policy_change`), kept in the
        store like a cell (one backward pass over every sample: minutes on a real model). The mean of its absolute
        value over samples is each latent's policy change alone; sums over a set's columns are the set's."""
        computed: dict = {}

        def compute(layer: int) -> torch.Tensor:
            if not computed:
                computed.update(self.scorer.latent_policy_change(per_trajectory=True, progress=progress))
            return torch.as_tensor(computed[layer], dtype=torch.float64)

        out = {}
        for layer in sorted(self.scorer.saes):
            key = {**self.context, "measure": "first-order policy change per sample", "layer": int(layer),
                   **self.inputs.steered([(layer, 0)])}
            out[layer] = self.store.fetch(f"policy_change_per_sample_L{layer}", key, lambda: compute(layer),
                                          MATRIX).numpy()
        return out
