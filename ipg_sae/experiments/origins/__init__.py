"""The origin comparison (``ipg-sae paths``; it was ``ipg_sae/paths.py``): where IPG's path starts. Its settings
(:mod:`.config`), stages and work (:mod:`.run`), statistics (:mod:`.summary`) and rendering (:mod:`.report`)."""

from ...lazy import lazy_exports
from .config import PathsConfig


# The stages and work import torch: they load on first use (PEP 562), so that the config (``ipg-sae CMD --help``,
# a config file's typo) does not; ``from ipg_sae.experiments.origins import X`` works for every name as before.
_LAZY = {"STAGES": "run", "origin_dir": "run", "run_paths": "run", "agreement": "summary"}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["STAGES", "PathsConfig", "agreement", "origin_dir", "run_paths"]
