"""Which model to load (:class:`ModelConfig`), apart from :mod:`ipg_sae.models` so that a config can be
built and checked (``ipg-sae CMD --help``, a mistyped flag or key) without importing torch; ``models``
re-exports both names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # hub id, local directory, path to a .gguf file, or an offline name
    dtype: Literal["float32", "bfloat16", "float16", "float64", "auto"] = "float32"  # auto: bfloat16 on CUDA
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    trust_remote_code: bool = False  # run a hub model's own code (only for models you trust)
    revision: str | None = None  # hub revision (branch, tag or commit)
