"""Steering (:mod:`ipg_sae.steering`) on a tiny random Llama.

Each intervention must do exactly what its formula says, at the right positions (left
padding, first token, decoding steps), at several layers at once, and leave no hooks behind.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from ipg_sae.errors import IPGError
from ipg_sae.models import block_hidden, decoder_layers, hidden_size, load_model
from ipg_sae.saes import PositionScope, decoder_matrix, gates_for, splice
from ipg_sae.sampling import SamplingConfig, sample
from ipg_sae.selection import load_selection
from ipg_sae.steering import (
    Intervention,
    add,
    check_selection,
    clamp,
    scale,
    steer,
    steering,
)
from ipg_sae.tasks import TaskConfig, build_prompts, load_problems
from tests.tiny import random_sae


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _sae(model, arch, layer, seed=None):
    sae = random_sae(arch, hidden_size(model), layer, d_sae=64, k=8, seed=layer if seed is None else seed)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(0.05)  # tiny residuals: let latents fire
    return sae


def _batch(tok, texts=("Tom has 3 apples and buys 5 more.", "A box holds 6 rows.")):
    side = tok.padding_side
    tok.padding_side = "left"
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    assert (enc["attention_mask"][:, 0] == 0).any()  # really left-padded
    return enc["input_ids"], enc["attention_mask"]


def _active_latent(model, sae, layer, ids, mask):
    """A latent of ``sae`` that fires at some real position (so tests are not vacuous)."""
    with torch.no_grad():
        x = _residual(model, layer, ids, mask)
        f = sae.encode(x) * mask[..., None]
    return int(f[:, 1:].sum((0, 1)).argmax())


def _residual(model, layer, ids, mask):
    out = {}
    h = decoder_layers(model)[layer].register_forward_hook(lambda m, i, o: out.__setitem__("x", block_hidden(o)))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    return out["x"]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _hook_count(model):
    mods = list(model.modules())
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def test_gamma_one_reproduces_unsteered_generation(llama):
    """Greedy, batched, left-padded, several layers: gamma = 1 changes no token."""
    model, tok = llama
    task = TaskConfig(n_problems=3, few_shot=0)
    problems = load_problems(task)
    prompts = build_prompts(tok, problems, task)
    assert len({len(tok(p, add_special_tokens=False).input_ids) for p in prompts}) > 1  # the batch is left-padded
    saes = {1: _sae(model, "topk", 1), 2: _sae(model, "standard", 2)}
    cfg = SamplingConfig(n_samples=1, temperature=0.0, max_new_tokens=8, batch_size=3)
    clean = sample(model, tok, problems, prompts, cfg, progress=False)
    sel = [(1, 3), (1, 10), (2, 5)]
    same = sample(model, tok, problems, prompts, cfg, progress=False, intervention=steering(model, saes, scale(sel, 1.0)))
    assert [t.completion_ids for t in same] == [t.completion_ids for t in clean]
    # and a strong gamma does change generations, so the hooks really run during decoding
    strong = sample(model, tok, problems, prompts, cfg, progress=False,
                    intervention=steering(model, saes, scale([(1, i) for i in range(64)], 8.0)))
    assert [t.completion_ids for t in strong] != [t.completion_ids for t in clean]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_gamma_zero_equals_splice_ablation(llama, arch):
    model, tok = llama
    ids, mask = _batch(tok)
    sae = _sae(model, arch, 1)
    latent = _active_latent(model, sae, 1, ids, mask)
    with steer(model, {1: sae}, scale([(1, latent)], 0.0)):
        steered = _logits(model, ids, mask)
    gates = gates_for({1: sae})
    gates[1][latent] = 0.0
    with splice(model, {1: sae}, gates, scope=PositionScope(prompt_mask=mask)):
        spliced = _logits(model, ids, mask)
    clean = _logits(model, ids, mask)
    real = mask.bool()
    assert not torch.allclose(steered[real], clean[real], atol=1e-4)  # the latent mattered
    torch.testing.assert_close(steered[real], spliced[real], rtol=1e-4, atol=1e-4)


def test_partial_encoding_only_where_exact(llama):
    from ipg_sae.steering import _LatentEncoder

    model, _ = llama
    for arch, partial in [("standard", True), ("jumprelu", True), ("topk", False)]:
        sae = _sae(model, arch, 1)
        enc = _LatentEncoder(sae, [3, 7])
        assert enc.partial is partial
        x = torch.randn(2, 5, hidden_size(model))
        torch.testing.assert_close(enc(x), sae.encode(x)[..., [3, 7]])


def _delta_at(model, layer, ivs, saes, ids, mask):
    """Residual after block ``layer`` with ``ivs`` minus the clean one (hooks chain: ours runs after steer's)."""
    clean = _residual(model, layer, ids, mask)
    with steer(model, saes, ivs):
        steered = _residual(model, layer, ids, mask)
    return steered - clean, clean


def test_clamp_formula_on_teacher_forced_pass(llama):
    model, tok = llama
    ids, mask = _batch(tok)
    sae = _sae(model, "jumprelu", 2)
    latent = _active_latent(model, sae, 2, ids, mask)
    delta, clean = _delta_at(model, 2, clamp([(2, latent)], 4.0), {2: sae}, ids, mask)
    f = sae.encode(clean)[..., latent]
    expected = (4.0 - f)[..., None] * decoder_matrix(sae)[latent]
    scope = PositionScope(prompt_mask=mask).positions(0, ids.shape[1], ids.shape[0], "cpu")
    torch.testing.assert_close(delta[scope], expected[scope], rtol=1e-4, atol=1e-5)
    assert delta[~scope].abs().max() == 0  # padding and each row's first token untouched


def test_add_formula_from_a_position_on(llama):
    model, tok = llama
    ids, mask = _batch(tok)
    sae = _sae(model, "topk", 1)
    delta, _ = _delta_at(model, 1, add([(1, 9)], 2.5, start=3), {1: sae}, ids, mask)
    first = mask.float().argmax(1)
    index = torch.arange(ids.shape[1])[None, :] - first[:, None]
    on = mask.bool() & (index >= 3)
    expected = 2.5 * decoder_matrix(sae)[9]
    torch.testing.assert_close(delta[on], expected.expand(int(on.sum()), -1), rtol=1e-5, atol=1e-6)
    assert delta[~on].abs().max() == 0


def test_several_layers_match_splice(llama):
    model, tok = llama
    ids, mask = _batch(tok)
    saes = {0: _sae(model, "standard", 0), 2: _sae(model, "topk", 2)}
    sel = [(0, 1), (0, 4), (2, 7), (2, 11)]
    with steer(model, saes, scale(sel, 2.0)):
        steered = _logits(model, ids, mask)
    gates = gates_for(saes)
    for layer, latent in sel:
        gates[layer][latent] = 2.0
    with splice(model, saes, gates, scope=PositionScope(prompt_mask=mask)):
        spliced = _logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(steered[real], spliced[real], rtol=1e-4, atol=1e-4)


def test_decoding_steps_are_steered_like_teacher_forcing(tiny_model_dir):
    """Greedy steered generation (KV cache, left padding) = argmax of the steered teacher-forced pass.

    Runs on every layout (Llama, Qwen2, GPT-2 passes input_ids positionally).
    """
    model, tok = load_model(str(tiny_model_dir))
    ids, mask = _batch(tok)
    saes = {1: _sae(model, "topk", 1)}
    ivs = scale([(1, i) for i in range(0, 64, 2)], 3.0) + add([(1, 5)], 1.0, start=4)
    with steer(model, saes, ivs), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], 6, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them (GPT-2 is absolute)
    with steer(model, saes, ivs), torch.no_grad():
        logits = model(input_ids=out, attention_mask=full_mask, position_ids=positions).logits
    width = ids.shape[1]
    assert torch.equal(logits[:, width - 1:-1].argmax(-1), out[:, width:])


