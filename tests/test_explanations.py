"""Explanations with no LLM on a tiny model with a planted latent: latent 0 of a standard SAE at layer 1 fires on
token A (" =": its encoder row is a linear probe for A's residual) and writes token B's unembedding direction
(" The"); the other latents are random and fire on about a tenth of the positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ipg_sae import explanations as ex

LAYER = 1


def _pieces(tok):
    return lambda ids: [tok.decode([int(i)]) for i in ids]


def _sequences(tok) -> list[list[int]]:
    from ipg_sae.tasks import arithmetic_problems

    problems = arithmetic_problems(60, 1, 0) + arithmetic_problems(30, 2, 0)
    return [tok(f"{p.question} {p.solution}", add_special_tokens=False)["input_ids"] for p in problems]


def _residuals(model, seqs):
    from ipg_sae.models import capture_residuals

    res = [capture_residuals(model, torch.tensor([s]), None, [LAYER])[LAYER][0, 1:] for s in seqs]
    return torch.cat(res), torch.cat([torch.tensor(s[1:]) for s in seqs])


def planted_sae(model, tok, seqs, d_sae: int = 48):
    """``(sae, A, B)``: latent 0 is the planted one (see the module docstring)."""
    from tests import tiny

    a = tok(" =", add_special_tokens=False)["input_ids"][0]
    b = tok(" The", add_special_tokens=False)["input_ids"][0]
    x, t = _residuals(model, seqs)
    is_a = t == a
    centred = x - x.mean(0)
    cov = centred.T @ centred / len(x) + 1e-3 * torch.eye(x.shape[1])
    probe = torch.linalg.solve(cov, x[is_a].mean(0) - x[~is_a].mean(0))  # LDA: separates A from the rest
    proj = x @ probe
    threshold = float(proj[is_a].min() + proj[~is_a].max()) / 2
    sae = tiny.random_sae("standard", x.shape[1], layer=LAYER, d_sae=d_sae, seed=1)
    unembed = model.get_output_embeddings().weight.detach()
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.copy_(-torch.quantile(x @ sae.W_enc, 0.9, dim=0))  # random latents: fire on ~10% of positions
        sae.W_enc[:, 0] = probe / threshold
        sae.b_enc[0] = -1.0
        sae.W_dec[0] = unembed[b] / unembed[b].norm() * 2 * x.norm(dim=1).mean()
    return sae, a, b


@pytest.fixture(scope="module")
def planted(tiny_llama_dir):
    from ipg_sae.models import load_model

    model, tok = load_model(str(tiny_llama_dir))
    seqs = _sequences(tok)
    sae, a, b = planted_sae(model, tok, seqs)
    corpus = ex.split_corpus(seqs, seed=0)
    cfg = ex.ExplainConfig(null_per_bin=4)
    results = ex.explain_latents(model, sae, LAYER, list(range(8)), corpus, _pieces(tok), cfg)
    return model, tok, sae, a, b, corpus, {e.latent: e for e in results}


def test_the_planted_latent_is_explained_by_both_its_tokens(planted):
    _, _, _, a, b, _, found = planted
    e = found[0]
    assert e.input.ngrams[0].tokens == [a] and e.input.ngrams[0].inactive == 0
    assert all(ex_.text.endswith("[ =]") for ex_ in e.input.examples)  # the examples it came from fire on A
    assert e.vocab_proj.promoted[0].token == b
    assert e.token_change.promoted[0].token == b and e.token_change.n_positions > 0
    assert e.token_change.promoted[0].value > 0 > e.token_change.suppressed[0].value


def test_detection_is_near_one_for_the_planted_latent_and_near_chance_for_random_ones(planted):
    _, _, _, _, _, _, found = planted
    assert found[0].detection.balanced_accuracy >= 0.95 and found[0].detection.auroc >= 0.95
    random = [e.detection.balanced_accuracy for latent, e in found.items() if latent and e.detection.n_positive >= 8]
    assert len(random) >= 4
    assert np.mean(random) < 0.8 and max(random) < found[0].detection.balanced_accuracy


def test_held_out_contexts_are_never_the_build_ones(planted):
    _, _, _, _, _, corpus, found = planted
    held = {j for j, h in enumerate(corpus.held) if h}
    assert held and len(held) < len(corpus.held)
    for e in found.values():
        assert all(x.sequence not in held for x in e.input.examples)


def test_the_output_score_ranks_the_planted_latent_above_random_ones(planted):
    _, _, _, _, _, _, found = planted
    planted_score = found[0].output
    others = [e.output.score for latent, e in found.items() if latent and e.output.score is not None]
    assert others and planted_score.score > max(others)
    assert planted_score.n_null >= 3 and planted_score.percentile == 1.0


def test_vocab_proj_goes_through_the_final_norm_as_the_model_applies_it(tmp_path, tiny_tokenizer):
    """For LayerNorm (GPT-2) the direction is centred and scaled by the norm's weight: the ranking equals the
    first-order change of the model's own logits when the direction is added to a residual whose norm it does not
    change to first order (the 1/r factor VocabProj leaves out is then exactly a positive constant)."""
    from ipg_sae.models import load_model
    from tests import tiny

    tiny.build_model("gpt2", tmp_path, vocab_size=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 2.0)
    sae = tiny.random_sae("standard", 64, layer=3, d_sae=8)
    got = ex.vocab_proj(model, sae, [2], _pieces(tok), 5)[0]
    direction = sae.W_dec[2].detach()
    centred = direction - direction.mean()
    x = torch.randn(64)
    x = x - x.mean()
    x = x - (x @ centred) / (centred @ centred) * centred  # the norm's scale does not move to first order
    first_order = torch.func.jvp(lambda v: model.lm_head(model.transformer.ln_f(v)), (x,), (direction,))[1]
    assert [t.token for t in got.promoted] == torch.topk(first_order, 5).indices.tolist()


def test_results_round_trip_through_json(planted):
    from ipg_sae.io import jsonable

    _, _, _, _, _, _, found = planted
    for e in found.values():
        assert ex.from_dict(jsonable(ex.to_dict(e))) == e
    assert set(ex.flat_columns(found[0])) == set(ex.EXPLANATION_COLUMNS)


def test_bad_settings_fail_in_one_line():
    from ipg_sae.errors import IPGError

    with pytest.raises(IPGError, match="explain.gamma"):
        ex.ExplainConfig(gamma=1.0).validate()
    with pytest.raises(IPGError, match="at least two"):
        ex.split_corpus([[1, 2, 3]])


def test_contexts_are_cut_to_the_tokens_before_the_last_firing_position():
    corpus = ex.Corpus([list(range(100, 120))], [False], [1])
    (tokens, kept), = ex.cut_contexts(corpus, [(0, [3, 12, 15])], context_tokens=6)
    assert tokens == list(range(110, 116)) and kept == [2, 5]  # 15 -> 5, 12 -> 2; 3 is before the cut
    assert ex.cut_contexts(corpus, [(0, [10])], context_tokens=1) == []  # only the window's first token
    assert ex.cut_contexts(corpus, [(0, [3])], context_tokens=0) == [(list(range(100, 104)), [3])]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_at_firing_positions_equal_the_models_own(tmp_path, tiny_tokenizer, arch):
    """TokenChange runs the LM head only where the latent fires; that is the model's own logits there."""
    from ipg_sae.explanations.output_side import _PLAIN_HEAD, logits_at
    from ipg_sae.models import load_model
    from tests import tiny

    tiny.build_model(arch, tmp_path, vocab_size=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path))
    ids = torch.randint(3, len(tiny_tokenizer), (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[0, [2, 8]] = at[1, 5] = at[2, [0, 5]] = True
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[at]
        got = logits_at(model, ids, mask, at)
        again = logits_at(model, ids, mask, at)
    assert _PLAIN_HEAD[model] is True and got.shape == (5, full.shape[-1])
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)


def test_logits_at_falls_back_to_the_full_forward_for_a_head_that_does_more(tiny_llama_dir):
    """A model whose logits are not the output embedding of the last hidden state (here scaled by 0.5, as some
    architectures scale them) is answered by its own forward, and remembered as such."""
    import types

    from ipg_sae.explanations.output_side import _PLAIN_HEAD, logits_at
    from ipg_sae.models import load_model

    model, _ = load_model(str(tiny_llama_dir))
    plain_forward = model.forward

    def scaled(self, *args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = types.MethodType(scaled, model)
    ids = torch.randint(3, 50, (2, 7))
    mask = torch.ones_like(ids)
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[:, -1] = True
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits[at]
        first, second = logits_at(model, ids, mask, at), logits_at(model, ids, mask, at)
    assert _PLAIN_HEAD[model] is False
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want)
