"""Weights & Biases logging that can never cost a run its local outputs.

Mode: ``wandb.mode: auto`` (default) logs online when the user is logged in to W&B
(``wandb login`` wrote credentials to ``~/.netrc``, or ``WANDB_API_KEY`` is set, or
``WANDB_MODE=online``) and offline otherwise: offline runs are written under
``runs/<name>/wandb/`` and can be uploaded later with ``wandb sync``. ``--no-wandb`` or
``wandb.enabled: false`` turns logging off.

A W&B server that cannot be reached is found out once per process, with a short connection
probe before the first online run: the process then logs offline, says so once, and says how
to sync later (a pipeline does not wait on the network at every stage). Every W&B network wait has
one total deadline: the probe (:data:`PROBE_S`, the whole answer, not each read: a host that sends
a byte a second fails it), starting an online run (:func:`deadline_s`) and uploading what is left when it ends
(:func:`upload_deadline_s`; what is not uploaded stays in ``runs/<name>/wandb/`` for ``wandb sync``).
An offline run, and W&B's own usage telemetry (``WANDB_ERROR_REPORTING``, off unless set), send
nothing at exit. A full disk turns W&B off with one warning (W&B's own log files never print
tracebacks).

Lineage: each job logs what it made as an artifact (trajectories, SAE, attribution result)
and declares what it used (:meth:`Tracker.use`), so W&B's lineage graph shows
sample -> SAE -> attribution -> evaluation (and attribution -> explorer). Offline artifacts
reference their files where they are (no staged copies) by paths relative to the run
directory, so a moved run directory syncs from inside it (``cd runs/<name> && wandb sync
wandb/offline-run-*``). A job that is killed and rerun continues its W&B
run (same id, ``resume="allow"``); the id lives in ``runs/<name>/wandb/run_ids.json`` until
the job finishes.

Every W&B call goes through :class:`Tracker`, which catches and reports any failure once
and then carries on without W&B: local files are always written first and never depend on
logging. :func:`read_offline_run` reads an offline run's records back (tests use it; it is
also handy to inspect a run before syncing it). wandb has no public reader for offline run
files, so it parses the record log with wandb's own protobuf definitions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .io import check_no_link_below

log = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    enabled: bool = True  # log to Weights & Biases at all (--no-wandb turns it off)
    project: str = "ipg-sae"  # W&B project
    entity: str | None = None  # W&B team or user (None: your default)
    mode: Literal["auto", "online", "offline"] = "auto"  # auto: online when you are logged in, else offline
    group: str | None = None  # W&B group (default: the run name)
    tags: list[str] = field(default_factory=list)  # W&B tags


DEFAULT_HOST = "https://api.wandb.ai"
_unreachable: str | None = None  # set once per process when the W&B server cannot be reached
_LOW_DISK: set[str] = set()  # run directories whose disk was too full for W&B (said once each)


def resolve_mode(cfg: WandbConfig) -> str:
    if not cfg.enabled or os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if cfg.mode != "auto":
        mode = cfg.mode
    elif os.environ.get("WANDB_MODE") in ("online", "offline"):
        mode = os.environ["WANDB_MODE"]
    else:
        mode = "online" if logged_in() else "offline"
    return "offline" if mode == "online" and _unreachable else mode


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST


def logged_in() -> bool:
    """Whether W&B credentials exist: ``WANDB_API_KEY``, or what ``wandb login`` wrote to the netrc file."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(base_url()).hostname or ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/_netrc" if os.name == "nt" else "~/.netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


PROBE_S = 3.0  # the probe's total deadline (connect, send, the whole answer)


def deadline_s() -> float:
    """The total deadline, in seconds, of starting an online run (``wandb.init``): 10 s, or
    ``$IPG_SAE_WANDB_TIMEOUT``. A server that answered the probe and then stalls costs no more."""
    return _seconds("IPG_SAE_WANDB_TIMEOUT", 10.0)


def upload_deadline_s() -> float:
    """The total deadline, in seconds, of uploading what is left when an online run ends (``run.finish``, and
    W&B's own exit hook): 300 s, or ``$IPG_SAE_WANDB_UPLOAD_TIMEOUT``. Longer than the start's because a healthy
    server may take minutes for a large SAE artifact; what is not uploaded in time stays in
    ``runs/<name>/wandb/`` for ``wandb sync``."""
    return _seconds("IPG_SAE_WANDB_UPLOAD_TIMEOUT", 300.0)


def _seconds(variable: str, default: float) -> float:
    try:
        value = float(os.environ.get(variable, "") or default)
    except ValueError:
        value = default
    return value if value > 0 else default