def test_generated_scope_leaves_prompt_alone(llama):
    model, tok = llama
    ids, mask = _batch(tok)
    sae = _sae(model, "standard", 1)
    with steer(model, {1: sae}, add([(1, 2)], 5.0), scope="generated"):
        logits = _logits(model, ids, mask)  # a fresh pass is all prompt
    torch.testing.assert_close(logits, _logits(model, ids, mask))


def test_hooks_removed_after_exception(llama):
    model, tok = llama
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, {1: _sae(model, "topk", 1)}, scale([(1, 0)], 2.0)):
            assert _hook_count(model) == before + 2
            raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_transfer_to_another_model_of_the_same_width(llama, tmp_path):
    """A set and its SAEs found on model A steer model B of the same architecture and width."""
    from tests.tiny import build_model

    model_a, tok = llama
    build_model("llama", tmp_path, vocab_size=len(tok), seed=1)
    tok.save_pretrained(tmp_path)
    model_b, _ = load_model(str(tmp_path))
    ids, mask = _batch(tok)
    saes = {1: _sae(model_a, "topk", 1)}
    ivs = scale([(1, i) for i in range(32)], 4.0)
    with steer(model_b, saes, ivs):
        steered = _logits(model_b, ids, mask)
    assert not torch.allclose(steered, _logits(model_b, ids, mask))


def test_transfer_shape_errors(llama):
    model, _ = llama
    good = {1: _sae(model, "topk", 1)}
    narrow = {1: random_sae("topk", 32, 1, d_sae=64)}
    with pytest.raises(IPGError, match="d_in 32 but the model's hidden size is 64"):
        check_selection(model, narrow, [(1, 0)])
    with pytest.raises(IPGError, match="out of range: the model has 4 decoder layers"):
        check_selection(model, good, [(7, 0)])
    with pytest.raises(IPGError, match="out of range: the SAE at layer 1 has 64 latents"):
        with steer(model, good, scale([(1, 64)], 2.0)):
            pass
    with pytest.raises(IPGError, match="SAEs were given only for layers \\[1\\]"):
        check_selection(model, good, [(2, 0)])
    with pytest.raises(IPGError, match="two interventions \\(scale and clamp\\)"):
        with steer(model, good, [Intervention(1, 0, "scale", 2.0), Intervention(1, 0, "clamp", 1.0)]):
            pass


