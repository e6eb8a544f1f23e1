"""The steering benchmark's grid (:class:`BenchGrid`: the settings each method may try) and the names of the
shipped recipes, apart from :mod:`.recipes` (which builds recipes with torch) so that the benchmark's config is
built and checked without importing torch (``ipg-sae steering-bench --help``, a mistyped flag or key answer at
once). :mod:`.recipes` re-exports :class:`BenchGrid` and refuses to load if its registered recipes are not the
names listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The shipped steering methods (the default of `steering_bench.methods`) and nulls (of `nulls`), in registration
# order (the report's order); the registry in recipes.py may hold more (a plugin's recipes).
SHIPPED_METHODS: tuple[str, ...] = (
    "ipg_topk", "act", "grad_x_act", "reason_words", "ig_likelihood", "ipg_step", "diffmean", "diffmean_projected",
    "prompting", "ipg_step_permuted", "ipg_step_shuffled", "grad_x_act_step", "act_step", "diffmean_latent_step",
    "diffmean_all", "prompting_shots")
SHIPPED_NULLS: tuple[str, ...] = ("random_direction", "random_latents")


@dataclass
class BenchGrid:
    """The settings each method may try (at most ``max_settings`` each)."""

    ks: list[int] = field(default_factory=lambda: [4, 16, 64])
    gammas: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0, 4.0])
    etas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0])
    alphas: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32,
                                                         0.48, 0.64, 0.96])
    projected_ks: list[int] = field(default_factory=lambda: [16, 64])
    projected_alphas: list[float] = field(default_factory=lambda: [0.04, 0.08, 0.16, 0.32, 0.64, 1.28])
    instructions: list[str] = field(default_factory=lambda: [
        "Solve the problem step by step, then give the final answer as a number.",
        "Think carefully. Check your arithmetic before you give the final answer.",
        "Read the question, write the one calculation it needs, and state the result.",
        "You are a careful math tutor. Show the calculation and end with 'The answer is N.'"])
    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4])  # worked examples (prompting_shots)
    shot_instructions: int = 3  # prompting_shots: the first this many instructions x every shots entry
    diffmean_layers: list[int] = field(default_factory=list)  # diffmean_layer: other layers than the SAE's
    layer_alphas: list[float] = field(default_factory=lambda: [0.04, 0.12, 0.32, 0.64])
    dev_draws: int = 10  # the step's nulls: draws tuned on dev (permutations / shuffles)
    test_draws: int = 5  # ... of which the first this many run on test and transfer (>= 5 for a rank p <= 1/6)
    max_settings: int = 12
