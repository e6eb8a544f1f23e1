"""The steering benchmark (``ipg-sae steering-bench``): its settings (:mod:`.config`), its recipes
(:mod:`.recipes`), its stages and work (:mod:`.run`), its statistics (:mod:`.summary`) and its rendering
(:mod:`.report`)."""

from .config import METHODS, SteeringBenchConfig, splits
from .run import STAGES, run_bench

__all__ = ["METHODS", "STAGES", "SteeringBenchConfig", "run_bench", "splits"]
