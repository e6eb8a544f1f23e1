"""The SAE splice and SAE loading (:mod:`ipg_sae.saes`) on tiny random models.

The splice must be exact: at gates = 1 the spliced model is the clean model, and moving
gates changes the spliced block's output by exactly ``(c - 1) * f @ W_dec`` at the
positions in scope. Loading must validate an SAE against the model before any compute.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ipg_sae.errors import IPGError
from ipg_sae.models import block_hidden, decoder_layers, hidden_size, load_model
from ipg_sae.saes import (
    PositionScope,
    SAESpec,
    decoder_matrix,
    gates_for,
    load_sae,
    prepare_sae,
    sae_layer,
    splice,
)
from tests.tiny import random_sae

ARCHS = ["standard", "topk", "jumprelu"]
LAYER_SETS = [(1,), (0, 2)]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    return model, tok


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    return model, tok


def _ids(model, batch=2, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=gen)


def _random_sae(arch, d, layer, **kwargs):
    sae = random_sae(arch, d, layer, seed=layer, **kwargs)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(0.05)  # the tiny models' residuals are small: let enough latents fire
    return sae


def _saes(model, arch, layers, **kwargs):
    d = hidden_size(model)
    return {layer: prepare_sae(_random_sae(arch, d, layer, **kwargs), model) for layer in layers}


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _assert_rel_close(got, want, rel=1e-5):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"max abs error {err:.3g} vs scale {scale:.3g}"


class _Capture:
    """Forward hooks that record each listed block's output (as the hooks before it left it)."""

    def __init__(self, model, layers):
        self.out: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self.handles = [blocks[layer].register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer):
        def hook(_module, _inputs, output):
            self.out[layer] = block_hidden(output).detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _block_outputs_around_splice(model, saes, gate_value, layers, ids):
    """Each block's output as the model computed it (``before``) and after the splice (``after``)."""
    before = _Capture(model, layers)  # registered before the splice: sees the block's own output
    try:
        with splice(model, saes, gates_for(saes, gate_value)):
            after = _Capture(model, layers)  # registered after: sees the spliced output
            try:
                _logits(model, ids)
            finally:
                after.remove()
    finally:
        before.remove()
    return before.out, after.out


# ---- exactness --------------------------------------------------------------------------


@pytest.mark.parametrize("layers", LAYER_SETS, ids=lambda ls: "layers" + "-".join(map(str, ls)))
@pytest.mark.parametrize("arch", ARCHS)
def test_splice_at_gates_one_is_exact(model_and_tok, arch, layers):
    model, _ = model_and_tok
    saes = _saes(model, arch, layers)
    ids = _ids(model)
    clean = _logits(model, ids)
    with splice(model, saes, gates_for(saes, 1.0)):
        spliced = _logits(model, ids)
    assert spliced.dtype == torch.float32
    _assert_rel_close(spliced, clean, 1e-5)


@pytest.mark.parametrize("value", [0.0, 2.0])
@pytest.mark.parametrize("arch", ARCHS)
def test_gates_change_block_output_by_decoder_rows(model_and_tok, arch, value):
    model, _ = model_and_tok
    layers = (0, 2)  # two layers: the second one sees the first one's change in its input
    saes = _saes(model, arch, layers)
    ids = _ids(model)
    before, after = _block_outputs_around_splice(model, saes, value, layers, ids)
    for layer in layers:
        sae, x, x_new = saes[layer], before[layer], after[layer]
        with torch.no_grad():
            f = sae.encode(x)
        in_scope = torch.ones(x.shape[:2], dtype=torch.bool)
        in_scope[:, 0] = False  # the first token is excluded by default
        expected_delta = ((value - 1.0) * f * in_scope[..., None]) @ decoder_matrix(sae)
        assert (f[:, 1:] != 0).sum() >= 5, "the random SAE should have active latents"
        _assert_rel_close(x_new - x, expected_delta, 1e-5)
        assert torch.equal(x_new[:, 0], x[:, 0])
        # Equivalently: the residual became dec(c * f) + (x - dec(f)) at in-scope positions.
        with torch.no_grad():
            recon = sae.decode(value * f) + (x - sae.decode(f))
        _assert_rel_close(x_new[:, 1:], recon[:, 1:], 1e-5)


def test_hooks_removed_when_body_raises(llama):
    model, _ = llama
    saes = _saes(model, "topk", (0, 2))
    ids = _ids(model)
    clean = _logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with splice(model, saes, gates_for(saes, 0.0)):
            _logits(model, ids)
            raise RuntimeError("boom")
    assert all(len(block._forward_hooks) == 0 for block in decoder_layers(model))
    assert torch.equal(_logits(model, ids), clean)


