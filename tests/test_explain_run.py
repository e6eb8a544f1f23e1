"""`ipg-sae explain RUN_DIR` on a tiny attribution run: files, resumability, the feature table with explanation
columns, a failing LLM endpoint that keeps what was computed, and the explorer (panel, search, dashboard export)."""

from __future__ import annotations

import csv
import json
import re

import pytest

from ipg_sae.cli import main
from ipg_sae.explanations import EXPLANATION_COLUMNS, load_explanations
from tests.browser import find_browser, rendered_dom


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir):
    """A tiny attribution run (IPG and the `act` baseline), then `ipg-sae explain` on it."""
    from ipg_sae.config import load_config
    from ipg_sae.jobs import AttributeJobConfig, SampleJobConfig, run_attribute, run_sample
    from tests import tiny

    root = tmp_path_factory.mktemp("explain")
    sae_dir = root / "sae"
    tiny.random_sae("standard", 64, layer=2, d_sae=64, seed=3).save_model(str(sae_dir))
    common = {"name": "x", "runs_dir": str(root / "runs"), "model.name": str(tiny_llama_dir), "wandb.enabled": False}
    run_sample(load_config(SampleJobConfig, None, {**common, "task.n_problems": 4, "task.few_shot": 0,
                                                   "sampling.n_samples": 3, "sampling.max_new_tokens": 12,
                                                   "reward": "length"}), progress=False)
    run_attribute(load_config(AttributeJobConfig, None, {
        **common, "sae.load": [{"path": str(sae_dir)}], "attribution.n_steps": 2, "baselines": ["act"],
        "selection.k": 3, "selection.n_bootstrap": 0, "selection.table_size": 5}), progress=False)
    out = root / "runs" / "x"
    assert main(["explain", str(out), "--no-wandb", "--top", "6", "--baseline_top", "2", "--save_every", "2",
                 "--explain.null_per_bin", "2", "--explain.n_contexts", "2"]) == 0
    return out


def test_explain_writes_every_chosen_latent_and_a_summary(run_dir):
    summary = json.loads((run_dir / "explanations" / "summary.json").read_text())
    found = load_explanations(run_dir)
    chosen = {tuple(p) for pairs in summary["groups"].values() for p in pairs}
    assert chosen and set(found) == chosen and summary["n_latents"] == len(chosen)
    assert {"ipg_top", "selected", "act_top", "ipg_top16"} <= set(summary["groups_mean"])
    assert summary["n_held_out"] and summary["n_held_out"] < summary["n_sequences"]
    firing = [e for e in found.values() if e.input.n_active]
    assert firing and all(e.vocab_proj.promoted for e in found.values())
    assert (run_dir / "explanations" / "null_L2.json").is_file()


def test_the_feature_table_carries_the_explanation_columns(run_dir):
    with open(run_dir / "explanations" / "features.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(run_dir / "features.csv", encoding="utf-8") as f:
        original = list(csv.DictReader(f))
    assert set(EXPLANATION_COLUMNS) <= set(rows[0]) and not set(EXPLANATION_COLUMNS) & set(original[0])
    assert [r["latent"] for r in rows[:len(original)]] == [r["latent"] for r in original]
    explained = {(int(r["layer"]), int(r["latent"])) for r in rows if r["vocab_proj"]}
    assert explained == set(load_explanations(run_dir))


def test_the_table_and_the_scores_go_to_wandb(run_dir, monkeypatch):
    """A rerun (everything already computed, so it only reads and logs) with W&B offline."""
    from ipg_sae.tracking import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["explain", str(run_dir), "--top", "6", "--baseline_top", "2", "--explain.null_per_bin", "2",
                 "--explain.n_contexts", "2", "--wandb.project", "t"]) == 0
    run = read_offline_run(run_dir)["runs"][-1]
    tables = [row for row in run["history"] if "explanations/features/nrows" in row]
    with open(run_dir / "explanations" / "features.csv", encoding="utf-8") as f:
        n_rows = len(list(csv.DictReader(f)))
    assert tables and tables[-1]["explanations/features/nrows"] == n_rows
    assert "explain/detection_bacc" in run["summary"] and "explain/n" in run["summary"]


