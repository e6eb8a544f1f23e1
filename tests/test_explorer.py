"""The feature explorer: its data against direct computations, and the page in a real browser."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ipg_sae.explorer import ExplorerConfig, build, load, render
from ipg_sae.latents import logit_effect
from tests.browser import find_browser, rendered_dom, screenshot


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    """A tiny attribution run with per-token maps, a baseline and an evaluation."""
    from ipg_sae.config import load_config
    from ipg_sae.jobs import AttributeJobConfig, EvaluateJobConfig, SampleJobConfig, run_attribute, run_evaluate, run_sample
    from tests import tiny

    root = tmp_path_factory.mktemp("explore")
    sae_dir = root / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    common = {"name": "x", "runs_dir": str(root / "runs"), "model.name": str(tiny_llama_dir), "wandb.enabled": False}
    run_sample(load_config(SampleJobConfig, None, {**common, "task.n_problems": 3, "task.few_shot": 0,
                                                   "sampling.n_samples": 3, "sampling.max_new_tokens": 8,
                                                   "reward": "tests.helpers:text_length_mod_7"}), progress=False)
    run_attribute(load_config(AttributeJobConfig, None, {
        **common, "sae.load": [{"path": str(sae_dir)}], "attribution.n_steps": 4, "attribution.token_maps": ["*"],
        "attribution.n_contexts": 12, "baselines": ["act"], "selection.k": 3, "selection.n_bootstrap": 5}),
        progress=False)
    run_evaluate(load_config(EvaluateJobConfig, None, {
        **common, "sae.load": [{"path": str(sae_dir)}], "sets": {"ipg": str(root / "runs" / "x" / "selection.json")},
        "attribution_dir": str(root / "runs" / "x"), "evaluation.k": 3, "evaluation.gammas": [0.0],
        "evaluation.seeds": [0], "evaluation.n_random_sets": 1, "evaluation.n_bootstrap": 200,
        "evaluation.task.n_problems": 2, "evaluation.task.few_shot": 0, "evaluation.estimator": "sampling",
        "evaluation.sampling.max_new_tokens": 6}), progress=False)
    run_dir = root / "runs" / "x"
    page = build(run_dir, cfg=ExplorerConfig(detail=6, n_contexts=10, held_out=4, page_size=25))
    return run_dir, page


def test_data_file_and_load(run):
    run_dir, page = run
    data = load(run_dir)
    assert page == run_dir / "explorer" / "index.html" and (run_dir / "explorer" / "data.json").is_file()
    rows = data["latents"]
    assert rows and [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all({"mean", "lo", "hi", "t", "sign_consistency", "selection_frequency", "activation_frequency", "ranks",
                "selected", "neuronpedia", "detail"} <= set(r) for r in rows)
    assert all("act" in r["ranks"] for r in rows)
    selected = {tuple(p) for p in data["run"]["selected"]}
    assert selected and all(data["details"].get(f"{l}:{i}") for l, i in selected)  # the selected set has panels
    assert {r["layer"] for r in rows} == {2}


def test_contexts_are_windows_of_real_activations(run, tiny_llama_dir):
    """Each context's shading is the latent's activation at those tokens, re-encoded from scratch."""
    from ipg_sae.models import capture_residuals, load_model
    from ipg_sae.saes import load_sae
    from ipg_sae.trajectories import load_trajectories

    run_dir, _ = run
    data = load(run_dir)
    model, _ = load_model(str(tiny_llama_dir))
    sae = load_sae(str(run_dir.parent.parent / "sae"), model)
    trajs = {t.id: t for t in load_trajectories(run_dir / "trajectories.jsonl")}
    checked = 0
    for key, detail in data["details"].items():
        layer, latent = map(int, key.split(":"))
        for ctx in detail["contexts"]:
            assert ctx["strings"] and len(ctx["strings"]) == len(ctx["tokens"]) == len(ctx["activations"])
            assert ctx["activations"][ctx["max_index"]] == ctx["max"] > 0  # the marked token is the activating one
            if not ctx["source"].startswith("trajectory "):
                continue
            t = trajs[ctx["source"].split(" ", 1)[1]]
            ids = t.prompt_ids + t.completion_ids
            f = sae.encode(capture_residuals(model, torch.tensor([ids]), None, [layer])[layer][0])[:, latent]
            f[0] = 0  # the first position is out of scope
            start = next(s for s in range(len(ids)) if ids[s:s + len(ctx["tokens"])] == ctx["tokens"])
            torch.testing.assert_close(f[start:start + len(ctx["tokens"])].float(),
                                       torch.tensor(ctx["activations"]), rtol=1e-3, atol=1e-3)
            checked += 1
    assert checked > 0
    assert any(c["source"] == "held-out text" for d in data["details"].values() for c in d["contexts"])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logit_effect_matches_a_direct_computation(kind, tmp_path, tiny_tokenizer):
    from ipg_sae.models import load_model
    from ipg_sae.saes import decoder_matrix
    from tests import tiny

    tiny.build_model(kind, tmp_path, vocab_size=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="float64")
    sae = tiny.random_sae("topk", 64, 1, d_sae=32, k=4).double()
    norm = model.model.norm if kind == "llama" else model.transformer.ln_f
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)  # a final norm whose scale matters
    direct = model.lm_head.weight @ (decoder_matrix(sae)[7] * norm.weight)
    torch.testing.assert_close(logit_effect(model, sae, 7), direct)


def test_steering_rows_and_ipg_token_maps(run):
    from ipg_sae.evaluation import EvalResult

    run_dir, _ = run
    data = load(run_dir)
    selected = [f"{l}:{i}" for l, i in data["run"]["selected"]]
    assert all(data["details"][k]["steering"] for k in selected)  # the evaluated set holds them
    # a panel's row is the whole set's effect, with its size and the random sets' mean at that gamma beside it
    evaluation = EvalResult.load(run_dir / "eval", with_samples=False)
    random_mean = next(r for r in evaluation.rows if r["condition"] == "random_mean" and r["gamma"] == 0.0)
    row = next(r for r in data["details"][selected[0]]["steering"] if r["set"] == "ipg")
    metric = evaluation.meta.primary_metric
    assert row["n_latents"] == 3 and row["metric"] == metric
    assert row["random_delta"] == random_mean[f"{metric}_delta"]
    verdict = data["run"]["verdict"]
    comp = next(c for c in evaluation.comparisons if c["against"] == "random" and c["metric"] == metric)
    assert verdict["target"] == "ipg" and verdict["n_random"] == 1 and verdict["reward"] == evaluation.meta.reward
    assert verdict["comparisons"] == [{k: comp[k] for k in ("gamma", "delta", "lo", "hi", "verdict")}]
    maps = [t for d in data["details"].values() for side in ("correct", "incorrect") for t in d["ipg_tokens"][side]]
    assert maps and all(len(t["strings"]) == len(t["values"]) for t in maps)
    view = data["trajectories"]
    assert view and all(len(t["strings"]) == len(t["total"]) == len(t["top"]) for t in view)


def test_special_characters_render_as_text(tmp_path):
    """Tokens are data: `|`, `<`, `&`, newlines and a closing script tag must come out as text."""
    nasty = ["a|b", "<b>bold</b>", "&amp;", "\n", "</script><script>document.body.dataset.error='x'</script>", "é",
             "<!--", "x\u2028y"]
    data = {"run": {"name": "<i>run</i>", "method": "ipg", "model": "m", "saes": [], "summary": {}, "selected": [[1, 0]],
                    "n_bootstrap": 0, "page_size": 10, "plots": [], "policy": ""},
            "latents": [{"layer": 1, "latent": 0, "rank": 1, "mean": 0.5, "lo": 0.1, "hi": 0.9, "t": 2.0,
                         "sign_consistency": 1.0, "selection_frequency": 1.0, "activation_frequency": 0.5, "ranks": {},
                         "selected": True, "neuronpedia": "", "detail": True}],
            "details": {"1:0": {"contexts": [{"source": "trajectory p/s0", "tokens": list(range(6)), "strings": nasty,
                                              "activations": [0, 1, 2, 3, 4, 5], "max": 5, "max_index": 5}],
                                "logits": {"promoted": [[1, "<u>", 0.5]], "suppressed": [[2, "&", -0.5]]},
                                "histogram": {"edges": [0, 1], "counts": [3]},
                                "ipg_tokens": {"correct": [], "incorrect": []}, "steering": []}},
            "trajectories": [{"id": "p/s0", "correct": True, "reward": 1.0, "prompt_length": 2, "strings": nasty,
                              "total": [0.1, -0.2, 0.3, 0, 0.1, 0.2], "top": [[]] * 6}]}
    page = tmp_path / "index.html"
    page.write_text(render(data), encoding="utf-8")
    if not _browser_or_skip():
        return
    dom = rendered_dom(page)
    assert 'data-ready="1"' in dom and "data-error" not in dom
    assert "<b>bold</b>" not in dom and "&lt;b&gt;bold&lt;/b&gt;" in dom  # shown, not interpreted
    assert "&lt;/script&gt;&lt;script&gt;" in dom and "a|b" in dom and "&lt;u&gt;" in dom and "&lt;!--" in dom
    assert "<i>run</i>" not in dom


def _browser_or_skip() -> bool:
    if find_browser():
        return True
    if os.environ.get("CI"):
        pytest.fail("no Chromium browser in CI: .ci/run installs Debian's chromium")
    pytest.skip("no Chromium browser here (apt-get install chromium); the page was written but not rendered")
    return False


def test_the_page_in_a_real_browser(run, tmp_path):
    run_dir, page = run
    if not _browser_or_skip():
        return
    data = load(run_dir)
    dom = rendered_dom(page)
    assert 'data-ready="1"' in dom and "data-error" not in dom  # the script ran to the end, no error
    body = re.search(r'<tbody id="rows">(.*?)</tbody>', dom, re.S).group(1)
    assert body.count("<tr") == min(len(data["latents"]), data["run"]["page_size"])
    panel = re.search(r'<div id="panel-body"[^>]*>(.*?)</section>', dom, re.S).group(1)
    assert panel.count('class="ctx"') >= 1 and "Direct logit effect" in panel and "ipg-tokens" in panel
    assert re.search(r'<div id="traj-tokens" class="tokens">.*class="tok', dom, re.S)
    # the answer first: the target against the random sets, in the header
    verdict = re.search(r'<div id="verdict">(.*?)</div>', dom, re.S).group(1)
    assert "`ipg` (3 latents) minus the mean of 1 random sets" in verdict and "gamma 0:" in verdict
    assert "random sets, same gamma" in panel and "not this latent alone" in panel
    # tokens such as <|im_end|> are drawn as typed: no font ligature turns "<|" into another glyph
    assert "font-variant-ligatures:none" in page.read_text()
    png = screenshot(page, tmp_path / "explorer.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    json.dumps(data)  # the data round-trips as JSON


def test_a_65k_latent_sae_pages_its_summary_rows(tmp_path):
    """Summary rows for every latent, shown a page at a time: a 65,536-latent SAE still renders."""
    n = 65_536
    rows = [{"layer": 12, "latent": i, "rank": i + 1, "mean": 1.0 / (i + 1), "lo": 0.0, "hi": 2.0, "t": 1.0,
             "sign_consistency": 1.0, "selection_frequency": 0.0, "activation_frequency": 0.01, "ranks": {"act": i + 1},
             "selected": i < 8, "neuronpedia": "", "detail": False} for i in range(n)]
    data = {"run": {"name": "big", "method": "ipg", "model": "m", "saes": [], "summary": {},
                    "selected": [[12, i] for i in range(8)], "n_bootstrap": 0, "page_size": 200, "plots": [],
                    "policy": ""}, "latents": rows, "details": {}, "trajectories": []}
    page = tmp_path / "index.html"
    page.write_text(render(data), encoding="utf-8")
    assert page.stat().st_size < 20_000_000
    if not _browser_or_skip():
        return
    dom = rendered_dom(page)
    assert 'data-ready="1"' in dom and "data-error" not in dom
    body = re.search(r'<tbody id="rows">(.*?)</tbody>', dom, re.S).group(1)
    assert body.count("<tr") == 200 and "page 1 of 328" in dom


# ---- what a researcher reads must be right (issue 22) ------------------------------------------------


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, tiny_llama_dir):
    """An attribution made through the Python API (no token maps), on prompts of which only some have reward
    variance, saved into a run directory with its trajectories."""
    from ipg_sae.attribution import attribute
    from ipg_sae.trajectories import save_trajectories
    from tests import tiny

    model, tok, trajs = tiny.sample_tiny(tiny_llama_dir, n_problems=4, n_samples=4, max_new_tokens=8)
    first = trajs[0].prompt_id  # only the first prompt keeps its varying reward
    trajs = [t if t.prompt_id == first else type(t)(**{**t.__dict__, "reward": 1.0}) for t in trajs]
    run_dir = tmp_path_factory.mktemp("api") / "run"
    save_trajectories(run_dir / "trajectories.jsonl", trajs)
    sae = tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3)
    result = attribute(model, {2: sae}, trajs, n_steps=2, tokenizer=tok, out_dir=run_dir, n_contexts=12,
                       progress=False)
    page = build(run_dir, model=model, tokenizer=tok, saes={2: result and sae}, trajectories=trajs,
                 cfg=ExplorerConfig(detail=64, n_contexts=12, held_out=0, page_size=25))
    return run_dir, page, trajs


def test_explorer_contexts_are_the_attributions_own_list(api_run):
    """The page's trajectory contexts are exactly AttributionResult.contexts (the list features.csv shows),
    including trajectories of prompts that were never attributed (no token map, no reward variance)."""
    from ipg_sae.attribution import AttributionResult

    run_dir, _, trajs = api_run
    result = AttributionResult.load(run_dir)
    assert result.prompt("skipped").any() and not result.prompt("skipped").all()
    data = load(run_dir)
    skipped_prompts = {pid for pid, s in zip(result.prompt_ids, result.prompt("skipped").tolist()) if s}
    by_id = {t.id: t for t in trajs}
    checked = from_skipped = 0
    for key, detail in data["details"].items():
        layer, latent = map(int, key.split(":"))
        value, traj, pos = (x[latent] for x in result.contexts[layer])
        want = sorted([(result.traj_ids[t], p, round(v, 4)) for v, t, p in zip(value.tolist(), traj.tolist(),
                                                                              pos.tolist()) if v >= 0 and t >= 0],
                      key=lambda c: -c[2])[:12]
        got = [(c["trajectory"], c["position"], c["max"]) for c in detail["contexts"] if "trajectory" in c]
        assert got == want, key
        for c in detail["contexts"]:
            if "trajectory" in c:  # the shading is the latent's real activation: the recorded one at its token
                assert c["activations"][c["max_index"]] == pytest.approx(c["max"], rel=1e-3, abs=1e-3)
        checked += len(got)
        from_skipped += sum(by_id[t].prompt_id in skipped_prompts for t, _, _ in got)
    assert checked and from_skipped  # contexts from prompts that were never attributed are there too


def test_a_result_without_token_maps_says_so(api_run):
    run_dir, page, _ = api_run
    data = load(run_dir)
    assert data["trajectories"] == [] and data["run"]["notes"] and "token_maps" in data["run"]["notes"][0]
    assert any(d["contexts"] for d in data["details"].values())  # contexts do not need token maps
    if not _browser_or_skip():
        return
    dom = rendered_dom(page)
    assert 'data-ready="1"' in dom and "data-error" not in dom and "has no token maps" in dom


def test_statistics_count_attributed_prompts_only(api_run, tiny_tokenizer):
    """Sign consistency over the attributed prompts: a prompt that was never attributed is no evidence."""
    from ipg_sae.attribution import AttributionResult
    from ipg_sae.selection import attributed_prompts, feature_table, latent_stats, per_prompt

    run_dir, _, trajs = api_run
    result = AttributionResult.load(run_dir)
    attributed = attributed_prompts(result)
    assert 0 < len(attributed) < result.n_prompts
    values = per_prompt(result)[2][attributed]
    stats = latent_stats(result)[2]
    mean = values.mean(0)
    want = (torch.sign(values) == torch.sign(mean)[None]).double().mean(0)
    assert torch.allclose(stats["sign_consistency"], want) and torch.allclose(stats["mean"], mean)
    top = int(torch.argmax(mean))
    assert float(stats["sign_consistency"][top]) == 1.0  # one attributed prompt: never a coin flip
    assert {r["n_prompts"] for r in feature_table(result, tiny_tokenizer, trajs, k=3)} == {len(attributed)}
    data = load(run_dir)
    assert data["run"]["n_attributed"] == len(attributed) and data["run"]["n_prompts"] == result.n_prompts
    row = next(r for r in data["latents"] if (r["layer"], r["latent"]) == (2, top))
    assert row["sign_consistency"] == pytest.approx(1.0)


def test_every_latent_has_a_panel_a_permalink_and_neighbours(api_run):
    run_dir, page, _ = api_run
    data = load(run_dir)
    compact = [r for r in data["latents"] if not r["detail"] and r.get("ctx")]
    assert all(len(r["near"]) == 5 and all(-1 <= c <= 1 for _, _, c in r["near"]) for r in data["latents"]
               if "near" in r)
    assert all(r["logits"]["promoted"] for r in data["latents"] if "logits" in r)
    exported = json.loads((run_dir / "explorer" / "dashboard" / "layer_2.json").read_text())
    feature = exported["features"][0]
    assert {"feature_index", "activations", "pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero",
            "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "topkCosSimIndices"} <= set(feature)
    assert len(feature["freq_hist_data_bar_heights"]) == len(feature["freq_hist_data_bar_values"])
    if not _browser_or_skip():
        return
    target = compact[0] if compact else data["latents"][-1]
    key = f"{target['layer']}:{target['latent']}"
    dom = rendered_dom(page, fragment=f"#L{key}")
    assert 'data-ready="1"' in dom and "data-error" not in dom
    assert f'data-latent="{key}"' in dom  # the permalink opened that latent's panel
    assert "Nearest latents" in dom and "permalink" in dom
    # a link to a latent the run does not have says so, instead of keeping whatever panel was open
    dom = rendered_dom(page, fragment="#L2:99999")
    assert "No latent L2:99999 in this run" in dom and 'data-latent=""' in dom and "data-error" not in dom
    full = next(r for r in data["latents"] if r["detail"])
    dom = rendered_dom(page, fragment=f"#L{full['layer']}:{full['latent']}")
    assert "activation (non-zero values)" in dom and ">count<" in dom  # the histogram's axes are labelled
