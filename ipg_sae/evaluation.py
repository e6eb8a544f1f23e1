r"""Does steering a selected set move the reward? Accuracy and length under a gamma sweep, with controls.

For a held-out problem set (never the prompts the set was selected on) and each sampling
seed, we sample completions under these conditions (``docs/ipg-method.md`` §5):

* ``none``: no steering (the base);
* the set under test (``target``, IPG's by default) scaled by each ``gamma`` of a sweep,
  ``x_t' = x_t + (gamma - 1) sum_{i in P} f_{t,i} W_dec[i]`` (:func:`ipg_sae.steering.scale`);
* the same gammas on ``n_random_sets`` random sets with the target's size and layer
  composition (drawn among latents active on the data when an ``active`` mask is given);
* the same gammas on every other named set (the baselines' sets).

Every condition uses the same seeds, so conditions are compared on common random numbers.
``gamma = 1`` is the clean model exactly, so it reuses the base cell
(:func:`ipg_sae.cells.is_unsteered`).

Statistics. For a condition, each problem's outcome is its mean over seeds and samples; the
reported value is the mean over problems, with the paired (and, for random draws, two-level)
percentile bootstrap of :func:`ipg_sae.stats.bootstrap`. The random control is a null of
:mod:`ipg_sae.nulls` (``eval.null``). Degenerate outputs (a repeated n-gram loop, an empty completion, or no
parseable answer) are counted per sample.

Checkpointing. Each ``(set, gamma, seed)`` cell is stored in ``<out_dir>/cells/`` as soon as
it finishes, keyed by everything it depends on (:mod:`ipg_sae.cells`: the model's weights
digest, the digests of the steered layers' SAEs, the set, gamma, seed, problems, prompts,
sampling settings, reward, scope and the result format). A rerun reuses a finished cell only
when all of that matches and its rows are intact, and says so in the log; otherwise it
computes the cell and says why. So a killed evaluation resumes, a cell computed with another
SAE or an edited cell file is never reused, and cells of other settings stay on disk. The raw per-sample table (``samples.csv``) holds everything the
summary is computed from (:func:`summarize_samples`).

The harness is reward-agnostic: accuracy, generated length and mean reward are reported for
every reward, so a length-selected set (reasoning strength) is judged on length with its
accuracy alongside. Nothing ties a set to the task or model it was selected on: transfer is
this evaluation with another task's problems or another model (checked by
:func:`ipg_sae.steering.check_selection`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .cells import BASE, TRAJECTORIES, Cell, CellStore, Inputs, LogprobCells, is_unsteered, safe_label
from .errors import IPGError
# the config and the estimators' names live torch-free (`ipg-sae CMD --help`); re-exported here
from .evaluation_config import BUILT_IN_ESTIMATORS, ESTIMATORS, EvalConfig, Estimator  # noqa: F401
from .io import read_json, write_json, write_text
from .models import model_fingerprint
from .nulls import LatentPool, NullKind, draw_sets
from .rewards import Reward, get_reward
from .sampling import SamplingConfig, eos_ids, sample
from .saes import as_layer_dict
from .stats import bootstrap, predicted_direction
from .steering import Selection, as_selection, check_selection, scale, steering
from .tasks import Problem
from .trajectories import Trajectory, prompt_groups

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("accuracy", "length", "reward")
_RANDOM_NAME = "random-draw{}"
_RANDOM_RE = re.compile(r"^random-draw\d+$")


# ---- the result ---------------------------------------------------------------------------


@dataclass
class EvalMeta:
    """What was evaluated, and how: everything the summary and the report are computed from besides the samples."""

    estimator: Estimator
    null: NullKind | None  # the random sets' kind (None: no random control)
    n_problems: int
    problem_ids: list[str]
    seeds: list[int]
    gammas: list[float]
    n_samples: int  # samples per problem and seed
    samples_per_problem: int  # samples each problem's estimate rests on (every seed's)
    target: str
    sets: dict[str, list[list[int]]]  # name -> latents, random draws included
    random_sets: list[str]
    reward: str
    primary_metric: str
    primary_direction: int
    scope: str
    sampling: dict
    task: dict
    n_bootstrap: int
    confidence: float
    model: dict
    degenerate_rule: dict
    # importance only: effective sample sizes per cell, the flagged cells, the threshold, latents active per layer
    ess: dict[str, dict] = field(default_factory=dict)
    ess_flagged: list[str] = field(default_factory=list)
    min_ess: float | None = None
    activation_frequencies: dict[str, float] | None = None

    @classmethod
    def from_dict(cls, data: dict, where: str = "summary.json") -> "EvalMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if not isinstance(data, dict) or missing or set(data) - names:
            raise IPGError(f"{where} was written by another version of ipg-sae (its meta lacks {missing or 'nothing'}"
                           f", has {sorted(set(data) - names) or 'nothing'} extra); rerun the evaluation")
        return cls(**data)


@dataclass
class EvalResult:
    rows: list[dict]  # one per (set, gamma): values, intervals, deltas against `none`
    comparisons: list[dict]  # target against the random sets and each baseline, per gamma and metric
    samples: list[dict]  # the raw per-sample table
    meta: EvalMeta  # what was evaluated: problems, seeds, gammas, sets, sampling, reward, bootstrap

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        write_json(out_dir / "summary.json", {"meta": dataclasses.asdict(self.meta), "rows": self.rows,
                                              "comparisons": self.comparisons})
        _write_csv(out_dir / "rows.csv", self.rows)
        _write_csv(out_dir / "comparisons.csv", self.comparisons)
        _write_csv(out_dir / "samples.csv", self.samples)

    @classmethod
    def load(cls, out_dir: str | Path, with_samples: bool = True) -> "EvalResult":
        """The evaluation saved in ``out_dir`` (without the per-sample table when ``with_samples`` is False)."""
        out_dir = Path(out_dir)
        if not (out_dir / "summary.json").is_file():
            raise IPGError(f"no evaluation in {out_dir} (summary.json missing); run the evaluation first")
        data = read_json(out_dir / "summary.json")
        if not isinstance(data, dict) or not {"meta", "rows", "comparisons"} <= set(data):
            raise IPGError(f"{out_dir / 'summary.json'} is not an evaluation summary; rerun the evaluation")
        meta = EvalMeta.from_dict(data["meta"], where=str(out_dir / "summary.json"))
        has_samples = with_samples and (out_dir / "samples.csv").is_file()
        samples = _read_samples(out_dir / "samples.csv") if has_samples else []
        return cls(rows=data["rows"], comparisons=data["comparisons"], samples=samples, meta=meta)


_SAMPLE_TYPES = {"gamma": float, "seed": int, "sample_index": int, "correct": float, "reward": float, "length": float,
                 "parsed": float, "repetition": float, "empty": float, "degenerate": float, "ess": float}


def _read_samples(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, typ in _SAMPLE_TYPES.items():
            if key in r:
                r[key] = None if r[key] in ("", "None") else typ(float(r[key]) if typ is int else r[key])
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = [cols] + [["" if r.get(c) is None else r.get(c) for c in cols] for r in rows]
    buf = StringIO()
    csv.writer(buf).writerows(lines)
    write_text(path, buf.getvalue())


# ---- degenerate outputs -------------------------------------------------------------------


def is_repetitive(ids: Iterable[int], repeat_times: int = 4, min_span: int = 12, max_ngram: int = 20) -> bool:
    """True when some n-gram (n <= max_ngram) repeats ``repeat_times`` times in a row over >= ``min_span`` tokens."""
    a = np.asarray(list(ids))
    for n in range(1, max_ngram + 1):
        need = max(repeat_times * n, min_span) - n  # matches a[t] == a[t + n] needed in a row
        if len(a) - n < need:
            break
        if _longest_true_run(a[n:] == a[:-n]) >= need:
            return True
    return False


def _longest_true_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    padded = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[::2]).max())


def degenerate_flags(t: Trajectory, cfg: EvalConfig, stops: set[int] = frozenset()) -> dict:
    """``repetition``, ``empty`` and ``parsed`` of one completion, and ``degenerate`` = any of them."""
    ids = [i for i in t.completion_ids if i not in stops]
    repetition = is_repetitive(ids, cfg.repeat_times, cfg.repeat_min_span, cfg.max_ngram)
    empty = not ids or not t.completion.strip()
    return {"parsed": int(t.parsed), "repetition": int(repetition), "empty": int(empty),
            "degenerate": int(repetition or empty or not t.parsed)}


# ---- the evaluation ---------------------------------------------------------------------


def check_held_out(problems: list[Problem], attribution_prompt_ids: Iterable[str] | None) -> None:
    """Refuse to evaluate on problems the set was selected on."""
    if attribution_prompt_ids is None:
        return
    overlap = sorted({p.id for p in problems} & set(attribution_prompt_ids))
    if overlap:
        raise IPGError(f"{len(overlap)} evaluation problems were used for attribution (e.g. {overlap[0]}); evaluate on "
                       "a held-out split: give the evaluation task another offset or seed")


def evaluate(model, tokenizer, saes, problems: list[Problem], prompts: list[str], sets: dict[str, Selection],
             cfg: EvalConfig, out_dir: str | Path | None = None, active: dict[int, Any] | None = None,
             attribution_prompt_ids: Iterable[str] | None = None, reward: Reward | str | None = None,
             progress: bool = True) -> EvalResult:
    """Steer with each set at each gamma on held-out problems, against no steering and random sets.

    Args:
        model, tokenizer: the policy to steer.
        saes: ``{layer: SAE}`` covering every layer of every set.
        problems, prompts: the held-out problems and their prompt strings
            (:func:`ipg_sae.tasks.build_prompts`).
        sets: name -> selection (``cfg.target`` is the set under test, the others are baselines).
        cfg: gammas, seeds, random sets, sampling, bootstrap settings.
        out_dir: save ``summary.json``, ``rows.csv``, ``comparisons.csv``, ``samples.csv`` and the
            resumable per-cell files there.
        active: per-layer masks of latents active on the data: uniform random sets are drawn among them.
        attribution_prompt_ids: the prompts the sets were selected on (checked disjoint).
        reward: overrides ``cfg.reward`` (e.g. a callable).
        progress: show progress bars.

    Returns:
        An :class:`EvalResult`: rows per (set, gamma) with bootstrap intervals, the target's
        comparisons against the random sets and each baseline, and the raw per-sample table.
    """
    cfg.validate()
    check_held_out(problems, attribution_prompt_ids)
    if len(problems) != len(prompts):
        raise IPGError(f"{len(problems)} problems but {len(prompts)} prompts")
    saes = as_layer_dict(saes)
    reward = get_reward(reward if reward is not None else cfg.reward)
    harness = _Harness(model, tokenizer, saes, problems, prompts, cfg, reward, out_dir, progress)
    samples, all_sets, ess = ESTIMATORS[cfg.estimator](harness, sets, active, progress)
    meta = _meta(cfg, problems, all_sets, reward, harness.fingerprint, ess)
    rows, comparisons = summarize_samples(samples, meta)
    result = EvalResult(rows=rows, comparisons=comparisons, samples=samples, meta=meta)
    if out_dir is not None:
        result.save(out_dir)
    return result


def unsteered_trajectories(model, tokenizer, problems: list[Problem], prompts: list[str], cfg: EvalConfig, seed: int,
                           out_dir: str | Path | None = None, reward: Reward | str | None = None,
                           progress: bool = True) -> list[Trajectory]:
    """The unsteered samples of ``seed`` exactly as :func:`evaluate` draws them (its base cell, kept in and read back
    from ``out_dir``'s store): to check samples drawn elsewhere against the evaluation path token for token."""
    cfg.validate()
    reward = get_reward(reward if reward is not None else cfg.reward)
    harness = _Harness(model, tokenizer, {}, problems, prompts, cfg, reward, out_dir, progress)
    return harness.sampled(Cell(BASE, None, seed))


class _Harness:
    """The held-out problems, the model, and the store its cells are kept in."""

    def __init__(self, model, tokenizer, saes, problems, prompts, cfg: EvalConfig, reward: Reward, out_dir, progress):
        self.model, self.tokenizer, self.saes = model, tokenizer, saes
        self.problems, self.prompts, self.cfg, self.reward = problems, prompts, cfg, reward
        self.sets: dict[str, Selection] = {}
        self.progress = progress
        self.store = CellStore(Path(out_dir) / "cells" if out_dir is not None else None)
        self.inputs = Inputs.of(model, saes)  # once per evaluation: every cell's key holds it
        self.fingerprint = model_fingerprint(model, tokenizer)
        self.stops = eos_ids(model, tokenizer)
        self.prompts_sha = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]

    def _sampling(self, cell: Cell) -> SamplingConfig:
        return dataclasses.replace(self.cfg.sampling, seed=cell.seed)

    def sampled(self, cell: Cell) -> list[Trajectory]:
        """A cell's trajectories, sampled under its steering (or read back from the store)."""
        latents = self.sets.get(cell.set, [])
        key = {"estimator": "sampling", "set": cell.set, "latents": latents, "gamma": cell.gamma, "seed": cell.seed,
               "problems": [p.id for p in self.problems], "prompts_sha": self.prompts_sha,
               "sampling": dataclasses.asdict(self._sampling(cell)), "reward": self.reward.identity,
               "scope": self.cfg.scope, "model": self.fingerprint, **self.inputs.steered(latents)}

        def compute() -> list[Trajectory]:
            intervention = None
            if cell.set != BASE:
                intervention = steering(self.model, self.saes, scale(latents, cell.gamma), scope=self.cfg.scope)
            return sample(self.model, self.tokenizer, self.problems, self.prompts, self._sampling(cell), self.reward,
                          intervention=intervention, progress=self.progress, desc=cell.name)

        return self.store.fetch(cell.name, key, compute, TRAJECTORIES)


