"""The origin comparison (``ipg-sae paths``; it was ``ipg_sae/paths.py``): where IPG's path starts. Its settings
(:mod:`.config`), stages and work (:mod:`.run`), statistics (:mod:`.summary`) and rendering (:mod:`.report`)."""

from .config import PathsConfig
from .run import STAGES, origin_dir, run_paths
from .summary import agreement

__all__ = ["STAGES", "PathsConfig", "agreement", "origin_dir", "run_paths"]
