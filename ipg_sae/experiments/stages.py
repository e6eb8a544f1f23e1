"""Stages: the resumable steps of a multi-stage job (the pipeline, the study, ...), and the SAE stage they share.

A :class:`Stage` declares what its outputs depend on, and nothing else is in its key:

* ``fields``: the config fields it reads, as dotted paths (``"task"``, ``"grid.ks"``, ``"seed"``);
* ``files``: the files and folders from outside the run it reads (a user's origin file, a local model or SAE,
  a reused attribution); their contents' digests go into the key, so a file rewritten at the same path reruns
  the stage;
* ``identity``: what identifies an outside input that is not a file (a reward's code, a hub model's id),
  computed from declared fields only.

The key (:func:`stage_key`) hashes exactly these, the result-format version and the key and output digests of
the stage before it (so a stage also depends on everything the stages before it declared). While a stage runs it
sees the config through a :class:`ConfigView` that raises :class:`UndeclaredRead` on a field that neither it
nor a stage before it declared: a key cannot silently miss a field. The job header (``name``, ``runs_dir``,
``run_dir``, ``wandb``: where outputs go and where they are logged) is readable by every stage.

:func:`run_stages` runs stages in order under ``cfg.run_dir`` and, when a stage finishes, writes a marker
``stages/<stage>.json`` holding its key, the digests of the files it wrote, the seconds of its last run and the
``total_seconds`` spent on it over every run and resume since it was first started. A rerun reuses a stage only
when its key matches and its output files are still the ones it wrote (and says so in the log), so a killed job
resumes at the first unfinished stage, changing a setting or an input reruns only what depends on it, and an
edited output is never built upon.

The SAE stage (:data:`SAE_STAGE`) loads the SAEs a job names, or trains them with :mod:`sae_training` from a
train-sae YAML (:class:`SAESourceConfig`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..digest import FORMAT_VERSION, file_digest, json_digest, key_dict, tree_digest
from ..errors import IPGError
from ..io import jsonable, read_json, remove_tree, write_json
from ..models import source_digest
from ..saes import SAESpec
from .configs import SAESourceConfig, train_config  # noqa: F401  (SAESourceConfig re-exported: torch-free)

log = logging.getLogger(__name__)

HEADER = frozenset({"name", "runs_dir", "run_dir", "wandb"})  # where a job writes and logs: every stage reads them
# Watchers (context-manager factories ``watch(stage_name, cfg, allowed_files)``) entered around every stage's run:
# the tests use one to check that a stage opens no outside file it did not declare.
WATCHERS: list[Callable[[str, Any, list[Path]], Any]] = []


@dataclass
class Stage:
    name: str
    run: Callable[[Any], dict | None]
    outputs: Callable[[Any], list[Path]]  # the files later stages read
    fields: tuple[str, ...] = ()  # the config fields (dotted paths) the stage reads
    files: Callable[[Any], list] = lambda cfg: []  # outside files and folders it reads: their digests are in its key
    identity: Callable[[Any], object] = lambda cfg: None  # outside inputs that are not files (a reward's code)
    # Partial outputs that a stage would refuse to reuse once its settings changed.
    stale: Callable[[Any], list[Path]] = lambda cfg: []


class UndeclaredRead(RuntimeError):
    """A stage read a config field that its key does not declare (a bug in the stage's declaration)."""


class ConfigView:
    """``cfg`` as a stage sees it: a field is readable when it (or a field holding it) is declared; a field only
    part of which is declared is itself a view. Properties and methods run against the view, so the fields they
    read are checked too."""

    __slots__ = ("_obj", "_declared", "_stage", "_prefix")

    def __init__(self, obj, declared: frozenset[str], stage: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, attr: str):
        obj, declared, prefix = self._obj, self._declared, self._prefix
        member = getattr(type(obj), attr, None)
        if isinstance(member, property):
            return member.fget(self)
        if isinstance(member, types.FunctionType):
            return types.MethodType(member, self)
        path = prefix + attr
        if path in declared or (not prefix and attr in HEADER) or any(path.startswith(d + ".") for d in declared):
            return getattr(obj, attr)
        if any(d.startswith(path + ".") for d in declared):
            return ConfigView(getattr(obj, attr), declared, self._stage, path + ".")
        raise UndeclaredRead(f"stage {self._stage} read `{path}`, which its key does not declare: add {path!r} to "
                             f"the stage's fields (or to a stage before it)")

    def __setattr__(self, attr: str, value) -> None:
        raise UndeclaredRead(f"stage {self._stage} assigned `{self._prefix}{attr}`: stages read their config only")


def resolve(cfg, path: str):
    """The value of a dotted config path."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def declared_view(cfg, stages: list[Stage], upto: int) -> ConfigView:
    """The config as stage ``upto`` sees it: the fields it and every stage before it declare."""
    declared = frozenset(f for s in stages[:upto + 1] for f in s.fields)
    return ConfigView(cfg, declared, stages[upto].name)


def stage_key(stage: Stage, view, upstream: str) -> str:
    """The digest of exactly what ``stage`` declares: its fields' values (dataclasses as dicts), the digests of
    its outside files, the identity of its other outside inputs, the format version and the stage before it."""
    def default(o):
        if dataclasses.is_dataclass(o):
            return key_dict(o)
        return str(o)

    values = {f: key_dict(resolve(view._obj, f)) for f in stage.fields}
    declared = [stage.fields, values, tree_digest(stage.files(view)), stage.identity(view)]
    text = json.dumps([FORMAT_VERSION, declared], default=default, sort_keys=True) + upstream
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stages(cfg, stages: list[Stage]) -> dict:
    """Run ``stages`` in order under ``cfg.run_dir``, reusing each one whose key and outputs still match.

    A stage's outputs are the files it wrote (recorded in its marker): a file someone else put beside them (an
    export inside ``sae/``) is neither checked nor deleted. A finished stage whose own files were edited or removed
    since is refused, naming the file, unless the job runs with ``force`` (``--force true``)."""
    run_dir = cfg.run_dir
    force = bool(getattr(cfg, "force", False))
    upstream, results, allowed = "", {}, []
    for i, stage in enumerate(stages):
        view = declared_view(cfg, stages, i)
        key = stage_key(stage, view, upstream)
        allowed += [Path(p) for p in stage.files(view)]
        marker = run_dir / "stages" / f"{stage.name}.json"
        done = _read_marker(marker)
        recorded = done.get("outputs") if done and isinstance(done.get("outputs"), dict) else {}
        changed = _changed_outputs(recorded) if done else []
        intact = done is not None and done.get("summary_sha256") == json_digest(done.get("summary"))
        if done and done["hash"] == key and not changed and intact:
            log.info("stage %s: already done with these settings and inputs (key %s) and its %d output files are "
                     "the ones it wrote: reused", stage.name, key, len(recorded))
            results[stage.name] = done.get("summary")
            outputs = recorded
        else:
            if done:  # finished before, but its settings, inputs or outputs changed: its partial outputs are stale
                if done["hash"] == key and changed and not force:
                    raise IPGError(f"stage {stage.name}: its output file {changed[0]} changed since it wrote it"
                                   f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; restore it, or "
                                   f"rerun with --force true to redo the stage (the files it wrote are replaced)")
                why = ("settings or inputs changed" if done["hash"] != key else
                       f"its output file {changed[0]} changed since (--force true)" if changed else
                       "its marker's summary was edited")
                log.warning("stage %s: %s; rerunning it", stage.name, why)
                _remove_stale(stage, cfg, recorded)
            before = tree_digest(p for p in stage.outputs(cfg) if Path(p).is_dir())
            summary, seconds, total = _run_one(stage, view, key, marker, allowed)
            outputs = _written(stage, cfg, recorded, before)
            write_json(marker, {"hash": key, "seconds": seconds, "total_seconds": total, "outputs": outputs,
                                "summary": summary, "summary_sha256": json_digest(summary)})
            marker.with_suffix(".partial.json").unlink(missing_ok=True)
            results[stage.name] = summary
        allowed += [Path(p) for p in stage.outputs(cfg)]
        upstream = json_digest(outputs) + key
    return results


def _changed_outputs(recorded: dict) -> list[str]:
    """The files a finished stage wrote (its marker's ``outputs``) that are no longer as it wrote them (edited,
    removed, or present where it wrote none); files that appeared beside them since are not its business."""
    return [path for path, digest in recorded.items()
            if (file_digest(Path(path)) if Path(path).is_file() else "missing") != digest]


def _written(stage: Stage, cfg, recorded: dict, before: dict) -> dict[str, str]:
    """The digests of the files the stage wrote: its declared output files and, under its output folders, the
    files that are new or changed since it started or that its previous run wrote (a file that lay there untouched
    before it ran is someone else's)."""
    return {path: digest for path, digest in tree_digest(stage.outputs(cfg)).items()
            if path in recorded or path not in before or before[path] != digest}


def _remove_stale(stage: Stage, cfg, recorded: dict) -> None:
    """Remove a stage's stale partial outputs before it reruns: under its output folders only the files it wrote
    (never what someone put beside them); its other stale paths (checkpoints, caches) whole."""
    outputs = [Path(p) for p in stage.outputs(cfg)]
    for path in stage.stale(cfg):
        path = Path(path)
        if any(path == o or path.is_relative_to(o) or o.is_relative_to(path) for o in outputs if o.is_dir()):
            for file in recorded:
                if Path(file).is_relative_to(path):
                    log.info("stage %s: removing %s", stage.name, file)
                    remove_tree(file)
        elif path.exists() or path.is_symlink():
            log.info("stage %s: removing %s", stage.name, path)
            remove_tree(path)


def _run_one(stage: Stage, view: ConfigView, key: str, marker: Path, allowed: list[Path]) -> tuple:
    """Run one stage, timing it; a run that fails or is interrupted leaves its seconds in ``<stage>.partial.json``,
    which the next run with the same key adds to its total (a killed process's seconds are lost)."""
    partial = marker.with_suffix(".partial.json")
    log.info("stage %s: running", stage.name)
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            for watch in WATCHERS:
                stack.enter_context(watch(stage.name, view._obj, list(allowed)))
            summary = jsonable(stage.run(view))
    except BaseException:
        write_json(partial, {"hash": key, "seconds": _earlier_seconds(partial, key) + time.perf_counter() - t0})
        raise
    seconds = time.perf_counter() - t0
    total = seconds + _earlier_seconds(partial, key)
    log.info("stage %s: done in %.0f s (%.0f s over every run with these settings)", stage.name, seconds, total)
    return summary, round(seconds, 1), round(total, 1)


def _earlier_seconds(partial: Path, key: str) -> float:
    """Seconds spent on earlier, unfinished runs of the stage with this key."""
    try:
        doc = read_json(partial)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0.0
    ok = isinstance(doc, dict) and doc.get("hash") == key and isinstance(doc.get("seconds"), (int, float))
    return float(doc["seconds"]) if ok else 0.0


def run_job_stages(cfg, stages: list[Stage], config_file: str, contexts: list) -> dict:
    """A staged job's whole run: every ``(task, max_new_tokens, field)`` of ``contexts`` checked against the
    model's context first, then, under the run directory's lock, its config written to ``config_file`` and
    :func:`run_stages`."""
    from ..config import dump_yaml
    from ..io import run_lock, write_text
    from ..sampling import check_fits_context

    check_fits_context(cfg.model, contexts)
    if getattr(cfg, "sae", None) is not None:
        check_sae_sources(cfg)
    with run_lock(cfg.run_dir):
        write_text(cfg.run_dir / config_file, dump_yaml(cfg))
        return run_stages(cfg, stages)


def _read_marker(marker: Path) -> dict | None:
    if not marker.is_file():
        return None
    try:
        done = read_json(marker)
    except (ValueError, UnicodeDecodeError):
        done = None
    if not isinstance(done, dict) or "hash" not in done:
        raise IPGError(f"{marker} is corrupt; delete it to rerun the {marker.stem} stage")
    return done


def model_inputs(cfg) -> dict:
    """Digests of the model files a job reads (a hub id is identified by its name and revision only)."""
    return {"model": source_digest(cfg.model.name), "revision": cfg.model.revision}


def task_files(*tasks) -> list[Path]:
    """The local problem files of ``tasks`` (a hub dataset has none): what a stage loading them opens."""
    return [Path(t.path) for t in tasks if t.path]


def model_files(cfg) -> list[Path]:
    """The model's local file or folder, when ``model.name`` is one (what a stage loading it may open)."""
    path = Path(cfg.model.name).expanduser()
    return [path] if path.exists() else []


# ---- the SAE stage ------------------------------------------------------------------------------


def train_job(cfg):
    """The train-sae config of a job whose ``sae`` trains its SAEs (its name, runs_dir, model and W&B); ``cfg`` may
    be a stage's :class:`ConfigView` (its splits are read from the whole config: see :func:`.configs.train_config`)."""
    return train_config(cfg, whole_config(cfg))


def whole_config(cfg):
    """The config behind a stage's :class:`ConfigView` (for what a stage's identity already covers)."""
    return cfg._obj if isinstance(cfg, ConfigView) else cfg


def sae_specs(cfg) -> list[SAESpec]:
    """The SAEs a job uses: those it loads, or those its SAE stage trains (one per layer)."""
    if cfg.sae.load:
        return cfg.sae.load
    train = train_job(cfg)
    return [SAESpec(path=str(train.run_dir / "sae" / f"layer_{layer}")) for layer in train.layers]


def sae_files(cfg) -> list[Path]:
    """The local SAE folders a job loads and the train-sae YAML it trains from: the SAE stage's outside files."""
    files = [Path(spec.path) for spec in cfg.sae.load if spec.path]
    return files + ([Path(cfg.sae.train_config)] if not cfg.sae.load and cfg.sae.train_config else [])


def check_sae_sources(cfg) -> None:
    """Before the first stage: every SAE the job loads fits its model (width, layer, residual hook, files or a
    published SAE available offline), or the SAE it trains does (layers in range, ``context_size`` within the model's
    positions). Model config and tokenizer only, no weights."""
    from ..models import config_sizes, load_tokenizer_and_config
    from ..saes import check_entry

    _, config = load_tokenizer_and_config(cfg.model)
    for i, spec in enumerate(cfg.sae.load):
        try:
            check_entry(spec, config, cfg.model.name)
        except IPGError as e:
            raise IPGError(f"sae.load[{i}]: {e}") from None
    if cfg.sae.load:
        return
    from sae_training.data import check_context_size

    train = train_job(cfg)
    try:
        check_context_size(train)
    except IPGError as e:
        raise IPGError(f"sae.train_config {cfg.sae.train_config}: {e}") from None
    n = config_sizes(config)[1]
    bad = [layer for layer in train.layers if n is not None and not 0 <= layer < n]
    if bad:
        raise IPGError(f"sae.train_config {cfg.sae.train_config}: layers {bad} are out of range: model "
                       f"{cfg.model.name!r} has {n} decoder layers (0..{n - 1})")


def run_sae_stage(cfg) -> dict:
    if cfg.sae.load:
        from sae_training.data import check_corpus_disjoint

        from ..splits import problem_sets

        for spec in cfg.sae.load:  # an SAE trained here never saw a question the job attributes or evaluates on
            if spec.path:
                check_corpus_disjoint(spec.path, problem_sets(whole_config(cfg)))
        return {"loaded": [dataclasses.asdict(s) for s in cfg.sae.load]}
    from sae_training import train

    return train(train_job(cfg))


SAE_STAGE = Stage(
    "sae", run_sae_stage, outputs=lambda c: [] if c.sae.load else [train_job(c).run_dir / "sae"],
    fields=("model", "sae"), files=sae_files, identity=lambda c: train_job(c) if not c.sae.load else None,
    stale=lambda c: [] if c.sae.load else [train_job(c).run_dir / p for p in ("checkpoints", "sae", "sae_eval.json")])
