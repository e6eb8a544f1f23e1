"""The origin comparison (``ipg-sae paths``; it was ``ipg_sae/paths.py``): where IPG's path starts. Its settings
(:mod:`.config`), stages and work (:mod:`.run`), statistics (:mod:`.summary`) and rendering (:mod:`.report`)."""

from .config import PathsConfig


# The stages and work import torch: they load on first use (PEP 562), so that the config (``ipg-sae CMD --help``,
# a config file's typo) does not; ``from ipg_sae.experiments.origins import X`` works for every name as before.
_LAZY = {"STAGES": "run", "origin_dir": "run", "run_paths": "run", "agreement": "summary"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STAGES", "PathsConfig", "agreement", "origin_dir", "run_paths"]