def _sampled_cells(harness: _Harness, sets, active, progress: bool) -> list[dict]:
    """On-policy: sample every (set, gamma, seed) cell under its steering."""
    cfg = harness.cfg
    harness.sets = _prepare_sets(harness.model, harness.saes, sets, cfg, LatentPool.of(harness.saes, active=active))
    # Only the per-sample rows are kept: a long evaluation's token ids would not fit in memory.
    done: dict[Cell, list[dict]] = {}
    bar = tqdm(plan_cells(harness.sets, cfg), desc="evaluate", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        if cell.set != BASE and is_unsteered(harness.sets[cell.set], cell.gamma):  # the base cell, relabelled
            base = done[Cell(BASE, None, cell.seed)]
            done[cell] = [{**r, "cell": cell.name, "set": cell.set, "gamma": cell.gamma} for r in base]
        else:
            done[cell] = cell_rows(cell, harness.sampled(cell), cfg, harness.stops)
    bar.close()
    return [r for rows in done.values() for r in rows]


def _on_policy(harness: _Harness, sets, active, progress: bool) -> tuple[list[dict], dict, None]:
    return _sampled_cells(harness, sets, active, progress), harness.sets, None


_VALUES = ("correct", "length", "reward", "parsed", "repetition", "empty", "degenerate")


def _importance_cells(harness: _Harness, sets, active, progress: bool) -> tuple[list[dict], dict, dict]:
    """Off-policy: sample the unsteered policy once (the base cells), then score every (set, gamma) on
    those samples (:mod:`ipg_sae.faithfulness`): one row per problem and cell, holding the
    self-normalised importance estimate of each metric."""
    from .faithfulness import TrajectoryScorer
    from .panel import OffPolicyPanel

    cfg = harness.cfg
    base_rows, pooled = [], []
    for seed in cfg.seeds:  # every seed's samples join one pool of G * len(seeds) per problem
        cell = Cell(BASE, None, seed)
        trajectories = harness.sampled(cell)
        base_rows += cell_rows(cell, trajectories, cfg, harness.stops)
        pooled += [dataclasses.replace(t, id=f"{t.id}@s{seed}", sample_index=t.sample_index + seed * 100_000)
                   for t in trajectories]
    scorer = TrajectoryScorer(harness.model, pooled, cfg.sampling.temperature, saes=harness.saes,
                              problems_per_batch=cfg.problems_per_batch, scope=cfg.scope)
    cells = LogprobCells(harness.store, scorer, harness.inputs, pooled, cfg.sampling.temperature, cfg.scope)
    frequencies = scorer.activation_frequencies() if cfg.n_random_sets and cfg.null_kind == "frequency" else None
    harness.sets = _prepare_sets(harness.model, harness.saes, sets, cfg,
                                 LatentPool.of(harness.saes, active=active, frequencies=frequencies))
    order = [p.id for p in harness.problems]
    groups = dict(zip(*prompt_groups([r["problem_id"] for r in base_rows])))
    index = [groups[pid] for pid in order]
    values = {k: torch.tensor([float(r[k]) for r in base_rows], dtype=torch.float64) for k in _VALUES}
    panel = OffPolicyPanel(cells, pooled, order, index, cells.logprobs([], 1.0, name=BASE))  # problems in task order
    samples, ess = list(base_rows), {}
    plan = [Cell(name, float(g), -1) for name in harness.sets for g in cfg.gammas]
    bar = tqdm(plan, desc="evaluate (importance)", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell.set} x{cell.gamma:g}")
        logp = panel.logprobs(harness.sets[cell.set], cell.gamma, name=cell.name)  # gamma 1: the base, weights 1
        estimates = {k: panel.estimate(logp, v) for k, v in values.items()}
        cell_ess = estimates["correct"].ess
        ess[cell.name] = {"mean": float(cell_ess.mean()), "min": float(cell_ess.min()),
                          "log_ratio_sd": estimates["correct"].log_ratio_sd}
        for j, pid in enumerate(order):
            samples.append({"cell": cell.name, "set": cell.set, "gamma": cell.gamma, "seed": -1,
                            "problem_id": pid, "sample_index": 0, "ess": float(cell_ess[j]),
                            **{k: float(est.per_prompt[j]) for k, est in estimates.items()}})
    bar.close()
    flagged = sorted(c for c, e in ess.items() if e["mean"] < cfg.min_ess)
    if flagged:
        log.warning("%d importance cells have a mean effective sample size below %.2f of G (%s); their estimates "
                    "rest on few samples: confirm them with eval.estimator: sampling", len(flagged), cfg.min_ess,
                    ", ".join(flagged[:4]))
    extra = {"samples_per_problem": len(pooled) // max(1, len(order)), "ess": ess, "ess_flagged": flagged,
             "min_ess": cfg.min_ess, "activation_frequencies": None if frequencies is None else
             {str(layer): float((f > 0).mean()) for layer, f in frequencies.items()}}
    return samples, harness.sets, extra


# Every estimator by its `eval.estimator` name, the one list of them (`EvalConfig.validate` checks a name against it):
# (harness, sets, active latents, progress) -> (per-sample or per-problem rows, the sets evaluated, per-cell ESS or
# None). A new estimator is one entry in this dict. It is the dict `evaluation_config` defines with the built-in
# names (so a config is checked without importing torch); here those names get their functions, and the two lists
# must agree, so they cannot drift apart.
_BUILT_IN: dict[str, Callable[[_Harness, dict, Any, bool], tuple[list[dict], dict, dict | None]]] = {
    "importance": _importance_cells,
    "sampling": _on_policy,
}
if set(_BUILT_IN) != set(BUILT_IN_ESTIMATORS):
    raise ImportError(f"evaluation's estimators {sorted(_BUILT_IN)} differ from the names evaluation_config lists "
                      f"{sorted(BUILT_IN_ESTIMATORS)}; list the same names in both")
ESTIMATORS.update(_BUILT_IN)


def _prepare_sets(model, saes, sets: dict[str, Selection], cfg: EvalConfig, pool: LatentPool) -> dict[str, Selection]:
    """The named sets (cut to ``k``) and the random control sets (``cfg.null_kind``, drawn from ``pool``)."""
    out: dict[str, Selection] = {}
    for name, sel in sets.items():
        if name == BASE or _RANDOM_RE.match(name) or not safe_label(name):
            raise IPGError(f"set name {name!r} is reserved or empty; rename the set")
        sel = as_selection(sel, where=f"set {name!r}")
        if cfg.k is not None:
            if len(sel) < cfg.k:
                raise IPGError(f"set {name!r} has {len(sel)} latents but eval.k is {cfg.k}; lower k")
            sel = sel[:cfg.k]
        check_selection(model, saes, sel)
        out[name] = sel
    if len({safe_label(n) for n in out}) != len(out):
        raise IPGError(f"set names {sorted(out)} collide once made file-safe; rename them")
    if cfg.n_random_sets:
        if cfg.target not in out:
            raise IPGError(f"the target set {cfg.target!r} is not among the sets {sorted(out)}; set eval.target, or "
                           "eval.n_random_sets: 0 for no random control")
        for d, draw in enumerate(draw_sets(cfg.null_kind, out[cfg.target], cfg.n_random_sets, cfg.random_seed, pool)):
            out[_RANDOM_NAME.format(d)] = draw
    return out


def plan_cells(sets: dict[str, Selection], cfg: EvalConfig) -> list[Cell]:
    """Base cells first (every other cell is compared with them), then sets by gamma and seed."""
    cells = [Cell(BASE, None, s) for s in cfg.seeds]
    for name in sets:
        cells += [Cell(name, float(g), s) for g in cfg.gammas for s in cfg.seeds]
    return cells


def cell_rows(cell: Cell, trajectories: list[Trajectory], cfg: EvalConfig, stops: set[int] = frozenset()) -> list[dict]:
    """A cell's rows of the raw per-sample table: one per (problem, sample)."""
    return [{"cell": cell.name, "set": cell.set, "gamma": cell.gamma, "seed": cell.seed, "problem_id": t.prompt_id,
             "sample_index": t.sample_index, "correct": int(t.correct), "reward": float(t.reward),
             "length": len(t.completion_ids), **degenerate_flags(t, cfg, stops)} for t in trajectories]


def _meta(cfg: EvalConfig, problems: list[Problem], sets: dict[str, Selection], reward: Reward,
          fingerprint: dict, importance: dict | None) -> EvalMeta:
    metric, direction = primary_metric(reward.name)
    randoms = [n for n in sets if _RANDOM_RE.match(n)]
    return EvalMeta(
        estimator=cfg.estimator, null=cfg.null_kind if randoms else None, n_problems=len(problems),
        problem_ids=[p.id for p in problems], seeds=list(cfg.seeds), gammas=[float(g) for g in cfg.gammas],
        n_samples=cfg.sampling.n_samples,
        target=cfg.target, sets={name: [list(p) for p in sel] for name, sel in sets.items()}, random_sets=randoms,
        reward=reward.name, primary_metric=metric, primary_direction=direction, scope=cfg.scope,
        sampling=dataclasses.asdict(cfg.sampling), task=dataclasses.asdict(cfg.task), n_bootstrap=cfg.n_bootstrap,
        confidence=cfg.confidence, model=fingerprint,
        degenerate_rule={"repeat_times": cfg.repeat_times, "repeat_min_span": cfg.repeat_min_span,
                         "max_ngram": cfg.max_ngram},
        **{"samples_per_problem": cfg.sampling.n_samples * len(cfg.seeds), **(importance or {})})


def primary_metric(reward_name: str) -> tuple[str, int]:
    """The metric a reward's selected set should move, and the sign it should move it with for gamma > 1."""
    return {"correctness": ("accuracy", 1), "length": ("length", 1), "neg_length": ("length", -1)}.get(
        reward_name, ("reward", 1))


# ---- summaries -----------------------------------------------------------------------------


def summarize_samples(samples: list[dict], meta: EvalMeta) -> tuple[list[dict], list[dict]]:
    """Rows (one per set and gamma, plus the base and the mean of the random draws) and target comparisons."""
    problem_ids = meta.problem_ids
    boot = dict(n_boot=meta.n_bootstrap, confidence=meta.confidence)
    table = PerProblem(samples, problem_ids)
    base = {m: table.matrix(m, [BASE], None) for m in METRICS}
    rows = [_row(table, "none", BASE, [BASE], None, base, boot, meta)]
    randoms = meta.random_sets
    for gamma in meta.gammas:
        for name in meta.sets:
            condition = "random" if name in randoms else ("target" if name == meta.target else "baseline")
            rows.append(_row(table, condition, name, [name], gamma, base, boot, meta))
        if randoms:
            rows.append(_row(table, "random_mean", f"random (mean of {len(randoms)})", randoms, gamma, base, boot, meta))
    return rows, _comparisons(table, meta, boot)


class PerProblem:
    """Per-problem means of each metric for each (set, gamma), over seeds and samples."""

    def __init__(self, samples: list[dict], problem_ids: list[str]):
        self.index = {pid: i for i, pid in enumerate(problem_ids)}
        self.groups: dict[tuple, list[dict]] = {}
        for r in samples:
            gamma = None if r["set"] == BASE else float(r["gamma"])
            self.groups.setdefault((r["set"], gamma), []).append(r)

    def matrix(self, metric: str, names: list[str], gamma: float | None) -> np.ndarray:
        """``[len(names), n_problems]`` per-problem means of ``metric``."""
        return np.stack([self._vector(metric, self.groups.get((n, gamma), [])) for n in names])

    def _vector(self, metric: str, rows: list[dict]) -> np.ndarray:
        key = "correct" if metric == "accuracy" else metric
        total = np.zeros(len(self.index))
        count = np.zeros(len(self.index))
        for r in rows:
            i = self.index[r["problem_id"]]
            total[i] += float(r[key])
            count[i] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count

    def rows(self, names: list[str], gamma: float | None) -> list[dict]:
        return [r for n in names for r in self.groups.get((n, gamma), [])]


def _row(table: PerProblem, condition: str, name: str, names: list[str], gamma, base: dict, boot: dict,
         meta: EvalMeta) -> dict:
    raw = table.rows(names, gamma)
    row = {"condition": condition, "set": name, "gamma": gamma,
           "size": len(meta.sets[names[0]]) if names[0] in meta.sets else 0,
           "n_problems": len(meta.problem_ids), "n_seeds": len({r["seed"] for r in raw}),
           "n_draws": len(names), "n_samples": len(raw)}
    for m in METRICS:
        x = table.matrix(m, names, gamma)
        row[m], row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap(x, **boot)
        if condition != "none":
            row[f"{m}_delta"], row[f"{m}_delta_lo"], row[f"{m}_delta_hi"] = bootstrap(x, base[m], **boot)
    for flag in ("degenerate", "repetition", "empty"):
        row[flag] = _share(raw, flag)
    if raw and "ess" in raw[0] and raw[0].get("ess") not in (None, ""):
        ess = [float(r["ess"]) for r in raw]
        row["ess"], row["ess_min"] = sum(ess) / len(ess), min(ess)
        row["ess_flag"] = row["ess"] < (meta.min_ess or 0.0)
    row["unparseable"] = 1.0 - _share(raw, "parsed") if raw else math.nan
    return row


def _share(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows) if rows else math.nan


def _comparisons(table: PerProblem, meta: EvalMeta, boot: dict) -> list[dict]:
    target, randoms = meta.target, meta.random_sets
    if target not in meta.sets:
        return []
    against = ([("random", randoms)] if randoms else []) + [
        (n, [n]) for n in meta.sets if n != target and n not in randoms]
    out = []
    for gamma in meta.gammas:
        for label, names in against:
            for m in METRICS:
                delta, lo, hi = bootstrap(table.matrix(m, [target], gamma), table.matrix(m, names, gamma), **boot)
                out.append({"set": target, "against": label, "gamma": gamma, "metric": m, "delta": delta, "lo": lo,
                            "hi": hi, "excludes_zero": bool(lo > 0 or hi < 0),
                            "verdict": _verdict(m, gamma, lo, hi, meta)})
    return out


def _verdict(metric: str, gamma: float, lo: float, hi: float, meta: EvalMeta) -> str:
    """``stronger``/``weaker`` for the primary metric (moved more/less in the direction the reward predicts),
    ``higher``/``lower`` for the others, ``no detectable difference`` when the interval contains 0."""
    if not (lo > 0 or hi < 0):
        return "no detectable difference"
    expected = predicted_direction(gamma, meta.primary_direction)
    if metric == meta.primary_metric and expected:
        return "stronger" if (lo > 0) == (expected > 0) else "weaker"
    return "higher" if lo > 0 else "lower"
