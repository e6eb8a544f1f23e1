"""Typed dataclass configs loaded from YAML, strictly.

Every command takes one dataclass config. ``load_config`` reads a YAML file into it and
rejects unknown fields, missing required fields and values of the wrong type, naming the
field path and the file. The same dataclasses generate the CLI: each leaf field
``a.b`` becomes a flag ``--a.b VALUE`` (the value is parsed as YAML, so ``0.5``, ``true``,
``[1, 2]`` and ``null`` work), so a config file and the command line are one schema.

Every job config (sample, train-sae, attribute, evaluate, pipeline) starts with the same
header, :class:`JobConfig`: its run directory (``runs_dir/name``), the model and W&B.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import IPGError
from .models_config import ModelConfig
from .tracking import WandbConfig

T = TypeVar("T")


@dataclass
class JobConfig:
    """The header every job config shares. Subclasses give ``name`` their own default."""

    name: str = "run"  # the run directory's name: outputs go to <runs_dir>/<name>/
    runs_dir: str = "runs"  # parent directory of run directories
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def validate(self) -> None:
        if self.name in ("", ".", "..") or "/" in self.name:
            raise IPGError(f"`name` {self.name!r} must be a plain directory name (it becomes runs/<name>/)")


@dataclass
class StagedJobConfig(JobConfig):
    """The header of a multi-stage job (pipeline, study, paths, steering-bench): ``force`` lets a rerun replace a
    stage whose own output files were edited since it wrote them (otherwise it refuses, naming the file)."""

    force: bool = dataclasses.field(default=False, metadata={"key_omits": False})


def from_dict(cls: type[T], data: Any, where: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, validating every field."""
    if not isinstance(data, dict):
        raise IPGError(f"{where}: `{prefix or 'the top level'}` must be a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = _join(prefix, unknown[0])
        raise IPGError(f"{where}: unknown field `{name}`{_did_you_mean(unknown[0], fields, prefix)}; "
                       f"valid fields here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        path = _join(prefix, name)
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise IPGError(f"{where}: missing required field `{path}`; add it to the config")
            continue
        value = data[name]
        default = _default_of(field)
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A partial section overrides the field's own default, not the section class's defaults
            # (e.g. evaluation.task keeps its held-out offset when only n_problems is given).
            value = _merge(dataclasses.asdict(default), value)
        kwargs[name] = _coerce(hints[name], value, where, path)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_LOADING: contextvars.ContextVar[str | None] = contextvars.ContextVar("ipg_sae_config_file", default=None)


def loading_file() -> str | None:
    """The config file :func:`load_config` is loading now (None outside it): nested configs built while it is
    checked (a pipeline's train-sae config) name it in their errors."""
    return _LOADING.get()


def check_dotted(cls: type, keys, where: str) -> None:
    """Every dotted key (``training_tokens``, ``data.task.n_problems``) names a field of dataclass ``cls``;
    else one line naming ``where``, the field and the closest valid one."""
    for dotted in keys:
        node, prefix = cls, ""
        for part in str(dotted).split("."):
            fields = {f.name: f for f in dataclasses.fields(node) if f.init}
            if part not in fields:
                raise IPGError(f"{where}: unknown field `{_join(prefix, part)}`{_did_you_mean(part, fields, prefix)}; "
                               f"valid fields here: {', '.join(sorted(fields))}")
            prefix = _join(prefix, part)
            typ = _is_optional(typing.get_type_hints(node)[part])[1]
            if not (isinstance(typ, type) and dataclasses.is_dataclass(typ)):
                break
            node = typ


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None,
                overrides_from: str = "command-line overrides") -> T:
    """Load ``cls`` from a YAML file (or only defaults when ``path`` is None), then apply dotted overrides
    (``overrides_from`` says where they came from, for errors)."""
    token = _LOADING.set(str(path) if path else None)
    try:
        return _load_config(cls, path, overrides, overrides_from)
    finally:
        _LOADING.reset(token)


def _load_config(cls: type[T], path, overrides, overrides_from: str) -> T:
    data: dict = {}
    where = str(path) if path else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise IPGError(f"config file {p} not found; pass the path of a YAML file (see configs/)")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise IPGError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
        except UnicodeDecodeError as e:
            raise IPGError(f"{p}: byte {e.start} is not UTF-8; save the config file as UTF-8") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    if overrides:
        where += f" + {overrides_from}"
    return from_dict(cls, data, where=where)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)



