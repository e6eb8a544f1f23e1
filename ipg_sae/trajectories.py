"""Trajectories: sampled, rewarded completions, stored with their exact token ids.

A trajectory keeps ``prompt_ids`` and ``completion_ids`` as sampled, so attribution re-scores
exactly the tokens the policy produced (decoding and re-tokenizing text is not an identity).
It also records the fingerprint of the model and tokenizer that produced it, so it cannot be
attributed against a different model by mistake.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import IPGError
from .io import read_jsonl_numbered, write_jsonl


@dataclass
class Trajectory:
    id: str
    prompt_id: str
    sample_index: int
    prompt: str
    completion: str
    reference: str
    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float
    answer: str | None = None
    correct: bool = False
    parsed: bool = True
    model: dict = field(default_factory=dict)  # models.model_fingerprint of the sampler

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Trajectory))


def save_trajectories(path: str | Path, trajectories: list[Trajectory]) -> None:
    write_jsonl(path, (dataclasses.asdict(t) for t in trajectories))


def load_trajectories(path: str | Path) -> list[Trajectory]:
    path = Path(path)
    if not path.is_file():
        raise IPGError(f"trajectories file {path} not found; run `ipg-sae sample` first or fix the path")
    out = [trajectory_from_row(row, f"{path}:{line_no}") for line_no, row in read_jsonl_numbered(path)]
    if not out:
        raise IPGError(f"{path} holds no trajectories; sample some first")
    return out


def trajectory_from_row(row, where: str) -> Trajectory:
    """A :class:`Trajectory` from one decoded JSON row (unknown fields ignored), checked field by field; an
    :class:`~ipg_sae.errors.IPGError` naming ``where`` and the field when the row is not one."""
    if not isinstance(row, dict):
        raise IPGError(f"{where}: a trajectory must be a JSON object, found {type(row).__name__}; was it "
                       "written by `ipg-sae sample`?")
    missing = {"id", "prompt_id", "prompt_ids", "completion_ids", "reward"} - set(row)
    if missing:
        raise IPGError(f"{where}: trajectory lacks {sorted(missing)}; was it written by `ipg-sae sample`?")
    _check_row(row, where)
    return Trajectory(**{k: v for k, v in row.items() if k in _FIELDS})


def _check_row(row: dict, where: str) -> None:
    """The fields every consumer indexes into have the types they need (one line naming the field if not)."""
    for key in ("prompt_ids", "completion_ids"):
        ids = row[key]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise IPGError(f"{where}: `{key}` must be a list of token ids, found {type(ids).__name__} {ids!r:.40}; "
                           "resample (`ipg-sae sample`) or fix that line")
    for key in ("id", "prompt_id"):
        if not isinstance(row[key], str):
            raise IPGError(f"{where}: `{key}` must be a string, found {row[key]!r:.40}; fix that line")
    for key in ("prompt", "completion", "reference"):
        if key in row and not isinstance(row[key], str):
            raise IPGError(f"{where}: `{key}` must be a string, found {type(row[key]).__name__}; fix that line")
    if "sample_index" not in row or not isinstance(row["sample_index"], int) or isinstance(row["sample_index"], bool):
        raise IPGError(f"{where}: `sample_index` must be a whole number (0 for a prompt's first sample), found "
                       f"{row.get('sample_index')!r:.40}; fix that line")
    for key in ("answer",):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise IPGError(f"{where}: `{key}` must be a string or null, found {type(row[key]).__name__}; fix that line")
    if "model" in row and not isinstance(row["model"], dict):
        raise IPGError(f"{where}: `model` must be an object (the sampler's fingerprint), found "
                       f"{type(row['model']).__name__}; resample (`ipg-sae sample`) or fix that line")
    if not isinstance(row["reward"], (int, float)) or isinstance(row["reward"], bool):
        raise IPGError(f"{where}: `reward` must be a number, found {row['reward']!r:.40}; fix the reward function "
                       "and resample")


def group_by_prompt(trajectories: list[Trajectory]) -> "OrderedDict[str, list[Trajectory]]":
    """Trajectories grouped by prompt, in first-seen order, each group sorted by sample index."""
    groups: OrderedDict[str, list[Trajectory]] = OrderedDict()
    for t in trajectories:
        groups.setdefault(t.prompt_id, []).append(t)
    for g in groups.values():
        g.sort(key=lambda t: t.sample_index)
    return groups


def prompt_groups(prompt_ids: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """The distinct prompt ids in first-seen order, and for each the positions where it occurs."""
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(i)
    return list(groups), list(groups.values())


def check_rewards(trajectories: list[Trajectory]) -> None:
    for t in trajectories:
        if not isinstance(t.reward, (int, float)) or not math.isfinite(t.reward):
            raise IPGError(f"trajectory {t.id} has reward {t.reward!r}; rewards must be finite numbers: fix the reward function")


def check_same_model(trajectories: list[Trajectory], fingerprint: dict) -> None:
    """Refuse trajectories sampled by a model or tokenizer other than ``fingerprint``'s."""
    for t in trajectories:
        if not t.model:
            continue
        if t.model.get("tokenizer_sha") != fingerprint["tokenizer_sha"]:
            raise IPGError(f"trajectory {t.id} was sampled with a different tokenizer ({t.model.get('name')!r}) than the "
                           f"model given ({fingerprint['name']!r}); attribute with the model that sampled it")
        if t.model.get("arch_sha") != fingerprint["arch_sha"]:
            raise IPGError(f"trajectory {t.id} was sampled by a different model architecture ({t.model.get('name')!r}) "
                           f"than the one given ({fingerprint['name']!r}); attribute with the model that sampled it")
