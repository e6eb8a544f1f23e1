"""Where SAEs come from in a config (:class:`SAESpec`, :class:`SAELoad`), apart from :mod:`ipg_sae.saes` so that
a config is built and checked without importing torch (``ipg-sae CMD --help``, a mistyped flag or key answer at
once); ``saes`` re-exports these names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import IPGError


@dataclass
class SAESpec:
    """Where to get one SAE: a local sae-lens directory, or a sae-lens registry release + id."""

    path: str | None = None
    release: str | None = None
    sae_id: str | None = None
    layer: int | None = None  # overrides the layer read from cfg.metadata.hook_name

    def validate(self) -> None:
        if bool(self.path) == bool(self.release):
            raise IPGError("an SAE entry needs exactly one of `path` (local directory) or `release` + `sae_id`")
        if self.release and not self.sae_id:
            raise IPGError(f"SAE release {self.release!r} needs an `sae_id`")


@dataclass
class SAELoad:
    """``sae:`` in the attribute and evaluate configs: the same spelling as the pipeline's and the experiments'
    ``sae: {load: [...]}`` (which may train instead)."""

    load: list[SAESpec] = field(default_factory=list)  # one SAE per layer: {path: dir} or {release, sae_id}


def sae_entries(data: dict) -> list:
    """The SAE entries of a job config read as YAML: ``sae.load``, or ``saes`` (the old spelling) in older runs."""
    sae = data.get("sae")
    return (sae.get("load") if isinstance(sae, dict) else None) or data.get("saes") or []


def take_old_saes(job) -> None:
    """A job config written with the old spelling ``saes: [...]``: its entries move to ``sae.load``, with one line
    saying so (both at once is refused)."""
    if not job.saes:
        return
    if job.sae.load:
        raise IPGError("the config names SAEs under both `saes:` (the old spelling) and `sae.load`; keep only "
                       "sae: {load: [...]}")
    # the logger of ipg_sae.saes, where this lived before (filters and tests keyed on it keep working)
    logging.getLogger("ipg_sae.saes").warning("`saes: [...]` is deprecated; write `sae: {load: [...]}` (the "
                                              "pipeline's spelling) instead")
    job.sae = SAELoad(load=list(job.saes))
    job.saes = None
