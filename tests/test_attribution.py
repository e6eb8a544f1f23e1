"""IPG attribution: completeness, agreement with real interventions, a planted latent, cost
structure, resume, sharding, baselines and user errors (tiny random models, float64)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ipg_sae.attribution import (
    AttributionConfig,
    AttributionResult,
    IPGEngine,
    advantages,
    attribute,
    quadrature,
    run_attribution,
)
from ipg_sae.errors import IPGError
from ipg_sae.models import capture_residuals, decoder_layers, load_model, model_fingerprint
from ipg_sae.saes import gates_for, prepare_sae, splice
from ipg_sae.trajectories import Trajectory
from tests import tiny
from tests.helpers import (VOCAB, calibrated_sae, make_trajs, planted_answer_latent, real_F, shard_inputs, spearman,
                           topk_saes)

REPO = Path(__file__).resolve().parents[1]


# ---- fixtures and helpers -----------------------------------------------------------------


class CallCounter:
    """Counts forward calls of a module (and the rows they carried)."""

    def __init__(self, module):
        self.calls, self.rows = 0, 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, _m, inputs, _out):
        self.calls += 1

    def remove(self):
        self.handle.remove()


# ---- quadrature, advantages, importance ----------------------------------------------------


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"])
def test_quadrature_weights_sum_to_one_and_integrate(method):
    nodes, w = quadrature(8, method)
    assert nodes.min() >= 0 and nodes.max() <= 1 and abs(w.sum() - 1) < 1e-12
    exact = {"gausslegendre": 1e-12, "riemann_middle": 5e-3, "riemann_trapezoid": 1e-2,
             "riemann_left": 0.1, "riemann_right": 0.1}[method]
    assert abs((w * nodes**3).sum() - 0.25) < exact  # int_0^1 a^3 da
    assert abs((w * np.ones(8)).sum() - 1) < 1e-12


def test_gauss_legendre_is_exact_to_degree_2n_minus_1():
    nodes, w = quadrature(4)
    for deg in range(8):
        assert abs((w * nodes**deg).sum() - 1 / (deg + 1)) < 1e-12


def test_advantages_numerically():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(advantages(r, "rloo"), torch.tensor([1 - 2 / 4, 0 - 3 / 4, -3 / 4, 1 - 2 / 4, 1 - 2 / 4]).double())
    assert torch.allclose(advantages(r, "mean"), (r - 0.6).double())
    z = (r.double() - 0.6) / (r.double().std(unbiased=False) + 1e-6)
    assert torch.allclose(advantages(r, "grpo"), z)
    assert torch.equal(advantages(r, "none"), r.double())
    assert torch.equal(advantages(torch.tensor([2.0, 0.0, -1.0]), "correct"), torch.tensor([1.0, 0.0, 0.0]).double())
    for kind in ("rloo", "mean", "grpo"):
        assert torch.equal(advantages(torch.full((4,), 3.0), kind), torch.zeros(4, dtype=torch.float64))
        assert torch.equal(advantages(torch.tensor([5.0]), kind), torch.zeros(1, dtype=torch.float64))
        assert abs(float(advantages(r, kind).sum())) < 1e-9  # baselines centre the group
    assert torch.equal(advantages(torch.full((3,), 2.0), "none"), torch.full((3,), 2.0, dtype=torch.float64))
    with pytest.raises(IPGError):
        advantages(torch.tensor([1.0, 0.0]), "bogus")


def test_self_normalized_importance_weights(models):
    model, _ = models("llama")
    eng = IPGEngine(model, topk_saes((1,)), AttributionConfig(importance="self_normalized"))
    logp_1 = torch.tensor([-3.0, -5.0, -4.0], dtype=torch.float64)
    logp_k = torch.tensor([[-3.0, -5.0, -4.0], [-2.0, -5.0, -4.5]], dtype=torch.float64)  # two nodes
    w = eng._importance(logp_k, logp_1)
    assert torch.allclose(w[0], torch.ones(3, dtype=torch.float64))  # on-policy node: weight 1
    ratio = torch.exp(logp_k[1] - logp_1)
    assert torch.allclose(w[1], ratio / ratio.mean())  # exp(logp_k - logp_1), normalised over the group
    big = eng._importance(torch.tensor([[0.0] + [-50.0] * 19], dtype=torch.float64), torch.zeros(20, dtype=torch.float64))
    assert float(big.max()) == 10.0  # clipped at 10x


# ---- completeness ----------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [(1,), (1, 2)], ids=["one-layer", "two-layers"])
def test_completeness_gauss_legendre(tiny_model_dir, layers):
    model, tok = load_model(str(tiny_model_dir), dtype="float64")
    trajs = make_trajs()
    saes = topk_saes(layers)
    gaps = {}
    for n in (4, 16):
        result, delta = attribute(model, saes, trajs, n_steps=n, progress=False, return_convergence_delta=True,
                                  error_node=True)
        assert torch.equal(delta, result.delta)
        gaps[n] = float(delta.abs().max())
        # the absolute form: sum of latents + error nodes vs A * (logp1 - logp0)
        assert torch.allclose(result.total - result.expected, result.delta_abs)
    assert gaps[16] < 1e-2 and gaps[16] < gaps[4]
    plain = attribute(model, saes, trajs, n_steps=16, progress=False)  # error held fixed
    assert float(plain.delta.abs().max()) < 1e-2
    assert (plain.expected.abs() > 0).all()


def test_bfloat16_attribution_agrees_with_float64(model_dirs):
    """bfloat16 is the default on CUDA. The splice's decoder bag runs in float32 there (CUDA has no
    half-precision backward for its per-sample weights, found on an H200); the attributions must
    still be those of the float64 model, up to bfloat16's precision."""
    trajs, saes = make_trajs(), topk_saes((1,))
    ref = attribute(load_model(str(model_dirs("llama")), dtype="float64")[0], saes, trajs, n_steps=8,
                    progress=False).score[1]
    half, _ = load_model(str(model_dirs("llama")), dtype="bfloat16")
    got = attribute(half, saes, trajs, n_steps=8, progress=False).score[1]
    assert got.isfinite().all() and got.abs().max() > 0
    assert spearman(got, ref) > 0.9
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.1


