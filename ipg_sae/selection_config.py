"""What a selection is asked for (:class:`SelectionConfig`) and the names it chooses from, apart from
:mod:`ipg_sae.selection` so that a config is built and checked without importing torch (``ipg-sae CMD --help``,
a mistyped flag or key answer at once); ``selection`` and ``jobs`` re-export these names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .errors import IPGError

RankBy = Literal["mean", "t", "mean_abs", "score"]
Normalize = Literal["none", "length", "l1"]
RANK_BY: tuple[str, ...] = get_args(RankBy)
NORMALIZE: tuple[str, ...] = get_args(Normalize)


@dataclass
class SelectionConfig:
    k: int = 16  # size of the selected set
    by: RankBy | None = None  # mean | t | mean_abs | score; None = the method's natural score
    per_layer: bool = False  # k per layer instead of k overall
    normalize: Normalize = "none"  # none | length | l1: per-trajectory normalization before aggregating
    n_bootstrap: int = 100  # prompt resamples for the Jaccard stability of the top-k
    table_size: int = 50  # rows in features.csv

    def validate(self) -> None:
        if self.k < 1:
            raise IPGError(f"selection.k is {self.k}; select at least one latent")
        if self.n_bootstrap < 0 or self.table_size < 1:
            raise IPGError("selection.n_bootstrap must be >= 0 and selection.table_size >= 1")

    def check_width(self, saes: dict) -> None:
        """Refuse a ``k`` larger than the latents there are, before any attribution runs."""
        widths = {layer: int(sae.cfg.d_sae) for layer, sae in saes.items()}
        available = min(widths.values()) if self.per_layer else sum(widths.values())
        if self.k > available:
            where = "the narrowest SAE has" if self.per_layer else "the SAEs have"
            raise IPGError(f"selection.k is {self.k} but {where} only {available} latents; lower selection.k")
