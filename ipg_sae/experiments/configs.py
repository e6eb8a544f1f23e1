"""What the experiments' configs share, torch-free: the ``sae:`` section (:class:`SAESourceConfig`), the train-sae
config it trains with (:func:`train_config`) and the checks their ``validate`` runs on load. Apart from :mod:`.stages` and :mod:`.common` (which import torch and re-export
these names) so that an experiment's config is built and checked without importing torch (``ipg-sae CMD --help``,
a mistyped flag or key answer at once).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sae_training.config import TrainSAEConfig

from ..config import check_dotted, load_config, loading_file
from ..errors import IPGError
from ..saes_config import SAESpec
from ..sampling_config import SamplingConfig
from ..splits import disjoint_splits, problem_sets
from ..tasks import TaskConfig


@dataclass
class SAESourceConfig:
    load: list[SAESpec] = field(default_factory=list)  # published or local SAEs; when empty, train them
    train_config: str | None = None  # a train-sae YAML (its name, runs_dir and model are the job's)
    train_overrides: dict = field(default_factory=dict)  # dotted overrides of that config, e.g. {training_tokens: 1e6}
    # the trained SAE's seed (init and data order), over the train config's: a replicate's own SAE (None: the config's)
    seed: int | None = field(default=None, metadata={"key_omits": None})

    def validate(self) -> None:
        if not self.load and not self.train_config:
            raise IPGError("sae needs `load` (SAE entries) or `train_config` (a train-sae YAML)")


def check_importance_sampling(field: str, sampling: SamplingConfig) -> None:
    """Samples that stand in for steered policies (importance weights) need a sampler with full support."""
    if sampling.temperature <= 0 or sampling.top_p != 1:
        raise IPGError(f"{field} needs temperature > 0 and top_p 1 (importance weights need a sampler with full "
                       "support)")


def check_problems_per_batch(field: str, n: int) -> None:
    """The off-policy scorer's problems per pass, checked on load rather than when scoring starts."""
    if n < 1:
        raise IPGError(f"{field} is {n}; give at least 1 (problems scored together off-policy; memory grows with it)")


def cheap_to_load(task: TaskConfig) -> bool:
    """A task whose problems are generated or read from a local file: loaded at validation at no real cost."""
    return task.name == "arithmetic" or bool(task.path)


def check_splits_disjoint(tasks: dict[str, TaskConfig], on_load: bool) -> None:
    """No problem in two of ``tasks`` (by id or question text: :func:`ipg_sae.splits.disjoint_splits`). On load
    (``on_load``) only when every split is cheap to load; otherwise (before the first stage) only when one is not,
    so that each run checks once, before any work."""
    if on_load == all(cheap_to_load(t) for t in tasks.values()):
        disjoint_splits(tasks)


def train_config(cfg, whole) -> TrainSAEConfig:
    """The train-sae config of a job whose ``sae`` trains its SAEs (its name, runs_dir, model and W&B). ``cfg`` is
    the job's config or a stage's view of it (:func:`.stages.train_job`), ``whole`` the whole config, whose splits
    the SAE must never train on. Torch-free, so a config's ``validate`` (:func:`check_sae`) builds it on load."""
    source = loading_file()  # the job's own config file, while it is being loaded and checked
    where = f"{source + ': ' if source else ''}sae.train_overrides (fields of {cfg.sae.train_config})"
    check_dotted(TrainSAEConfig, cfg.sae.train_overrides, where)
    overrides = {**cfg.sae.train_overrides, "name": cfg.name, "runs_dir": cfg.runs_dir}
    if cfg.sae.seed is not None:
        overrides["seed"] = cfg.sae.seed
    train = load_config(TrainSAEConfig, cfg.sae.train_config, overrides,
                        overrides_from=f"sae.train_overrides{' of ' + source if source else ''}")
    # The SAE never trains on a question the job attributes or evaluates on (every split it names). The splits are
    # read from the whole config: they are in the SAE stage's key through its identity, this very train config.
    exclude = [*train.data.exclude_tasks,
               *(t for t in problem_sets(whole) if t not in train.data.exclude_tasks)]
    return dataclasses.replace(train, model=cfg.model, wandb=dataclasses.replace(train.wandb, enabled=cfg.wandb.enabled),
                               data=dataclasses.replace(train.data, exclude_tasks=exclude))


def check_sae(job: str, cfg) -> None:
    """An experiment needs SAEs to load or a train-sae YAML to train them; the train-sae config it would train with
    is built (and so checked) now, a typo in ``sae.train_overrides`` named in the job's own config file."""
    if not cfg.sae.load and not cfg.sae.train_config:
        raise IPGError(f"{job}.sae needs `load` (SAE entries) or `train_config` (a train-sae YAML)")
    if not cfg.sae.load:
        try:
            train_config(cfg, cfg)
        except IPGError as e:
            raise IPGError(str(e) if "sae.train_overrides" in str(e) else f"sae.train_config: {e}") from None
