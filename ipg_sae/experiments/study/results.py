"""The study's typed summary (:class:`StudySummary`) and its file, ``study/summary.json``.

Gamma is a float and a confirmed cell's label a :class:`~.labels.CellLabel`; the file writes them as before
(gamma ``"0.0"`` as a key, a confirmed set as ``ipg-k16``), so every number a reader of an older file knew is
where it was. A file carries :data:`FORMAT`; one written before the summary was typed (no ``format``: the committed
``docs/study/summary.json``) loads too, without the curves' points and the null's band, which it did not keep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import IPGError
from ...io import JSONFile
from .labels import CellLabel

FORMAT = "ipg-sae-study-summary/1"


def _gkey(gamma: float) -> str:
    return str(float(gamma))


def _by_gamma(d: dict | None, fn) -> dict[float, Any]:
    return {float(g): fn(v) for g, v in (d or {}).items()}


@dataclass
class NullRank:
    """A method's place in one null: percentile and one-sided rank p-value in the predicted direction."""

    percentile: float
    p_value: float


_ROW = ("value", "effect", "lo", "hi", "accuracy", "length", "parsed", "degenerate", "abs_log_ratio",
        "abs_log_ratio_per_token", "first_order_change", "ess_mean", "ess_min", "ess_flag")
_HEADLINE = ("null_percentile", "p_value", "vs_null", "vs_null_lo", "vs_null_hi")


@dataclass
class EffectRow:
    """One cell's off-policy effect against no steering (paired bootstrap interval over problems) and what it did
    besides: its weighted accuracy, length, parsed and degenerate rates, how far it moved the samples (realised push,
    per sample and per token, and to first order) and its effective sample size."""

    value: float
    effect: float
    lo: float
    hi: float
    accuracy: float
    length: float
    parsed: float | None
    degenerate: float | None
    abs_log_ratio: float | None
    abs_log_ratio_per_token: float | None
    first_order_change: float | None
    ess_mean: float
    ess_min: float
    ess_flag: bool  # mean ESS below min_ess
    latents: list[tuple[int, int]] | None = None  # the set (not saved: scores.json has it)
    # a method at the headline k: its rank in the frequency-matched null, its effect minus the null's, and its rank
    # in every null drawn
    null_percentile: float | None = None
    p_value: float | None = None
    vs_null: float | None = None
    vs_null_lo: float | None = None
    vs_null_hi: float | None = None
    nulls: dict[str, NullRank] | None = None
    as_predicted: bool | None = None  # the sign control: its effect has the sign opposite to the top set's

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in _ROW}
        if self.null_percentile is not None:
            out.update({k: getattr(self, k) for k in _HEADLINE})
        if self.nulls is not None:
            out["nulls"] = {kind: {"percentile": r.percentile, "p_value": r.p_value} for kind, r in self.nulls.items()}
        if self.as_predicted is not None:
            out["as_predicted"] = self.as_predicted
        return out

    @classmethod
    def from_json(cls, d: dict) -> "EffectRow":
        nulls = d.get("nulls")
        return cls(**{k: d.get(k) for k in _ROW + _HEADLINE + ("as_predicted",)},
                   nulls=None if nulls is None else {kind: NullRank(**r) for kind, r in nulls.items()})


@dataclass
class NullDraws:
    """One null's sets at the headline k and one gamma: each set's effect and realised push, and their means."""

    n: int
    effects: list[float]
    abs_log_ratios: list[float | None]
    mean_ess: float
    abs_log_ratio: float | None = None
    abs_log_ratio_per_token: float | None = None
    first_order_change: float | None = None
    parsed: float | None = None
    degenerate: float | None = None


@dataclass
class FrequencyNull:
    """The frequency-matched null across k at one gamma: its sets at the headline k, its 5-95% band of effects at
    every k (None where no set was drawn; None in a file from before the typed summary) and its mean ESS over all
    its sets."""

    n: int
    mean_ess: float
    band: dict[int, tuple[float, float] | None] | None = None


@dataclass
class Curve:
    """A method's estimated reward against k at one gamma (value and 95% interval, absolute) and its area (the mean
    effect over k). Only the area in a file from before the typed summary."""

    auc: float
    ks: list[int] | None = None
    values: list[float] | None = None
    lo: list[float] | None = None
    hi: list[float] | None = None


