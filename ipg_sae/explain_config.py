"""The settings of ``ipg-sae explain`` and of the pipeline's explain stage (:class:`ExplainJobConfig`,
:class:`ExplainStageConfig`) and where the LLM is (:class:`LLMConfig`), apart from :mod:`ipg_sae.explain_run` and
:mod:`ipg_sae.llm_explain` (which re-export them) so that these configs are built and checked without importing
torch (``ipg-sae explain --help``, a mistyped flag or key answer at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import IPGError
from .explanations.results import ExplainConfig
from .tracking import WandbConfig


@dataclass
class LLMConfig:
    """Where the LLM is. ``base_url`` / ``api_key`` default to ``$IPG_SAE_LLM_BASE_URL`` (else
    ``$OPENAI_BASE_URL``) and ``$IPG_SAE_LLM_API_KEY`` (else ``$OPENAI_API_KEY``)."""

    backend: Literal["openai", "transformers"] = "openai"
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    api_key: str | None = None
    model: str = "default"  # the served model's name (openai) or a model path / hub id (transformers)
    timeout_s: float = 10.0
    max_tokens: int = 300
    temperature: float = 0.0
    n_explain: int = 10  # build windows shown to the explainer
    n_score: int = 10  # held-out windows per class for detection and fuzzing
    per_prompt: int = 5  # examples per scoring prompt (Delphi's batch)
    window: int = 12  # tokens before the marked token

    def validate(self) -> None:
        """The settings alone: the loader checks every section it reads, with the LLM on or off (a pipeline's saved
        config holds an ``llm`` section either way); :meth:`require_endpoint` is for the jobs that turn it on."""
        if self.backend not in ("openai", "transformers"):
            raise IPGError(f"llm.backend is {self.backend!r}; use openai (an OpenAI-compatible endpoint) or "
                           "transformers (a local model)")
        if self.timeout_s <= 0:
            raise IPGError(f"llm.timeout_s is {self.timeout_s}; give a positive number of seconds")
        for name in ("n_explain", "n_score", "per_prompt", "max_tokens"):
            if getattr(self, name) < 1:
                raise IPGError(f"llm.{name} is {getattr(self, name)}; give a positive integer")

    def require_endpoint(self) -> None:
        """With the LLM on, an ``openai`` backend without an endpoint fails on load, before any work."""
        if self.backend == "openai":
            self.resolved_url()

    def resolved_url(self) -> str:
        url = self.base_url or os.environ.get("IPG_SAE_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise IPGError("no LLM endpoint: set llm.base_url (e.g. http://127.0.0.1:8000/v1) or "
                           "$IPG_SAE_LLM_BASE_URL / $OPENAI_BASE_URL, or use llm.backend: transformers")
        return url.rstrip("/")

    def resolved_key(self) -> str | None:
        return self.api_key or os.environ.get("IPG_SAE_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")


@dataclass
class ExplainJobConfig:
    run_dir: str = ""  # the attribution run (a directory with attribution.json)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    top: int = 64  # IPG's top latents explained (besides the selected set)
    baseline_top: int = 0  # each baseline's top k explained too (for comparing methods)
    latents: list[str] = field(default_factory=list)  # more latents, as "layer:latent"
    max_sequences: int = 0  # trajectories used as the corpus (0: all)
    save_every: int = 16  # explanations written to disk every this many latents
    llm_enabled: bool = False  # also ask an LLM (see llm)
    llm: LLMConfig = field(default_factory=LLMConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    trust_remote_code: bool = False  # let the run's model run its own code (only for runs you trust)

    def validate(self) -> None:
        if not self.run_dir or not (Path(self.run_dir) / "attribution.json").is_file():
            raise IPGError(f"{self.run_dir or '(no run_dir)'} is not an attribution run (no attribution.json); give "
                           "the run directory of `ipg-sae attribute` or `ipg-sae pipeline`, e.g. runs/demo")
        if self.top < 0 or self.baseline_top < 0 or self.save_every < 1:
            raise IPGError("explain: top and baseline_top must be >= 0 and save_every >= 1; fix them")
        self.explain.validate()
        if self.llm_enabled:
            self.llm.validate()
            self.llm.require_endpoint()


@dataclass
class ExplainStageConfig(ExplainConfig):
    """The pipeline's ``explain`` section: the explanation settings (those of ``ipg-sae explain --explain.*``),
    whether the stage runs, and the LLM. Which latents is not a setting here: the explorer's full panels."""

    enabled: bool = True  # explain the explorer's full-panel latents before the explorer is built
    max_sequences: int = 0  # trajectories used as the corpus (0: all)
    llm_enabled: bool = False  # also ask an LLM (see llm): off unless an endpoint or local model is configured
    llm: LLMConfig = field(default_factory=LLMConfig)

    def validate(self) -> None:
        super().validate()
        if self.max_sequences < 0:
            raise IPGError(f"explain.max_sequences is {self.max_sequences}; give 0 (all) or a positive count")
        if self.enabled and self.llm_enabled:
            self.llm.validate()
            self.llm.require_endpoint()

    def job(self, run_dir: Path, wandb: WandbConfig, trust_remote_code: bool) -> ExplainJobConfig:
        """The ``ipg-sae explain`` config of a pipeline run with these settings."""
        from dataclasses import fields

        settings = ExplainConfig(**{f.name: getattr(self, f.name) for f in fields(ExplainConfig)})
        return ExplainJobConfig(run_dir=str(run_dir), explain=settings, max_sequences=self.max_sequences,
                                llm_enabled=self.llm_enabled, llm=self.llm, wandb=wandb,
                                trust_remote_code=trust_remote_code)