def test_load_selection_sources(tmp_path, monkeypatch):
    table = tmp_path / "features.csv"
    table.write_text("layer,latent,rank,mean,context\n2,5,2,0.3,a\n1,9,1,0.5,b\n3,1,3,0.1,c\n")
    assert load_selection(table) == [(1, 9), (2, 5), (3, 1)]
    assert load_selection(tmp_path, k=2) == [(1, 9), (2, 5)]  # a run directory with features.csv
    (tmp_path / "sel.json").write_text(json.dumps([[4, 2], {"layer": 0, "latent": 8}]))
    assert load_selection(tmp_path / "sel.json") == [(4, 2), (0, 8)]
    (tmp_path / "sel.txt").write_text("# hand-picked\n3:17\n3:4  # note\n")
    assert load_selection(tmp_path / "sel.txt") == [(3, 17), (3, 4)]
    assert load_selection([(1, 2), [3, 4]], k=1) == [(1, 2)]
    with pytest.raises(IPGError, match="asked for"):
        load_selection([(1, 2)], k=3)
    with pytest.raises(IPGError, match="not a \\(layer, latent\\) pair"):
        load_selection(["1:2:3"])
    with pytest.raises(IPGError, match="not found"):
        load_selection(tmp_path / "missing.csv")
    # an attribution-like object goes through ipg_sae.selection.select
    import ipg_sae.selection

    monkeypatch.setattr(ipg_sae.selection, "select", lambda result, k=None, **kw: result.top[:k])
    assert load_selection(types.SimpleNamespace(top=[(1, 1), (2, 2), (3, 3)]), k=2) == [(1, 1), (2, 2)]


# ---- steering vectors (no SAE): DiffMean and user-given directions ------------------------------


def test_a_vector_changes_exactly_the_steered_positions_residual_by_that_vector(llama):
    from ipg_sae.steering import add_vector

    model, tok = llama
    ids, mask = _batch(tok)
    layer = 1
    vector = torch.randn(hidden_size(model), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(mask, dtype=torch.bool)
    completion[:, -3:] = True  # the last three positions play the completion
    seen = []  # the next block's input: the residual after block `layer`, steering included
    handle = decoder_layers(model)[layer + 1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            with steer(model, {}, [add_vector(layer, vector, coef=0.5)], scope=PositionScope(mask=completion)):
                model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    clean, steered = seen
    diff = steered - clean
    torch.testing.assert_close(diff[completion], (0.5 * vector).expand(int(completion.sum()), -1), rtol=1e-5,
                               atol=1e-5)
    assert float(diff[~completion].abs().max()) == 0.0
    with pytest.raises(IPGError, match="hidden size"):
        check_selection(model, {}, [add_vector(layer, torch.zeros(3))])


def test_sampling_under_a_vector_has_the_scorers_log_probabilities(llama):
    from ipg_sae.decode import decode_loop
    from ipg_sae.faithfulness import TrajectoryScorer
    from ipg_sae.sampling import row_seed
    from ipg_sae.steering import add_vector
    from ipg_sae.trajectories import Trajectory

    model, tok = llama
    task = TaskConfig(n_problems=2, few_shot=0)
    problems = load_problems(task)
    prompts = build_prompts(tok, problems, task)
    cfg = SamplingConfig(n_samples=2, temperature=0.8, max_new_tokens=6, batch_size=4, backend="loop")
    seeds = [row_seed(0, p.id, g) for p in problems for g in range(2)]
    vector = [add_vector(1, 3.0 * torch.randn(hidden_size(model), generator=torch.Generator().manual_seed(1)))]
    for scope in ("all", "generated"):
        prompt_ids, completions, logp = decode_loop(model, tok, prompts, cfg, seeds, set(),
                                                    steering(model, {}, vector, scope=scope))
        trajs = [Trajectory(id=f"{problems[r // 2].id}/s{r % 2}", prompt_id=problems[r // 2].id, sample_index=r % 2,
                            prompt=prompts[r // 2], completion="", reference="", prompt_ids=prompt_ids[r // 2],
                            completion_ids=c, reward=0.0) for r, c in enumerate(completions)]
        scored = TrajectoryScorer(model, trajs, cfg.temperature, scope=scope).logprobs(vector)
        plain = TrajectoryScorer(model, trajs, cfg.temperature).logprobs([])
        assert scored.tolist() == pytest.approx(logp, abs=2e-3), scope
        assert float((scored - plain).abs().max()) > 1e-2  # the vector did change the policy
