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


def test_hf_backend_reports_every_decoding_step_without_changing_the_samples(setup, monkeypatch):
    """The hf backend finishes a batch in one generate() call: its progress hook fires at every step, and the
    hook changes nothing that is sampled."""
    import ipg_sae.sampling as sampling

    model, tok, problems, prompts = setup
    cfg = SamplingConfig(n_samples=2, max_new_tokens=6, batch_size=4, seed=5)
    steps: list[int] = []
    with_hook = sampling._generate(model, tok, prompts[:2], cfg, seed=9, stops=set(), intervention=None,
                                   on_step=steps.append)
    without = sampling._generate(model, tok, prompts[:2], cfg, seed=9, stops=set(), intervention=None)
    assert with_hook == without
    assert steps == list(range(1, 7))  # no stop token: every one of the 6 steps is seen, in order
    seen: list[str] = []
    monkeypatch.setattr(sampling, "_step_postfix", lambda bar, cfg: lambda step: seen.append(step))
    assert [t.completion_ids for t in run(setup, seed=5)] == [t.completion_ids for t in run(setup, seed=5)]
    assert seen  # sample() wires the hook to its progress bar


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


# ---- backend: loop (one random stream per sample, continuous batching) ----------------------------


def _loop_cfg(**kw):
    return SamplingConfig(**{"n_samples": 3, "max_new_tokens": 12, "batch_size": 9, "temperature": 0.8,
                             "backend": "loop", **kw})


