"""Steering recipes from trajectories: DiffMean (the vector baseline) and the IPG-weighted step."""

from __future__ import annotations

import pytest
import torch

from ipg_sae.attribution import attribute
from ipg_sae.errors import IPGError
from ipg_sae.models import capture_residuals
from ipg_sae.steering import steer
from ipg_sae.trajectories import Trajectory
from ipg_sae.vectors import diffmean, ipg_weighted_step
from tests.helpers import calibrated_sae
from tests.helpers import trajs_with_rewards as make_trajs

pytestmark = pytest.mark.filterwarnings("ignore:the SAE at layer")  # hand-made SAEs: reconstruction is not the point


def _traj(p, g, prompt, completion, reward):
    return Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="", reference="",
                      prompt_ids=prompt, completion_ids=completion, reward=float(reward))


def test_diffmean_of_one_group_is_high_minus_low_and_recovers_a_planted_direction(models):
    model, _ = models("llama")
    A, B = 77, 78
    u = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u /= u.norm()
    with torch.no_grad():  # token A is token B plus a large planted direction in the embedding
        emb = model.get_input_embeddings().weight
        emb[A] = emb[B] + 50.0 * u
    try:
        prompt = [5, 9, 13, 40, 41]
        trajs = [_traj(0, g, prompt, [20 + g, 30, A if g % 2 == 0 else B, 31], g % 2 == 0) for g in range(6)]
        dm = diffmean(model, trajs, layer=0)
        means = [capture_residuals(model, torch.tensor([t.prompt_ids + t.completion_ids]), None, [0])[0][0, 5:]
                 .double().mean(0) for t in trajs]
        want = torch.stack(means[0::2]).mean(0) - torch.stack(means[1::2]).mean(0)
        torch.testing.assert_close(dm.vector.double(), want, rtol=1e-5, atol=1e-6)
        cos = float(dm.vector.double() @ u / dm.vector.double().norm())
        assert cos > 0.95, cos
        assert dm.residual_norm > 0 and dm.n_trajectories == 6
    finally:
        with torch.no_grad():
            emb[A] -= 50.0 * u  # leave the shared model as it was
    with pytest.raises(IPGError, match="different rewards"):
        diffmean(model, [_traj(0, g, prompt, [20, 30], 1.0) for g in range(3)], layer=0)


def test_the_ipg_weighted_step_at_eta_0_is_the_clean_model_and_scales_by_score(models):
    model, _ = models("llama")
    trajs = make_trajs([[1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]], seed=6)
    sae = calibrated_sae(model, 2, trajs, d_sae=48)
    result = attribute(model, {2: sae}, trajs, n_steps=4, progress=False)
    ids = torch.tensor([trajs[0].prompt_ids + trajs[0].completion_ids])
    with torch.no_grad():
        clean = model(ids).logits
        with steer(model, {2: sae}, ipg_weighted_step(result, 0.0)):
            same = model(ids).logits
        step = ipg_weighted_step(result, 0.5)
        with steer(model, {2: sae}, step):
            moved = model(ids).logits
    assert torch.equal(clean, same)  # eta 0: every c_i is 1, the splice is exact
    assert float((moved - clean).abs().max()) > 1e-6
    gammas = {iv.latent: iv.value for iv in step}
    scores = result.attributions[2].double()[~result.prompt("skipped").bool()].mean(0)
    top = int(scores.abs().argmax())
    assert gammas[top] == pytest.approx(1 + 0.5 * float(torch.sign(scores[top])), abs=1e-6)
    assert all(g >= 0 for g in gammas.values()) and len(step) == int((scores != 0).sum())
    with pytest.raises(IPGError, match="eta"):
        ipg_weighted_step(result, -1.0)


