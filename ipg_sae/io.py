"""Atomic file output: a reader never sees a half-written file.

Every writer goes to a temporary file in the target's directory and renames it into
place (``os.replace`` is atomic on POSIX and Windows), so a killed run leaves either
the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the result the mode a plain open() would (shared run dirs)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=_json_default) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                from .errors import IPGError

                raise IPGError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def cache_root() -> Path:
    """Where ipg-sae caches what it can rebuild (dequantized models, file digests): ``$IPG_SAE_CACHE`` or
    ``~/.cache/ipg_sae``."""
    root = os.environ.get("IPG_SAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ipg_sae"
    )
    return Path(root)


# ---- one writer per run directory ----------------------------------------------------------

_HELD: dict[str, tuple[int, int]] = {}  # resolved run dir -> (lock file descriptor, depth in this process)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory lock on ``run_dir`` (``.lock`` inside it) for the duration of the block.

    A second process that asks for the same directory gets an :class:`~ipg_sae.errors.IPGError`
    naming the process that holds it, instead of both writing files that disagree. The lock is
    re-entrant within a process (the pipeline holds it while its stages take it again) and is
    released by the kernel when its holder dies, so a killed run never leaves a stale lock.
    Only the main process of a ``torchrun`` job takes it (the ranks share the directory).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    import fcntl

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        from .errors import IPGError

        raise IPGError(f"run directory {path} is in use by {holder}; wait for it to finish, or give this run another "
                       "name (--name)") from None
    import sys

    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} ({' '.join(sys.argv)[:200]})".encode(), 0)
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # closing the descriptor releases the lock