def test_a_rerun_keeps_what_is_there_and_a_dead_llm_fails_in_one_line(run_dir, capsys):
    import socket

    path = run_dir / "explanations" / "L2.jsonl"
    before = path.read_text()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["explain", str(run_dir), "--no-wandb", "--top", "6", "--baseline_top", "2",
                 "--explain.null_per_bin", "2", "--explain.n_contexts", "2", "--llm_enabled", "true",
                 "--llm.base_url", f"http://127.0.0.1:{port}/v1", "--llm.timeout_s", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and any("did not answer within 2 s" in line for line in err)
    assert path.read_text() == before  # nothing recomputed, nothing lost


def test_an_llm_adds_its_explanation_and_scores_to_the_files(run_dir, monkeypatch):
    """The stand-in endpoint (tests/llm_standin.py) through the job: preflight, explainer, scorers, the LLM
    columns of the feature table; the key comes from the environment."""
    from tests.llm_standin import standin

    monkeypatch.setenv("IPG_SAE_LLM_API_KEY", "sk-env")
    with standin() as (httpd, url):
        assert main(["explain", str(run_dir), "--no-wandb", "--top", "6", "--baseline_top", "2",
                     "--explain.null_per_bin", "2", "--explain.n_contexts", "2", "--llm_enabled", "true",
                     "--llm.base_url", url, "--llm.n_score", "3"]) == 0
        assert httpd.state["requests"] > 1 and httpd.state["auth"] == "Bearer sk-env"
    found = load_explanations(run_dir)
    said = 'the token " =" in equations'
    firing = {k for k, e in found.items() if e.input.n_active}  # a latent silent on the build part is not asked
    assert firing and all(e.llm["explanation"] == (said if k in firing else "") for k, e in found.items())
    with open(run_dir / "explanations" / "features.csv", encoding="utf-8") as f:
        rows = {(int(r["layer"]), int(r["latent"])): r for r in csv.DictReader(f) if r["vocab_proj"]}
    assert all(rows[k]["llm_explanation"] == said for k in firing)


def test_the_explorer_shows_explanations_in_the_panel_search_and_dashboard(run_dir, tmp_path):
    from ipg_sae.explorer import ExplorerConfig, build, load

    page = build(run_dir, cfg=ExplorerConfig(detail=4, held_out=0, page_size=25))
    data = load(run_dir)
    rows = [r for r in data["latents"] if "explanation" in r]
    assert rows and {r["latent"] for r in rows} <= {k[1] for k in load_explanations(run_dir)}
    dashboard = json.loads((run_dir / "explorer" / "dashboard" / "layer_2.json").read_text())
    with_expl = [f for f in dashboard["features"] if f["explanations"]]
    assert with_expl and {x["typeName"] for x in with_expl[0]["explanations"]} >= {"ngram-log-odds", "vocab-proj"}
    if not find_browser():
        pytest.skip("no Chromium browser here (apt-get install chromium); the page was written but not rendered")
    target = next(r for r in rows if r["explanation"]["ngrams"])
    dom = rendered_dom(page, fragment=f"#L{target['layer']}:{target['latent']}")
    assert "data-error" not in dom and 'data-ready="1"' in dom
    panel = re.search(r'id="explanation">(.*?)</table>', dom, re.S).group(1)
    assert "VocabProj" in panel and "detection: balanced accuracy" in panel
    assert "the token \" =\" in equations" in panel.replace("&quot;", '"')  # the LLM's (the test above)
    assert json.dumps(target["explanation"]["ngrams"][0][0]).replace("&", "&amp;").replace("<", "&lt;") in panel
    # the search box finds a latent by its explanation: type its VocabProj label into it and redraw
    word = target["explanation"]["vocab_proj"]
    typed = page.read_text(encoding="utf-8").replace(
        "</body>", "<script>document.getElementById('f-text').value=" + json.dumps(word).replace("<", "\\u003c")
        + ";document.getElementById('f-text').dispatchEvent(new Event('input'));</script></body>")
    copy = tmp_path / "typed.html"
    copy.write_text(typed, encoding="utf-8")
    body = re.search(r'<tbody id="rows">(.*?)</tbody>', rendered_dom(copy), re.S).group(1)
    assert f'data-key="{target["layer"]}:{target["latent"]}"' in body
    assert body.count("<tr") < len(data["latents"])


# The parameters of sae-dashboard 0.8.0's data classes (sae_dashboard/neuronpedia/neuronpedia_dashboard.py, MIT):
# the package does not install beside the pinned stack, so the export is checked against its schema here.
SAEDASHBOARD_FEATURE = {
    "feature_index": int, "neuron_alignment_indices": list, "neuron_alignment_values": list,
    "neuron_alignment_l1": list, "correlated_neurons_indices": list, "correlated_neurons_l1": list,
    "correlated_neurons_pearson": list, "correlated_features_indices": list, "correlated_features_l1": list,
    "correlated_features_pearson": list, "neg_str": list, "neg_values": list, "pos_str": list, "pos_values": list,
    "frac_nonzero": float, "freq_hist_data_bar_values": list, "freq_hist_data_bar_heights": list,
    "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list, "n_prompts_total": int,
    "n_tokens_in_prompt": int, "dataset": str, "activations": list, "decoder_weights_dist": list, "vector": list}
SAEDASHBOARD_ACTIVATION = {"bin_min": (int, float), "bin_max": (int, float), "bin_contains": (int, float),
                           "tokens": list, "values": list, "qualifying_token_index": int, "dfa_values": list,
                           "dfa_maxValue": float, "dfa_targetIndex": int}


def test_the_dashboard_export_fits_saedashboards_schema(run_dir):
    """Every key but the documented extras is a parameter of SAEDashboard's classes, with its type; the
    explanations are Neuronpedia explanation records (description, typeName, scores)."""
    from ipg_sae.dashboard import NOT_SAEDASHBOARD
    from ipg_sae.explorer import ExplorerConfig, build

    if not (run_dir / "explorer" / "dashboard" / "layer_2.json").is_file():
        build(run_dir, cfg=ExplorerConfig(detail=4, held_out=0, page_size=25))
    doc = json.loads((run_dir / "explorer" / "dashboard" / "layer_2.json").read_text())
    assert doc["features"]
    for feature in doc["features"]:
        for key, value in feature.items():
            if key in NOT_SAEDASHBOARD:
                continue
            kind = SAEDASHBOARD_FEATURE[key]
            assert isinstance(value, kind) or (kind is float and isinstance(value, int)), key
        for act in feature["activations"]:
            assert set(act) <= set(SAEDASHBOARD_ACTIVATION)
            assert all(isinstance(v, SAEDASHBOARD_ACTIVATION[k]) for k, v in act.items())
            assert all(isinstance(t, str) for t in act["tokens"]) and len(act["tokens"]) == len(act["values"])
        for x in feature["explanations"]:
            assert isinstance(x["description"], str) and x["typeName"] and isinstance(x["scores"], list)
