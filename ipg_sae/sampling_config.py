"""How completions are sampled (:class:`SamplingConfig`), apart from :mod:`ipg_sae.sampling` so that a config
is built and checked without importing torch (``ipg-sae CMD --help``, a mistyped flag or key answer at once);
``sampling`` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import IPGError


@dataclass
class SamplingConfig:
    n_samples: int = 4  # G: completions per prompt
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling (1 = the full vocabulary)
    max_new_tokens: int = 128  # generated tokens per completion at most
    batch_size: int = 16  # sequences per generate call (prompts per call = batch_size // n_samples)
    seed: int = 0  # each batch reseeds from (seed, batch index)
    # hf: transformers generate() (one random stream per batch). loop: our decode loop (ipg_sae/decode.py), one
    # random stream per sample (seeded by seed, problem id and sample index), batch_size rows decoding at once and
    # a finished row refilled by the next sample, so a sample's tokens do not depend on the batch it is in (the
    # same distribution as hf, not the same draws)
    # vllm: vLLM's engine (GPU, unsteered only; pip install vllm), one stream per batch like hf
    backend: Literal["hf", "loop", "vllm"] = "hf"
    # loop only: run the decoding steps' norms, MLPs and rotary embeddings as compiled, fused kernels (torch.compile;
    # on a CPU it needs a C++ compiler, and without one it warns and decodes uncompiled). The first steps pay the
    # compilation (seconds to a minute, once per process and model class). Not bit for bit the uncompiled loop: the
    # compiled norms round their sums differently (~1e-7 relative), so log-probabilities agree to ~1e-6 and a draw
    # that falls within that rounding of a token boundary can pick the neighbouring token; hence off by default, and
    # part of cache keys when on
    compile: bool = field(default=False, metadata={"key_omits": False})

    def validate(self) -> None:
        if self.n_samples < 1:
            raise IPGError(f"sampling.n_samples is {self.n_samples}; it must be at least 1")
        if self.temperature < 0:
            raise IPGError("sampling.temperature must be >= 0 (0 = greedy)")
        if self.temperature == 0 and self.n_samples > 1:
            raise IPGError(f"sampling.temperature is 0 (greedy) with n_samples={self.n_samples}: every sample would "
                           "be identical; set a temperature > 0 or n_samples: 1")
        if not 0 < self.top_p <= 1:
            raise IPGError("sampling.top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise IPGError("sampling.max_new_tokens must be at least 1")
        if self.compile and self.backend != "loop":
            raise IPGError(f"sampling.compile compiles the loop backend's decoding step; sampling.backend is "
                           f"{self.backend!r}: set sampling.backend: loop or sampling.compile: false")
        if self.batch_size < 1:
            raise IPGError(f"sampling.batch_size is {self.batch_size}; it must be at least 1 (sequences decoded at "
                           "once, e.g. 16)")
