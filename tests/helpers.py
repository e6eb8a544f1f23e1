"""What several test files share and no test file owns: the reward plugins test configs name
(``tests.helpers:<function>``, loaded like any user reward), so renaming a test file breaks no other test.
and the tiny attribution setups (trajectories, calibrated SAEs, a planted latent). Fixtures live in
``conftest.py``."""

from __future__ import annotations

import random
import time

VOCAB = 390  # token ids drawn below this (the tiny tokenizer has ~400)


def text_length_mod_7(prompt, completion, reference):
    """A reward that varies between samples of a random model (which never stops early)."""
    return float(len(completion) % 7)


def text_length_mod_3(prompt, completion, reference):
    """A reward that varies between samples of a random model."""
    return float(len(completion) % 3)


def text_length_is_even(prompt, completion, reference):
    """A 0/1 reward (the reward-permutation null needs non-zero advantages: 0/1 rewards in mixed groups)."""
    return float(len(completion) % 2 == 0)


def constant_reward(prompt, completion, reference):
    """The same reward for every sample: nothing to attribute."""
    return 1.0


def slow_reward(prompt, completion, reference):
    """A reward that takes a while (a job killed while it scores)."""
    time.sleep(0.3)
    return float(len(completion) % 2)


def raising_reward(prompt, completion, reference):
    """A user reward with a bug."""
    raise ZeroDivisionError("the user's bug")


# ---- tiny attribution setups ---------------------------------------------------------------------------
# (their imports are inside: a job that loads a reward above from this module starts as fast as with its own)


def make_trajs(n_prompts=2, G=4, seed=0, prompt_len=8, comp_len=6, rewards=None, model=None) -> list[Trajectory]:
    from ipg_sae.trajectories import Trajectory

    rng = random.Random(seed)
    out = []
    for p in range(n_prompts):
        prompt = [rng.randint(5, VOCAB) for _ in range(prompt_len)]
        for g in range(G):
            comp = [rng.randint(5, VOCAB) for _ in range(comp_len + g)]
            r = float((g + p) % 2) if rewards is None else float(rewards[p][g])
            out.append(Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="",
                                  reference="", prompt_ids=prompt, completion_ids=comp, reward=r, model=model or {}))
    return out


def topk_saes(layers=(1, 2), d_sae=96, k=8):
    from tests import tiny

    return {layer: tiny.random_sae("topk", 64, layer, d_sae=d_sae, k=k, seed=layer) for layer in layers}


def shard_inputs():
    """Inputs of the sharding test (shared with tests/_attr_worker.py)."""
    return topk_saes((1, 2)), make_trajs(n_prompts=5, G=3, seed=7)


def spearman(a, b) -> float:
    import torch

    ra = torch.as_tensor(a).argsort().argsort().double()
    rb = torch.as_tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def real_F(model, layer, sae, trajs, gate) -> float:
    """``(1/G) sum_g A_g log pi(tau_g; c)`` with the one-layer splice (gates ``gate``)."""
    import torch

    from ipg_sae.attribution import advantages
    from ipg_sae.saes import splice

    A = advantages(torch.tensor([t.reward for t in trajs]), "rloo")
    total = 0.0
    for g, t in enumerate(trajs):
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        with torch.no_grad(), splice(model, {layer: sae}, gates={layer: gate}, scope="all"):
            lp = model(ids).logits.log_softmax(-1)
        P = len(t.prompt_ids)
        total += float(A[g]) * float(lp[0, P - 1:-1].gather(-1, ids[0, P:, None]).sum())
    return total / len(trajs)


def calibrated_sae(model, layer, trajs, d_sae=64, quantile=0.85, dec_scale=1.0, seed=3):
    """A standard SAE whose latents each fire on ~15% of these trajectories' positions."""
    import torch

    from ipg_sae.models import capture_residuals
    from ipg_sae.saes import prepare_sae
    from tests import tiny

    sae = prepare_sae(tiny.random_sae("standard", 64, layer, d_sae=d_sae, seed=seed), model, layer)
    ids = torch.tensor([t.prompt_ids + t.completion_ids for t in trajs])
    x = capture_residuals(model, ids, None, [layer])[layer][:, 1:].reshape(-1, 64)
    with torch.no_grad():
        sae.b_enc.copy_(-(x @ sae.W_enc).quantile(quantile, dim=0))
        sae.W_dec.mul_(dec_scale * x.norm(dim=-1).mean() / sae.W_dec.norm(dim=-1, keepdim=True) / 8)
    return sae


def planted_answer_latent(model, layer: int = 3, correct_tok: int = 77, P: int = 5, distractor: int | None = None):
    """4 prompts x 4 samples whose reward is whether the last token is ``correct_tok``, and an SAE at ``layer``
    where latent ``P`` alone, active at every position, pushes that token; ``distractor`` (if given) fires five
    times as strongly everywhere and has no effect at all."""
    import torch

    from ipg_sae.models import capture_residuals
    from ipg_sae.trajectories import Trajectory

    rng = random.Random(3)
    trajs = []
    for p in range(4):
        prompt = [rng.randint(5, VOCAB) for _ in range(8)]
        prefix = [rng.randint(5, VOCAB) for _ in range(5)]
        for g in range(4):
            ok = g % 2 == 0
            last = correct_tok if ok else rng.choice([t for t in range(5, VOCAB) if t != correct_tok])
            trajs.append(Trajectory(id=f"q{p}/s{g}", prompt_id=f"q{p}", sample_index=g, prompt="", completion="",
                                    reference="", prompt_ids=prompt, completion_ids=prefix + [last],
                                    reward=1.0 if ok else 0.0))
    sae = calibrated_sae(model, layer, trajs, d_sae=32, quantile=0.8)
    ids = torch.tensor([t.prompt_ids + t.completion_ids for t in trajs])
    x = capture_residuals(model, ids, None, [layer])[layer]
    head = model.get_output_embeddings().weight.double()
    planted = [(P, 1.0)] + ([(distractor, 5.0)] if distractor is not None else [])
    with torch.no_grad():
        noise_max = float(torch.relu(x @ sae.W_enc + sae.b_enc).max())
        for i, bias in planted:
            sae.W_enc[:, i] = 0.0
            sae.b_enc[i] = bias * max(noise_max, 1.0)  # active at every position
        direction = head[correct_tok] - head.mean(0)
        sae.W_dec[P] = 4 * x.norm(dim=-1).mean() * direction / direction.norm() / sae.b_enc[P]
        if distractor is not None:
            sae.W_dec[distractor] = 0.0  # no effect at all
    return trajs, sae


def trajs_with_rewards(rewards, seed=0, prompt_len=8, comp_len=6) -> list[Trajectory]:
    """Groups of equal-length trajectories with the given rewards (one row of ``rewards`` per prompt)."""
    from ipg_sae.trajectories import Trajectory

    rng = random.Random(seed)
    out = []
    for p, row in enumerate(rewards):
        prompt = [rng.randint(5, VOCAB) for _ in range(prompt_len)]
        for g, r in enumerate(row):
            out.append(Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="",
                                  reference="", prompt_ids=prompt,
                                  completion_ids=[rng.randint(5, VOCAB) for _ in range(comp_len)], reward=float(r)))
    return out