def _frequent_stops(setup):
    """Stop tokens common enough that rows of a random tiny model finish at different steps."""
    model, tok, _, prompts = setup
    ids = tok(prompts[:1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top = model(input_ids=ids).logits[0, -1].topk(12).indices.tolist()
    return set(top)


def test_a_samples_tokens_do_not_depend_on_rows_refills_or_column_shifts(setup, monkeypatch):
    """Continuous batching: whether a sample decodes alone, beside its prompt's other samples, in a row freed by
    another prompt's sample mid-batch, or after the cache dropped old columns, it draws the same tokens."""
    import ipg_sae.decode as decode
    from ipg_sae.sampling import row_seed

    model, tok, problems, prompts = setup
    cfg = _loop_cfg()
    stops = _frequent_stops(setup)
    seeds = [row_seed(0, p.id, g) for p in problems for g in range(cfg.n_samples)]
    finished = []
    _, together, logp_a = decode.decode_loop(model, tok, prompts, cfg, seeds, stops, rows=9,
                                             on_finish=finished.append)
    lengths = {len(c) for c in together}
    assert len(lengths) > 1 and min(lengths) < cfg.max_new_tokens  # rows did finish at different steps
    assert sorted(finished) == list(range(9))  # every sample reported once
    for rows in (1, 2, 3, 4):  # one at a time; fewer rows than samples per prompt; one prompt; refills mid-prompt
        _, alone, logp_b = decode.decode_loop(model, tok, prompts, cfg, seeds, stops, rows=rows)
        assert alone == together, rows
        assert logp_b == pytest.approx(logp_a, abs=1e-4)
    monkeypatch.setattr(decode, "_SLACK", 0)  # the cache runs out of columns and shifts while rows still read it
    from ipg_sae.kv_cache import SlotLayer

    shifts, shift = [], SlotLayer.shift
    monkeypatch.setattr(SlotLayer, "shift", lambda self, n: (shifts.append(n), shift(self, n))[1])
    _, shifted, _ = decode.decode_loop(model, tok, prompts, cfg, seeds, stops, rows=2)
    assert shifted == together
    assert any(n > 0 for n in shifts)


def test_a_samples_tokens_do_not_depend_on_its_batch(setup):
    model, tok, problems, prompts = setup
    one = sample(model, tok, problems, prompts, _loop_cfg(batch_size=3), progress=False)  # a prompt per batch
    all_ = sample(model, tok, problems, prompts, _loop_cfg(batch_size=9), progress=False)
    assert [t.completion_ids for t in one] == [t.completion_ids for t in all_]
    again = sample(model, tok, problems[1:], prompts[1:], _loop_cfg(batch_size=9), progress=False)
    assert [t.completion_ids for t in again] == [t.completion_ids for t in all_[3:]]  # without the first problem


def test_the_loops_log_probabilities_are_the_scorers_plain_and_steered(setup):
    """The loop samples from softmax(logits / T) under the steering hooks: the off-policy scorer, which scores
    a trajectory teacher-forced under the same hooks, gives the same log-probability."""
    from ipg_sae.faithfulness import TrajectoryScorer
    from ipg_sae.models import hidden_size
    from ipg_sae.decode import decode_loop
    from ipg_sae.sampling import row_seed
    from ipg_sae.steering import scale, steering
    from ipg_sae.trajectories import Trajectory
    from tests.tiny import random_sae

    model, tok, problems, prompts = setup
    cfg = _loop_cfg(temperature=0.7)
    stops = _frequent_stops(setup)
    sae = random_sae("topk", hidden_size(model), 1, d_sae=32, k=8)
    with torch.no_grad():  # latents that fire on these prompts, so that prompt steering matters
        from ipg_sae.models import capture_residuals

        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        f = sae.encode(capture_residuals(model, enc["input_ids"], enc["attention_mask"], [1])[1])
    firing = [(1, int(i)) for i in (f[:, 1:] > 0).sum((0, 1)).topk(4).indices]
    seeds = [row_seed(0, p.id, g) for p in problems for g in range(cfg.n_samples)]
    for interventions in ([], scale(firing, 0.0), scale(firing, 3.0)):
        steer_fn = steering(model, {1: sae}, interventions) if interventions else None
        prompt_ids, completions, logp = decode_loop(model, tok, prompts, cfg, seeds, stops, steer_fn)
        trajs = [Trajectory(id=f"{problems[r // 3].id}/s{r % 3}", prompt_id=problems[r // 3].id, sample_index=r % 3,
                            prompt=prompts[r // 3], completion="", reference="", prompt_ids=prompt_ids[r // 3],
                            completion_ids=c, reward=0.0) for r, c in enumerate(completions)]
        scorer = TrajectoryScorer(model, trajs, cfg.temperature, saes={1: sae})
        scored = scorer.logprobs(interventions)
        assert scored.tolist() == pytest.approx(logp, abs=2e-3), interventions


def test_the_compiled_decoding_step_draws_the_same_tokens_plain_and_steered(setup):
    """sampling.compile runs the decoding steps' norms, MLPs and rotary embeddings compiled (one graph per module class
    or function, shared by the layers): the same tokens as the eager loop, plain and steered, whatever the rows; log-probabilities within the
    compiled norms' rounding (their sums are reduced in another order: ~1e-7 relative per norm, not bit for bit)."""
    import dataclasses

    from ipg_sae.decode import CompiledStep, decode_loop
    from ipg_sae.models import hidden_size
    from ipg_sae.sampling import row_seed
    from ipg_sae.steering import scale, steering
    from tests.tiny import random_sae

    model, tok, problems, prompts = setup
    cfg = _loop_cfg()
    compiled = dataclasses.replace(cfg, compile=True)
    compiled.validate()
    stops = _frequent_stops(setup)
    seeds = [row_seed(0, p.id, g) for p in problems for g in range(cfg.n_samples)]
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb
    step = CompiledStep(model)
    assert len(step.targets) == 3 * 4 + 1  # two norms and the MLP of each of the 4 blocks, and the final norm
    assert step.functions == [(modeling_llama, rotary)]
    sae = random_sae("topk", hidden_size(model), 1, d_sae=32, k=8)
    for interventions in ([], scale([(1, 0), (1, 3), (1, 5)], 3.0)):
        steer_fn = steering(model, {1: sae}, interventions) if interventions else None
        _, eager, logp_eager = decode_loop(model, tok, prompts, cfg, seeds, stops, steer_fn)
        for rows in (9, 2):
            _, fused, logp_fused = decode_loop(model, tok, prompts, compiled, seeds, stops, steer_fn, rows=rows)
            assert fused == eager, (interventions, rows)
            assert logp_fused == pytest.approx(logp_eager, abs=1e-5)
    assert all("forward" not in vars(m) for m in step.targets)  # the eager code is back after the loop
    assert modeling_llama.apply_rotary_pos_emb is rotary
    assert {type(m) for m in step.targets} | {rotary} <= set(CompiledStep._compiled)  # it did compile them


def test_the_loop_decodes_uncompiled_with_a_warning_when_compilation_fails(setup, monkeypatch):
    import dataclasses

    from ipg_sae.decode import CompiledStep, decode_loop
    from ipg_sae.sampling import row_seed

    model, tok, problems, prompts = setup
    cfg = _loop_cfg(max_new_tokens=4)
    seeds = [row_seed(0, p.id, g) for p in problems for g in range(cfg.n_samples)]

    def no_compiler(fn, *a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(CompiledStep, "_compiled", {})
    want = decode_loop(model, tok, prompts, cfg, seeds, set())
    with pytest.warns(RuntimeWarning, match=r"^sampling.compile: torch.compile failed \(RuntimeError: InvalidCxxCompiler"
                                           r": No working C\+\+ compiler found\); decoding uncompiled$") as caught:
        got = decode_loop(model, tok, prompts, dataclasses.replace(cfg, compile=True), seeds, set())
    assert len(caught) == 1 and got == want  # warned once, and decoded exactly as uncompiled
    with pytest.raises(IPGError, match="sampling.compile .* set sampling.backend: loop"):
        SamplingConfig(compile=True).validate()


def test_sampling_compile_enters_cache_keys_only_when_on():
    """Samples stored before the option existed stay valid (compile off is the old loop, bit for bit); compiled
    samples, which can differ by rounding, get keys of their own."""
    from ipg_sae.digest import key_dict

    plain = SamplingConfig(backend="loop")
    assert "compile" not in key_dict(plain)
    assert key_dict(SamplingConfig(backend="loop", compile=True)) == {**key_dict(plain), "compile": True}


# ---- backend: vllm (GPU only; here its adapter is tested against a stand-in engine) ---------------------


def test_vllm_backend_refuses_steering_and_a_missing_install(setup, monkeypatch):
    import sys

    model, tok, problems, prompts = setup
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(IPGError, match="needs vLLM and a GPU"):
        sample(model, tok, problems, prompts, SamplingConfig(backend="vllm", n_samples=2), progress=False)
    with pytest.raises(IPGError, match="unsteered model only"):
        sample(model, tok, problems, prompts, SamplingConfig(backend="vllm", n_samples=2), progress=False,
               intervention=lambda: None)


def test_vllm_backend_feeds_token_ids_and_cuts_at_stops(setup, monkeypatch):
    """A stand-in with vLLM's interface: the adapter passes exact prompt token ids and the sampling settings,
    and turns the engine's outputs into trajectories cut after their first stop token."""
    import sys
    import types

    import ipg_sae.sampling as sampling

    model, tok, problems, prompts = setup
    seen = {}

    class Params:
        def __init__(self, **kw):
            seen["params"] = kw

    class LLM:
        def __init__(self, **kw):
            seen["engine"] = kw

        def generate(self, requests, params, use_tqdm=False):
            seen["requests"] = requests
            stop = seen["params"]["stop_token_ids"][0]
            outputs = [types.SimpleNamespace(token_ids=[5, 6, stop, 7]) for _ in range(seen["params"]["n"])]
            return [types.SimpleNamespace(outputs=outputs) for _ in requests]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=Params))
    monkeypatch.setattr(sampling, "_VLLM_ENGINES", {})
    cfg = SamplingConfig(backend="vllm", n_samples=2, temperature=0.5, max_new_tokens=7, batch_size=8)
    trajs = sample(model, tok, problems, prompts, cfg, progress=False)
    assert [r["prompt_token_ids"] for r in seen["requests"]] == [tok(p, add_special_tokens=False)["input_ids"]
                                                                 for p in prompts]
    assert seen["params"]["n"] == 2 and seen["params"]["temperature"] == 0.5 and seen["params"]["max_tokens"] == 7
    assert seen["engine"]["model"] == model.config._ipg_source  # the directory the model loaded from
    assert len(trajs) == 6 and all(len(t.completion_ids) == 3 for t in trajs)


def test_the_loops_draws_follow_the_temperature_softmax():
    """20,000 draws from one row's distribution (its own generator) match softmax(logits / T) and top_p's
    renormalised nucleus; a zero-probability token is never drawn."""
    from ipg_sae.decode import draw_tokens

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -float("inf")]])
    hot = SamplingConfig(temperature=0.7)
    for cfg, want, block in [(hot, torch.softmax(logits[0] / 0.7, -1), 256), (hot, torch.softmax(logits[0] / 0.7, -1), 2),
                             (SamplingConfig(temperature=1.0, top_p=0.8), None, 256)]:
        gen = torch.Generator().manual_seed(0)
        counts = torch.zeros(5)
        for _ in range(20_000):  # block 2: the two-level CDF crosses blocks (and pads the last one)
            token, logp = draw_tokens(logits.clone(), cfg, [gen], block=block)  # (it works in place)
            counts[int(token[0])] += 1
            if cfg.top_p == 1:
                assert float(logp[0]) == pytest.approx(float(torch.log_softmax(logits[0] / 0.7, -1)[token[0]]),
                                                       abs=1e-5)
        freq = counts / counts.sum()
        if want is None:  # top_p 0.8 keeps the two largest (0.59 + 0.22 >= 0.8), renormalised
            p = torch.softmax(logits[0], -1)
            want = torch.zeros(5)
            want[:2] = p[:2] / p[:2].sum()
        assert torch.allclose(freq, want.float(), atol=0.012), (freq, want)
        assert counts[4] == 0


