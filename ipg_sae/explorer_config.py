"""What the explorer page shows (:class:`ExplorerConfig`), apart from :mod:`ipg_sae.explorer` so that a config
is built and checked without importing torch (``ipg-sae CMD --help``, a mistyped flag or key answer at once);
``explorer`` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExplorerConfig:
    detail: int = 48  # latents with a full panel (top by IPG), besides the selected set and baselines' top 8
    n_contexts: int = 12  # top-activating contexts per latent
    window: list[int] = field(default_factory=lambda: [10, 4])  # tokens before / after the activating token
    held_out: int = 32  # held-out texts to encode for contexts (0: none)
    logit_tokens: int = 10  # promoted / suppressed tokens shown
    trajectories_per_side: int = 2  # per latent, the correct and the incorrect trajectories it matters most in
    n_bootstrap: int = 100  # prompt resamples for the selection frequency
    page_size: int = 200  # summary rows per page
    n_trajectories: int = 24  # trajectories in the trajectory view
    on_demand: int = 4096  # other latents (by IPG rank) whose panel the page builds on demand from compact data
    nearest: int = 5  # nearest latents by decoder cosine shown in a panel
