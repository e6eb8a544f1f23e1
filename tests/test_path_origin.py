"""Where IPG's path starts (``attribution.path_origin``) and the local one-node rule ``ipg_local``
(docs/ipg-method.md §2a), on tiny float64 models: completeness from the mean origin, zero scores
when the origin is the activations themselves, the local rule against an independent autograd
computation, and a planted latent whose effect saturates (the path credits it, the local rule
does not)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from ipg_sae.attribution import AttributionConfig, advantages, attribute
from ipg_sae.digest import key_dict
from ipg_sae.errors import IPGError
from ipg_sae.models import block_hidden, decoder_layers, replace_block_hidden
from ipg_sae.saes import prepare_sae
from ipg_sae.selection import select
from tests import tiny
from ipg_sae.trajectories import Trajectory
from tests.helpers import VOCAB, calibrated_sae, planted_answer_latent


def make_trajs(n_prompts=2, G=4, seed=0, prompt_len=8, comp_len=8) -> list[Trajectory]:
    """Trajectories of one length (so ``calibrated_sae`` can stack them), rewards mixed in every group."""
    import random

    rng = random.Random(seed)
    out = []
    for p in range(n_prompts):
        prompt = [rng.randint(5, VOCAB) for _ in range(prompt_len)]
        for g in range(G):
            out.append(Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="",
                                  reference="", prompt_ids=prompt,
                                  completion_ids=[rng.randint(5, VOCAB) for _ in range(comp_len)],
                                  reward=float((g + p) % 2)))
    return out


def test_mean_origin_keeps_completeness_and_records_where_it_started(models):
    model, _ = models("gpt2")
    trajs = make_trajs(n_prompts=2, G=4)
    sae = calibrated_sae(model, 2, trajs, d_sae=48)
    result = attribute(model, {2: sae}, trajs, n_steps=16, path_origin="mean", progress=False)
    assert float(result.delta.abs().max()) < 1e-4
    origin = result.origin[2]
    # the mean activation over in-scope tokens (every position but each sequence's first), zeros counted
    ids = [t.prompt_ids + t.completion_ids for t in trajs]
    from ipg_sae.models import capture_residuals

    acts = torch.cat([sae.encode(capture_residuals(model, torch.tensor([s]), None, [2])[2][0, 1:]) for s in ids])
    assert torch.allclose(origin, acts.double().mean(0), atol=1e-10)
    assert int((origin > 0).sum()) > 10
    # the path is a different one: the same trajectories attributed from zero give other scores and logp0
    zero = attribute(model, {2: sae}, trajs, n_steps=16, progress=False)
    assert not torch.allclose(zero.tensors["traj.logp0"], result.tensors["traj.logp0"])
    assert torch.equal(zero.tensors["traj.logp1"], result.tensors["traj.logp1"])
    assert "L2.origin" not in zero.tensors and float(zero.origin[2].abs().sum()) == 0.0


def test_adaptive_quadrature_works_unchanged_from_the_mean(models):
    model, _ = models("llama")
    trajs = make_trajs(n_prompts=2, G=4, seed=4)
    sae = calibrated_sae(model, 1, trajs, d_sae=48)
    result = attribute(model, {1: sae}, trajs, delta_tol=1e-3, max_nodes=65, path_origin="mean", progress=False)
    assert float(result.delta.abs().max()) <= 1e-3
    fixed = attribute(model, {1: sae}, trajs, n_steps=48, path_origin="mean", progress=False)
    assert torch.allclose(result.score[1], fixed.score[1], atol=1e-3 * float(fixed.score[1].abs().max()))


def test_origin_at_the_activations_gives_zero_scores(models, tmp_path):
    """Latents that fire at one constant value everywhere (zero encoder, positive bias): starting the path at
    that value leaves nothing to integrate, so every score is zero (to float64 rounding: the active part and the
    origin part cancel) and F(origin) = F(1)."""
    model, _ = models("llama")
    trajs = make_trajs(n_prompts=2, G=4)
    sae = prepare_sae(tiny.random_sae("standard", 64, 1, d_sae=16, seed=2), model, 1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.linspace(0.5, 2.0, 16))
    constant = torch.relu(sae.b_enc).detach().double()
    save_file({"L1": constant}, str(tmp_path / "origin.safetensors"))
    result = attribute(model, {1: sae}, trajs, n_steps=4, path_origin=str(tmp_path / "origin.safetensors"),
                       progress=False)
    from_zero = attribute(model, {1: sae}, trajs, n_steps=4, progress=False).score[1]
    assert float(from_zero.abs().max()) > 1e-3  # from zero the same latents do get scores
    assert float(result.score[1].abs().max()) < 1e-12 * float(from_zero.abs().max()) * 1e3
    assert float(result.attributions[1].abs().max()) < 1e-12
    assert torch.allclose(result.tensors["traj.logp0"], result.tensors["traj.logp1"], rtol=0, atol=1e-12)


def _local_by_autograd(model, layer, sae, trajs, origin):
    """``(1/G) sum_g A_g d log pi(tau_g)/dc_i`` at ``c = 1`` with ``x' = x + sum_i (c_i - 1)(f_i - b_i) W_dec[i]`` at
    every position but the first, computed with a dense gate and plain autograd (no engine code)."""
    A = advantages(torch.tensor([t.reward for t in trajs]), "rloo")
    block = decoder_layers(model)[layer]
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for g, t in enumerate(trajs):
        gate = torch.ones(sae.cfg.d_sae, dtype=torch.float64, requires_grad=True)

        def hook(_m, _i, out):
            x = block_hidden(out)
            f = sae.encode(x).detach()
            keep = torch.ones(x.shape[1], 1, dtype=x.dtype)
            keep[0] = 0.0
            return replace_block_hidden(out, x + (((gate - 1) * (f - origin)) * keep) @ sae.W_dec.detach())

        handle = block.register_forward_hook(hook)
        try:
            ids = torch.tensor([t.prompt_ids + t.completion_ids])
            lp = model(ids).logits.log_softmax(-1)
            P = len(t.prompt_ids)
            (lp[0, P - 1:-1].gather(-1, ids[0, P:, None]).sum() * float(A[g])).backward()
        finally:
            handle.remove()
        total += gate.grad
    return total / len(trajs)


@pytest.mark.parametrize("origin", ["zero", "mean"])
def test_local_rule_is_the_one_node_rule_and_the_gradient_times_the_distance(models, origin):
    model, _ = models("llama")
    trajs = make_trajs(n_prompts=1, G=4, seed=5)
    sae = calibrated_sae(model, 2, trajs, d_sae=40)
    local = attribute(model, {2: sae}, trajs, baseline="ipg_local", path_origin=origin, progress=False)
    one_node = attribute(model, {2: sae}, trajs, n_steps=1, method="riemann_right", path_origin=origin,
                         progress=False)
    assert local.method_name == "ipg_local"
    assert torch.allclose(local.score[2], one_node.score[2], rtol=0, atol=1e-12)
    b = local.origin[2].to(torch.float64)
    reference = _local_by_autograd(model, 2, sae, trajs, b)
    assert torch.allclose(local.score[2], reference, rtol=1e-6, atol=1e-9), float((local.score[2] - reference).abs().max())


def test_a_saturating_latent_is_credited_by_the_path_not_by_the_local_rule(model_dirs):
    """The model's residual carries a huge push towards the answer token (added to every embedding), and latent
    P, firing at 1 everywhere, is exactly that push. At c = 1 the final norm is saturated: a little more or
    less of P changes nothing (the gradient is ~0), though removing P changes everything. The integrated path
    gives P nearly all of F(1) - F(0); the local rule gives it a thousandth of that."""
    from ipg_sae.models import capture_residuals, load_model

    model, _ = load_model(str(model_dirs("llama")), dtype="float64")  # its own copy: the embeddings change
    layer, P, answer = 3, 5, 77
    trajs, _ = planted_answer_latent(model, layer, correct_tok=answer, P=P)
    head = model.get_output_embeddings().weight.double()
    direction = head[answer] - head.mean(0)
    ids = torch.tensor([t.prompt_ids + t.completion_ids for t in trajs])
    push = 100 * capture_residuals(model, ids, None, [layer])[layer].norm(dim=-1).mean() * direction / direction.norm()
    with torch.no_grad():
        model.get_input_embeddings().weight += push
    sae = calibrated_sae(model, layer, trajs, d_sae=32, quantile=0.8)
    with torch.no_grad():
        sae.W_enc[:, P], sae.b_enc[P], sae.W_dec[P] = 0.0, 1.0, push
    ipg = attribute(model, {layer: sae}, trajs, delta_tol=1e-3, max_nodes=65, progress=False)
    local = attribute(model, {layer: sae}, trajs, baseline="ipg_local", progress=False)
    assert float(ipg.delta.abs().max()) <= 1e-3
    assert select(ipg, 1) == [(layer, P)]
    change = float(ipg.expected.sum()) / len(trajs)  # F(1) - F(0), in the scores' units
    assert float(ipg.score[layer][P]) > 0.9 * change > 0
    assert abs(float(local.score[layer][P])) < 0.01 * float(ipg.score[layer][P])


def test_path_origin_errors(models, tmp_path):
    model, _ = models("llama")
    trajs = make_trajs(n_prompts=1, G=4)
    sae = calibrated_sae(model, 1, trajs, d_sae=16)
    with pytest.raises(IPGError, match="path_origin"):
        AttributionConfig(path_origin="median")
    with pytest.raises(IPGError, match="does not exist"):
        attribute(model, {1: sae}, trajs, path_origin=str(tmp_path / "nope.safetensors"), progress=False)
    save_file({"L2": torch.zeros(16)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(IPGError, match="no tensor L1"):
        attribute(model, {1: sae}, trajs, path_origin=str(tmp_path / "other.safetensors"), progress=False)
    save_file({"L1": torch.ones(15)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(IPGError, match="16 latents"):
        attribute(model, {1: sae}, trajs, path_origin=str(tmp_path / "short.safetensors"), progress=False)


def test_the_new_setting_leaves_stored_keys_as_they_were():
    """At its default, path_origin is not in any cache key (stages and checkpoints made before it existed stay
    valid); set to anything else, it is."""
    cfg = AttributionConfig()
    plain = dataclasses.asdict(cfg)
    plain.pop("path_origin")
    assert json.dumps(key_dict(cfg), sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert key_dict(AttributionConfig(path_origin="mean"))["path_origin"] == "mean"
