"""The faithfulness study (``ipg-sae study``): its settings (:mod:`.config`), its stages and work (:mod:`.run`),
its statistics (:mod:`.summary`) and its rendering (:mod:`.report`)."""

from .config import StudyConfig
from .run import STAGES, run_study

__all__ = ["STAGES", "StudyConfig", "run_study"]
