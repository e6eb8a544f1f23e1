"""The reward-permutation null (selection.permuted_ranking): exact against a recomputation on shuffled rewards,
and on a planted latent it separates the set the reward picked from sets picked with the reward shuffled."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ipg_sae.attribution import attribute
from ipg_sae.errors import IPGError
from ipg_sae.selection import permuted_ranking, permuted_rankings, reward_permutations, select
from tests.helpers import calibrated_sae, planted_answer_latent, real_F
from tests.helpers import trajs_with_rewards as make_trajs

pytestmark = pytest.mark.filterwarnings("ignore:the SAE at layer")  # hand-made SAEs: reconstruction is not the point


def test_identity_gives_ipgs_ranking_and_a_shuffle_equals_recomputing_on_shuffled_rewards(models):
    model, _ = models("llama")
    rewards = [[1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]]
    trajs = make_trajs(rewards, seed=2)
    sae = calibrated_sae(model, 2, trajs, d_sae=48)
    result = attribute(model, {2: sae}, trajs, n_steps=6, progress=False)  # fixed nodes: no adaptive refinement
    identity = torch.arange(len(trajs))
    assert permuted_ranking(result, identity, 12) == select(result, 12)
    (order,) = reward_permutations(result, 1, seed=5)
    assert not torch.equal(order, identity)
    shuffled = [dataclasses.replace(t, reward=trajs[int(order[i])].reward) for i, t in enumerate(trajs)]
    recomputed = attribute(model, {2: sae}, shuffled, n_steps=6, progress=False)
    assert permuted_ranking(result, order, 12) == select(recomputed, 12)
    assert permuted_ranking(result, order, 12) != select(result, 12)  # the shuffle did change the ranking
    sets = permuted_rankings(result, 12, n=5, seed=1)
    assert len(sets) == 5 and all(len(s) == 12 for s in sets)
    with pytest.raises(IPGError, match="within a prompt"):
        permuted_ranking(result, torch.arange(len(trajs)).flip(0), 12)


def test_a_zero_advantage_is_refused_with_the_fix(models):
    model, _ = models("llama")
    trajs = make_trajs([[0.0, 1.0, 2.0]], seed=1)  # the middle one sits at the mean
    sae = calibrated_sae(model, 2, trajs, d_sae=32)
    result = attribute(model, {2: sae}, trajs, n_steps=4, advantage="mean", progress=False)
    with pytest.raises(IPGError, match="advantage 0.*recompute"):
        permuted_rankings(result, 4, n=2)


def test_the_planted_latent_beats_the_permutation_null_and_a_shuffled_set_does_not(models):
    """One latent alone decides whether the answer token comes out (test_attribution's planted model). IPG ranks
    it first; of the sets picked on shuffled rewards only those that happen to hold it come as close as IPG's set
    to lowering the real objective when removed, and a shuffled pick without it sits inside the null."""
    model, _ = models("llama")
    layer, P = 3, 5
    trajs, sae = planted_answer_latent(model, layer, P=P)
    result = attribute(model, {layer: sae}, trajs, n_steps=16, progress=False)
    k = 2
    ipg_set = select(result, k)
    assert ipg_set[0] == (layer, P)
    null = permuted_rankings(result, k, n=40, seed=0)
    assert sum((layer, P) in s for s in null) < len(null) / 2  # the shuffled rewards rarely pick the planted one

    def removal_effect(selection) -> float:  # the real objective's change when the set is switched off
        gate = torch.ones(sae.cfg.d_sae, dtype=torch.float64)
        gate[[i for _, i in selection]] = 0.0
        return real_F(model, layer, sae, trajs, gate) - clean

    clean = real_F(model, layer, sae, trajs, torch.ones(sae.cfg.d_sae, dtype=torch.float64))
    effects = {tuple(s): removal_effect(s) for s in null}
    ipg_effect = removal_effect(ipg_set)
    null_effects = [effects[tuple(s)] for s in null]
    with_planted = sum((layer, P) in s for s in null) / len(null)
    as_extreme = sum(e <= ipg_effect + 1e-9 for e in null_effects) / len(null_effects)
    assert as_extreme <= with_planted + 1e-9  # only null sets that happen to hold the planted latent come close
    assert ipg_effect < sorted(null_effects)[int(0.5 * len(null_effects))]
    shuffled_set = next(s for s in null if (layer, P) not in s)
    rank = sum(e <= effects[tuple(shuffled_set)] for e in null_effects) / len(null_effects)
    assert rank > 0.05  # a shuffled pick is not extreme within its own null


def test_the_sign_control_is_the_most_negative_end_of_the_ranking(models):
    from ipg_sae.selection import latent_stats

    model, _ = models("llama")
    trajs = make_trajs([[1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]], seed=4)
    sae = calibrated_sae(model, 2, trajs, d_sae=48)
    result = attribute(model, {2: sae}, trajs, n_steps=4, progress=False)
    bottom = select(result, 5, bottom=True)
    stats = latent_stats(result)[2]
    active = torch.nonzero(stats["active_frac"] > 0).flatten()
    lowest = active[stats["mean"][active].argsort()[:5]].tolist()
    assert bottom == [(2, i) for i in lowest]
    assert float(stats["mean"][bottom[0][1]]) < 0 < float(stats["mean"][select(result, 1)[0][1]])
    assert not set(bottom) & set(select(result, 5))