def test_bfloat16_splice_casts_w_dec_once_per_engine_and_computes_what_a_per_call_cast_did(model_dirs, monkeypatch):
    """In half precision the splice's decoder bag runs in float32: the engine casts W_dec once per layer, not once
    per node pass, and the splice's output is bit for bit the per-call cast's."""
    import ipg_sae.attribution.engine as engine_mod

    casts = []
    cast = engine_mod.bag_matrix
    monkeypatch.setattr(engine_mod, "bag_matrix", lambda w, dtype: (casts.append(dtype), cast(w, dtype))[1])
    trajs, saes = make_trajs(), topk_saes((1, 2))
    half, _ = load_model(str(model_dirs("llama")), dtype="bfloat16")
    attribute(half, saes, trajs, n_steps=4, internal_batch_size=2, progress=False)  # many node passes per prompt
    assert casts == [torch.bfloat16, torch.bfloat16]  # one per layer, when the engine is built
    engine = engine_mod.IPGEngine(half, saes)
    assert engine.w_bag[1].dtype == torch.float32
    casts.clear()
    w = engine.w_dec[1]
    idx = torch.randint(0, w.shape[0], (2, 3, 4))
    val = torch.rand(2, 3, 4, dtype=torch.bfloat16)
    s = torch.full_like(val, 0.25)
    x = torch.randn(2, 3, w.shape[1], dtype=torch.bfloat16)
    cached = engine_mod._FrozenSplice(w, idx, val, s, w_bag=engine.w_bag[1])(x)
    per_call = engine_mod._FrozenSplice(w, idx, val, s)(x)
    assert len(casts) == 1  # only the splice without the engine's copy cast (its own)
    assert torch.equal(cached, per_call)


def test_riemann_variants_converge_to_the_same_value(models):
    model, _ = models("gpt2")
    trajs, saes = make_trajs(), topk_saes((1, 2))
    reference = attribute(model, saes, trajs, n_steps=16, progress=False, error_node=True)
    assert float(reference.delta.abs().max()) < 1e-5
    for method in ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        gaps = []
        for n in (4, 16, 64):
            r = attribute(model, saes, trajs, n_steps=n, method=method, progress=False, error_node=True)
            gaps.append(float(r.delta.abs().max()))
        assert gaps[0] > gaps[1] > gaps[2], (method, gaps)
        limit = 0.1 if method in ("riemann_left", "riemann_right") else 1e-3
        assert gaps[2] < limit, (method, gaps)
        scale = float(reference.expected.abs().max())
        assert float((r.total - reference.total).abs().max()) < limit * scale


def test_grad_x_act_is_ipg_with_one_node_at_one(models):
    model, tok = models("llama")
    trajs, saes = make_trajs(), topk_saes((1, 2))
    gxa = attribute(model, saes, trajs, baseline="grad_x_act", progress=False, tokenizer=tok)
    same = attribute(model, saes, trajs, n_steps=1, method="riemann_right", advantage="correct", progress=False)
    assert gxa.method_name == "grad_x_act"
    for layer in (1, 2):
        assert torch.allclose(gxa.attributions[layer], same.attributions[layer], rtol=0, atol=1e-12)
    ig = attribute(model, saes, trajs, baseline="ig_likelihood", n_steps=16, progress=False, tokenizer=tok)
    # integrated gradients of log pi over correct trajectories: completeness with A = 1 on them
    correct = torch.tensor([t.reward > 0 for t in trajs])
    assert torch.equal(ig.tensors["traj.advantage"], correct.double())
    assert float(ig.delta.abs()[correct].max()) < 1e-2


# ---- against real interventions -----------------------------------------------------------


