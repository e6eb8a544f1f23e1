"""The steering benchmark (``ipg-sae steering-bench``): its settings (:mod:`.config`), its recipes
(:mod:`.recipes`), its stages and work (:mod:`.run`), its statistics (:mod:`.summary`) and its rendering
(:mod:`.report`)."""

from .config import METHODS, SteeringBenchConfig, splits


# The stages and work import torch: they load on first use (PEP 562), so that the config (``ipg-sae CMD --help``,
# a config file's typo) does not; ``from ipg_sae.experiments.steering_bench import X`` works for every name as before.
_LAZY = {"STAGES": "run", "run_bench": "run"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "STAGES", "SteeringBenchConfig", "run_bench", "splits"]