def test_the_loop_runs_every_tiny_architecture_with_the_scorers_log_probabilities(tiny_model_dir):
    """Llama, Qwen2 (grouped key/value heads) and GPT-2 (absolute positions, no grouping): the loop's shared-prefix
    attention and slot cache give each sample the log-probability the scorer gives it."""
    from ipg_sae.decode import decode_loop
    from ipg_sae.faithfulness import TrajectoryScorer
    from ipg_sae.sampling import row_seed
    from ipg_sae.trajectories import Trajectory

    model, tok = load_model(str(tiny_model_dir))
    task = TaskConfig(n_problems=3, few_shot=1)
    problems = load_problems(task)
    prompts = build_prompts(tok, problems, task)
    cfg = _loop_cfg(n_samples=2, batch_size=3)  # fewer rows than samples: rows are refilled
    seeds = [row_seed(0, p.id, g) for p in problems for g in range(2)]
    prompt_ids, completions, logp = decode_loop(model, tok, prompts, cfg, seeds, set())
    trajs = [Trajectory(id=f"{problems[r // 2].id}/s{r % 2}", prompt_id=problems[r // 2].id, sample_index=r % 2,
                        prompt=prompts[r // 2], completion="", reference="", prompt_ids=prompt_ids[r // 2],
                        completion_ids=c, reward=0.0) for r, c in enumerate(completions)]
    scored = TrajectoryScorer(model, trajs, cfg.temperature).logprobs([])
    assert scored.tolist() == pytest.approx(logp, abs=2e-3)
    _, again, _ = decode_loop(model, tok, prompts, cfg, seeds, set(), rows=6)
    assert again == completions