# ---- generation and gradients -------------------------------------------------------------


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              use_cache=True, pad_token_id=0, **kwargs)


def test_generate_under_splice_at_gates_one_is_unchanged(model_and_tok):
    model, _ = model_and_tok
    saes = _saes(model, "topk", (1, 2))
    ids = _ids(model, batch=1, length=6, seed=3)
    clean = _generate(model, ids)
    with splice(model, saes, gates_for(saes, 1.0)):
        spliced = _generate(model, ids)
    assert torch.equal(spliced, clean)


def test_generate_with_kv_cache_matches_teacher_forced_splice(llama):
    """Decoding steps (one position each, KV cache on) get the same edit as a full forward."""
    model, _ = llama
    saes = _saes(model, "topk", (1,))
    ids = _ids(model, batch=1, length=6, seed=4)
    with splice(model, saes, gates_for(saes, 3.0)):
        gen = _generate(model, ids, return_dict_in_generate=True, output_logits=True)
        teacher = _logits(model, gen.sequences)
    prompt_len = ids.shape[1]
    step_logits = torch.stack(gen.logits, dim=1)  # logits of each decoding step, computed with the KV cache
    _assert_rel_close(step_logits, teacher[:, prompt_len - 1:-1], 1e-4)
    clean = _logits(model, gen.sequences)
    assert not torch.allclose(teacher, clean, atol=1e-3), "gates of 3 should change this tiny model's logits"


def test_gradient_flows_to_gates(model_and_tok):
    model, _ = model_and_tok
    saes = _saes(model, "jumprelu", (1, 2))
    ids = _ids(model, batch=2, length=10)
    gates = {layer: g.clone().requires_grad_(True) for layer, g in gates_for(saes, 1.0).items()}
    with splice(model, saes, gates):
        logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).sum()
    logp.backward()
    for layer, g in gates.items():
        assert g.grad is not None and torch.isfinite(g.grad).all()
        assert g.grad.abs().sum() > 0, f"no gradient reached the layer-{layer} gates"


def test_generated_scope_leaves_prompt_positions_untouched(llama):
    model, _ = llama
    saes = _saes(model, "topk", (1,))
    ids = _ids(model, batch=2, length=12)
    prompt_len = 7
    clean_logits = _logits(model, ids)
    before = _Capture(model, [1])
    try:
        with splice(model, saes, gates_for(saes, 0.0), scope=PositionScope(scope="generated", prompt_len=prompt_len)):
            after = _Capture(model, [1])
            try:
                logits = _logits(model, ids)
            finally:
                after.remove()
    finally:
        before.remove()
    x, x_new = before.out[1], after.out[1]
    assert torch.equal(x_new[:, :prompt_len], x[:, :prompt_len])
    assert not torch.allclose(x_new[:, prompt_len:], x[:, prompt_len:])
    # Causality: logits at prompt positions are the clean ones.
    assert torch.equal(logits[:, :prompt_len], clean_logits[:, :prompt_len])


# ---- loading and validation ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_sae_loads_and_validates(llama, tmp_path, arch):
    model, _ = llama
    sae = random_sae(arch, hidden_size(model), 2)
    sae.save_model(tmp_path)
    loaded = load_sae(str(tmp_path), model)
    assert loaded.cfg.architecture() == arch
    assert sae_layer(loaded) == 2 and loaded.ipg_layer == 2
    assert not loaded.W_dec.requires_grad
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    ids = _ids(model)
    with splice(model, {2: loaded}, gates_for({2: loaded}, 1.0)):
        spliced = _logits(model, ids)
    _assert_rel_close(spliced, _logits(model, ids))


def test_sae_width_mismatch_names_both_sides(llama, tmp_path):
    model, _ = llama
    random_sae("topk", 32, 1).save_model(tmp_path)
    with pytest.raises(IPGError, match=r"d_in is 32 .*hidden size is 64"):
        load_sae(str(tmp_path), model)


def test_sae_layer_out_of_range(llama, tmp_path):
    model, _ = llama
    random_sae("topk", hidden_size(model), 9).save_model(tmp_path)
    with pytest.raises(IPGError, match=r"layer 9 is out of range.*4 decoder layers"):
        load_sae(str(tmp_path), model)
    with pytest.raises(IPGError, match=r"layer 7 is out of range"):
        load_sae(SAESpec(path=str(tmp_path), layer=7), model)


