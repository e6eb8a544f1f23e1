"""The study's nulls, one registry entry each: what the study draws at the headline k beside the frequency-matched
null, how many sets, from which random stream, under which cell label, whether its first sets are confirmed
on-policy, and how the report draws and names it.

A new null for the study is one :func:`register` call (with a draw function: a kind of :mod:`ipg_sae.nulls`, or
anything with the signature of :class:`ControlNull.draw`); the study scores it, summarises it, ranks every method
in it, confirms it and reports it with no other edit. Its number of sets comes from ``study.null_counts[name]``
(or the entry's ``default_sets``) unless the entry names a config field of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from ...attribution import AttributionResult
from ...errors import IPGError
from ...nulls import LatentPool, Selection, draw_sets
from ...selection import permuted_rankings

log = logging.getLogger(__name__)

FREQUENCY = "frequency"  # the headline null: drawn at every k of the curves (seed ``null_seed + k``), label ``null``
FREQUENCY_LABEL = "null"
FREQUENCY_COLOR = "darkgrey"


@dataclass(frozen=True)
class ControlNull:
    name: str
    label: str  # the cells' label prefix: ``<label><draw>|k<k>``
    seed_offset: int  # added to ``study.null_seed``: each null its own random stream (these values made the stored cells)
    # draw(template, k, n, seed, pool, ipg) -> n sets like the template (IPG's top k); ipg: IPG's attribution
    draw: Callable[[Sequence[tuple[int, int]], int, int, int, LatentPool, AttributionResult], list[Selection]]
    description: str  # what the sets are, in the report's words ("push-matched random sets")
    color: str = "C4"  # in the report's plots
    confirmed: bool = True  # its first ``confirm_null_sets`` sets are sampled on-policy
    sets_field: str | None = None  # the StudyConfig field giving its number of sets (else null_counts / default_sets)
    default_sets: int = 20

    def sets(self, cfg) -> int:
        """How many sets the study draws for the first reward."""
        if self.sets_field:
            return int(getattr(cfg, self.sets_field))
        return int(cfg.null_counts.get(self.name, self.default_sets))


def random_sets(kind: str):
    """A draw function for a kind of :mod:`ipg_sae.nulls` (matched on the pool)."""
    def draw(template, k, n, seed, pool, ipg):
        return draw_sets(kind, template, n, seed, pool)
    return draw


def permutation_sets(template, k, n, seed, pool, ipg):
    """IPG's selection rerun on shuffled rewards (:func:`ipg_sae.selection.permuted_rankings`)."""
    try:
        return permuted_rankings(ipg, k, n, seed=seed)
    except IPGError as e:  # e.g. a trajectory at exactly its group's baseline (a non-binary reward)
        log.warning("study: no reward-permutation null: %s", e)
        return []


NULLS: dict[str, ControlNull] = {}


def register(entry: ControlNull) -> ControlNull:
    """Add a null to every study (in registration order: the order of the report's rows)."""
    if entry.name == FREQUENCY or entry.label in {FREQUENCY_LABEL, *(e.label for e in NULLS.values() if
                                                                     e.name != entry.name)}:
        raise IPGError(f"null {entry.name!r}: its name or label {entry.label!r} is taken; choose another")
    NULLS[entry.name] = entry
    return entry


register(ControlNull("push", "push", 7919, random_sets("push"), "push-matched random sets", color="C9",
                     sets_field="push_null_sets"))
register(ControlNull("policy", "policy", 7927, random_sets("policy"), "policy-change-matched random sets",
                     color="C5", sets_field="policy_null_sets"))
register(ControlNull("permutation", "perm", 0, permutation_sets, "sets IPG picks on shuffled rewards", color="C1",
                     sets_field="permutation_sets"))


def labels() -> dict[str, str]:
    """Every null's cell label prefix by name, the frequency-matched null first."""
    return {FREQUENCY: FREQUENCY_LABEL, **{name: e.label for name, e in NULLS.items()}}


def colors() -> dict[str, str]:
    return {FREQUENCY: FREQUENCY_COLOR, **{name: e.color for name, e in NULLS.items()}}
