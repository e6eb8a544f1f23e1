"""Package attributes that load their module on first use (PEP 562).

A package's ``__init__`` exports its config classes eagerly (they are torch-free, so ``ipg-sae CMD --help`` and a
config file's typo answer without importing torch) and the names that need torch through :func:`lazy_exports`:
``from package import name`` works for every name as before, and the module behind it loads on the first access.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (its ``__name__``), where ``names`` maps each lazily
    exported name to the submodule that defines it (relative to the package, e.g. ``"run"``)."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{names[name]}", package), name)
        setattr(sys.modules[package], name, value)  # once loaded, a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