@pytest.mark.parametrize("kind,layer", [("llama", 1), ("gpt2", 2)])
def test_attribution_predicts_single_latent_ablation(models, kind, layer):
    model, _ = models(kind)
    rng = random.Random(1)
    prompt = [rng.randint(5, VOCAB) for _ in range(10)]
    trajs = [Trajectory(id=f"p/s{g}", prompt_id="p", sample_index=g, prompt="", completion="", reference="",
                        prompt_ids=prompt, completion_ids=[rng.randint(5, VOCAB) for _ in range(10)],
                        reward=float(g in (0, 2))) for g in range(4)]
    sae = calibrated_sae(model, layer, trajs, dec_scale=2.0)
    result = attribute(model, {layer: sae}, trajs, n_steps=32, progress=False)
    attr = result.attributions[layer][0].double()
    ones = gates_for({layer: sae})[layer]
    base = real_F(model, layer, sae, trajs, ones)
    active = result.active[layer][0].nonzero().squeeze(1).tolist()
    assert len(active) >= 20
    top = sorted(active, key=lambda i: -abs(float(attr[i])))[:10]
    real = []
    for i in top:
        gate = ones.clone()
        gate[i] = 0.0
        real.append(base - real_F(model, layer, sae, trajs, gate))
    rho = spearman(attr[top], torch.tensor(real))
    assert rho >= 0.9, rho
    # and the whole path: the sum over latents is F(1) - F(0) (completeness, in F's units)
    assert abs(float(attr.sum()) - float(result.expected.sum()) / 4) < 1e-6


def test_planted_latent_is_ranked_first_by_ipg_not_by_act(models):
    """One latent alone decides whether the correct answer token comes out; another fires
    five times as strongly everywhere but has no effect. IPG finds the first, ``act`` the second."""
    model, tok = models("llama")
    layer, P, D = 3, 5, 9
    trajs, sae = planted_answer_latent(model, layer, P=P, distractor=D)
    ipg = attribute(model, {layer: sae}, trajs, n_steps=16, progress=False)
    act = attribute(model, {layer: sae}, trajs, baseline="act", progress=False)
    from ipg_sae.selection import select

    assert select(ipg, 1) == [(layer, P)]
    assert select(act, 1) == [(layer, D)]
    assert float(ipg.score[layer][D]) == 0.0 and float(ipg.score[layer][P]) > 0
    assert float(act.score[layer][D]) > float(act.score[layer][P])
    assert float(ipg.delta.abs().max()) < 1e-2


# ---- cost structure: active set, node batching, lower layers once, skipping -----------------


def test_lower_layers_run_once_per_group(models):
    model, _ = models("llama")
    trajs = make_trajs(n_prompts=3)
    for n in (2, 8):
        below, above = CallCounter(decoder_layers(model)[0]), CallCounter(decoder_layers(model)[3])
        try:
            attribute(model, topk_saes((2,)), trajs, n_steps=n, progress=False)
        finally:
            below.remove()
            above.remove()
        assert below.calls == 3  # one batched clean pass per group, whatever n_steps
        assert above.calls == 3 * (1 + 1 + 1)  # clean + logp(c=0) + one pass with all nodes stacked


def test_gates_live_on_the_active_set_only(models, monkeypatch):
    import ipg_sae.attribution.engine as engine

    shapes = []
    original = engine._FrozenSplice.__init__

    def spy(self, w_dec, idx, val, s, *args):
        shapes.append((tuple(idx.shape), tuple(s.shape), s.requires_grad))
        original(self, w_dec, idx, val, s, *args)

    monkeypatch.setattr(engine._FrozenSplice, "__init__", spy)
    model, _ = models("llama")
    attribute(model, topk_saes((1, 2), d_sae=96, k=8), make_trajs(n_prompts=1), n_steps=3, progress=False)
    leaves = [s for _, s, grad in shapes if grad]
    assert leaves and all(len(s) == 3 and s[-1] <= 8 < 96 for s in leaves)  # [rows, tokens, K], K <= k
    assert all(s[0] == 3 * 4 for s in leaves)  # 3 nodes x 4 trajectories stacked on the batch dim


def test_internal_batch_size_chunks_nodes_without_changing_results(models):
    model, _ = models("llama")
    trajs, saes = make_trajs(n_prompts=1, G=4), topk_saes((1, 2))
    full = attribute(model, saes, trajs, n_steps=6, progress=False)
    top = CallCounter(decoder_layers(model)[3])
    try:
        chunked = attribute(model, saes, trajs, n_steps=6, internal_batch_size=8, progress=False)  # 2 nodes x 4 rows
    finally:
        top.remove()
    assert top.calls == 1 + 1 + 3
    for layer in (1, 2):
        assert torch.allclose(full.attributions[layer], chunked.attributions[layer], rtol=1e-9, atol=1e-12)


def test_gradient_checkpointing_gives_the_same_attributions(models):
    model, _ = models("qwen2")
    trajs, saes = make_trajs(), topk_saes((1, 2))
    plain = attribute(model, saes, trajs, n_steps=4, progress=False)
    ckpt = attribute(model, saes, trajs, n_steps=4, progress=False, gradient_checkpointing=True)
    for layer in (1, 2):
        a, b = plain.attributions[layer].double(), ckpt.attributions[layer].double()
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


def test_zero_advantage_group_skips_node_passes(models):
    model, _ = models("llama")
    trajs = make_trajs(n_prompts=2, rewards=[[1, 1, 1, 1], [1, 0, 0, 1]])
    top = CallCounter(decoder_layers(model)[3])
    try:
        result = attribute(model, topk_saes((1,)), trajs, n_steps=4, progress=False)
    finally:
        top.remove()
    assert top.calls == 1 + (1 + 1 + 1)  # first group: clean pass only
    assert result.tensors["prompt.skipped"].tolist() == [True, False]
    assert torch.count_nonzero(result.attributions[1][0]) == 0
    assert torch.count_nonzero(result.attributions[1][1]) > 0