def probe(timeout: float = PROBE_S) -> str | None:
    """None when the W&B server answers an HTTP request within ``timeout`` seconds in all (any status: it is
    there), else why not. A server that accepts connections but never answers, or answers a byte at a time, is
    unreachable too: the deadline is total, not per read."""
    import threading

    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(_head(timeout)), daemon=True, name="ipg-sae-wandb-probe")
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _head(timeout: float) -> str | None:
    import socket
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(base_url(), method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (401, 404, ...): the server is there
    except urllib.error.URLError as e:
        reason = e.reason
        return f"{type(reason).__name__}: {getattr(reason, 'strerror', None) or reason}"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


def _no_telemetry() -> None:
    """An offline run sends nothing: W&B's usage telemetry otherwise posts to the server at exit (and waits on a
    silent one)."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()
    except (ImportError, AttributeError):
        pass


class Tracker:
    """A W&B run, or a no-op when W&B is off or broken."""

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, name: str, job_type: str, config: dict | None = None,
                 group: str | None = None):
        self.run = None
        self.mode = resolve_mode(cfg)
        if self.mode == "disabled":
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in ("wandb", "wandb-data"):  # W&B's own processes write there, past io's guard: check first
            check_no_link_below(run_dir, run_dir / folder / "files", "write")
        self.run_dir, self.job_type = run_dir, job_type
        # Artifacts stage under the user data dir unless told otherwise: keep them with the run.
        os.environ.setdefault("WANDB_DATA_DIR", str(run_dir.resolve() / "wandb-data"))
        os.environ.setdefault("WANDB_SILENT", "true")
        # W&B's own usage telemetry and error reports post to the server when the process exits, and wait ~10 s on
        # one that does not answer; they are not the run's logging (WANDB_ERROR_REPORTING=true turns them back on)
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        free = _free_bytes(run_dir / "wandb" if (run_dir / "wandb").is_dir() else run_dir)
        if free is not None and free < MIN_FREE_BYTES:
            if str(run_dir) not in _LOW_DISK:  # said once per run directory and process
                _LOW_DISK.add(str(run_dir))
                log.warning("W&B is off: only %d KiB are free on the disk of %s; free disk space to log to W&B "
                            "(local outputs are unaffected)", free // 1024, run_dir / "wandb")
            self.mode = "disabled"
            return
        if self.mode == "online":
            self._check_reachable(run_dir)
        start = lambda: self._init(cfg, run_dir, name, job_type, config or {}, group)  # noqa: E731
        if self.mode == "online":
            try:
                start()
                return
            except Exception as e:  # the server went away, or refused the run: keep the logs, offline
                log.warning("W&B could not start an online run (%s: %s); this process logs offline under %s",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "", run_dir / "wandb")
                self.mode = "offline"
        self._guard(start)

    def _check_reachable(self, run_dir: Path) -> None:
        global _unreachable
        why = probe()
        if why is None:
            return
        _unreachable = why
        self.mode = "offline"
        log.warning("W&B server %s cannot be reached (%s); this process logs offline under %s (upload later with "
                    "`wandb sync %s`)", base_url(), why, run_dir / "wandb", run_dir / "wandb" / "offline-run-*")

    def _init(self, cfg, run_dir, name, job_type, config, group):
        import wandb

        ids = _read_ids(run_dir)
        run_id = ids.get(job_type)
        # absolute: W&B's service process resolves a relative dir from its own working directory, which is where
        # the first run of this process started, not where this one does
        if self.mode == "offline":
            _no_telemetry()
        # every network wait bounded: starting the run, and uploading the rest when it ends (or at exit)
        waits = dict(init_timeout=deadline_s(), finish_timeout=upload_deadline_s()) if self.mode == "online" else {}
        with _no_logging_tracebacks():  # W&B's own log files on a full disk: no traceback per line
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=f"{name}-{job_type}", job_type=job_type,
                                  group=group or cfg.group or name, tags=cfg.tags or None, config=config,
                                  dir=str(run_dir.resolve()), mode=self.mode, reinit="finish_previous", id=run_id,
                                  resume="allow" if run_id else None, settings=wandb.Settings(**waits))
        _quiet_wandb()
        if run_id is None:
            _write_ids(run_dir, {**ids, job_type: self.run.id})

    @property
    def active(self) -> bool:
        return self.run is not None

    def _guard(self, fn) -> Any:
        try:
            return fn()
        except Exception as e:  # W&B must never take a run down with it
            _quiet_wandb()
            log.warning("W&B logging failed (%s: %s); continuing without W&B, local outputs are unaffected",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.run = None
            return None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self._guard(lambda: self.run.log(metrics, step=step))

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self._guard(lambda: self.run.summary.update(metrics))

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self._guard(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}))

    def histogram(self, key: str, values) -> None:
        if self.run is not None:
            import wandb

            self._guard(lambda: self.run.log({key: wandb.Histogram(values)}))

    def image(self, key: str, path: str | Path) -> None:
        if self.run is not None:
            import wandb

            self._guard(lambda: self.run.log({key: wandb.Image(str(path))}))

    def html(self, key: str, path: str | Path) -> None:
        """Log a self-contained HTML page (``wandb.Html``)."""
        if self.run is not None:
            import wandb

            self._guard(lambda: self.run.log({key: wandb.Html(Path(path).read_text(encoding="utf-8"))}))

    def artifact(self, name: str, type: str, *paths: str | Path, metadata: dict | None = None) -> None:
        """Log the files or directories ``paths`` as one artifact this job made; ``metadata`` is what the W&B
        artifact page shows beside the files (layer, width, explained variance, top latents, verdict...)."""
        if self.run is not None:
            self._guard(lambda: self.run.log_artifact(_artifact(name, type, paths, self._base(), metadata)))

    def use(self, name: str, type: str, *paths: str | Path) -> None:
        """Declare that this job used the artifact made of ``paths`` (same content, same W&B version)."""
        if self.run is None or not paths or not all(Path(p).exists() for p in paths):
            return
        art = self._guard(lambda: _artifact(name, type, paths, self._base()))
        if art is None:
            return
        if self.mode == "online":
            self._guard(lambda: self.run.use_artifact(art))
        else:
            # wandb refuses use_artifact offline; for a draft artifact, use_artifact online is exactly this call,
            # which records the use in the run file so that `wandb sync` draws the lineage.
            self._guard(lambda: self.run._log_artifact(art, is_user_created=True, use_after_commit=True))

    def _base(self) -> Path | None:
        """Where offline artifacts reference their files from (None online: W&B stages copies and uploads them)."""
        return self.run_dir if self.mode == "offline" else None

    def finish(self, completed: bool = True) -> None:
        """End the W&B run; a completed job forgets its run id, so the next run of it starts a new W&B run."""
        if self.run is not None:
            self._guard(self.run.finish)
            self.run = None
            if completed:
                ids = _read_ids(self.run_dir)
                if ids.pop(self.job_type, None) is not None:
                    _write_ids(self.run_dir, ids)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.finish(completed=exc_type is None)  # killed or failed: the rerun continues this W&B run


MIN_FREE_BYTES = 4 << 20  # below this on the run directory's disk, W&B is not started (its files would not fit)


def _free_bytes(path: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def _no_logging_tracebacks():
    previous = logging.raiseExceptions
    logging.raiseExceptions = False
    try:
        yield
    finally:
        logging.raiseExceptions = previous


def _quiet_wandb() -> None:
    """Keep a failing W&B (a full disk, a service that died) to the one warning :class:`Tracker` gives: W&B's own
    log files report their write errors as tracebacks on stderr (``--- Logging error ---``), and its client's
    event loop warns once per message sent to a service that is gone (``asyncio: socket.send() raised
    exception``), a hundred lines or more at exit."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DeadSocketWarnings) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DeadSocketWarnings())
    for name in ["wandb", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("wandb"))]:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            handler.handleError = _ignore_record


