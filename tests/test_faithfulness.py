"""The off-policy estimator: exact scoring under steering, importance weights, enumeration, a fair null."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from ipg_sae.errors import IPGError
from ipg_sae.faithfulness import TrajectoryScorer, estimate, prefix_tree
from ipg_sae.models import load_model
from ipg_sae.nulls import LatentPool, frequency_bins, frequency_matched_sets
from ipg_sae.stats import effective_sample_size, null_rank
from ipg_sae.saes import prepare_sae
from ipg_sae.steering import scale, steer
from ipg_sae.trajectories import Trajectory
from tests import tiny

T = 0.7


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    loaded = {}

    def get(kind: str = "llama", vocab: int | None = None):
        key = (kind, vocab)
        if key not in loaded:
            d = tmp_path_factory.mktemp(f"faith-{kind}-{vocab}")
            tiny.build_model(kind, d, vocab_size=vocab or len(tiny_tokenizer))
            tiny_tokenizer.save_pretrained(d)
            loaded[key] = load_model(str(d), dtype="float64")
        return loaded[key]

    return get


def saes_for(model, layers=(1, 2), d_sae=32, k=4):
    return {layer: prepare_sae(tiny.random_sae("topk", 64, layer, d_sae=d_sae, k=k, seed=layer), model, layer)
            for layer in layers}


def make_trajs(n_prompts=3, G=3, seed=0, vocab=300):
    rng = random.Random(seed)
    shared = [rng.randint(5, vocab) for _ in range(6)]
    out = []
    for p in range(n_prompts):
        question = [rng.randint(5, vocab) for _ in range(2 + p)]
        for g in range(G):
            completion = [rng.randint(5, vocab) for _ in range(1 + g + p)]
            out.append(Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="",
                                  reference="", prompt_ids=shared + question, completion_ids=completion,
                                  reward=float(g % 2)))
    return out


def naive_logprobs(model, saes, trajs, interventions):
    """Each trajectory alone, in one teacher-forced call, with the generation hooks."""
    out = []
    for t in trajs:
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        with torch.no_grad():
            if interventions:
                with steer(model, saes, interventions):
                    logits = model(ids).logits[0].double()
            else:
                logits = model(ids).logits[0].double()
        lp = torch.log_softmax(logits / T, -1)
        P = len(t.prompt_ids)
        out.append(float(lp[P - 1:-1].gather(-1, ids[0, P:, None]).sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_prefix_tree_shares_the_common_prompt():
    trajs = make_trajs()
    tree = prefix_tree(trajs)
    assert len(tree.prefix) == 6 and [len(q) for q in tree.questions] == [2, 3, 4]
    assert [len(c) for c in tree.completions] == [3, 3, 3] and tree.index[1] == [3, 4, 5]
    assert tree.n_tokens < tree.n_tokens_flat
    single = prefix_tree(trajs[:3])  # one prompt: its last token stays in the question
    assert len(single.questions[0]) == 1
    bad = [trajs[0], Trajectory(**{**trajs[1].__dict__, "prompt_ids": [1, 2]})]
    with pytest.raises(IPGError, match="different prompt tokens"):
        prefix_tree(bad)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_scoring_as_a_tree_equals_each_trajectory_alone(models, kind):
    """KV-cache segments, replayed lower blocks and batching change nothing: the same numbers as
    scoring every trajectory in its own forward pass, steered or not."""
    model, _ = models(kind)
    saes = saes_for(model)
    trajs = make_trajs()
    scorer = TrajectoryScorer(model, trajs, T, saes=saes, problems_per_batch=2)
    all_latents = [(layer, i) for layer in (1, 2) for i in range(32)]
    cells = [[], scale(all_latents, 0.0), scale(all_latents, 2.0), scale([(1, i) for i in range(16)] +
                                                                         [(2, i) for i in range(8, 32)], 3.0)]
    moved = False
    for interventions in cells:
        tree, alone = scorer.logprobs(interventions), naive_logprobs(model, saes, trajs, interventions)
        torch.testing.assert_close(tree, alone, rtol=1e-10, atol=1e-10)
        moved |= not torch.allclose(alone, naive_logprobs(model, saes, trajs, []))
    assert moved  # the interventions did change the policy


def test_gamma_one_and_empty_sets_give_weights_of_exactly_one(models):
    model, _ = models("llama")
    saes = saes_for(model)
    trajs = make_trajs()
    scorer = TrajectoryScorer(model, trajs, T, saes=saes)
    base = scorer.logprobs([])
    assert torch.equal(scorer.logprobs(scale([(1, 3), (2, 5)], 1.0)), base)
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    est = estimate(base, base, rewards, groups)  # deletion with k = 0: no intervention at all
    assert np.array_equal(est.ess, np.ones(3)) and est.log_ratio_sd == 0.0
    assert est.per_prompt.tolist() == [float(rewards[g].mean()) for g in groups]  # the plain sample mean


def test_scored_logprob_is_what_generate_samples_with(models):
    """Trajectories sampled under the steering hooks have exactly the log-probability the scorer gives them."""
    model, tok = models("llama")
    saes = saes_for(model)
    interventions = scale([(1, i) for i in range(20)], 2.5)
    prompt = [5, 17, 33, 60, 71, 99]
    torch.manual_seed(0)
    with torch.no_grad(), steer(model, saes, interventions):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=True, temperature=T, top_k=0, top_p=1.0, max_new_tokens=5,
                             num_return_sequences=4, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=2)
    generated = out.sequences[:, len(prompt):]
    # each sample up to and with its end-of-sequence token, as the sampler keeps it
    lengths = [next((i + 1 for i, tok in enumerate(row) if tok == 2), len(row)) for row in generated.tolist()]
    step = torch.stack([torch.log_softmax(s.double(), -1).gather(-1, generated[:, i:i + 1]).squeeze(-1)
                        for i, s in enumerate(out.scores)], dim=1)
    reported = torch.stack([step[g, :n].sum() for g, n in enumerate(lengths)])
    trajs = [Trajectory(id=f"p/s{g}", prompt_id="p", sample_index=g, prompt="", completion="", reference="",
                        prompt_ids=prompt, completion_ids=generated[g, :n].tolist(), reward=0.0)
             for g, n in enumerate(lengths)]
    scored = TrajectoryScorer(model, trajs, T, saes=saes).logprobs(interventions)
    torch.testing.assert_close(scored, reported, rtol=1e-8, atol=1e-8)


def test_estimate_converges_to_the_enumerated_expectation(models):
    """A vocabulary of 6 tokens and 3 generated tokens: every continuation can be enumerated, so
    E_{pi'}[R] is known exactly. The importance estimate from unsteered samples converges to it."""
    model, _ = models("llama", vocab=6)
    sae = tiny.random_sae("standard", 64, 1, d_sae=16, seed=5)
    with torch.no_grad():
        sae.W_dec.mul_(5.0)  # latents that matter to this tiny model
    saes = {1: prepare_sae(sae, model, 1)}
    interventions = scale([(1, i) for i in range(16)], 3.0)
    prompt = [1, 3, 4, 5, 3]
    reward = lambda c: float(c.count(3)) + (c[-1] == 4)  # noqa: E731

    def traj(i, c):
        return Trajectory(id=f"x/s{i}", prompt_id="x", sample_index=i, prompt="", completion="", reference="",
                          prompt_ids=prompt, completion_ids=list(c), reward=reward(list(c)))

    every = [traj(i, c) for i, c in enumerate(itertools.product(range(6), repeat=3))]
    steered = TrajectoryScorer(model, every, T, saes=saes).logprobs(interventions)
    assert abs(float(torch.logsumexp(steered, 0))) < 1e-9  # a distribution over the 216 continuations
    exact = float((steered.exp() * torch.tensor([t.reward for t in every])).sum())
    unsteered = TrajectoryScorer(model, every, T, saes=saes).logprobs([])
    exact_base = float((unsteered.exp() * torch.tensor([t.reward for t in every])).sum())
    assert abs(exact - exact_base) > 0.05  # the intervention moves the expectation

    gen = torch.Generator().manual_seed(0)
    probs = unsteered.exp()
    rewards = torch.tensor([t.reward for t in every], dtype=torch.float64)
    # a sample scored by the scorer itself has the enumerated log-probabilities (so larger samples index them)
    picks = torch.multinomial(probs, 12, replacement=True, generator=gen)
    sample = [traj(j, every[i].completion_ids) for j, i in enumerate(picks.tolist())]
    scorer = TrajectoryScorer(model, sample, T, saes=saes)
    torch.testing.assert_close(scorer.logprobs(interventions), steered[picks], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scorer.logprobs([]), unsteered[picks], rtol=1e-10, atol=1e-10)
    errors = {}
    for G in (16, 256, 8192):
        draws = []
        for _ in range(16):
            picks = torch.multinomial(probs, G, replacement=True, generator=gen)
            est = estimate(unsteered[picks], steered[picks], rewards[picks], [list(range(G))])
            draws.append(est.value)
        errors[G] = abs(float(np.mean(draws)) - exact)
    assert errors[8192] < errors[16] and errors[8192] < 0.01, errors


def test_effective_sample_size_on_hand_made_weights():
    assert effective_sample_size([1, 1, 1, 1]) == 4.0
    assert effective_sample_size([1, 0, 0, 0]) == 1.0
    assert math.isclose(effective_sample_size([3, 1]), 16 / 10)
    base = torch.zeros(4, dtype=torch.float64)
    cell = torch.log(torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    est = estimate(base, cell, torch.tensor([1.0, 0.0, 0.0, 0.0]), [[0, 1, 2, 3]])
    assert math.isclose(est.ess[0], (6 ** 2 / 12) / 4) and math.isclose(est.per_prompt[0], 3 / 6)


def matched_random_sets(template, freq, n, seed=0):
    return frequency_matched_sets(template, n, seed, LatentPool({l: len(f) for l, f in freq.items()}, frequencies=freq))


def test_matched_null_keeps_the_frequency_profile():
    rng = np.random.default_rng(0)
    freq = {7: np.concatenate([np.zeros(100), rng.uniform(1e-4, 0.5, 900)])}  # 100 dead latents
    bins = frequency_bins(freq[7], 10)
    assert (bins[:100] == -1).all() and set(bins[100:]) == set(range(10))
    order = np.argsort(freq[7])
    template = [(7, int(order[150])), (7, int(order[500])), (7, int(order[990])), (7, int(order[991]))]
    nulls = matched_random_sets(template, freq, n=200, seed=1)
    assert len(nulls) == 200 and all(len(s) == 4 and len(set(s)) == 4 for s in nulls)
    for s in nulls:
        assert not set(s) & set(template)
        assert [bins[i] for _, i in s] == [bins[i] for _, i in template]  # each latent from its template's bin
        assert all(freq[7][i] > 0 for _, i in s)  # never a dead latent
    drawn = np.array([[freq[7][i] for _, i in s] for s in nulls]).mean(0)
    wanted = np.array([freq[7][i] for _, i in template])
    assert np.all(np.abs(np.log(drawn / wanted)) < 0.7)  # the same frequency profile
    uniform = rng.choice(np.arange(100, 1000), size=(200, 4))
    assert abs(np.log(freq[7][uniform].mean(0) / wanted)).max() > 1.0  # what an unmatched null would give
    assert matched_random_sets(template, freq, n=5, seed=1) == nulls[:5]  # seeded
    dead = matched_random_sets([(7, 3), (7, 600)], freq, n=20, seed=2)  # a latent that never fires: a dead match
    assert all(freq[7][s[0][1]] == 0 and freq[7][s[1][1]] > 0 for s in dead)
    with pytest.raises(IPGError, match="no activation frequencies"):
        matched_random_sets([(8, 3)], freq, n=1)


def test_null_percentile_and_permutation_p_value():
    null = np.arange(100) / 100  # effects 0.00 .. 0.99
    pct, p = null_rank(0.995, null, direction=1)
    assert pct == 100.0 and math.isclose(p, 1 / 101)
    pct, p = null_rank(0.5, null, direction=1)
    assert 49 < pct < 51 and math.isclose(p, 51 / 101)
    pct, p = null_rank(-0.1, null, direction=-1)  # deletion: a lower value is the predicted effect
    assert pct == 100.0 and math.isclose(p, 1 / 101)