def test_importance_at_the_clean_node_changes_nothing(models):
    model, _ = models("llama")
    trajs, saes = make_trajs(), topk_saes((1,))
    a = attribute(model, saes, trajs, n_steps=1, method="riemann_right", progress=False)
    b = attribute(model, saes, trajs, n_steps=1, method="riemann_right", importance="self_normalized", progress=False)
    assert torch.allclose(a.attributions[1], b.attributions[1], rtol=1e-9, atol=1e-12)
    c = attribute(model, saes, trajs, n_steps=4, importance="self_normalized", progress=False)
    assert c.meta["config"]["importance"] == "self_normalized"
    assert not torch.allclose(a.attributions[1], c.attributions[1])


def test_scope_generated_gates_only_generated_positions(models):
    model, _ = models("llama")
    trajs = make_trajs()
    r = attribute(model, topk_saes((1,)), trajs, n_steps=8, scope="generated", progress=False, token_maps=["p0/s1"])
    assert float(r.delta.abs().max()) < 1e-2
    n_gen = sum(len(t.completion_ids) for t in trajs if t.prompt_id == "p0")
    assert int(r.tensors["prompt.n_scope"][0]) == n_gen
    m = r.token_maps["p0/s1"]
    assert torch.count_nonzero(m["L1.attribution"][:8]) == 0  # the prompt's positions carry no gate


# ---- result contents, files, maps, callback --------------------------------------------------


def test_result_files_and_sidecar(models, tmp_path):
    model, tok = models("llama")
    trajs = make_trajs(model=model_fingerprint(model, tok))
    seen = []
    result = attribute(model, topk_saes((1, 2)), trajs, n_steps=4, progress=True, tokenizer=tok, out_dir=tmp_path,
                       token_maps=["p1/s2"], error_node=True, callback=seen.append, seed=3,
                       sae_sources={1: "saes/l1", 2: "saes/l2"})
    assert (tmp_path / "attribution.safetensors").is_file() and (tmp_path / "attribution.json").is_file()
    side = json.loads((tmp_path / "attribution.json").read_text())
    assert side["method"] == "ipg" and side["seed"] == 3 and side["layers"] == [1, 2]
    assert side["prompt_ids"] == ["p0", "p1"] and side["trajectory_ids"] == [t.id for t in trajs]
    assert side["model"] == model_fingerprint(model, tok)
    assert [s["source"] for s in side["saes"]] == ["saes/l1", "saes/l2"] and side["saes"][0]["d_sae"] == 96
    assert side["config"]["n_steps"] == 4 and side["config"]["error_node"] is True
    assert "git_commit" in side and side["summary"]["n_trajectories"] == 8
    assert isinstance(side["summary"]["delta_max"], float) and side["summary"]["tokens_per_s"] > 0
    loaded = AttributionResult.load(tmp_path)
    assert loaded.method_name == "ipg" and loaded.traj_ids == result.traj_ids
    assert set(loaded.tensors) == set(result.tensors)
    assert all(torch.equal(loaded.tensors[k], result.tensors[k]) for k in result.tensors)
    assert torch.equal(loaded.delta, result.delta) and loaded.error is not None
    # shapes of what selection reads
    assert result.attributions[1].shape == (2, 96) and result.attributions[1].dtype == torch.float32
    assert result.active[2].dtype == torch.bool and result.activation[2].shape == (2, 96)
    # per-trajectory rows add up to the per-prompt attribution (1/G sum over the group)
    rows = result.per_trajectory(1).double()
    assert torch.allclose(rows[:4].mean(0), result.attributions[1][0].double(), atol=1e-6)
    assert torch.allclose(rows.sum(1), result.tensors["L1.traj.sum"], atol=1e-5)
    # the per-token map of one trajectory scatters back to its row
    m = result.token_maps["p1/s2"]
    assert m["tokens"].tolist() == trajs[6].prompt_ids + trajs[6].completion_ids
    for layer in (1, 2):
        dense = torch.zeros(96, dtype=torch.float64).index_add_(
            0, m[f"L{layer}.latents"].flatten(), m[f"L{layer}.attribution"].flatten().double())
        assert torch.allclose(dense, result.per_trajectory(layer)[6].double(), atol=1e-5)
    # top contexts point at real activations
    value, traj, pos = result.contexts[1]
    lat = int(value[:, 0].argmax())
    assert 0 <= int(traj[lat, 0]) < 8 and int(pos[lat, 0]) >= 1
    # the callback saw every group with the CLI's numbers
    assert [s["prompt_id"] for s in seen] == ["p0", "p1"]
    for key in ("delta", "mean_abs_attribution", "tokens_per_s", "n_tokens", "done", "total", "checkpointed"):
        assert key in seen[0]
    assert seen[-1]["done"] == seen[-1]["total"] == 2 and seen[0]["mean_abs_attribution"] > 0