class _DeadSocketWarnings(logging.Filter):
    """Drops asyncio's "socket.send() raised exception." (W&B's client writing to its service after it died)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("socket.send() raised exception")


def _ignore_record(record) -> None:
    """``logging.Handler.handleError`` for W&B's handlers: a log line W&B cannot write is dropped silently."""


def artifact_name(kind: str, path: str | Path) -> str:
    """The artifact name of what lies at ``path``: the same for the job that made it and the jobs that use it.

    ``runs/demo/trajectories.jsonl`` -> ``demo-trajectories``; ``runs/demo/sae/layer_15`` ->
    ``demo-sae-layer_15``; ``runs/demo`` (an attribution) -> ``demo-attribution``;
    ``runs/demo/baselines/act`` -> ``demo-attribution-act``.
    """
    import re

    path = Path(path).resolve()
    if kind == "trajectories":
        name = f"{path.parent.name}-trajectories"
    elif kind == "sae":
        name = f"{path.parent.parent.name}-sae-{path.name}" if path.parent.name == "sae" else f"sae-{path.name}"
    elif kind == "attribution":
        name = (f"{path.parent.parent.name}-attribution-{path.name}" if path.parent.name == "baselines"
                else f"{path.name}-attribution")
    elif path.name == "eval":  # runs/demo/eval -> demo-evaluation: every run's evaluation has a name of its own
        name = f"{path.parent.name}-{kind}"
    else:
        name = f"{path.name}-{kind}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


