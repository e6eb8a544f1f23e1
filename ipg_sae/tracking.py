"""Weights & Biases logging that can never cost a run its local outputs.

Mode: ``wandb.mode: auto`` (default) logs online when the user has configured W&B
(``WANDB_API_KEY`` set, or ``WANDB_MODE=online``) and offline otherwise: offline runs are
written under ``runs/<name>/wandb/`` and can be uploaded later with ``wandb sync``.
``--no-wandb`` or ``wandb.enabled: false`` turns logging off.

Every W&B call goes through :class:`Tracker`, which catches and reports any failure once
and then carries on without W&B: local files are always written first and never depend on
logging. :func:`read_offline_run` reads an offline run's records back (tests use it; it is
also handy to inspect a run before syncing it).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "ipg-sae"
    entity: str | None = None
    mode: Literal["auto", "online", "offline"] = "auto"
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def resolve_mode(cfg: WandbConfig) -> str:
    if not cfg.enabled or os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


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
        # Artifacts stage under the user data dir unless told otherwise: keep them with the run.
        os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb-data"))
        os.environ.setdefault("WANDB_SILENT", "true")
        self._guard(lambda: self._init(cfg, run_dir, name, job_type, config or {}, group))

    def _init(self, cfg, run_dir, name, job_type, config, group):
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=f"{name}-{job_type}", job_type=job_type,
                              group=group or cfg.group or name, tags=cfg.tags or None, config=config,
                              dir=str(run_dir), mode=self.mode, reinit="finish_previous")

    @property
    def active(self) -> bool:
        return self.run is not None

    def _guard(self, fn) -> Any:
        try:
            return fn()
        except Exception as e:  # W&B must never take a run down with it
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

    def artifact(self, name: str, type: str, path: str | Path) -> None:
        if self.run is not None:
            import wandb

            def upload():
                art = wandb.Artifact(name, type=type)
                (art.add_dir if Path(path).is_dir() else art.add_file)(str(path))
                self.run.log_artifact(art)

            self._guard(upload)

    def finish(self) -> None:
        if self.run is not None:
            self._guard(self.run.finish)
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


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
        history, summary, config = [], {}, {}
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
        runs.append({"file": str(f), "history": history, "summary": summary, "config": config})
    return {"runs": runs, **runs[-1]}