def test_resume_after_a_kill_is_bitwise_identical(models, tmp_path):
    model, tok = models("llama")
    trajs, saes = make_trajs(n_prompts=6, G=3), topk_saes((1, 2))
    kw = dict(n_steps=4, progress=False, token_maps=["p4/s1"], checkpoint_every=2)
    reference = attribute(model, saes, trajs, **kw)
    ckpt = tmp_path / "ckpt.safetensors"
    saved = []

    def killer(stats):
        saved.append(stats["checkpointed"])
        if sum(saved) == 2:
            raise KeyboardInterrupt  # the kill, right after the second checkpoint

    with pytest.raises(KeyboardInterrupt):
        attribute(model, saes, trajs, checkpoint_path=ckpt, callback=killer, **kw)
    assert ckpt.is_file() and len(saved) == 4
    resumed_groups = []
    resumed = attribute(model, saes, trajs, checkpoint_path=ckpt, callback=resumed_groups.append, **kw)
    assert [s["prompt_id"] for s in resumed_groups] == ["p4", "p5"]  # only what was left
    assert set(resumed.tensors) == set(reference.tensors)
    for k, v in reference.tensors.items():
        assert torch.equal(v, resumed.tensors[k]), k
    # a checkpoint of a different call is not resumed
    other = attribute(model, saes, trajs, checkpoint_path=ckpt, callback=resumed_groups.append,
                      **{**kw, "n_steps": 2})
    assert len(resumed_groups) == 2 + 6 and not torch.equal(other.attributions[1], reference.attributions[1])