ATTRIBUTION_FILES = ("attribution.safetensors", "attribution.json", "features.csv", "selection.json")


def use_inputs(tracker: Tracker, trajectories_path=None, saes=(), attribution_dirs=()) -> None:
    """Declare the artifacts a job reads, for W&B's lineage graph."""
    if trajectories_path is not None:
        tracker.use(artifact_name("trajectories", trajectories_path), "dataset", trajectories_path)
    for spec in saes:
        if spec.path:
            tracker.use(artifact_name("sae", spec.path), "model", spec.path)
    for directory in attribution_dirs:
        files = attribution_files(directory)
        if files:
            tracker.use(artifact_name("attribution", directory), "attribution", *files)


def attribution_files(method_dir: str | Path) -> list[Path]:
    """The files that make an attribution artifact (the result and its selection)."""
    return [Path(method_dir) / f for f in ATTRIBUTION_FILES if (Path(method_dir) / f).is_file()]


def _artifact(name: str, type: str, paths, base: Path | None = None, metadata: dict | None = None):
    """A W&B artifact of ``paths``. With ``base`` (offline runs), files are referenced where they are, not copied
    into a staging folder, and by their path relative to ``base`` where they lie inside it: the run directory
    can then be moved and synced from inside it (``cd runs/<name> && wandb sync wandb/offline-run-*``)."""
    import wandb

    from .io import jsonable

    art = wandb.Artifact(name, type=type, metadata=jsonable(metadata) if metadata else None)
    policy = "immutable" if base is not None else "mutable"
    # resolved before entering base: a relative path names a file from where the job runs, not from its run dir
    base = None if base is None else Path(base).resolve()
    files = [_relative_to(Path(path).resolve(), base) for path in paths]
    with _working_dir(base):
        for local in files:
            if Path(local).is_dir():
                art.add_dir(local, policy=policy)
            else:
                art.add_file(local, policy=policy)
    return art


@contextlib.contextmanager
def _working_dir(path: Path | None):
    if path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _relative_to(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)  # outside the run directory: referenced where it is


def _ids_file(run_dir: Path) -> Path:
    return Path(run_dir) / "wandb" / "run_ids.json"


def _read_ids(run_dir: Path) -> dict:
    import json

    try:
        return json.loads(_ids_file(run_dir).read_text())
    except (OSError, ValueError):
        return {}


def _write_ids(run_dir: Path, ids: dict) -> None:
    from .io import write_json

    write_json(_ids_file(run_dir), ids)


# ---- reading offline runs back ----------------------------------------------------------

_BLOCK = 32768
_HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    """The protobuf records of a ``run-*.wandb`` file (a leveldb-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FIRST:
            pending = chunk
            continue
        if kind == _MIDDLE:
            pending += chunk
            continue
        payload = pending + chunk if kind == _LAST else chunk
        pending = b""
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _finished_records(path: Path, wait_s: float) -> list:
    """The file's records, once its ``exit`` record is on disk (or after ``wait_s``).

    W&B's service writes the file in its own process: ``run.finish()`` can return a moment
    before the last records reach the disk.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = list(_records(path))
        except Exception:  # a record cut off mid-write
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records  # a killed run never writes `exit`: return what is there
        time.sleep(0.1)


def read_offline_run(run_dir: str | Path, wait_s: float = 30.0) -> dict:
    """History rows, summary and config of the offline run(s) under ``run_dir`` (newest last)."""
    import json

    files = sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {run_dir}")
    runs = []
    for f in files:
        run_id = None
        history, summary, config, artifacts = [], {}, {}, []
        for rec in _finished_records(f, wait_s):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                for i in rec.summary.update:
                    summary["/".join(i.nested_key) or i.key] = json.loads(i.value_json)
            elif kind == "config":
                for i in rec.config.update:
                    config[i.key] = json.loads(i.value_json)
            elif kind == "run":
                for i in rec.run.config.update:
                    config[i.key] = json.loads(i.value_json)
                run_id = rec.run.run_id
            elif kind == "artifact":  # logged (made) or, with use_after_commit, used by the run
                a = rec.artifact
                artifacts.append({"name": a.name, "type": a.type, "digest": a.digest, "used": a.use_after_commit,
                                  "metadata": json.loads(a.metadata) if a.metadata else {},
                                  "files": {e.path: e.local_path for e in a.manifest.contents}})
        runs.append({"file": str(f), "history": history, "summary": summary, "config": config, "id": run_id,
                     "made": [a for a in artifacts if not a["used"]], "used": [a for a in artifacts if a["used"]]})
    return {"runs": runs, **runs[-1]}
