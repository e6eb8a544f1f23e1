"""The faithfulness study (``ipg-sae study``): its settings (:mod:`.config`), its stages and work (:mod:`.run`),
its statistics (:mod:`.summary`) and its rendering (:mod:`.report`)."""

from ...lazy import lazy_exports
from .config import StudyConfig


# The stages and work import torch: they load on first use (PEP 562), so that the config (``ipg-sae CMD --help``,
# a config file's typo) does not; ``from ipg_sae.experiments.study import X`` works for every name as before.
_LAZY = {"STAGES": "run", "run_study": "run"}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["STAGES", "StudyConfig", "run_study"]