def test_capability_cost_is_zero_unsteered_and_measures_a_push(tiny_llama_dir):
    from ipg_sae.capability import capability_cost
    from ipg_sae.models import hidden_size, load_model
    from ipg_sae.steering import add_vector, scale
    from tests.tiny import random_sae

    model, tok = load_model(str(tiny_llama_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = ["The river ran past the old mill and into the town.", "Prices rose again this spring.", "   "]
    none = capability_cost(model, tok, {}, [], texts)
    assert none.kl == 0.0 and none.nll_clean == none.nll_steered and none.ppl_ratio == 1.0 and none.n_tokens > 5
    sae = random_sae("topk", hidden_size(model), 1, d_sae=32, k=4)
    identity = capability_cost(model, tok, {1: sae}, scale([(1, i) for i in range(32)], 1.0), texts)
    assert identity.kl == 0.0 and identity.ppl_ratio == 1.0  # gamma 1 is the model itself
    vector = torch.randn(hidden_size(model), generator=torch.Generator().manual_seed(0))
    small = capability_cost(model, tok, {}, [add_vector(1, vector, 0.5)], texts)
    big = capability_cost(model, tok, {}, [add_vector(1, vector, 20.0)], texts)
    assert 0 < small.kl < big.kl and big.ppl_ratio > 1.0
    with pytest.raises(IPGError, match="neutral text"):
        capability_cost(model, tok, {}, [], ["", " "])


def test_projection_on_latents_recovers_a_vector_in_their_span_and_nothing_orthogonal():
    from ipg_sae.vectors import project_on_latents
    from tests.tiny import random_sae

    sae = random_sae("topk", 64, 1, d_sae=32, k=4, seed=2)
    rows = sae.W_dec.detach().double()
    inside = 2.0 * rows[3] - 0.5 * rows[7]
    p = project_on_latents(inside, sae, [3, 7, 11])
    torch.testing.assert_close(p.vector.double(), inside, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p.coefficients.double(), torch.tensor([2.0, -0.5, 0.0], dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    assert p.captured == pytest.approx(1.0, abs=1e-6)
    basis = rows[[3, 7, 11]].T  # a vector orthogonal to the three rows: nothing of it is carried
    q, _ = torch.linalg.qr(basis)
    outside = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    outside -= q @ (q.T @ outside)
    assert project_on_latents(outside, sae, [3, 7, 11]).captured < 1e-10
    half = project_on_latents(inside / inside.norm() + outside / outside.norm(), sae, [3, 7, 11])
    assert half.captured == pytest.approx(0.5, abs=1e-6)


def test_the_reward_permuted_step_equals_the_step_recomputed_on_shuffled_rewards(models):
    """Issue 37: the step's reward-permutation null, from the stored per-trajectory rows, is the IPG-weighted step
    of an attribution recomputed on the shuffled rewards (fixed quadrature nodes: exact)."""
    import dataclasses

    from ipg_sae.selection import reward_permutations
    from ipg_sae.vectors import permuted_step_scores, step_scores, weighted_step

    model, _ = models("llama")
    trajs = make_trajs([[1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]], seed=2)
    sae = calibrated_sae(model, 2, trajs, d_sae=48)
    result = attribute(model, {2: sae}, trajs, n_steps=6, progress=False)
    identity = torch.arange(len(trajs))
    torch.testing.assert_close(permuted_step_scores(result, identity)[2], step_scores(result)[2])
    orders = reward_permutations(result, 5, seed=4)
    assert len(orders) == 5
    order = orders[1]
    shuffled = [dataclasses.replace(t, reward=trajs[int(order[i])].reward) for i, t in enumerate(trajs)]
    recomputed = attribute(model, {2: sae}, shuffled, n_steps=6, progress=False)
    torch.testing.assert_close(permuted_step_scores(result, order)[2], step_scores(recomputed)[2], rtol=1e-6,
                               atol=1e-9)
    got = weighted_step(permuted_step_scores(result, order), 2.0)
    want = ipg_weighted_step(recomputed, 2.0)
    assert [(iv.layer, iv.latent) for iv in got] == [(iv.layer, iv.latent) for iv in want]
    assert [iv.value for iv in got] == pytest.approx([iv.value for iv in want], rel=1e-6)
    assert got != ipg_weighted_step(result, 2.0)  # the shuffle did change the step


def test_the_score_shuffled_step_keeps_the_magnitudes_on_other_latents(models):
    from ipg_sae.vectors import shuffled_scores

    scores = {2: torch.tensor([0.0, 3.0, -1.0, 0.0, 2.0, 0.5], dtype=torch.float64),
              5: torch.tensor([0.0, -4.0, 0.0], dtype=torch.float64)}
    out = shuffled_scores(scores, seed=1)
    for layer in scores:  # the same scored latents, the same values among them
        assert torch.equal(out[layer] != 0, scores[layer] != 0)
    before = sorted(float(v) for s in scores.values() for v in s[s != 0])
    assert sorted(float(v) for s in out.values() for v in s[s != 0]) == before
    assert any(not torch.equal(out[layer], scores[layer]) for layer in scores)
    assert all(torch.equal(shuffled_scores(scores, 1)[layer], out[layer]) for layer in scores)  # seeded


def test_diffmean_in_the_latent_basis_finds_a_planted_latent(models):
    """Issue 37: the advantage-weighted mean difference of SAE latent activations (the latent-basis DiffMean step's
    weights) is exactly the hand-computed difference and puts a latent that fires only on rewarded
    trajectories first."""
    from ipg_sae.vectors import latent_diffmean, weighted_step

    model, _ = models("llama")
    A, B, P = 77, 78, 5
    u = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u /= u.norm()
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        saved = emb[A].clone()
        emb[A] = emb[B] + 50.0 * u
    try:
        prompt = [5, 9, 13, 40, 41]
        trajs = [_traj(p, g, prompt, [20 + g, 30, A if g % 2 == 0 else B, 31], g % 2 == 0)
                 for p in range(2) for g in range(4)]
        sae = calibrated_sae(model, 0, trajs, d_sae=32)
        xs = torch.cat([capture_residuals(model, torch.tensor([t.prompt_ids + t.completion_ids]), None, [0])[0][0]
                        for t in trajs]).double()
        proj = xs @ u
        with torch.no_grad():  # latent P: fires where the planted direction is (token A), nowhere else
            sae.W_enc[:, P] = u.to(sae.W_enc.dtype)
            sae.b_enc[P] = -float(proj.min() + proj.max()) / 2
        w = latent_diffmean(model, {0: sae}, trajs)[0].double()
        means = [sae.encode(capture_residuals(model, torch.tensor([t.prompt_ids + t.completion_ids]), None, [0])[0]
                            [0, 5:]).double().mean(0) for t in trajs]
        want = torch.stack(means[0::2]).mean(0) - torch.stack(means[1::2]).mean(0)  # 0/1 rewards: high minus low
        torch.testing.assert_close(w, want.detach(), rtol=1e-4, atol=1e-5)
        assert int(w.abs().argmax()) == P and float(w[P]) > 0
        step = {iv.latent: iv.value for iv in weighted_step({0: w}, 1.0)}
        assert step[P] == pytest.approx(2.0)  # the top latent is doubled at eta 1
    finally:
        with torch.no_grad():
            emb[A] = saved