def test_attribute_hashes_the_model_once_and_a_weight_changed_in_place_is_not_resumed(model_dirs, tmp_path,
                                                                                        monkeypatch):
    """The resume signature holds the model's weight digest: computed once per loaded model and state (it was a full
    hash per call: 4 of 4.6 s of one group on an H200), yet a parameter changed in place changes it."""
    import ipg_sae.digest as digest

    monkeypatch.setenv("IPG_SAE_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = digest.tensors_digest
    monkeypatch.setattr(digest, "tensors_digest", lambda t: (hashed.append(len(t)), real(t))[1])
    model, _ = load_model(str(model_dirs("llama")), dtype="float64")
    n_model = len(model.state_dict())
    trajs, saes = make_trajs(n_prompts=2, G=3), topk_saes((1,))
    kw = dict(n_steps=2, progress=False, checkpoint_path=tmp_path / "ckpt.safetensors")
    first = attribute(model, saes, trajs, **kw)
    done = []
    attribute(model, saes, trajs, callback=done.append, **kw)  # resumes: everything was done
    assert done == [] and hashed.count(n_model) == 1
    with torch.no_grad():
        decoder_layers(model)[2].mlp.up_proj.weight.mul_(1.5)
    changed = attribute(model, saes, trajs, callback=done.append, **kw)
    assert len(done) == 2 and hashed.count(n_model) == 2  # not resumed: recomputed, with the new weights
    assert not torch.equal(changed.attributions[1], first.attributions[1])


@pytest.mark.slow
def test_torchrun_shards_merge_to_the_one_process_result(model_dirs, tmp_path):
    model_dir = model_dirs("llama")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"world{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(REPO / "tests" / "_attr_worker.py"), str(model_dir), str(out), "ipg"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n] = AttributionResult.load(out)
    one, two = outs[1], outs[2]
    assert two.meta["world_size"] == 2 and (tmp_path / "world2" / "shards" / "rank1of2.safetensors").is_file()
    assert two.prompt_ids == one.prompt_ids and two.traj_ids == one.traj_ids
    assert set(two.tensors) == set(one.tensors)
    for k, v in one.tensors.items():
        assert torch.equal(v, two.tensors[k]), k
    # and the same numbers as an in-process run
    model, tok = load_model(str(model_dir), dtype="float64")
    saes, trajs = shard_inputs()
    local = attribute(model, saes, trajs, n_steps=4, tokenizer=tok, progress=False, token_maps=["p1/s2"])
    for layer in (1, 2):
        assert torch.allclose(local.attributions[layer], two.attributions[layer], rtol=1e-6, atol=1e-9)


# ---- baselines through the same interface ---------------------------------------------------


def test_activation_baselines(models, tiny_tokenizer):
    model, tok = models("llama")
    trajs, saes = make_trajs(n_prompts=3), topk_saes((1, 2))
    act = attribute(model, saes, trajs, baseline="act", progress=False, tokenizer=tok)
    assert act.method_name == "act" and not act.is_gradient_method
    # token-weighted mean activation over in-scope positions (all but the first), by hand
    sae = prepare_sae(saes[1], model, 1)
    total, count = torch.zeros(96, dtype=torch.float64), 0
    for t in trajs:
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        x = capture_residuals(model, ids, None, [1])[1][0, 1:]
        total += sae.encode(x).double().sum(0)
        count += x.shape[0]
    assert torch.allclose(act.score[1], total / count, rtol=1e-6, atol=1e-9)
    assert torch.isnan(act.delta).all()
    rnd = attribute(model, saes, trajs, baseline="random", progress=False, seed=5)
    rnd2 = attribute(model, saes, trajs, baseline="random", progress=False, seed=5)
    rnd3 = attribute(model, saes, trajs, baseline="random", progress=False, seed=6)
    assert torch.equal(rnd.score[1], rnd2.score[1]) and not torch.equal(rnd.score[1], rnd3.score[1])
    active = rnd.active[1].any(0)
    assert (rnd.score[1][~active] == 0).all() and (rnd.score[1][active] > 0).all()
    assert rnd.attributions is None
    from ipg_sae.selection import select

    chosen = select(rnd, 5, per_layer=True)
    assert len(chosen) == 10 and all(bool(rnd.active[layer].any(0)[i]) for layer, i in chosen)


def test_reason_words_windows_and_score(models, tiny_tokenizer):
    from ipg_sae.attribution.baselines import ReasonWords, reason_score

    cfg = AttributionConfig(baseline="reason_words", reason_words=["wait", "let me", "so"])
    rw = ReasonWords(tiny_tokenizer, cfg, [1], {1: 4}, {})
    ids = tiny_tokenizer("Tom has 3 apples. Wait, let me check. So the answer is 8. Sara")["input_ids"]
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    win = rw.windows(ids)
    # "Wait" is two tokens here (" Wa", "it"): the window is one token before the first, two after the last
    first = next(i for i, p in enumerate(pieces) if p.strip() and "Wait".startswith(p.strip()))
    last = next(i for i in range(first, len(pieces)) if "".join(pieces[first:i + 1]).strip() == "Wait")
    assert win[0].nonzero().squeeze(1).tolist() == list(range(first - 1, last + 3))
    assert win[1].any() and win[2].any()
    assert not win[:, :3].any()  # "Tom has 3" is far from every word
    # ReasonScore from accumulators, by hand: two latents, three words
    acc = {"pos_sum": torch.tensor([6.0, 2.0]).double(), "pos_n": torch.tensor(2.0).double(),
           "neg_sum": torch.tensor([1.0, 3.0]).double(), "neg_n": torch.tensor(4.0).double(),
           "word_sum": torch.tensor([[2.0, 1.0], [2.0, 0.0], [2.0, 0.0]]).double(),
           "word_n": torch.tensor([1.0, 1.0, 1.0]).double()}
    score = reason_score(acc, alpha=0.7)
    mu_pos, mu_neg = torch.tensor([3.0, 1.0]), torch.tensor([0.25, 0.75])
    h = torch.tensor([1.0, 0.0])  # latent 0 spreads evenly over the words, latent 1 fires on one
    expected = mu_pos / mu_pos.sum() * h**0.7 - mu_neg / mu_neg.sum()
    assert torch.allclose(score, expected.double())
    # end to end on the tiny model with text containing reasoning words
    model, tok = models("llama")
    text_ids = tok("Wait, let me check. So the total is 19. Therefore the answer is 8.")["input_ids"]
    trajs = [Trajectory(id=f"r/s{g}", prompt_id="r", sample_index=g, prompt="", completion="", reference="",
                        prompt_ids=[5, 6, 7], completion_ids=text_ids[g:], reward=float(g % 2)) for g in range(3)]
    res = attribute(model, topk_saes((1,)), trajs, baseline="reason_words", tokenizer=tok, progress=False)
    assert res.method_name == "reason_words" and res.attributions is None
    assert float(res.tensors["L1.rw.pos_n"]) > 0 and float(res.tensors["L1.rw.neg_n"]) > 0
    assert torch.isfinite(res.score[1]).all() and res.score[1].abs().sum() > 0
    with pytest.raises(IPGError, match="tokenizer"):
        attribute(model, topk_saes((1,)), trajs, baseline="reason_words", progress=False)


# ---- errors -------------------------------------------------------------------------------


def test_user_errors(models, model_dirs, tmp_path):
    model, tok = models("llama")
    saes = topk_saes((1,))
    with pytest.raises(IPGError, match="no trajectories"):
        attribute(model, saes, [], progress=False)
    bad = make_trajs()
    bad[3].reward = float("nan")
    with pytest.raises(IPGError, match="p0/s3"):
        attribute(model, saes, bad, progress=False)
    inf = make_trajs()
    inf[5].reward = float("inf")
    with pytest.raises(IPGError, match="p1/s1"):
        attribute(model, saes, inf, progress=False)
    with pytest.raises(IPGError, match="out of range"):
        attribute(model, {7: tiny.random_sae("topk", 64, 7)}, make_trajs(), progress=False)
    long = make_trajs(n_prompts=1, prompt_len=600)
    with pytest.raises(IPGError, match="context"):
        attribute(model, saes, long, progress=False)
    # trajectories sampled by another model (different architecture) or with another tokenizer
    gpt2, _ = models("gpt2")
    foreign = make_trajs(model=model_fingerprint(gpt2, tok))
    with pytest.raises(IPGError, match="different model"):
        attribute(model, saes, foreign, tokenizer=tok, progress=False)
    other_tok = tiny.build_tokenizer(tmp_path / "tok", vocab_size=380)
    foreign_tok = make_trajs(model=model_fingerprint(model, other_tok))
    with pytest.raises(IPGError, match="tokenizer"):
        attribute(model, saes, foreign_tok, tokenizer=tok, progress=False)
    with pytest.raises(IPGError, match="tokenizer"):  # cannot check without it
        attribute(model, saes, foreign_tok, progress=False)
    with pytest.raises(IPGError, match="baseline"):
        attribute(model, saes, make_trajs(), baseline="nope", progress=False)
    with pytest.raises(IPGError, match="not among"):
        attribute(model, saes, make_trajs(), token_maps=["zzz"], progress=False)


def test_all_rewards_equal_is_refused_before_any_work(models, tmp_path):
    """Zero variance in every group: F is identically 0, so any selection would be arbitrary."""
    model, tok = models("llama")
    trajs = make_trajs(rewards=[[1, 1, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(IPGError, match="no prompt has reward variance"):
        attribute(model, topk_saes((1,)), trajs, progress=False, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(IPGError, match="positive reward"):  # the likelihood baselines need a correct trajectory
        attribute(model, topk_saes((1,)), make_trajs(rewards=[[0] * 4, [0] * 4]), baseline="grad_x_act",
                  progress=False)
    act = attribute(model, topk_saes((1,)), trajs, baseline="act", progress=False)  # activations need no variance
    assert act.active[1].any()
    # one prompt with variance is enough; the other is skipped
    mixed = attribute(model, topk_saes((1,)), make_trajs(rewards=[[1, 1, 1, 1], [0, 1, 0, 0]]), progress=False)
    assert mixed.prompt("skipped").tolist() == [True, False] and mixed.meta["summary"]["n_skipped_prompts"] == 1


def test_run_attribution_from_a_yaml_config(models, tmp_path):
    from ipg_sae.config import load_config

    model, _ = models("llama")
    cfg = load_config(AttributionConfig, REPO / "configs" / "sections" / "attribution_tiny.yaml")
    assert cfg.n_steps == 4 and cfg.baseline == "ipg"
    trajs = make_trajs()
    a = run_attribution(model, topk_saes((1,)), trajs, cfg, progress=False)
    b = attribute(model, topk_saes((1,)), trajs, n_steps=4, progress=False)
    assert torch.equal(a.attributions[1], b.attributions[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(IPGError):
            load_config(AttributionConfig, None, {"baseline": "what"})
    assert math.isclose(AttributionConfig().importance_clip, 10.0)


@pytest.mark.parametrize("softcap", [None, 30.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_target_logprob_matches_autograd(softcap, bias):
    """The fused head (gradient computed in the forward) equals autograd through log-softmax,
    with and without a Gemma-style logit softcap, across chunk boundaries."""
    from ipg_sae.attribution import engine as A

    g = torch.Generator().manual_seed(0)
    n, d, vocab = 7, 5, 11
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)

    z = torch.nn.functional.linear(h, w, b)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    ref = torch.log_softmax(z, -1).gather(-1, tgt[:, None]).squeeze(-1)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), h)

    orig = A._head_chunk
    A._head_chunk = lambda vocab: 3  # several chunks, the last one partial
    try:
        lp = A._TargetLogProb.apply(h, tgt, w, b, softcap)
        (grad,) = torch.autograd.grad((lp * upstream).sum(), h)
    finally:
        A._head_chunk = orig
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_config_is_valid_by_construction_and_names_come_from_the_types():
    from typing import get_args

    from ipg_sae.attribution import Advantage, Baseline, Method

    for kind in get_args(Advantage):
        AttributionConfig(advantage=kind)
    with pytest.raises(IPGError, match="rloo, mean, grpo, none, correct"):  # every name, from the Literal
        AttributionConfig(advantage="bogus")
    with pytest.raises(IPGError, match=", ".join(get_args(Baseline))):
        AttributionConfig(baseline="bogus")
    with pytest.raises(IPGError, match=", ".join(get_args(Method))):
        AttributionConfig(method="bogus")
    with pytest.raises(IPGError, match="n_steps"):
        AttributionConfig(n_steps=0)


def test_normalized_selection_reads_a_real_result(models):
    """``normalize`` needs each trajectory's prompt row, which the result stores (``traj.prompt``)."""
    from ipg_sae.selection import per_prompt, select

    model, _ = models("llama")
    trajs = make_trajs(n_prompts=3)
    result = attribute(model, topk_saes((1,)), trajs, n_steps=4, progress=False)
    assert result.traj("prompt").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    plain = per_prompt(result)[1]
    # dividing each row by its length and re-averaging, by hand
    lengths = result.traj("n_generated").double()
    rows = result.per_trajectory(1).double() / lengths[:, None]
    by_hand = torch.stack([rows[4 * p:4 * p + 4].mean(0) for p in range(3)])
    assert torch.allclose(per_prompt(result, "length")[1], by_hand, atol=1e-7)
    assert not torch.allclose(plain, by_hand)
    assert len(select(result, 3, normalize="l1")) == 3


# ---- adaptive quadrature ---------------------------------------------------------------------


def test_nested_simpson_rules_integrate_cubics_exactly():
    from ipg_sae.attribution.path import simpson_weights

    panels = [(0.0, 1.0)]
    rules = [simpson_weights(panels)]
    for split in ((0.0, 1.0), (0.0, 0.5), (0.25, 0.5)):  # bisect, as the adaptive loop does
        panels.remove(split)
        a, b = split
        panels += [(a, (a + b) / 2), ((a + b) / 2, b)]
        rules.append(simpson_weights(panels))
    for (coarse, _), (fine, _) in zip(rules, rules[1:]):
        assert set(coarse.tolist()) < set(fine.tolist()) and len(fine) == len(coarse) + 2  # nested, two new nodes
    for nodes, w in rules:
        assert abs(w.sum() - 1) < 1e-15 and nodes[0] == 0.0 and nodes[-1] == 1.0
        for deg in range(4):  # Simpson: exact for cubics on every panel
            assert abs((w * nodes**deg).sum() - 1 / (deg + 1)) < 1e-15, deg
    nodes, w = rules[-1]
    assert abs((w * nodes**4).sum() - 0.2) > 1e-6  # and not for quartics


def test_adaptive_meets_delta_tol_and_equals_the_fixed_rule_at_its_nodes(models):
    from ipg_sae.attribution import IPGEngine

    model, _ = models("gpt2")  # LayerNorm in float64: gaps go down to 1e-12
    trajs, saes = make_trajs(n_prompts=3), topk_saes((1, 2))
    tol = 1e-4
    result = attribute(model, saes, trajs, delta_tol=tol, max_nodes=65, progress=False, token_maps=["p1/s0"],
                       error_node=True)
    assert float(result.delta.abs().max()) <= tol
    assert result.meta["summary"]["n_budget_hit"] == 0
    assert all(n >= 3 and n % 2 == 1 for n in result.prompt("n_nodes").tolist())  # 3 + 2 per bisection
    engine = IPGEngine(model, saes, AttributionConfig(error_node=True, delta_tol=tol, max_nodes=65))
    for p in range(3):  # the same numbers as a fixed rule at the nodes and weights it ended with
        group = [t for t in trajs if t.prompt_id == f"p{p}"]
        adaptive = engine.attribute_group_adaptive(group, tol, 65)
        fixed = engine.attribute_group(group, adaptive.nodes, adaptive.weights)
        for layer in (1, 2):
            torch.testing.assert_close(adaptive.per_traj[layer], fixed.per_traj[layer], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(result.attributions[layer][p].double(), fixed.per_traj[layer].mean(0),
                                       rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(adaptive.error[1], fixed.error[1], rtol=1e-9, atol=1e-12)
    m = result.token_maps["p1/s0"]  # the token map is that of the final rule too
    dense = torch.zeros(96, dtype=torch.float64).index_add_(0, m["L1.latents"].flatten(),
                                                            m["L1.attribution"].flatten().double())
    assert torch.allclose(dense, result.per_trajectory(1)[4].double(), atol=1e-6)


def test_adaptive_spends_fewer_nodes_when_the_tolerance_is_loose(models):
    model, _ = models("gpt2")
    trajs, saes = make_trajs(n_prompts=3), topk_saes((1,))
    loose = attribute(model, saes, trajs, delta_tol=0.05, progress=False)
    tight = attribute(model, saes, trajs, delta_tol=1e-5, max_nodes=65, progress=False)
    assert float(loose.prompt("n_nodes").double().mean()) < float(tight.prompt("n_nodes").double().mean())
    assert float(loose.delta.abs().max()) <= 0.05 and float(tight.delta.abs().max()) <= 1e-5


def test_unreachable_tolerance_stops_at_the_budget_and_is_reported(models, caplog):
    import logging

    model, _ = models("llama")  # RMSNorm computes in float32: the gap cannot go below ~1e-6
    trajs = make_trajs(n_prompts=2)
    seen = []
    from ipg_sae.attribution import IPGWarning

    with caplog.at_level(logging.WARNING, logger="ipg_sae.attribution.run"), \
            pytest.warns(IPGWarning, match="2 of 2 prompts ended above delta_tol"):
        result = attribute(model, topk_saes((1,)), trajs, delta_tol=1e-14, max_nodes=9, progress=False,
                           callback=seen.append)
    assert result.prompt("budget_hit").tolist() == [True, True]
    assert result.prompt("n_nodes").tolist() == [9, 9]  # 3, then two per bisection, never above the budget
    summary = result.meta["summary"]
    assert summary["n_budget_hit"] == 2 and [b["prompt_id"] for b in summary["budget_hit"]] == ["p0", "p1"]
    assert all(b["delta"] > 1e-14 for b in summary["budget_hit"])
    assert torch.allclose(result.prompt("delta").double(), result.delta.abs().view(2, 4).max(1).values)
    assert [s["budget_hit"] for s in seen] == [True, True]
    assert sum("max_nodes is reached" in r.message for r in caplog.records) == 2


def test_adaptive_resume_is_bitwise_identical(models, tmp_path):
    model, _ = models("llama")
    trajs, saes = make_trajs(n_prompts=4, G=3), topk_saes((1,))
    kw = dict(delta_tol=1e-3, max_nodes=17, progress=False, checkpoint_every=1)
    reference = attribute(model, saes, trajs, **kw)
    ckpt = tmp_path / "ckpt.safetensors"

    def killer(stats):
        if stats["done"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attribute(model, saes, trajs, checkpoint_path=ckpt, callback=killer, **kw)
    resumed = attribute(model, saes, trajs, checkpoint_path=ckpt, **kw)
    assert set(resumed.tensors) == set(reference.tensors)
    for k, v in reference.tensors.items():
        assert torch.equal(v, resumed.tensors[k]), k
