"""Atomic file output: a reader never sees a half-written file.

Every writer goes to a temporary file in the target's directory and renames it into
place (``os.replace`` is atomic on POSIX and Windows), so a killed run leaves either
the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
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
    check_inside_run(path, "write")
    if path.is_dir():  # refused before anything is written (the command line names it, with the fix)
        raise IsADirectoryError(errno.EISDIR, "a folder is where this file goes", str(path))
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the result the mode a plain open() would (shared run dirs)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        raise _naming(e, path) from e
    except Exception as e:  # a library's own error for a full disk (safetensors: SafetensorError) names no file
        if "No space left on device" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` with the file being written named in it (a write to a full disk names none)."""
    if e.filename and not str(e.filename).endswith(".tmp"):
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


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
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, row)`` for each non-blank line of a JSONL file; an IPGError naming the line for a line that is
    not UTF-8 or not JSON."""
    from .errors import IPGError

    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise IPGError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                               "fix or remove that line") from None
            if not line:
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise IPGError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from the JSON this module writes (tuples as lists, keys as strings, arrays as lists)."""
    return json.loads(json.dumps(obj, default=_json_default))


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


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p``, also when ``path`` is a symbolic link whose target does not exist yet (the target is made)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        Path(os.path.realpath(path)).mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- one writer per run directory ----------------------------------------------------------

_HELD: dict[str, tuple[int, int]] = {}  # resolved run dir -> (lock file descriptor, depth in this process)
_ROOTS: dict[str, Path] = {}  # resolved run dir -> the run dir as the job named it (absolute, links kept)


def check_inside_run(path: str | os.PathLike, action: str = "write") -> None:
    """Refuse to write or delete through a symbolic link inside a run directory this process holds.

    A folder inside ``runs/<name>/`` that is a link to elsewhere would make a rerun overwrite or
    delete files outside the run (the run directory itself may be a link: that is where the user
    put the run).
    """
    for root in list(_ROOTS.values()):
        check_no_link_below(root, path, action)


def check_no_link_below(root: str | os.PathLike, path: str | os.PathLike, action: str = "write") -> None:
    """Refuse to ``action`` ``path`` when a folder between ``root`` (itself allowed to be a link) and it is a
    symbolic link, for a delete ``path`` itself too: the action would land outside ``root``."""
    root = Path(os.path.abspath(root))
    target = Path(os.path.abspath(path))
    try:
        inside = target.relative_to(root)
    except ValueError:
        return
    current = root
    for part in inside.parts[:-1] if action == "write" else inside.parts:
        current = current / part
        if current.is_symlink():
            from .errors import IPGError

            raise IPGError(f"refusing to {action} {path}: {current} is a symbolic link inside the run directory "
                           f"{root}, so the {action} would land outside the run; replace the link with a real "
                           "folder (or move the whole run directory instead)")


def secondary_rank() -> bool:
    """Whether this process is a rank other than 0 of an initialised ``torch.distributed`` process group (the
    process group says so, never an environment variable: ``RANK`` set outside ``torchrun`` means nothing)."""
    import sys

    dist = sys.modules.get("torch.distributed")  # not imported: no process group
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a file or a directory inside a run (never through a symbolic link inside it)."""
    import shutil

    path = Path(path)
    check_inside_run(path, "delete")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, lock_hint: bool = True) -> Iterator[None]:
    """Hold an advisory lock on ``run_dir`` (``.lock`` inside it) for the duration of the block.

    A second process that asks for the same directory gets an :class:`~ipg_sae.errors.IPGError`
    naming the process that holds it, instead of both writing files that disagree. The lock is
    re-entrant within a process (the pipeline holds it while its stages take it again) and is
    released by the kernel when its holder dies, so a killed run never leaves a stale lock.
    Only rank 0 of an initialised ``torch.distributed`` process group takes it (the ranks share the directory;
    the other ranks are guarded against links all the same); ``RANK`` in the environment alone changes nothing.
    ``lock_hint``: the busy message suggests ``--name`` (not for commands that take a run directory).
    While held, writes and deletions inside it never go through a symbolic link (:func:`check_inside_run`).
    """
    import fcntl

    path = make_dir(run_dir)
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
    fd = None  # the other ranks of a process group share rank 0's lock, and are guarded all the same
    if not secondary_rank():
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            from .errors import IPGError

            raise IPGError(f"run directory {path} is in use by {holder}; wait for it to finish"
                           + (", or give this run another name (--name)" if lock_hint else "")) from None
        import sys

        os.ftruncate(fd, 0)
        # an argument that is not UTF-8 (a surrogate escape) is written escaped, never a UnicodeEncodeError
        os.pwrite(fd, f"process {os.getpid()} ({' '.join(sys.argv)[:200]})".encode("utf-8", "backslashreplace"), 0)
    _HELD[key] = (fd, 1)
    _ROOTS[key] = Path(os.path.abspath(path))
    try:
        yield
    finally:
        _HELD.pop(key, None)
        _ROOTS.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


class JSONFile:
    """A typed result saved as one JSON file (a study's, an origin comparison's, a benchmark's summary): ``save``
    writes ``to_json()`` atomically; ``load`` reads it back through ``from_json(doc, where)`` and turns a file that
    is not one (a missing key, a wrong type) into one line naming the file. Subclasses define ``to_json``,
    ``from_json`` and ``KIND`` (what the file is, for that line)."""

    KIND = "result"
    FORMAT = ""  # the format version a file must carry (empty: not checked)

    @classmethod
    def check_format(cls, doc, where: str) -> None:
        """Refuse a document of another format version (or no dict at all), naming it and the fix."""
        from .errors import IPGError

        found = doc.get("format") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or (cls.FORMAT and found != cls.FORMAT):
            raise IPGError(f"{where} is not a {cls.KIND} of this version (format {found!r}, expected "
                           f"{cls.FORMAT!r}); rerun its report stage")

    def save(self, path: str | Path) -> Path:
        write_json(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path):
        from .errors import IPGError

        try:
            return cls.from_json(read_json(path), str(path))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IPGError(f"{path} is not a {cls.KIND} ({type(e).__name__}: {e}); rerun the report stage that "
                           "writes it") from None
