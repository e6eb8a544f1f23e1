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

Every digest is a sha256 hex string. ``FORMAT_VERSION`` names the layout of this version's
saved results and is part of every cache key: a new layout never reuses an old file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
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


def module_digest(module: torch.nn.Module) -> str:
    """The digest of a module's parameters and buffers (about 0.5 s per GB; callers keep it for a run)."""
    return tensors_digest(dict(module.state_dict()))


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_digest(obj: Any) -> str:
    return text_digest(json.dumps(obj, sort_keys=True, default=str))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered by the file's identity and times so unchanged files are hashed once."""
    from .io import cache_root

    path = Path(path)
    stat = path.stat()
    stamp = f"{path.resolve()}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    memo = cache_root() / "digests" / hashlib.sha1(stamp.encode()).hexdigest()
    if not verify_all():
        try:
            return memo.read_text().strip()
        except OSError:
            pass
    digest = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return digest


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
