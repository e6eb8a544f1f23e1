import pytest
import torch

from ipg_sae.errors import IPGError
from ipg_sae.models import load_model
from ipg_sae.sampling import SamplingConfig, sample
from ipg_sae.tasks import TaskConfig, build_prompts, load_problems
from ipg_sae.trajectories import group_by_prompt, load_trajectories, save_trajectories


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    task = TaskConfig(n_problems=3, few_shot=0)
    problems = load_problems(task)
    return model, tok, problems, build_prompts(tok, problems, task)


def run(setup, **kw):
    model, tok, problems, prompts = setup
    cfg = SamplingConfig(**{"n_samples": 2, "max_new_tokens": 6, "batch_size": 4, **kw})
    return sample(model, tok, problems, prompts, cfg, progress=False)


def test_shapes_ids_and_groups(setup):
    model, tok, problems, prompts = setup
    trajs = run(setup)
    assert len(trajs) == 6
    groups = group_by_prompt(trajs)
    assert list(groups) == [p.id for p in problems] and all(len(g) == 2 for g in groups.values())
    for t in trajs:
        # exact ids are kept: the prompt re-tokenizes to the stored ids and no padding leaked in
        assert t.prompt_ids == tok(t.prompt, add_special_tokens=False).input_ids
        assert tok.pad_token_id not in t.completion_ids[:-1]
        assert 1 <= len(t.completion_ids) <= 6
        assert t.model["tokenizer_sha"] and t.reference


def test_reproducible_given_seed(setup):
    a = [t.completion_ids for t in run(setup, seed=3)]
    b = [t.completion_ids for t in run(setup, seed=3)]
    c = [t.completion_ids for t in run(setup, seed=4)]
    assert a == b and a != c


def test_left_padding_matches_unbatched_greedy(setup):
    model, tok, problems, prompts = setup
    batched = run(setup, temperature=0.0, n_samples=1, batch_size=3)
    single = run(setup, temperature=0.0, n_samples=1, batch_size=1)
    assert [t.completion_ids for t in batched] == [t.completion_ids for t in single]


def test_completion_cut_after_eos(setup):
    model, tok, problems, prompts = setup
    eos = tok.eos_token_id
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 1e4  # force EOS after the first token
    h = model.lm_head.register_forward_hook(lambda m, i, o: o + (torch.arange(o.shape[1]) == o.shape[1] - 1)[None, :, None] * 0 + bias)
    try:
        trajs = run(setup, temperature=0.0, n_samples=1)
    finally:
        h.remove()
    assert all(t.completion_ids == [eos] for t in trajs)


def test_rewards_and_save_roundtrip(setup, tmp_path):
    trajs = run(setup)
    assert all(t.reward in (0.0, 1.0) for t in trajs)
    save_trajectories(tmp_path / "t.jsonl", trajs)
    assert load_trajectories(tmp_path / "t.jsonl") == trajs


def test_user_reward_nan_names_trajectory(setup):
    model, tok, problems, prompts = setup
    with pytest.raises(IPGError, match=r"trajectory arith-\S+/s0: reward .*nan"):
        sample(model, tok, problems, prompts, SamplingConfig(n_samples=1, max_new_tokens=2),
               reward=lambda p, c, r: float("nan"), progress=False)


def test_bad_config_and_empty():
    with pytest.raises(IPGError, match="top_p"):
        SamplingConfig(top_p=0).validate()
    with pytest.raises(IPGError, match="greedy.*identical"):
        SamplingConfig(temperature=0, n_samples=2).validate()
    with pytest.raises(IPGError, match="empty dataset"):
        sample(None, None, [], [], SamplingConfig())
