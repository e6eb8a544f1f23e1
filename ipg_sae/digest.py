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


# --------------------------------------------------------------------------- code identity

class UnstableIdentity(ValueError):
    """What a callable closes over cannot be digested the same way in another process; the message says what."""


_MAX_NODES = 200_000  # values visited for one identity; a larger closure is refused, not half-hashed


def code_identity(obj: Any) -> str:
    """sha256 of everything a callable's result can depend on, equal in every process that loads the same code.

    A function: the file its code was compiled from (the whole module: its constants are read at call
    time), its compiled code, its defaults, the values it closes over and the values of the globals it
    names, each followed recursively (a function or class it names is digested the same way, wherever it
    lives, so a decorator or factory in a helper module counts, and so does a constant imported from a
    third one). A ``functools.partial``: its function and bound arguments; a bound method: its function
    and object; a callable instance: its class (source and bases) and its state (``__dict__``/slots). A
    tensor or array counts by its bytes, a module, function or class of the standard library or of an
    installed package by its name and version, an instance of such a class by its ``repr`` when that names
    no memory address (a logger, a tokenizer, a compiled pattern), else by its state. Raises :class:`UnstableIdentity` naming the value that has no stable digest
    (an object with neither state to read nor a ``repr`` free of memory addresses).
    """
    return _Identity().digest(obj)


class _Identity:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self.files: dict[str, None] = {}
        self.nodes = 0
        self.keep: list = []  # objects visited, kept alive so that their ids are not reused

    def digest(self, obj: Any) -> str:
        self.value(obj, "the callable")
        for path in self.files:  # by content, not by path: the same code in another checkout has the same identity
            self.put("file", _file_text(path))
        return self.h.hexdigest()

    def put(self, *parts: Any) -> None:
        self.h.update(json.dumps(parts, default=str).encode() + b"\n")

    def value(self, v: Any, where: str) -> None:
        import enum
        import functools
        import types

        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise UnstableIdentity(f"{where} closes over more than {_MAX_NODES} values")
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
            self.put("v", type(v).__name__, repr(v))
            return
        if id(v) in self.seen:  # a cycle or a shared value: refer to its first visit
            self.put("ref", self.seen[id(v)])
            return
        self.seen[id(v)] = len(self.seen)
        self.keep.append(v)
        if isinstance(v, (list, tuple, dict, set, frozenset)) and _plain(v):  # one entry, not one per element
            items = sorted(map(repr, v.items())) if isinstance(v, dict) else (
                sorted(map(repr, v)) if isinstance(v, (set, frozenset)) else list(map(repr, v)))
            self.put("plain", type(v).__name__, items)
        elif isinstance(v, (list, tuple)):
            self.put(type(v).__name__, len(v))
            for i, x in enumerate(v):
                self.value(x, f"{where}[{i}]")
        elif isinstance(v, dict):
            self.put("dict", len(v))
            for k, x in _sorted_items(v):
                self.value(k, f"{where} key")
                self.value(x, f"{where}[{k!r}]")
        elif isinstance(v, (set, frozenset)):
            self.put(type(v).__name__, sorted(_Identity().digest(x) for x in v))
        elif isinstance(v, functools.partial):
            self.put("partial")
            self.value(v.func, f"{where}.func")
            self.value(v.args, f"{where}.args")
            self.value(v.keywords, f"{where}.keywords")
        elif isinstance(v, types.MethodType):
            self.put("method")
            self.value(v.__func__, where)
            self.value(v.__self__, f"{where}.__self__")
        elif isinstance(v, types.FunctionType):
            self.function(v, where)
        elif isinstance(v, (staticmethod, classmethod)):
            self.put(type(v).__name__)
            self.value(v.__func__, where)
        elif isinstance(v, property):
            self.put("property")
            self.value((v.fget, v.fset, v.fdel), where)
        elif isinstance(v, types.ModuleType):
            self.module(v)
        elif isinstance(v, type):
            self.cls(v)
        elif isinstance(v, (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodDescriptorType)):
            owner = getattr(v, "__self__", None)
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.put("builtin method", getattr(v, "__qualname__", v.__name__))
                self.value(owner, f"{where}.__self__")
            else:
                self.put("builtin", getattr(v, "__module__", None), getattr(v, "__qualname__", v.__name__))
        elif isinstance(v, torch.Tensor):
            self.put("tensor", tensors_digest({"t": v}))
        elif isinstance(v, torch.nn.Module):
            self.cls(type(v))
            self.put("module state", module_digest(v))
        elif isinstance(v, enum.Enum):
            self.cls(type(v))
            self.put("enum", v.name)
        elif type(v).__module__ == "numpy" and hasattr(v, "tobytes"):
            self.put("array", str(getattr(v, "dtype", "")), list(getattr(v, "shape", ())),
                     hashlib.sha256(v.tobytes()).hexdigest())
        else:
            self.instance(v, where)

    def function(self, fn: Any, where: str) -> None:
        code = fn.__code__
        self.put("function", fn.__module__, fn.__qualname__)
        if _library_file(code.co_filename):  # the standard library's or an installed package's
            self.put("library function", _version(fn.__module__ or ""))
            return
        self.code(code, fn.__globals__, where)
        self.value(fn.__defaults__, f"{where}'s defaults")
        self.value(fn.__kwdefaults__, f"{where}'s keyword defaults")
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                self.put("empty cell", name)
                continue
            self.value(content, f"{where}'s closure variable {name!r}")

    def code(self, code: Any, globals_: dict, where: str) -> None:
        import types

        if _user_file(code.co_filename):
            self.files[code.co_filename] = None
        self.put("code", code.co_name, code.co_code.hex(), list(code.co_names), list(code.co_varnames),
                 [_const(c) for c in code.co_consts if not isinstance(c, types.CodeType)])
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const, globals_, where)
        builtins = globals_.get("__builtins__")
        for name in code.co_names:  # globals (and attribute names: only those that are globals count)
            if name in globals_:
                self.put("global", name)
                self.value(globals_[name], f"{where}'s global {name!r}")
            elif isinstance(builtins, dict) and name in builtins or hasattr(builtins, name):
                self.put("builtin name", name)

    def module(self, mod: Any) -> None:
        path = getattr(mod, "__file__", None)
        if path and _user_file(path):
            self.put("module", mod.__name__)
            self.files[str(path)] = None
        else:
            self.put("library module", mod.__name__, _version(mod.__name__))

    def cls(self, cls: type) -> None:
        import sys

        path = getattr(sys.modules.get(cls.__module__), "__file__", None)
        self.put("class", cls.__module__, cls.__qualname__)
        if _user_class(cls):
            if path and _user_file(path):
                self.files[str(path)] = None
            for base in cls.__mro__[1:]:
                self.value(base, f"{cls.__qualname__}'s base")
            for name, attr in sorted(vars(cls).items()):
                if not name.startswith("__") or name in ("__call__", "__init__"):
                    self.put("attribute", name)
                    self.value(attr, f"{cls.__qualname__}.{name}")
        else:
            self.put("library class", _version(cls.__module__))

    def instance(self, v: Any, where: str) -> None:
        self.cls(type(v))
        if not _user_class(type(v)) and type(v).__repr__ is not object.__repr__:
            text = repr(v)  # a library object that says what it is (a logger, a tokenizer, a pattern, a path)
            if " at 0x" not in text:
                self.put("repr", text)
                return
        state = getattr(v, "__dict__", None)
        slots = [s for c in type(v).__mro__ for s in getattr(c, "__slots__", ()) if hasattr(v, s)]
        if isinstance(state, dict) or slots:
            self.put("state", sorted(slots))
            self.value(dict(state or {}), f"{where} ({type(v).__qualname__}) state")
            for s in sorted(slots):
                self.value(getattr(v, s), f"{where}.{s}")
            return
        text = repr(v)
        if " at 0x" in text or type(v).__repr__ is object.__repr__:
            raise UnstableIdentity(
                f"{where} is a {type(v).__module__}.{type(v).__qualname__} with no state to digest and no stable repr")
        self.put("repr", text)


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _plain(container: Any) -> bool:
    values = (x for kv in container.items() for x in kv) if isinstance(container, dict) else container
    return all(type(x) in _PLAIN for x in values)


