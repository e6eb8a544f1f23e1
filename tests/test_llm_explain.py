"""LLM explanations end to end against a stand-in OpenAI-compatible server on 127.0.0.1 (a thread that stops by
itself), including a missing endpoint, a silent one and one that dies half-way (what was computed is kept)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ipg_sae import explanations as ex
from ipg_sae import llm_explain as llm
from ipg_sae.errors import IPGError
from tests.llm_standin import MARK, standin

LAYER = 1


@pytest.fixture
def server():
    """A stand-in endpoint (tests/llm_standin.py); it stops at the end of the test, or after 60 s."""
    with standin() as found:
        yield found


@pytest.fixture(scope="module")
def planted(tiny_llama_dir):
    """The tiny model and an SAE whose latent 0 fires exactly on " =" (a linear probe of its residual)."""
    from ipg_sae.models import capture_residuals, load_model
    from ipg_sae.tasks import arithmetic_problems
    from tests import tiny

    model, tok = load_model(str(tiny_llama_dir))
    problems = arithmetic_problems(60, 1, 0) + arithmetic_problems(30, 2, 0)
    seqs = [tok(f"{p.question} {p.solution}", add_special_tokens=False)["input_ids"] for p in problems]
    x = torch.cat([capture_residuals(model, torch.tensor([s]), None, [LAYER])[LAYER][0, 1:] for s in seqs])
    t = torch.cat([torch.tensor(s[1:]) for s in seqs])
    is_a = t == tok(MARK, add_special_tokens=False)["input_ids"][0]
    centred = x - x.mean(0)
    probe = torch.linalg.solve(centred.T @ centred / len(x) + 1e-3 * torch.eye(x.shape[1]),
                               x[is_a].mean(0) - x[~is_a].mean(0))
    threshold = float((x @ probe)[is_a].min() + (x @ probe)[~is_a].max()) / 2
    sae = tiny.random_sae("standard", x.shape[1], layer=LAYER, d_sae=16, seed=1)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.copy_(-torch.quantile(x @ sae.W_enc, 0.9, dim=0))
        sae.W_enc[:, 0], sae.b_enc[0] = probe / threshold, -1.0
    corpus = ex.split_corpus(seqs, seed=0)
    acts = ex.encode_corpus(model, sae, LAYER, corpus)
    return corpus, acts, (lambda ids: [tok.decode([int(i)]) for i in ids])


def test_explainer_and_scorers_end_to_end(server, planted, tmp_path, monkeypatch):
    httpd, url = server
    corpus, acts, pieces = planted
    monkeypatch.setenv("IPG_SAE_LLM_BASE_URL", url)
    monkeypatch.setenv("IPG_SAE_LLM_API_KEY", "sk-test")
    cfg = llm.LLMConfig(timeout_s=5)
    rows = llm.explain_all(llm.make_chat(cfg), corpus, acts, LAYER, [0, 1], pieces, cfg, tmp_path / "llm.jsonl")
    assert rows[0]["explanation"] == 'the token " =" in equations'
    assert rows[0]["detection_bacc"] == 1.0 and rows[0]["fuzzing_bacc"] == 1.0  # the planted latent: " =" exactly
    assert rows[1]["detection_bacc"] is not None and rows[1]["detection_bacc"] <= 0.75  # a random one: no
    assert rows[0]["detection"]["parsed"] == 1.0 and httpd.state["auth"] == "Bearer sk-test"
    assert [json.loads(line)["latent"] for line in (tmp_path / "llm.jsonl").read_text().splitlines()] == [0, 1]


def test_a_missing_endpoint_fails_in_seconds_with_one_line(planted, tmp_path):
    import socket

    corpus, acts, pieces = planted
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = llm.LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", timeout_s=2)
    start = time.monotonic()
    with pytest.raises(IPGError, match=r"did not answer within 2 s .*llm.base_url") as e:
        llm.explain_all(llm.make_chat(cfg), corpus, acts, LAYER, [0], pieces, cfg, tmp_path / "llm.jsonl")
    assert time.monotonic() - start < 5 and "\n" not in str(e.value)
    assert not (tmp_path / "llm.jsonl").exists()


def test_a_silent_endpoint_fails_in_seconds(server, planted, tmp_path):
    httpd, url = server
    httpd.state.update(mode="silent", silence_s=4.0)
    corpus, acts, pieces = planted
    cfg = llm.LLMConfig(base_url=url, timeout_s=1)
    start = time.monotonic()
    with pytest.raises(IPGError, match="did not answer within 1 s"):
        llm.explain_all(llm.make_chat(cfg), corpus, acts, LAYER, [0], pieces, cfg, tmp_path / "llm.jsonl")
    assert time.monotonic() - start < 3


def test_no_endpoint_configured_says_where_to_set_it(monkeypatch):
    for name in ("IPG_SAE_LLM_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(IPGError, match="llm.base_url"):
        llm.make_chat(llm.LLMConfig())


def test_a_failure_half_way_keeps_what_was_computed_and_a_rerun_resumes(server, planted, tmp_path):
    httpd, url = server
    corpus, acts, pieces = planted
    cfg = llm.LLMConfig(base_url=url, timeout_s=5, n_score=5)
    per_latent = 1 + 2 * 2  # one explanation, detection and fuzzing: 10 windows each, 5 per prompt
    httpd.state.update(mode="fail_after", limit=per_latent + 1)
    path = tmp_path / "llm.jsonl"
    with pytest.raises(IPGError, match="HTTP 500"):
        llm.explain_all(llm.make_chat(cfg), corpus, acts, LAYER, [0, 1], pieces, cfg, path)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["latent"] for r in kept] == [0]
    httpd.state.update(mode="ok", requests=0)
    rows = llm.explain_all(llm.make_chat(cfg), corpus, acts, LAYER, [0, 1], pieces, cfg, path)
    assert httpd.state["requests"] == per_latent  # latent 0 was not asked again
    assert rows[0] == kept[0] and rows[1]["explanation"]


def test_answers_that_do_not_parse_count_as_wrong():
    assert llm.parse_labels("Sure! [1, 0, 1]", 3) == [1, 0, 1]
    assert llm.parse_labels("[1, 0]", 3) is None
    assert llm.parse_explanation("thinking...\n[EXPLANATION]: digits") == "digits"
    truth = torch.tensor([True, True, False, False]).numpy()
    assert llm._balanced([1, None, 0, None], truth)["balanced_accuracy"] == 0.5


def test_a_local_transformers_model_can_be_the_llm(planted, tiny_llama_dir, tmp_path):
    """The tiny random model answers gibberish: the path runs end to end and unparsed labels count as wrong."""
    corpus, acts, pieces = planted
    cfg = llm.LLMConfig(backend="transformers", model=str(tiny_llama_dir), max_tokens=8, n_explain=3, n_score=2)
    rows = llm.explain_all(llm.make_chat(cfg), corpus, acts, LAYER, [0], pieces, cfg, tmp_path / "llm.jsonl")
    assert isinstance(rows[0]["explanation"], str)
    assert rows[0]["detection"]["n"] in (0, 4)