@dataclass
class RewardSummary:
    """One reward's study: no steering, every method's headline effect, the nulls, the sign control, the curves."""

    base: dict[str, float]  # accuracy, length, reward with no steering
    methods: dict[str, dict[float, EffectRow]] = field(default_factory=dict)  # at the headline k, by gamma
    frequency: dict[float, FrequencyNull] = field(default_factory=dict)
    nulls: dict[float, dict[str, NullDraws]] = field(default_factory=dict)  # every null at the headline k
    sign_control: dict[float, EffectRow] = field(default_factory=dict)
    curves: dict[str, dict[float, Curve]] = field(default_factory=dict)
    answer: str = ""

    def to_json(self) -> dict:
        bands = {_gkey(g): None if f.band is None else {str(k): None if b is None else list(b) for k, b in f.band.items()}
                 for g, f in self.frequency.items()}
        return {"base": self.base, "null_size": {_gkey(g): f.n for g, f in self.frequency.items()},
                "null_mean_ess": {_gkey(g): f.mean_ess for g, f in self.frequency.items()},
                "methods": {m: {_gkey(g): r.to_json() for g, r in rows.items()} for m, rows in self.methods.items()},
                "nulls": {_gkey(g): {kind: vars(n).copy() for kind, n in nulls.items()} for g, nulls in self.nulls.items()},
                "sign_control": {_gkey(g): r.to_json() for g, r in self.sign_control.items()},
                "auc": {m: {_gkey(g): c.auc for g, c in curves.items()} for m, curves in self.curves.items()},
                "curves": {m: {_gkey(g): {k: v for k, v in vars(c).items() if k != "auc"} for g, c in curves.items()}
                           for m, curves in self.curves.items()},
                "null_band": bands}

    @classmethod
    def from_json(cls, d: dict, answer: str = "") -> "RewardSummary":
        points = d.get("curves") or {}
        bands = d.get("null_band") or {}
        return cls(
            base=d["base"],
            methods={m: _by_gamma(rows, EffectRow.from_json) for m, rows in d["methods"].items()},
            frequency={float(g): FrequencyNull(n=n, mean_ess=d["null_mean_ess"][g], band=None if bands.get(g) is None
                                               else {int(k): None if b is None else tuple(b)
                                                     for k, b in bands[g].items()})
                       for g, n in d["null_size"].items()},
            nulls=_by_gamma(d["nulls"], lambda nulls: {kind: NullDraws(**n) for kind, n in nulls.items()}),
            sign_control=_by_gamma(d["sign_control"], EffectRow.from_json),
            curves={m: {float(g): Curve(auc=auc, **(points.get(m, {}).get(g) or {})) for g, auc in aucs.items()}
                    for m, aucs in d["auc"].items()},
            answer=answer)


@dataclass
class ConfirmedCell:
    """A cell sampled on-policy: its set (``label``), why it was chosen, its off-policy estimate, and its on-policy
    effect and the gap (each ``[point, lo, hi]``, paired by problem with an unsteered run of the same seeds)."""

    reward: str
    label: CellLabel
    gamma: float
    why: str
    latents: list[list[int]]
    off_policy_effect: float
    on_policy_effect: list[float]
    on_minus_off: list[float]
    agree: bool
    on_policy_value: float
    accuracy: float
    length: float
    parsed: float
    degenerate: float
    samples: int

    @property
    def set(self) -> str:
        """The cell's name in ``confirm.json`` and the evaluation's tables: ``ipg-k16``, ``push3-k16``."""
        return f"{self.label.set}-k{self.label.k}"

    def to_json(self) -> dict:
        """As ``confirm.json`` holds it: the label written as its ``set`` name, after the reward."""
        rest = {k: v for k, v in vars(self).items() if k not in ("reward", "label")}
        return {"reward": self.reward, "set": self.set, **rest}

    @classmethod
    def from_json(cls, d: dict) -> "ConfirmedCell":
        name, _, k = d["set"].rpartition("-k")
        return cls(label=CellLabel.parse(f"{name}|k{k}"), **{f: v for f, v in d.items() if f != "set"})


@dataclass
class Calibration:
    """Across one reward's confirmed cells: the on-policy effect regressed on the off-policy one, and their
    correlation (None with fewer than three cells or no spread)."""

    slope: float | None
    intercept: float | None
    correlation: float | None
    cells: int


@dataclass
class Contrast:
    """On-policy at one gamma: IPG's headline set minus a group of other confirmed cells (``against``: the best
    baseline, the sign control, a null's confirmed sets), ``[point, lo, hi]`` paired by problem, and IPG's rank among
    them in the predicted direction (1: first)."""

    gamma: float
    against: str
    sets: int
    rank: int
    ipg_minus: list[float]


