"""Everything for a list of latents of one SAE: explanations, scores, the null they are ranked in."""

from __future__ import annotations

from ..errors import IPGError
from .corpus import Activations, Corpus, encode_corpus
from .input_side import NGramCounts, detection_score, input_explanation
from .output_side import null_pool, rank_in_null, raw_output_score, token_change, vocab_proj
from .results import ExplainConfig, LatentExplanation, OutputScore


def explain_latents(model, sae, layer: int, latents: list[int], corpus: Corpus, pieces,
                    cfg: ExplainConfig | None = None, acts: Activations | None = None,
                    done: dict[int, LatentExplanation] | None = None, on_done=None,
                    null_scores: dict[int, float | None] | None = None) -> list[LatentExplanation]:
    """Input and output explanations, detection and output scores of ``latents`` of one SAE.

    ``done`` holds explanations already computed (kept as they are); ``on_done(explanation)`` is called after
    each new one (for resumable writing); ``null_scores`` caches the null pool's raw output scores."""
    cfg = cfg or ExplainConfig()
    cfg.validate()
    acts = acts if acts is not None else encode_corpus(model, sae, layer, corpus, cfg.batch)
    counts = NGramCounts(acts, cfg.max_n)
    d_sae = int(sae.cfg.d_sae)
    for latent in latents:
        if not 0 <= latent < d_sae:
            raise IPGError(f"latent {latent} is outside the SAE at layer {layer} (d_sae {d_sae}); fix the latent list")
    done = dict(done or {})
    null_scores = null_scores if null_scores is not None else {}
    pool, bins = null_pool(acts, d_sae, cfg)
    for b, members in pool.items():
        todo = [i for i in members if i not in null_scores]
        for i, v in zip(todo, vocab_proj(model, sae, todo, pieces, cfg.output_top)):
            null_scores[i] = raw_output_score(model, sae, layer, i, corpus, acts, v, cfg)[0]
    out = []
    for latent in latents:
        if latent not in done:
            done[latent] = _explain_one(model, sae, layer, latent, corpus, acts, counts, pieces, cfg)
            null = [null_scores.get(i) for i in pool.get(int(bins[latent]), []) if i != latent]
            mean, pct = rank_in_null(done[latent].output.score, null)
            done[latent].output.null_mean, done[latent].output.percentile = mean, pct
            done[latent].output.n_null = len([x for x in null if x is not None])
            if on_done is not None:
                on_done(done[latent])
        out.append(done[latent])
    return out


def _explain_one(model, sae, layer, latent, corpus, acts, counts, pieces, cfg) -> LatentExplanation:
    inp = input_explanation(counts, latent, pieces, cfg)
    vocab = vocab_proj(model, sae, [latent], pieces, cfg.n_tokens)[0]
    change = token_change(model, sae, layer, latent, corpus, acts, pieces, cfg)
    score, n = raw_output_score(model, sae, layer, latent, corpus, acts, vocab, cfg)
    return LatentExplanation(layer, latent, round(acts.build_frequency(latent), 6), inp, vocab, change,
                             detection_score(counts, latent, inp, cfg), OutputScore(score, None, None, 0, n))
