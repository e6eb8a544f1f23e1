"""Content digests: what saved outputs are matched against, so that a reused output is provably the
output of its inputs.

* :func:`tensors_digest` hashes named tensors (names, dtypes, shapes and bytes): a model's or an
  SAE's weights (:func:`module_digest`), or the tensors of a checkpoint or result file, which
  store it in their metadata and check it on read.
* :func:`file_digest` hashes a file's bytes, remembered in the user cache by the file's identity
  (path, inode, size, modification time and *change* time, in nanoseconds) so an unchanged 500 MB
  model file is hashed once. Any write to a file, and any ``os.utime`` that puts its modification
  time back, sets its change time to now: a file edited in place is always hashed again (only
  someone who can set the system clock could forge it). ``IPG_SAE_VERIFY=1`` (``--verify`` on the
  command line) ignores the memo and hashes every file.
* :func:`text_digest` hashes text (a JSONL body, a canonical JSON dump).
* :func:`module_digest` is a module's :func:`tensors_digest`, computed once per module object and
  state: it is remembered with a stamp of every tensor (storage address, in-place version counter,
  dtype, shape, strides), so a parameter changed in place (``p.add_()``, ``load_state_dict``,
  ``model.to(dtype)``) is hashed afresh, and an unchanged one is not hashed again (the attribution
  signature and the cell keys ask for it on every call; hashing a 3 GB model cost 4 s each time).
  A model from :func:`ipg_sae.models.load_model` that is still as loaded takes its digest from the
  user cache, keyed by its weight files' digests (the file memo above), its dtype and the library
  versions: a new process does not hash the weights again either. A write that bypasses the version
  counter (``p.data.add_()``, a NumPy view) is not seen; ``IPG_SAE_VERIFY=1`` hashes every time.

Every digest is a sha256 hex string. ``FORMAT_VERSION`` names the layout of this version's
saved results and is part of every cache key: a new layout never reuses an old file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch

FORMAT_VERSION = "ipg-sae/3"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# Per module object (weakly held: a copy or a reloaded model starts afresh): the stamp of its state when its
# digest was computed, and that digest.
_MODULE_DIGESTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
# Per model from load_model: its stamp as loaded, and its weight files as they were then.
_LOADED: "weakref.WeakKeyDictionary[torch.nn.Module, _Loaded]" = weakref.WeakKeyDictionary()


def module_digest(module: torch.nn.Module) -> str:
    """The digest of a module's parameters and buffers (``tensors_digest`` of its state dict): hashed once per
    module object and state (about 0.5 s per GB), or read from the user cache for a model still as
    :func:`remember_weight_files` recorded it; hashed on every call under ``IPG_SAE_VERIFY=1``."""
    state = dict(module.state_dict())
    if verify_all():
        return tensors_digest(state)
    stamp = state_stamp(state)
    if stamp is None:
        return tensors_digest(state)  # no version counters to tell an edit by: hashed every time
    known = _MODULE_DIGESTS.get(module)
    if known is not None and known[0] == stamp:
        return known[1]
    loaded = _LOADED.get(module)
    key = loaded.key() if loaded is not None and loaded.stamp == stamp else None
    memo = cache_path("weights", key) if key else None
    digest = None
    if memo is not None:
        try:
            digest = memo.read_text().strip() or None
        except OSError:
            pass
    if digest is None:
        digest = tensors_digest(state)
        if memo is not None:
            _write_memo(memo, digest)
    _MODULE_DIGESTS[module] = (stamp, digest)
    return digest


def state_stamp(state: dict[str, torch.Tensor]) -> tuple | None:
    """What changes when any tensor of ``state`` is replaced or written in place through torch: per tensor its
    name, storage address, version counter (every in-place op bumps it, under ``no_grad`` too), dtype, shape,
    strides, offset and device. Cheap: no tensor is read. None when a tensor keeps no version counter (one made
    under ``torch.inference_mode``)."""
    if any(t.is_inference() for t in state.values()):  # (a detached one reads version 0 forever)
        return None
    return tuple((name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), t.stride(), t.storage_offset(),
                  str(t.device)) for name, t in sorted(state.items()))


class _Loaded:
    """A loaded model's weight files (their identities as they were at load) and what else fixed its tensors."""

    def __init__(self, stamp: tuple, files: list[Path], extra: dict):
        self.stamp, self.extra = stamp, extra
        self.files = {f: _file_stamp(f) for f in files}
        self._key: str | None = None

    def key(self) -> str | None:
        """The cache key of the weights these files load into (None when a file changed since the load)."""
        if self._key is None:
            if any(_file_stamp(f) != stamp for f, stamp in self.files.items()):
                return None  # the files are not those the model was loaded from
            self._key = json_digest([FORMAT_VERSION, self.extra, {str(f): file_digest(f) for f in sorted(self.files)}])
        return self._key


def remember_weight_files(module: torch.nn.Module, files: Iterable[str | os.PathLike], **extra: Any) -> None:
    """Record that ``module``'s tensors, as they are now, are exactly what loading ``files`` (with the settings
    ``extra``: dtype, library versions...) gives: :func:`module_digest` then reads its digest from the user cache
    while the files and the module's tensors stay unchanged. Only for a deterministic load (no weight left
    randomly initialised)."""
    stamp = state_stamp(dict(module.state_dict()))
    if stamp is not None:
        _LOADED[module] = _Loaded(stamp, [Path(f) for f in files], extra)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_digest(obj: Any) -> str:
    return text_digest(json.dumps(obj, sort_keys=True, default=str))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered by the file's identity and times so unchanged files are hashed once."""
    from .io import cache_root

    path = Path(path)
    memo = cache_root() / "digests" / hashlib.sha1(_file_stamp(path).encode()).hexdigest()
    if not verify_all():
        try:
            known = memo.read_text().strip()
            if known:
                return known
        except OSError:
            pass
    digest = file_sha256(path)
    _write_memo(memo, digest)
    return digest


def _file_stamp(path: Path) -> str:
    """A file's identity and times (path, inode, size, modification and change time in nanoseconds)."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def cache_path(kind: str, key: str) -> Path:
    from .io import cache_root

    return cache_root() / "digests" / kind / hashlib.sha1(key.encode()).hexdigest()


def _write_memo(memo: Path, digest: str) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)  # a reader never sees half a digest
    except OSError:
        pass  # a read-only cache only costs the hash next time


def verify_all() -> bool:
    """True when every file must be hashed afresh (``IPG_SAE_VERIFY=1``, or ``--verify`` on the command line)."""
    return os.environ.get("IPG_SAE_VERIFY", "") not in ("", "0")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read now."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tree_digest(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{path: digest}`` of files and of every file under directories (``"missing"`` when absent)."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                out[str(f)] = file_digest(f)
        else:
            out[str(p)] = file_digest(p) if p.is_file() else "missing"
    return out


def key_dict(obj: Any) -> Any:
    """``obj`` as cache keys see it: dataclasses as dicts (recursively), without a field marked
    ``key_omits: V`` while it holds ``V``. A setting added after results were stored is marked with the value
    that reproduces the old behaviour, so at that value it leaves every stored stage and checkpoint valid (and
    keeps doing so if the field's default later changes)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if "key_omits" in f.metadata and value == f.metadata["key_omits"]:
                continue
            out[f.name] = key_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(key_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: key_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)
