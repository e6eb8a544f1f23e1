"""What an attribution run is asked to do: the method names and :class:`AttributionConfig`.

The config is checked once, when it is built (``__post_init__``): the job (from YAML), the
captum-style :func:`ipg_sae.attribution.attribute` wrapper and a notebook user all hand the
driver a config that is already valid, so nothing downstream validates it again. Every list
of names in an error message comes from the ``Literal`` type it checks, so the two cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ..errors import IPGError
from .rules import ADVANTAGES, Advantage, Method, quadrature

Baseline = Literal["ipg", "act", "reason_words", "grad_x_act", "ig_likelihood", "random", "ipg_local"]
Importance = Literal["none", "self_normalized"]
ScopeName = Literal["all", "generated"]

METHOD_NAMES: tuple[str, ...] = get_args(Baseline)
GRADIENT_METHODS: tuple[str, ...] = ("ipg", "grad_x_act", "ig_likelihood", "ipg_local")  # per-prompt attributions, completeness
# ReasonScore's vocabulary (arXiv 2503.18878, extraction/reason_tokens.json), lower case; multi-word entries allowed.
REASON_WORDS: tuple[str, ...] = ("wait", "hmm", "so", "therefore", "let me", "alternatively", "however", "but",
                                 "check", "verify", "maybe", "perhaps", "actually", "thus", "instead")


@dataclass
class AttributionConfig:
    n_steps: int = 8  # quadrature nodes on the path c = alpha * 1 (fixed-count mode)
    method: Method = "gausslegendre"  # quadrature rule of the fixed-count mode (captum's names)
    # Adaptive mode (when set): per prompt, composite Simpson panels are bisected where the completeness
    # gap is, until every trajectory's relative gap is <= delta_tol or max_nodes nodes are spent.
    delta_tol: float | None = None
    max_nodes: int = 33  # node budget per prompt in adaptive mode
    advantage: Advantage = "rloo"  # A_g of each sample in its group
    importance: Importance = "none"  # off-policy correction of the integrand at each node
    scope: ScopeName = "all"  # positions that get gates: all (prompt and generated) or generated only
    exclude_first: bool = True  # the first token's residual is an outlier; no SAE reads it
    internal_batch_size: int | None = None  # sequences per forward/backward chunk (whole groups)
    error_node: bool = False  # gate the SAE error term as one more component on the path
    gradient_checkpointing: bool = False  # recompute blocks in the backward (long trajectories)
    importance_clip: float = 10.0  # cap of the self-normalized importance weights
    token_maps: list[str] = field(default_factory=list)  # trajectory ids that keep per-token maps ("*": all)
    n_contexts: int = 3  # top activating contexts kept per latent
    baseline: Baseline = "ipg"  # which method produces the scores: IPG itself or one of the baselines
    checkpoint_every: int = 8  # prompts between checkpoints (when a checkpoint path is given)
    seed: int = 0  # the `random` baseline's seed; recorded with every result
    reason_words: list[str] = field(default_factory=lambda: list(REASON_WORDS))  # `reason_words` baseline
    reason_window: list[int] = field(default_factory=lambda: [1, 2])  # tokens before / after a reasoning word
    reason_alpha: float = 0.7  # entropy exponent of ReasonScore
    # Where the path starts (docs/ipg-method.md §2a): `zero` (every latent off), `mean` (each latent's mean
    # activation over the attributed tokens: mean ablation) or a safetensors file with one [d_sae] tensor per
    # layer named `L<layer>`. Gradient methods only. (At zero, how attribution worked before this setting
    # existed, cache keys are as they were.)
    path_origin: str = field(default="zero", metadata={"key_omits": "zero"})

    def __post_init__(self) -> None:
        _check_choice("baseline", self.baseline, METHOD_NAMES)
        _check_choice("advantage", self.advantage, ADVANTAGES)
        _check_choice("importance", self.importance, get_args(Importance))
        _check_choice("scope", self.scope, get_args(ScopeName))
        if self.n_steps < 1:
            raise IPGError(f"attribution.n_steps is {self.n_steps}; it must be at least 1")
        quadrature(self.n_steps, self.method)  # rejects unknown methods and trapezoid with one step
        if self.delta_tol is not None and not 0 < self.delta_tol < 1:
            raise IPGError(f"attribution.delta_tol is {self.delta_tol}; give a relative gap in (0, 1), e.g. 0.01, "
                           "or null for a fixed n_steps")
        if self.delta_tol is not None and self.max_nodes < 3:
            raise IPGError(f"attribution.max_nodes is {self.max_nodes}; adaptive attribution starts with 3 nodes")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise IPGError("attribution.internal_batch_size must be positive or null")
        if self.checkpoint_every < 1:
            raise IPGError(f"attribution.checkpoint_every is {self.checkpoint_every}; it must be at least 1")
        if self.n_contexts < 1:
            raise IPGError("attribution.n_contexts must be at least 1")
        if self.importance_clip <= 0:
            raise IPGError("attribution.importance_clip must be positive")
        if len(self.reason_window) != 2 or min(self.reason_window) < 0:
            raise IPGError(f"attribution.reason_window is {self.reason_window}; give [before, after], two counts >= 0")
        if not isinstance(self.path_origin, str) or not self.path_origin:
            raise IPGError("attribution.path_origin must be zero, mean or the path of a safetensors file")
        if self.path_origin not in ("zero", "mean") and not self.path_origin.endswith(".safetensors"):
            raise IPGError(f"attribution.path_origin is {self.path_origin!r}; use zero, mean or a .safetensors file "
                           "with one [d_sae] tensor per layer named L<layer>")
        if not self.reason_words and self.baseline == "reason_words":
            raise IPGError("attribution.reason_words is empty; list the reasoning words to score against")

    @property
    def is_gradient_method(self) -> bool:
        return self.baseline in GRADIENT_METHODS


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise IPGError(f"attribution.{name} is {value!r}; use one of {', '.join(choices)}")