def test_missing_cfg_json(llama, tmp_path):
    model, _ = llama
    (tmp_path / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(IPGError, match=r"no cfg\.json"):
        load_sae(str(tmp_path), model)
    with pytest.raises(IPGError, match=r"no cfg\.json"):
        load_sae(str(tmp_path / "missing"), model)


def test_hook_name_without_layer_needs_layer(llama, tmp_path):
    model, _ = llama
    sae = random_sae("topk", hidden_size(model), 1)
    sae.cfg.metadata.hook_name = "model.norm"
    sae.save_model(tmp_path)
    with pytest.raises(IPGError, match=r"hook_name 'model\.norm'.*set `layer`"):
        load_sae(str(tmp_path), model)
    loaded = load_sae(SAESpec(path=str(tmp_path), layer=3), model)
    assert loaded.ipg_layer == 3
    from sae_lens import SAE

    with pytest.raises(IPGError, match="pass `layer` explicitly"):
        prepare_sae(SAE.load_from_disk(str(tmp_path)), model)


def test_model_name_mismatch_warns(llama, tmp_path):
    model, _ = llama
    random_sae("topk", hidden_size(model), 1, model_name="some-org/other-model").save_model(tmp_path)
    with pytest.warns(UserWarning, match=r"trained on 'some-org/other-model'"):
        load_sae(str(tmp_path), model)
    # The same model name (any directory prefix) does not warn.
    same = tmp_path / "same"
    random_sae("topk", hidden_size(model), 1, model_name=f"/elsewhere/{model.config._name_or_path.rstrip('/').split('/')[-1]}").save_model(same)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sae(str(same), model)


def test_batchtopk_saved_as_jumprelu_splices_exactly(llama, tmp_path):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    model, _ = llama
    d = hidden_size(model)
    torch.manual_seed(0)
    cfg = BatchTopKTrainingSAEConfig(d_in=d, d_sae=96, k=8, metadata=SAEMetadata(hook_name="model.layers.1"))
    train_sae = BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        train_sae.W_enc.normal_(0, d**-0.5)
        train_sae.W_dec.normal_(0, d**-0.5)
    # A few training passes on real residuals set the running threshold.
    x = _Capture(model, [1])
    _logits(model, _ids(model, batch=4, length=16))
    x.remove()
    acts = x.out[1][:, 1:].reshape(-1, d)
    for step in range(5):
        train_sae.training_forward_pass(TrainStepInput(sae_in=acts, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=step, is_logging_step=False))
    threshold = float(train_sae.topk_threshold)
    assert threshold > 0
    train_sae.save_inference_model(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"

    sae = load_sae(str(tmp_path), model)
    assert sae.cfg.architecture() == "jumprelu"
    assert torch.allclose(sae.threshold, torch.full_like(sae.threshold, threshold))
    with torch.no_grad():
        f = sae.encode(acts)
        # The same latents fire as under the training SAE's threshold rule.
        pre = train_sae.encode_with_hidden_pre(acts)[1]
    assert torch.equal(f > 0, pre > threshold)

    saes = {1: sae}
    ids = _ids(model)
    clean = _logits(model, ids)
    with splice(model, saes, gates_for(saes, 1.0)):
        _assert_rel_close(_logits(model, ids), clean)
    before, after = _block_outputs_around_splice(model, saes, 0.0, [1], ids)
    xb, xa = before[1], after[1]
    with torch.no_grad():
        f = sae.encode(xb)
    expected = (-f[:, 1:]) @ sae.W_dec
    _assert_rel_close(xa[:, 1:] - xb[:, 1:], expected)


# ---- published SAEs: where they were trained, in which basis ------------------------------------


def _saved_by_sae_lens(tmp_path, hook: str, **meta) -> str:
    """An SAE written by sae-lens's own save_model, with the given hook and metadata."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=32, k=4, metadata=SAEMetadata(hook_name=hook, **meta)))
    path = tmp_path / hook.replace(".", "_")
    sae.save_model(str(path))
    return str(path)


@pytest.mark.parametrize("hook,layer", [
    ("blocks.2.hook_resid_post", 2),
    ("blocks.2.hook_resid_pre", 1),  # the input of block 2 is the output of block 1
    ("blocks.1.hook_resid_pre", 0),
    ("model.layers.3", 3),
    ("transformer.h.1", 1),
])
def test_residual_hooks_map_to_the_block_output_they_read(llama, tmp_path, hook, layer):
    model, _ = llama
    sae = load_sae(_saved_by_sae_lens(tmp_path, hook, model_class_name="AutoModelForCausalLM"), model)
    assert sae.ipg_layer == layer


@pytest.mark.parametrize("hook,match", [
    ("blocks.2.hook_mlp_out", "not the residual stream"),
    ("blocks.2.hook_attn_out", "not the residual stream"),
    ("blocks.2.attn.hook_z", "not the residual stream"),
    ("blocks.2.hook_resid_mid", "between attention and MLP"),
    ("blocks.0.hook_resid_pre", "embedding output"),
    ("model.layers.2.mlp", "submodule of a decoder block"),
])
def test_sites_the_splice_cannot_reach_are_refused_even_with_a_layer(llama, tmp_path, hook, match):
    model, _ = llama
    path = _saved_by_sae_lens(tmp_path, hook, model_class_name="AutoModelForCausalLM")
    with pytest.raises(IPGError, match=match):
        load_sae(path, model)
    with pytest.raises(IPGError, match=match):
        load_sae(SAESpec(path=path, layer=2), model)


def test_a_given_layer_that_contradicts_the_hook_is_refused(llama, tmp_path):
    model, _ = llama
    path = _saved_by_sae_lens(tmp_path, "blocks.3.hook_resid_pre", model_class_name="AutoModelForCausalLM")
    with pytest.raises(IPGError, match="the output of decoder block 2, but its entry says layer 3"):
        load_sae(SAESpec(path=path, layer=3), model)
    assert load_sae(SAESpec(path=path, layer=2), model).ipg_layer == 2


def test_transformer_lens_centred_residuals_are_refused(llama, tmp_path):
    model, _ = llama
    tl_default = _saved_by_sae_lens(tmp_path, "blocks.1.hook_resid_post", model_class_name="HookedTransformer",
                                    model_name="gpt2-small")
    with pytest.raises(IPGError, match="center_writing_weights"):
        load_sae(tl_default, model)
    fine = tmp_path / "fine"
    fine.mkdir()
    ok = _saved_by_sae_lens(fine, "blocks.1.hook_resid_post", model_class_name="HookedTransformer",
                            model_name="gpt2-small", model_from_pretrained_kwargs={"center_writing_weights": False})
    assert load_sae(ok, model).ipg_layer == 1
    rms = tmp_path / "rms"
    rms.mkdir()  # TransformerLens never centres the writing weights of RMSNorm models
    assert load_sae(_saved_by_sae_lens(rms, "blocks.1.hook_resid_post", model_class_name="HookedTransformer",
                                       model_name="meta-llama/Llama-3.2-1B"), model).ipg_layer == 1


def test_load_sae_measures_the_fit_and_warns_on_a_poor_one(llama, tmp_path):
    model, tok = llama
    path = _saved_by_sae_lens(tmp_path, "model.layers.1", model_class_name="AutoModelForCausalLM")
    with pytest.warns(UserWarning, match="likely the wrong layer"):
        sae = load_sae(path, model, tokenizer=tok)  # random weights: explains nothing of this residual
    assert sae.ipg_explained_variance < 0.5


def test_a_poor_generic_fit_of_an_sae_trained_here_for_this_model_is_no_alarm(llama, tmp_path, caplog):
    """The demo's SAE, trained on arithmetic, explains 0.48 of generic prose: its sidecar rules out the wrong
    layer, model or basis, so that is logged, not warned about; the same SAE recorded for another model warns."""
    import logging
    import warnings

    from ipg_sae.saes import write_sae_sidecar

    model, tok = llama
    path = _saved_by_sae_lens(tmp_path, "model.layers.1", model_class_name="AutoModelForCausalLM")
    write_sae_sidecar(path, model.config._name_or_path, layer=1)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="ipg_sae.saes"):
        warnings.simplefilter("error")  # any warning fails the test
        sae = load_sae(path, model, tokenizer=tok)
    assert sae.ipg_explained_variance < 0.5
    assert "trained here on a narrower distribution" in caplog.text
    write_sae_sidecar(path, "some-other-model", layer=1)
    with pytest.warns(UserWarning, match="likely the wrong layer"):
        load_sae(path, model, tokenizer=tok)


def test_trained_saes_export_for_transformer_lens(tmp_path):
    from sae_lens import SAE

    from ipg_sae.export import export_for_transformer_lens
    from ipg_sae.saes import write_sae_sidecar

    src = tmp_path / "sae"
    random_sae("topk", 64, layer=3).save_model(str(src))
    meta = json.loads((src / "cfg.json").read_text())
    meta["metadata"]["model_name"] = "smollm2-135m-instruct"
    (src / "cfg.json").write_text(json.dumps(meta))
    write_sae_sidecar(src, model_name="smollm2-135m-instruct", layer=3)
    side = json.loads((src / "ipg_sae.json").read_text())
    assert side["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and side["model_name"] == "smollm2-135m-instruct"
    out = export_for_transformer_lens(src, tmp_path / "tl")
    exported = SAE.load_from_disk(str(out))
    md = exported.cfg.metadata
    assert md.hook_name == "blocks.3.hook_resid_post" and md.model_class_name == "HookedTransformer"
    assert md.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert md.model_from_pretrained_kwargs["center_writing_weights"] is False
    original = SAE.load_from_disk(str(src))
    assert torch.equal(exported.W_dec, original.W_dec) and torch.equal(exported.W_enc, original.W_enc)