def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---- CLI ------------------------------------------------------------------------------


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--a.b`` flag per leaf field of dataclass ``cls`` (values parsed as YAML), described
    by the comment its dataclass gives the field."""
    group = parser.add_argument_group("config overrides (any field of the config file)")
    for path, typ, default, doc in _leaf_fields(cls):
        group.add_argument(
            f"--{path}",
            dest=f"cfg:{path}",
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=(f"{doc}. " if doc else "") + f"{_type_name(typ)} (default: {default!r})",
        )


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line description: its trailing comment, or the comment lines just above it."""
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# ").strip())
                continue
            m = re.match(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
            if m and m.group(1) in {f.name for f in dataclasses.fields(klass)}:
                text = m.group(2) or " ".join(above)
                if text:
                    docs[m.group(1)] = text.strip().rstrip(".")
            above = []
    return docs


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for key, raw in vars(args).items():
        if key.startswith("cfg:"):
            try:
                out[key[4:]] = yaml.safe_load(raw)
            except yaml.YAMLError:
                out[key[4:]] = raw
    return out


# ---- internals ------------------------------------------------------------------------


def _did_you_mean(name: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{_join(prefix, close[0])}`?)" if close else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise IPGError(f"override `{dotted}`: `{k}` is not a section")
    node[keys[-1]] = value


def _is_optional(typ: Any) -> tuple[bool, Any]:
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(typ) if a is not type(None)]
        if len(args) < len(get_args(typ)):
            return True, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, typ


def _coerce(typ: Any, value: Any, where: str, path: str) -> Any:
    optional, inner = _is_optional(typ)
    if value is None:
        if optional or typ is Any:
            return None
        raise IPGError(f"{where}: field `{path}` may not be null; give a {_type_name(typ)}")
    typ = inner
    origin = get_origin(typ)
    if typ is Any:
        return value
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where, path)
    if origin is Literal:
        choices = get_args(typ)
        if value not in choices:
            hint = _did_you_mean(str(value), [str(c) for c in choices])
            raise IPGError(f"{where}: field `{path}` is {value!r}{hint}; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a scalar where a list is expected: a list of one
        (item,) = get_args(typ)[:1] or (Any,)
        return [_coerce(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise IPGError(f"{where}: field `{path}` must be a mapping, got {value!r}")
        _, vt = get_args(typ) or (Any, Any)
        return {k: _coerce(vt, v, where, f"{path}.{k}") for k, v in value.items()}
    if origin in (Union, types.UnionType):
        for alt in get_args(typ):
            try:
                return _coerce(alt, value, where, path)
            except IPGError:
                continue
        raise IPGError(f"{where}: field `{path}` is {value!r}; expected {_type_name(typ)}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # YAML "1e6" is a float
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise IPGError(f"{where}: field `{path}` is {value!r}; expected {_type_name(typ)}")


def _type_name(typ: Any) -> str:
    optional, inner = _is_optional(typ)
    if optional:
        return f"{_type_name(inner)} or null"
    origin = get_origin(typ)
    if origin is Literal:
        return "one of " + "|".join(map(str, get_args(typ)))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(typ)[0])}"
    if origin is dict:
        return "mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(typ))
    return getattr(typ, "__name__", str(typ))


def _leaf_fields(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        typ = hints[f.name]
        _, inner = _is_optional(typ)
        path = _join(prefix, f.name)
        if dataclasses.is_dataclass(inner):
            yield from _leaf_fields(inner, path)
        else:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "required"
            yield path, typ, default, docs.get(f.name, "")