def _const(c: Any) -> Any:
    """A compiled constant as text that is the same in every process (a frozenset's order is not)."""
    if isinstance(c, frozenset):
        return ["frozenset", sorted(repr(_const(x)) for x in c)]
    if isinstance(c, tuple):
        return ["tuple", [_const(x) for x in c]]
    return repr(c)


def _user_class(cls: type) -> bool:
    """A class of the user's code: from a file that is no library's, or typed in (``__main__``, a notebook)."""
    import sys

    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return _user_file(path) if path else cls.__module__ == "__main__"


def _sorted_items(d: dict) -> list:
    try:
        return sorted(d.items())
    except TypeError:
        return sorted(d.items(), key=lambda kv: repr(kv[0]))


def _file_text(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _user_file(path: str | os.PathLike) -> bool:
    """An existing file of the user's own code: not of the standard library or of an installed package."""
    return os.path.isfile(path) and not _library_file(path)


def _library_file(path: str | os.PathLike) -> bool:
    """A file of the standard library or of an installed package."""
    import sysconfig

    path = os.path.realpath(path)
    roots = {os.path.realpath(p) for key in ("stdlib", "platstdlib", "purelib", "platlib")
             if (p := sysconfig.get_paths().get(key))}
    return any(path.startswith(root + os.sep) for root in roots)


def _version(module_name: str) -> str | None:
    import sys

    top = sys.modules.get(module_name.partition(".")[0])
    version = getattr(top, "__version__", None)
    return version if isinstance(version, str) else None
