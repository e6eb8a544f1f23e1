"""Selection statistics, top-k, normalisation, bootstrap stability, the feature table and W&B."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from ipg_sae.attribution import AttributionResult, attribute
from ipg_sae.errors import IPGError
from ipg_sae.selection import (
    TABLE_COLUMNS,
    bootstrap_stability,
    feature_table,
    latent_stats,
    log_to_wandb,
    per_prompt,
    read_feature_table,
    select,
    write_feature_table,
)
from ipg_sae.trajectories import Trajectory


def from_traj_rows(rows: dict[int, torch.Tensor], traj_prompt: list[int], n_generated: list[int] | None = None,
                   method: str = "ipg", active: dict[int, torch.Tensor] | None = None,
                   score: dict[int, torch.Tensor] | None = None) -> AttributionResult:
    """A result built by hand from dense per-trajectory rows ``[M, d]`` (per prompt: their mean)."""
    prompt = torch.tensor(traj_prompt)
    N, M = int(prompt.max()) + 1, len(traj_prompt)
    counts = torch.bincount(prompt, minlength=N).double()
    t = {"prompt.n_scope": torch.full((N,), 10), "prompt.skipped": torch.zeros(N, dtype=torch.bool),
         "traj.prompt": prompt, "traj.n_generated": torch.tensor(n_generated or [1] * M),
         "traj.logp1": torch.zeros(M, dtype=torch.float64), "traj.logp0": torch.zeros(M, dtype=torch.float64),
         "traj.advantage": torch.zeros(M, dtype=torch.float64)}
    for layer, r in rows.items():
        r = r.float()
        per = torch.zeros(N, r.shape[1], dtype=torch.float64).index_add_(0, prompt, r.double()) / counts[:, None]
        if method in ("ipg", "grad_x_act", "ig_likelihood", "act"):
            t[f"L{layer}.attribution"] = per.float()
        t[f"L{layer}.active"] = (per != 0) if active is None else active[layer]
        t[f"L{layer}.activation"] = per.abs().float()
        t[f"L{layer}.score"] = per.mean(0) if score is None else score[layer]
        nz = [row.nonzero().squeeze(1) for row in r]
        t[f"L{layer}.traj.indptr"] = torch.tensor([0] + np.cumsum([len(i) for i in nz]).tolist())
        t[f"L{layer}.traj.indices"] = torch.cat(nz)
        t[f"L{layer}.traj.values"] = torch.cat([row[i] for row, i in zip(r, nz)])
        t[f"L{layer}.traj.sum"] = r.double().sum(1)
        t[f"L{layer}.traj.error"] = torch.zeros(M, dtype=torch.float64)
        d = r.shape[1]
        t[f"L{layer}.ctx.value"] = torch.full((d, 2), -1.0)
        t[f"L{layer}.ctx.traj"] = torch.full((d, 2), -1)
        t[f"L{layer}.ctx.pos"] = torch.full((d, 2), -1)
    layers = sorted(rows)
    return AttributionResult(method, layers, {layer: rows[layer].shape[1] for layer in layers},
                             [f"p{i}" for i in range(N)], [f"p{int(p)}/s{j}" for j, p in enumerate(prompt)], t,
                             {"config": {}, "summary": {"n_prompts": N}})


def per_prompt_result(values: torch.Tensor, layer: int = 2, **kw) -> AttributionResult:
    """One trajectory per prompt: per-prompt values = the rows."""
    return from_traj_rows({layer: values}, list(range(values.shape[0])), **kw)


# ---- statistics ---------------------------------------------------------------------------


def test_latent_stats_by_hand():
    values = torch.tensor([[1.0, 1.0, -2.0, 0.0], [2.0, -1.0, -2.0, 0.0], [3.0, 1.0, -2.0, 0.0], [4.0, -1.0, -2.0, 0.0]])
    s = latent_stats(per_prompt_result(values))[2]
    std0 = math.sqrt(((torch.tensor([1, 2, 3, 4.0]) - 2.5) ** 2).sum().item() / 3)
    assert s["mean"].tolist() == [2.5, 0.0, -2.0, 0.0]
    assert s["mean_abs"].tolist() == [2.5, 1.0, 2.0, 0.0]
    assert math.isclose(s["std"][0], std0) and math.isclose(s["se"][0], std0 / 2)
    assert math.isclose(s["t"][0], 2.5 / (std0 / 2))
    assert s["t"][1] == 0.0 and s["t"][2] == -math.inf and s["t"][3] == 0.0
    assert s["sign_consistency"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert s["active_frac"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.equal(s["score"], values.double().mean(0))


def test_select_by_mean_t_global_and_per_layer():
    a = torch.tensor([[5.0, 1.0, 0.5], [-3.0, 1.1, 0.6], [4.0, 0.9, 0.4]])  # latent 0: big but noisy
    b = torch.tensor([[2.0, 0.0, 2.0], [2.0, 0.0, 2.0], [2.0, 0.0, 2.0]])
    r = from_traj_rows({1: torch.cat([a, torch.zeros(3, 3)]), 3: torch.cat([b, torch.zeros(3, 3)])},
                       [0, 1, 2, 0, 1, 2])
    # per-prompt values are half the rows (two trajectories per prompt, one of them zero)
    assert select(r, 3) == [(1, 0), (3, 0), (3, 2)]  # means 1, 1 (ties by layer), 1
    assert select(r, 2, by="t") == [(3, 0), (3, 2)]  # zero spread: infinite t
    assert select(r, 1, per_layer=True) == [(1, 0), (3, 0)]
    assert select(r, 10, per_layer=True) == [(1, 0), (1, 1), (1, 2), (3, 0), (3, 2)]  # inactive latent 1 of layer 3 left out
    assert len(select(r, 10, active_only=False)) == 6
    assert select(r, 2, by="mean_abs") == [(1, 0), (3, 0)]
    with pytest.raises(IPGError):
        select(r, 2, by="median")
    with pytest.raises(IPGError):
        select(r, 0)


def test_normalize_length_and_l1():
    rows = torch.tensor([[2.0, 0.0], [1.0, 3.0], [4.0, 4.0], [0.0, 0.0]])
    r = from_traj_rows({0: rows}, [0, 0, 1, 1], n_generated=[2, 1, 4, 5])
    assert torch.allclose(per_prompt(r)[0], torch.tensor([[1.5, 1.5], [2.0, 2.0]]).double())
    length = per_prompt(r, "length")[0]
    assert torch.allclose(length, torch.tensor([[(1.0 + 1.0) / 2, (0 + 3.0) / 2], [(1.0 + 0) / 2, (1.0 + 0) / 2]]).double())
    l1 = per_prompt(r, "l1")[0]
    assert torch.allclose(l1, torch.tensor([[(1 + 0.25) / 2, 0.75 / 2], [0.25, 0.25]]).double())
    assert torch.allclose(latent_stats(r, "l1")[0]["mean"], l1.mean(0))
    assert select(r, 1, normalize="length") == [(0, 1)] and select(r, 1) == [(0, 0)]
    with pytest.raises(IPGError):
        per_prompt(r, "max")


def test_bootstrap_stability_is_seeded_and_sensible():
    stable = per_prompt_result(torch.tensor([[3.0, 2.0, 1.0, 0.1]] * 6))
    assert bootstrap_stability(stable, k=2, n_boot=20)["jaccard_mean"] == 1.0
    g = torch.Generator().manual_seed(0)
    noisy = per_prompt_result(torch.randn(8, 20, generator=g))
    one = bootstrap_stability(noisy, k=5, n_boot=30, seed=1)
    two = bootstrap_stability(noisy, k=5, n_boot=30, seed=1)
    other = bootstrap_stability(noisy, k=5, n_boot=30, seed=2)
    assert one == two and one["jaccard"] != other["jaccard"]
    assert 0 < one["jaccard_mean"] < 1 and len(one["jaccard"]) == 30
    rw = per_prompt_result(torch.ones(3, 4), method="reason_words", score={2: torch.arange(4.0).double()})
    assert select(rw, 2) == [(2, 3), (2, 2)]  # the natural score
    with pytest.raises(IPGError, match="global score"):
        bootstrap_stability(rw, k=2, n_boot=3)
    with pytest.raises(IPGError, match="score"):
        select(rw, 2, by="mean")


# ---- feature table, CSV, W&B --------------------------------------------------------------


def test_feature_table_contexts_and_csv(tiny_tokenizer, tmp_path):
    text = "Tom has 3 apples and buys 5 more. 3 + 5 = 8. The answer is 8."
    ids = tiny_tokenizer(text)["input_ids"]
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    eight = next(i for i, p in enumerate(pieces) if p.strip() == "8")
    traj = Trajectory(id="p0/s0", prompt_id="p0", sample_index=0, prompt="", completion="", reference="",
                      prompt_ids=ids[:4], completion_ids=ids[4:], reward=1.0)
    r = per_prompt_result(torch.tensor([[0.5, 2.0, 0.0]]), layer=2)
    r.tensors["L2.ctx.value"][1] = torch.tensor([3.5, -1.0])
    r.tensors["L2.ctx.traj"][1] = torch.tensor([0, -1])
    r.tensors["L2.ctx.pos"][1] = torch.tensor([eight, -1])
    rows = feature_table(r, tiny_tokenizer, [traj], k=5)
    assert [(row["layer"], row["latent"], row["rank"]) for row in rows] == [(2, 1, 1), (2, 0, 2)]
    assert list(rows[0]) == list(TABLE_COLUMNS)
    assert rows[0]["mean"] == 2.0 and rows[0]["method"] == "ipg"
    assert rows[0]["contexts"].startswith("...") and "3 + 5 = [8]. The answer" in rows[0]["contexts"]
    assert "(3.5)" in rows[0]["contexts"] and rows[1]["contexts"] == ""
    path = write_feature_table(tmp_path, rows)
    assert path == tmp_path / "features.csv" and not list(tmp_path.glob(".*.tmp"))
    back = read_feature_table(tmp_path)
    assert [row["latent"] for row in back] == ["1", "0"] and back[0]["contexts"] == rows[0]["contexts"]
    with open(path, newline="") as f:
        assert next(csv.reader(f))[:10] == ["layer", "latent", "rank", "mean", "mean_abs", "std", "se", "t",
                                            "sign_consistency", "active_frac"]
    explicit = feature_table(r, tiny_tokenizer, [traj], latents=[(2, 0)])
    assert [row["latent"] for row in explicit] == [0]


class FakeRun:
    def __init__(self, fail=False):
        self.logged, self.summary, self.fail = {}, {}, fail

    def log(self, payload):
        if self.fail:
            raise RuntimeError("network down")
        self.logged.update(payload)


class FakeTracker:
    def __init__(self):
        self.calls = []

    def table(self, key, columns, rows):
        self.calls.append(("table", key, columns, rows))

    def histogram(self, key, values):
        self.calls.append(("histogram", key, values))

    def summary(self, metrics):
        self.calls.append(("summary", metrics))


def test_log_to_wandb_with_a_run_a_tracker_or_nothing():
    import wandb

    r = per_prompt_result(torch.tensor([[0.5, 2.0, 0.0], [0.1, 1.0, 0.0]]))
    rows = [{"layer": 2, "latent": 1, "rank": 1, "mean": 1.5}]
    log_to_wandb(None, rows, r)
    run = FakeRun()
    log_to_wandb(run, rows, r)
    assert isinstance(run.logged["attribution/features"], wandb.Table)
    assert isinstance(run.logged["attribution/score_hist/L2"], wandb.Histogram)
    assert run.summary["attribution/n_prompts"] == 2
    tracker = FakeTracker()
    log_to_wandb(tracker, rows, r)
    kinds = [c[0] for c in tracker.calls]
    assert kinds == ["table", "histogram", "summary"] and tracker.calls[0][2] == ["layer", "latent", "rank", "mean"]
    log_to_wandb(FakeRun(fail=True), rows, r)  # never raises


# ---- end to end ---------------------------------------------------------------------------


def test_end_to_end_on_a_tiny_model(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from ipg_sae.models import load_model
    from tests import tiny

    model, tok = load_model(str(tiny_llama_dir), dtype="float64")
    text = tok("3 + 5 = 8. Wait, so the answer is 8.")["input_ids"]
    trajs = [Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="", reference="",
                        prompt_ids=[5 + p, 6, 7], completion_ids=text[g:], reward=float(g % 2))
             for p in range(3) for g in range(3)]
    saes = {1: tiny.random_sae("topk", 64, 1, d_sae=48, k=6, seed=1)}
    results = {m: attribute(model, saes, trajs, n_steps=4, baseline=m, tokenizer=tok, progress=False)
               for m in ("ipg", "act", "reason_words", "random")}
    for name, res in results.items():
        top = select(res, 5)
        assert res.method_name == name and len(top) == 5
        score = res.score[1]
        assert [float(score[i]) for _, i in top] == sorted((float(score[i]) for _, i in top), reverse=True)
    ipg = results["ipg"]
    stats = latent_stats(ipg)[1]
    assert select(ipg, 3) == select(ipg, 3, by="mean")
    assert torch.allclose(stats["mean"], ipg.attributions[1].double().mean(0))
    rows = feature_table(ipg, tok, trajs, k=5)
    assert len(rows) == 5 and all("[" in row["contexts"] for row in rows)
    write_feature_table(tmp_path / "run", rows)
    assert (tmp_path / "run" / "features.csv").is_file()
    stab = bootstrap_stability(ipg, k=3, n_boot=10)
    assert 0 <= stab["jaccard_mean"] <= 1
    table_act = feature_table(results["act"], tok, trajs, k=3)
    assert table_act[0]["score"] >= table_act[1]["score"] >= table_act[2]["score"]


def test_neuronpedia_ids_reach_the_result_and_the_feature_table(tiny_llama_dir, tiny_tokenizer):
    """An SAE that carries a Neuronpedia id: attribution.json records it, features.csv links each latent."""
    import random

    from ipg_sae.models import load_model
    from ipg_sae.saes import prepare_sae
    from tests import tiny

    model, tok = load_model(str(tiny_llama_dir))
    sae = tiny.random_sae("topk", 64, 1, d_sae=32, k=4)
    sae.cfg.metadata.neuronpedia_id = "tiny-model/1-res"
    sae = prepare_sae(sae, model, 1)
    rng = random.Random(0)
    prompt = [rng.randint(5, 300) for _ in range(6)]
    trajs = [Trajectory(id=f"p/s{g}", prompt_id="p", sample_index=g, prompt="", completion="", reference="",
                        prompt_ids=prompt, completion_ids=[rng.randint(5, 300) for _ in range(5)], reward=float(g % 2))
             for g in range(4)]
    result = attribute(model, {1: sae}, trajs, n_steps=2, progress=False)
    assert result.meta["saes"][0]["neuronpedia_id"] == "tiny-model/1-res"
    rows = feature_table(result, tok, trajs, k=3)
    assert all(r["neuronpedia"] == f"https://www.neuronpedia.org/tiny-model/1-res/{r['latent']}" for r in rows)
    plain = attribute(model, {1: prepare_sae(tiny.random_sae("topk", 64, 1, d_sae=32, k=4), model, 1)}, trajs,
                      n_steps=2, progress=False)
    assert "neuronpedia" not in feature_table(plain, tok, trajs, k=3)[0]  # no id: no empty column
