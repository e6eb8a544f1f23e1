r"""What a latent is, in words and in numbers, with no LLM: input-side and output-side explanations and the
scores that say how good they are.

Everything is computed from a corpus of token sequences (a run's trajectories, held-out text), split into
a *build* part (the explanation is made from it) and a *held-out* part (it is scored on it; the two never
share a sequence, and :func:`split_corpus` keeps the samples of one prompt together).

Input side (:func:`input_explanation`). A latent *fires* at position ``p`` when ``f_p > 0`` (the first
position of every sequence, and those before its ``start``, are never read, as in attribution). For every n-gram ``g`` (``n = 1..max_n``)
ending at ``p``, with ``a`` its count at firing build positions (``A`` of them) and ``c`` its count at the
other build positions (``C``), the smoothed log-odds ratio against the base rate (Monroe et al.'s
"fightin' words", add-``alpha`` prior) is

    lo(g) = log((a + alpha) / (A - a + alpha)) - log((c + alpha) / (C - c + alpha))
    z(g)  = lo(g) / sqrt(1 / (a + alpha) + 1 / (c + alpha))

and the explanation is the n-grams with the largest ``z`` (``lo > 0``, ``a >= min_count``), with the
strongest firing windows they came from. ``c`` is the n-gram's total build count minus ``a``, so one pass
over the corpus serves every latent.

Output side. *VocabProj* (:func:`vocab_proj`): the tokens ``W_dec[i]`` promotes and suppresses directly,
``logits(i) = W_U norm_lin(W_dec[i])``. "Through the final norm as the model applies it": a norm is
``N(x) = w * (x - m(x)) / r(x) + b`` with ``m`` the mean over d_model for LayerNorm (0 for RMSNorm) and
``r`` the RMS / standard deviation. Adding ``t * d`` to a residual ``x`` changes the logits, to first order
in ``t`` and ignoring the change of ``r`` (a positive factor shared by every token's logit at a position,
so it changes no ranking), by ``W_U (w * (d - m(d))) / r(x)``. We therefore use
``norm_lin(d) = w * (d - mean(d))`` for LayerNorm and ``w * d`` for RMSNorm (``(1 + w) * d`` for Gemma's
norm, which stores ``w - 1``); the bias ``b`` adds the same vector for every latent and is left out.
(:func:`ipg_sae.latents.logit_effect`, the explorer's panel, scales by ``w`` and does not centre; they
differ only for LayerNorm models such as GPT-2.)

*TokenChange* (:func:`token_change`): the latent amplified (``scale`` by ``gamma``, through
:func:`ipg_sae.steering.steer`) at its own firing positions only, the model run on, and per token ``v``

    delta(v) = mean over firing positions p of  P_steered(v | x_<=p) - P_clean(v | x_<=p)

the tokens with the largest and smallest ``delta`` (measured through every later layer, unlike VocabProj), on
the latent's ``n_contexts`` strongest build sequences, each cut to the ``context_tokens`` tokens ending at its
last firing position (the cost is then a few short forward passes per latent, whatever the prompt length).

Scores. *Detection* (:func:`detection_score`): on held-out positions, the explanation predicts "fires"
at ``p`` with strength ``max z(g)`` over its n-grams ending at ``p`` (0 when none matches). Positives are
held-out firing positions; negatives are as many non-firing ones, up to half of them *hard* (their token is
one the latent fires on in the build part: where a token-level explanation is tempted and the latent is
silent) and the rest drawn at random. Reported: balanced accuracy of the binary
prediction (``strength > 0``) and AUROC of the strength (Mann-Whitney, ties counted half).

*Output score* (:func:`raw_output_score`, ranked by :func:`explain_latents`; after Arad et al., arXiv
2505.20063): on held-out firing positions,
the latent amplified as for TokenChange, ``sum_{v in T_i} delta(v)`` with ``T_i`` its top ``m`` VocabProj
tokens: how much amplifying it raises the probability of what its output-side explanation says it
promotes. It is compared with latents of the same activation-frequency decile
(:func:`ipg_sae.nulls.frequency_bins`): ``output_percentile`` is the share of that null pool it beats.

Modules: ``results`` (the typed results and :class:`ExplainConfig`, JSON round trip, the table columns),
``corpus`` (the corpus and where latents fire in it), ``input_side``, ``output_side``, ``explain``
(:func:`explain_latents`: everything for a list of latents of one SAE). The job that writes a run's
``explanations/`` is :mod:`ipg_sae.explain_run`; the LLM explainer and scorers are :mod:`ipg_sae.llm_explain`.
"""


from ..lazy import lazy_exports
from .results import (EXPLANATION_COLUMNS, OUT, DetectionScore, Example, ExplainConfig, InputExplanation,
                      LatentExplanation, NGram, OutputExplanation, OutputScore, TokenEffect, flat_columns, from_dict,
                      json_quote, load_explanations, to_dict, token_pieces)

# The modules that compute (corpus, input_side, output_side, explain) import torch and load on first use
# (PEP 562): the settings and results above are read without it (`ipg-sae explain --help`, a config's typo), and
# `from ipg_sae.explanations import X` works for every name as before.
_LAZY = {**dict.fromkeys(("Activations", "Corpus", "encode_corpus", "split_corpus"), "corpus"),
         "explain_latents": "explain",
         **dict.fromkeys(("NGramCounts", "auroc", "binary_scores", "detection_sample", "detection_score",
                          "input_explanation"), "input_side"),
         **dict.fromkeys(("cut_contexts", "final_norm", "firing_contexts", "norm_linear", "null_pool",
                          "probability_change", "rank_in_null", "raw_output_score", "token_change", "vocab_proj"),
                         "output_side")}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["Activations", "Corpus", "encode_corpus", "split_corpus", "explain_latents", "NGramCounts", "auroc",
           "binary_scores", "detection_sample", "detection_score", "input_explanation", "cut_contexts", "final_norm",
           "firing_contexts", "norm_linear", "null_pool", "probability_change", "rank_in_null", "raw_output_score",
           "token_change", "vocab_proj", "EXPLANATION_COLUMNS", "OUT", "DetectionScore", "Example", "ExplainConfig",
           "InputExplanation", "LatentExplanation", "NGram", "OutputExplanation", "OutputScore", "TokenEffect",
           "flat_columns", "from_dict", "json_quote", "load_explanations", "to_dict", "token_pieces"]