@dataclass
class Regeneration:
    """The held-out samples regenerated through the evaluation path: how many came back token for token (the first
    differing ids), both accuracies, and the on-policy unsteered run minus the held-out samples (paired by problem)
    with the unsteered accuracy seed by seed."""

    samples: int
    token_identical: int
    differing: list[str]
    stored_accuracy: float
    regenerated_accuracy: float
    heldout_seed: int
    unsteered_minus_heldout_accuracy: list[float]
    unsteered_accuracy_by_seed: dict[str, float] = field(default_factory=dict)


def _calibrations(d: dict | None) -> dict[str, Calibration] | None:
    return None if d is None else {r: Calibration(**c) for r, c in d.items()}


@dataclass
class StudySummary(JSONFile):
    """Everything the study's report says, per reward (:class:`RewardSummary`), with its settings and, once
    confirmed, the on-policy cells, their calibration against the off-policy estimates, the contrasts of IPG's
    headline set against the other confirmed cells and the regeneration check of the held-out samples (from
    ``confirm.json``)."""
    KIND = "study summary"

    k: int
    ks: list[int]
    gammas: list[float]
    problems: int
    samples_per_problem: int
    null_sets: int
    curve_null_sets: int
    rewards: dict[str, RewardSummary]
    confirmation: list[ConfirmedCell] = field(default_factory=list)
    calibration: dict[str, Calibration] | None = None  # per reward
    confirm_samples_per_problem: int | None = None
    unsteered_on_policy: dict[str, dict[str, float]] | None = None  # per reward: reward, correct, length, ... n
    regeneration: Regeneration | None = None
    contrasts: list[Contrast] | None = None
    format: str = FORMAT

    def with_confirmation(self, confirmed: dict) -> "StudySummary":
        """This summary with the confirm stage's results (``confirm.json``; empty: not confirmed)."""
        return dataclasses.replace(
            self, confirmation=[ConfirmedCell.from_json(c) for c in confirmed.get("cells", [])],
            calibration=_calibrations(confirmed.get("calibration")),
            confirm_samples_per_problem=confirmed.get("samples_per_problem"),
            unsteered_on_policy=confirmed.get("unsteered"),
            regeneration=None if confirmed.get("regeneration") is None else Regeneration(**confirmed["regeneration"]),
            contrasts=None if confirmed.get("contrasts") is None else [Contrast(**c) for c in confirmed["contrasts"]])

    def to_json(self) -> dict:
        return {"k": self.k, "ks": self.ks, "gammas": self.gammas, "problems": self.problems,
                "samples_per_problem": self.samples_per_problem, "null_sets": self.null_sets,
                "curve_null_sets": self.curve_null_sets, "rewards": {r: s.to_json() for r, s in self.rewards.items()},
                "confirmation": [c.to_json() for c in self.confirmation],
                "answer": {r: s.answer for r, s in self.rewards.items()},
                "calibration": None if self.calibration is None else {r: vars(c) for r, c in self.calibration.items()},
                "confirm_samples_per_problem": self.confirm_samples_per_problem,
                "unsteered_on_policy": self.unsteered_on_policy,
                "regeneration": None if self.regeneration is None else vars(self.regeneration),
                "contrasts": None if self.contrasts is None else [vars(c) for c in self.contrasts],
                "format": self.format}

    @classmethod
    def from_json(cls, d: dict, where: str = "summary") -> "StudySummary":
        fmt = d.get("format", FORMAT)  # no format: written before the summary was typed, read as this format
        if fmt != FORMAT:
            raise IPGError(f"{where}: a study summary of format {fmt!r}, not {FORMAT!r}: rerun its report stage "
                           "(ipg-sae study CONFIG) to rewrite it from its stored cells")
        answers = d.get("answer") or {}
        return cls(k=d["k"], ks=d["ks"], gammas=[float(g) for g in d["gammas"]], problems=d["problems"],
                   samples_per_problem=d["samples_per_problem"], null_sets=d["null_sets"],
                   curve_null_sets=d["curve_null_sets"],
                   rewards={r: RewardSummary.from_json(s, answers.get(r, "")) for r, s in d["rewards"].items()},
                   confirmation=[ConfirmedCell.from_json(c) for c in d.get("confirmation") or []],
                   calibration=_calibrations(d.get("calibration")),
                   confirm_samples_per_problem=d.get("confirm_samples_per_problem"),
                   unsteered_on_policy=d.get("unsteered_on_policy"),
                   regeneration=None if d.get("regeneration") is None else Regeneration(**d["regeneration"]),
                   contrasts=None if d.get("contrasts") is None else [Contrast(**c) for c in d["contrasts"]])
