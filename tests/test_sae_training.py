"""SAE training (:mod:`sae_training`) on tiny random models: training, outputs, resume, cache, errors.

Everything runs on the tiny Llama of ``tests/tiny.py`` with a small local text file; the
multi-process (gloo) test is marked slow.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import sae_training.activations as activations
from ipg_sae.config import dump_yaml, from_dict, load_config
from ipg_sae.errors import IPGError
from ipg_sae.models import load_model
from ipg_sae.saes import gates_for, load_sae, splice
from sae_training import TrainSAEConfig, train
from sae_training.__main__ import main as cli_main
from sae_training.data import build_rows
from tests.tiny import random_sae

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices gain nothing from threads, and on a shared machine idle-spinning
    # threads make them many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for _ in range(600):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        lines.append(json.dumps({"text": f"Tom has {a} apples and buys {b} more. How many apples does he have? "
                                         f"{a} + {b} = {a + b}. The answer is {a + b}.", "id": len(lines)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_cfg(tmp_path, model_dir, data_path, **overrides) -> TrainSAEConfig:
    data = {"name": "tiny", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model_dir)},
            "layers": [1], "k": 8, "expansion_factor": 4, "lr": 1e-3, "training_tokens": 256 * 120,
            "context_size": 32, "batch_size_tokens": 256, "lm_batch_size": 8, "chunk_sequences": 16,
            "buffer_chunks": 2, "checkpoint_every": 0, "n_eval_sequences": 8, "log_every": 10,
            "dead_feature_window": 50, "data": {"source": "text", "path": str(data_path)},
            "wandb": {"enabled": False}}
    for dotted, value in overrides.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return from_dict(TrainSAEConfig, data)


def sae_state(run_dir: Path, layer: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae" / f"layer_{layer}" / "sae_weights.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- training and outputs ---------------------------------------------------------------


def test_trains_two_layers_and_writes_loadable_saes(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    from ipg_sae.tracking import Tracker, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    artifacts = []
    original_artifact = Tracker.artifact

    def spy(self, name, type, path, **kw):
        artifacts.append((name, type, Path(path)))
        return original_artifact(self, name, type, path, **kw)

    monkeypatch.setattr(Tracker, "artifact", spy)
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, layers=[2, 1], training_tokens=256 * 300,
                   checkpoint_every=100, eval_every=150, **{"wandb.enabled": True, "wandb.mode": "offline"})
    summary = train(cfg)
    run_dir = cfg.run_dir

    assert summary["finished"] and summary["steps"] == 300
    ev = json.loads((run_dir / "sae_eval.json").read_text())
    for layer in ("1", "2"):
        m = ev["layers"][layer]
        for key in ("explained_variance", "l0", "dead_fraction", "never_fired_fraction", "ce_loss_score",
                    "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "mse"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        assert m["explained_variance"] > 0.6
        assert m["l0"] <= 8
    assert ev["throughput"]["tokens_per_second"] > 0

    # W&B: sae-lens keys per layer, the loss falls, eval metrics at the end, SAE artifacts.
    run = read_offline_run(run_dir)
    losses = [row["layer_1/losses/overall_loss"] for row in run["history"] if "layer_1/losses/overall_loss" in row]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    keys = set().union(*run["history"])
    for key in ("layer_2/losses/mse_loss", "layer_2/losses/auxiliary_reconstruction_loss",
                "layer_2/metrics/train_batch_explained_variance", "layer_2/metrics/train_batch_l0",
                "layer_2/sparsity/dead_features", "layer_1/model_performance_preservation/heldout_ce_loss_score",
                "layer_1/reconstruction_quality/heldout_explained_variance", "layer_1/sparsity/heldout_l0",
                "layer_1/sparsity/heldout_dead_fraction"):
        assert key in keys, key
    # The two explained variances have names that say which is which: sae-lens's of each training batch, and the
    # held-out evaluation's (the summary's value is sae_eval.json's); neither under the old, confusable names.
    assert not {k for k in keys if k.endswith(("metrics/explained_variance", "quality/explained_variance"))}
    assert run["summary"]["layer_2/reconstruction_quality/heldout_explained_variance"] == \
        ev["layers"]["2"]["explained_variance"]
    assert "layer_2/metrics/train_batch_explained_variance" in run["summary"]
    ce_steps = [row["_step"] for row in run["history"]
                if "layer_1/model_performance_preservation/heldout_ce_loss_score" in row]
    assert ce_steps == [150, 300]  # during training (eval_every) and at the end
    # named after where they lie (runs/tiny/sae/layer_<L>), as the jobs that use them name them too
    assert sorted((n, t) for n, t, _ in artifacts) == [("tiny-sae-layer_1", "model"), ("tiny-sae-layer_2", "model")]
    made = {a["name"]: a["metadata"] for a in run["made"]}  # what the artifact page shows beside the files
    assert made["tiny-sae-layer_1"]["layer"] == 1 and made["tiny-sae-layer_1"]["d_sae"] == 4 * 64
    assert made["tiny-sae-layer_2"]["heldout_explained_variance"] == ev["layers"]["2"]["explained_variance"]

    # The saved SAEs: sae-lens format, with the HF hook name, loadable both ways, exact splice.
    from sae_lens import SAE

    model, _ = load_model(str(tiny_llama_dir))
    for layer in (1, 2):
        sae_dir = run_dir / "sae" / f"layer_{layer}"
        assert {"cfg.json", "sae_weights.safetensors"} <= {p.name for p in sae_dir.iterdir()}
        sae = SAE.load_from_disk(str(sae_dir))
        assert sae.cfg.architecture() == "topk" and sae.cfg.k == 8 and sae.cfg.d_sae == 256
        assert sae.cfg.metadata.hook_name == f"model.layers.{layer}"
        assert sae.cfg.metadata.model_name == str(tiny_llama_dir)
        assert sae.cfg.metadata.context_size == 32
        assert sae.cfg.normalize_activations == "none"  # the training-time scaling is folded in
        ours = load_sae(str(sae_dir), model)
        assert ours.ipg_layer == layer
    saes = {layer: load_sae(str(run_dir / "sae" / f"layer_{layer}"), model) for layer in (1, 2)}
    ids = torch.randint(4, 300, (2, 12))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with splice(model, saes, gates_for(saes, 1.0)):
            spliced = model(input_ids=ids).logits
    assert torch.allclose(spliced, clean, rtol=1e-5, atol=1e-5 * clean.abs().max().item())

    # Only the final checkpoint is kept; the config is recorded.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000300"]
    assert yaml.safe_load((run_dir / "train_sae_config.yaml").read_text())["layers"] == [2, 1]


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "batchtopk"])
def test_other_architectures_train_and_load(tmp_path, tiny_llama_dir, text_file, arch):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, architecture=arch, training_tokens=256 * 40,
                   l1_coefficient=0.5, l0_coefficient=0.1)
    summary = train(cfg)
    saved_arch = json.loads((cfg.run_dir / "sae" / "layer_1" / "cfg.json").read_text())["architecture"]
    assert saved_arch == ("jumprelu" if arch == "batchtopk" else arch)
    model, _ = load_model(str(tiny_llama_dir))
    load_sae(str(cfg.run_dir / "sae" / "layer_1"), model)
    assert summary["layers"]["1"]["explained_variance"] > 0


def test_wandb_failure_keeps_local_outputs(tmp_path, tiny_llama_dir, text_file, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, training_tokens=256 * 20,
                   **{"wandb.enabled": True, "wandb.mode": "offline"})
    train(cfg)
    assert (cfg.run_dir / "sae_eval.json").is_file() and (cfg.run_dir / "sae" / "layer_1" / "cfg.json").is_file()
    assert "W&B logging failed" in caplog.text


def test_cli_trains_and_reports(tmp_path, tiny_llama_dir, text_file, capsys):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file)
    config = tmp_path / "sae.yaml"
    config.write_text(dump_yaml(cfg))
    code = cli_main([str(config), "--training_tokens", "5120", "--name", "cli", "--no-wandb"])
    out = capsys.readouterr().out
    assert code == 0 and "layer 1: explained variance" in out
    assert (tmp_path / "runs" / "cli" / "sae_eval.json").is_file()
    assert not (tmp_path / "runs" / "cli" / "wandb").exists()
    code = cli_main([str(config), "--training_tokens", "10", "--no-wandb"])
    assert code == 2 and "smaller than one batch" in capsys.readouterr().err


# ---- resume ---------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, n_batches: int) -> None:
    """Make the run die (like a kill) after ``n_batches`` training batches."""
    original = activations.ActivationStream.batches

    def batches(self, start_step=0):
        for i, batch in enumerate(original(self, start_step)):
            if i == n_batches:
                raise _Killed
            yield batch

    monkeypatch.setattr(activations.ActivationStream, "batches", batches)


def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    reference_cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, name="straight", layers=[1, 2],
                             checkpoint_every=40)
    straight = train(reference_cfg)

    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, name="killed", layers=[1, 2], checkpoint_every=40)
    with monkeypatch.context() as m:
        _kill_after(m, 95)  # dies at step 96: the last checkpoint is step 80
        with pytest.raises(_Killed):
            train(cfg)
    assert [p.name for p in (cfg.run_dir / "checkpoints").iterdir()] == ["step_00000080"]
    assert not (cfg.run_dir / "sae").exists()
    resumed = train(cfg)  # the same command again
    assert resumed["resumed_from_step"] == 80 and resumed["steps"] == straight["steps"] == 120
    for layer in (1, 2):
        assert_same_weights(sae_state(cfg.run_dir, layer), sae_state(reference_cfg.run_dir, layer))
    assert resumed["layers"] == straight["layers"]


def test_max_steps_stops_and_rerun_finishes(tmp_path, tiny_llama_dir, text_file):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, max_steps=50, checkpoint_every=25)
    first = train(cfg)
    assert not first["finished"] and first["step"] == 50
    assert [p.name for p in (cfg.run_dir / "checkpoints").iterdir()] == ["step_00000050"]
    cfg.max_steps = None
    second = train(cfg)
    assert second["finished"] and second["resumed_from_step"] == 50 and second["steps"] == 120
    other = make_cfg(tmp_path, tiny_llama_dir, text_file, name="straight")
    train(other)
    assert_same_weights(sae_state(cfg.run_dir, 1), sae_state(other.run_dir, 1))


def test_kill_during_final_evaluation_resumes_without_retraining(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    import sae_training.trainer as trainer_module

    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file)
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "evaluate", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            train(cfg)
    weights = sae_state(cfg.run_dir, 1)
    summary = train(cfg)
    assert summary["resumed_from_step"] == summary["steps"] == 120
    assert_same_weights(sae_state(cfg.run_dir, 1), weights)


# ---- activation cache ---------------------------------------------------------------------


def test_activation_cache_is_reused_across_epochs_and_runs(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    calls = []
    original = activations.capture_residuals

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(activations, "capture_residuals", counting)
    # ~3 epochs over 100 documents.
    common = dict(cache_activations=True, cache_dir=str(tmp_path / "cache"), **{"data.max_documents": 100})
    first_cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, name="first", **common)
    first = train(first_cfg)
    rows = build_rows(first_cfg, load_model(str(tiny_llama_dir))[1])
    n_train_rows = len(rows) - first_cfg.n_eval_sequences
    assert first["steps"] * 256 > 2 * (n_train_rows * 31)  # really more than two epochs
    # Each training row ran through the LM at most once (rows of a block too small for a batch never do).
    assert 0.8 * n_train_rows * 32 <= first["throughput"]["lm_tokens"] <= n_train_rows * 32
    assert len(calls) <= -(-n_train_rows // 8)

    calls.clear()
    second_cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, name="second", **common)
    second = train(second_cfg)
    assert calls == [] and second["throughput"]["lm_tokens"] == 0
    assert_same_weights(sae_state(first_cfg.run_dir, 1), sae_state(second_cfg.run_dir, 1))

    # Without the cache the weights are the same too: the cache changes nothing but speed.
    third_cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, name="third", **{"data.max_documents": 100})
    train(third_cfg)
    assert_same_weights(sae_state(first_cfg.run_dir, 1), sae_state(third_cfg.run_dir, 1))


class _StubSource:
    """Chunks of given activations, standing in for the LM."""

    def __init__(self, chunks):
        self.chunks, self.layers, self.n_chunks = chunks, [0], len(chunks)

    def chunk_valid(self, i):
        return self.chunks[i].shape[0]

    def chunk(self, i):
        return {0: self.chunks[i]}


def test_attention_sink_outliers_are_dropped_from_batches():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(64, 8, generator=gen) for _ in range(4)]
    chunks[1][5] *= 500.0  # an attention-sink-like residual
    stream = activations.ActivationStream(_StubSource(chunks), batch_size=32, buffer_chunks=2, seed=0,
                                          max_norm_ratio=10.0)
    batches = [next(it)[0] for it in [stream.batches(0)] for _ in range(8)]
    assert stream.dropped == 1
    assert sorted(b.shape[0] for b in batches) == [31] + [32] * 7
    assert max(b.norm(dim=-1).max().item() for b in batches) < 100
    keep_all = activations.ActivationStream(_StubSource(chunks), 32, 2, 0, max_norm_ratio=0.0)
    assert all(next(keep_all.batches(s))[0].shape[0] == 32 for s in range(8)) and keep_all.dropped == 0
    # The batch of a step does not depend on where the stream started (exact resume).
    for step in (0, 3, 5, 7):
        assert torch.equal(next(stream.batches(step))[0], batches[step])


def test_evaluation_leaves_outliers_alone():
    from sae_training.evaluate import _skip_outliers

    x = torch.randn(20, 8)
    x[3] *= 1000
    out = _skip_outliers(torch.zeros_like, 10.0)(x)
    assert torch.equal(out[3], x[3]) and out[torch.arange(20) != 3].abs().sum() == 0


# ---- data sources -----------------------------------------------------------------------------


def test_padding_is_trimmed_per_lm_batch(tmp_path, tiny_llama_dir, text_file, tiny_tokenizer, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, context_size=256, **{"data.pack": False})
    rows = build_rows(cfg, tiny_tokenizer)[:16]
    widths = []
    original = activations.capture_residuals
    monkeypatch.setattr(activations, "capture_residuals",
                        lambda m, ids, att, layers: widths.append(ids.shape[1]) or original(m, ids, att, layers))
    model, _ = load_model(str(tiny_llama_dir))
    acts = activations.compute_residuals(model, rows, [1], 8, torch.float32)
    assert acts[1].shape[0] == rows.n_valid()
    assert max(widths) == int(rows.attention.sum(1).max()) < 256


def test_unpacked_rows_mask_first_and_padding(tmp_path, tiny_llama_dir, text_file, tiny_tokenizer):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, context_size=64, **{"data.pack": False})
    rows = build_rows(cfg, tiny_tokenizer)
    assert rows.tokens.shape[1] == 64
    lengths = rows.attention.sum(1)
    assert (lengths < 64).all()  # each short document is one padded row
    assert not rows.mask[:, 0].any()
    assert torch.equal(rows.mask.sum(1), lengths - 1)
    assert not (rows.mask & ~rows.attention.bool()).any()


def test_packed_rows_skip_only_the_first_position(tmp_path, tiny_llama_dir, text_file, tiny_tokenizer):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file)
    rows = build_rows(cfg, tiny_tokenizer)
    assert rows.attention.all() and not rows.mask[:, 0].any() and rows.mask[:, 1:].all()
    assert (rows.tokens[:, 0] == tiny_tokenizer.bos_token_id).all()  # every row starts like a sequence
    eos = tiny_tokenizer.eos_token_id
    assert (rows.tokens == eos).any()  # documents are separated by EOS
    assert torch.equal(build_rows(cfg, tiny_tokenizer).tokens, rows.tokens)  # deterministic


def test_task_source_uses_prompts_and_solutions(tmp_path, tiny_llama_dir, tiny_tokenizer):
    cfg = make_cfg(tmp_path, tiny_llama_dir, "unused", context_size=512, training_tokens=10**6,
                   data={"source": "task", "task": {"name": "arithmetic", "n_problems": 20}, "task_levels": [1, 2],
                         "pack": False})
    rows = build_rows(cfg, tiny_tokenizer)
    text = tiny_tokenizer.decode(rows.tokens[0][rows.attention[0].bool()])
    assert "<|im_start|>assistant" in text and "The answer is" in text
    assert len(rows) == 40  # 20 problems of each level (the budget needs them all)


def test_txt_file_and_trajectory_sources(tmp_path, tiny_llama_dir, tiny_tokenizer):
    from ipg_sae.trajectories import Trajectory, save_trajectories

    txt = tmp_path / "lines.txt"
    txt.write_text("\n".join(f"Sara had {i} pencils and gave away 4." for i in range(300)))
    rows = build_rows(make_cfg(tmp_path, tiny_llama_dir, txt), tiny_tokenizer)
    assert len(rows) > 50

    trajs = [Trajectory(id=f"t{i}", prompt_id=f"p{i}", sample_index=0, prompt="q", completion="a", reference="1",
                        prompt_ids=list(range(10, 30)), completion_ids=[40 + i, 41, 42, 2], reward=1.0)
             for i in range(50)]
    path = tmp_path / "trajectories.jsonl"
    save_trajectories(path, trajs)
    cfg = make_cfg(tmp_path, tiny_llama_dir, "unused", context_size=32, training_tokens=512,
                   data={"source": "trajectories", "path": str(path), "pack": False})
    rows = build_rows(cfg, tiny_tokenizer)
    first = rows.tokens[rows.tokens[:, 20].argsort()][0]  # rows are shuffled; find trajectory 0
    assert first[:24].tolist() == list(range(10, 30)) + [40, 41, 42, 2]
    assert rows.mask.sum(1).eq(23).all()


# ---- bad input --------------------------------------------------------------------------------


def test_layer_out_of_range(tmp_path, tiny_llama_dir, text_file):
    with pytest.raises(IPGError, match=r"layer 7 is out of range: the model has 4 decoder layers"):
        train(make_cfg(tmp_path, tiny_llama_dir, text_file, layers=[1, 7]))


def test_pretrained_sae_of_other_width(tmp_path, tiny_llama_dir, text_file):
    random_sae("topk", 32, 1).save_model(tmp_path / "other")
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, from_pretrained_path=str(tmp_path / "other"))
    with pytest.raises(IPGError, match=r"d_in 32 but the model's hidden size is 64"):
        train(cfg)


def test_fine_tunes_from_pretrained_sae(tmp_path, tiny_llama_dir, text_file):
    first = make_cfg(tmp_path, tiny_llama_dir, text_file, name="first", training_tokens=256 * 20)
    train(first)
    second = make_cfg(tmp_path, tiny_llama_dir, text_file, name="second", training_tokens=256 * 20,
                      from_pretrained_path=str(first.run_dir / "sae"))
    summary = train(second)
    assert summary["finished"]


def test_dataset_without_text_field_names_fields(tmp_path, tiny_llama_dir):
    path = tmp_path / "d.jsonl"
    path.write_text('{"content": "a b c", "meta": 1}\n' * 10)
    with pytest.raises(IPGError, match=r"no field 'text' \(its fields are \['content', 'meta'\]\)"):
        train(make_cfg(tmp_path, tiny_llama_dir, path))


@pytest.mark.parametrize("name,content,match", [
    ("missing.jsonl", None, r"data.path '.*missing.jsonl' does not exist or is not a file; give a local"),
    ("d.xml", "<a/>", r"data.path '.*d.xml' has an unsupported extension; use one of \[.*'.txt'\]"),
    ("blank.jsonl", "  \n", r"blank.jsonl has no rows; point data.path at a file with at least one document"),
    ("bad.jsonl", "{not json\n", r"could not read data.path '.*bad.jsonl' as json .*fix the file"),
])
def test_bad_data_file_names_data_path(tmp_path, tiny_llama_dir, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(IPGError, match=match):
        train(make_cfg(tmp_path, tiny_llama_dir, path))


def test_budget_smaller_than_one_batch(tmp_path, tiny_llama_dir, text_file):
    with pytest.raises(IPGError, match=r"training_tokens \(100\) is smaller than one batch"):
        make_cfg(tmp_path, tiny_llama_dir, text_file, training_tokens=100)
    config = tmp_path / "c.yaml"
    config.write_text("training_tokens: 1000\nbatch_size_tokens: 4096\n")
    with pytest.raises(IPGError, match="smaller than one batch"):
        load_config(TrainSAEConfig, config)


def test_k_wider_than_sae(tmp_path, tiny_llama_dir, text_file):
    with pytest.raises(IPGError, match=r"k=999 exceeds the SAE width 256"):
        train(make_cfg(tmp_path, tiny_llama_dir, text_file, k=999))


def test_too_little_data(tmp_path, tiny_llama_dir, text_file):
    with pytest.raises(IPGError, match=r"only \d+ rows of tokens but n_eval_sequences is 5000"):
        train(make_cfg(tmp_path, tiny_llama_dir, text_file, n_eval_sequences=5000))


def test_corrupt_checkpoint_names_file(tmp_path, tiny_llama_dir, text_file):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, max_steps=20)
    train(cfg)
    cfg.max_steps = None
    state = cfg.run_dir / "checkpoints" / "step_00000020" / "layer_1" / "trainer_state.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(IPGError, match=r"trainer_state\.pt is missing or corrupt .*delete .*checkpoints"):
        train(cfg)
    (cfg.run_dir / "checkpoints" / "step_00000020" / "state.json").write_text("{")
    with pytest.raises(IPGError, match=r"state\.json is missing or corrupt"):
        train(cfg)


def test_resume_with_changed_config_is_refused(tmp_path, tiny_llama_dir, text_file):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, max_steps=20)
    train(cfg)
    changed = make_cfg(tmp_path, tiny_llama_dir, text_file, k=4)
    with pytest.raises(IPGError, match=r"written with k=8 but the config now says k=4"):
        train(changed)


def test_finished_run_is_never_overwritten(tmp_path, tiny_llama_dir, text_file):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, training_tokens=256 * 20)
    train(cfg)
    before = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
    with pytest.raises(IPGError, match="already finished"):
        train(cfg)
    assert {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()} == before


# ---- multi-process --------------------------------------------------------------------------


_DDP_CHECK = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from sae_training import distributed
from sae_training.config import TrainSAEConfig
from sae_training.saes import build_trainers
from ipg_sae.models import load_model
d = distributed.setup("cpu")
model, _ = load_model({model!r})
cfg = TrainSAEConfig(layers=[1], k=8, training_tokens=4096, batch_size_tokens=256, normalize_activations=False)
trainer = build_trainers(cfg, model, [1], 128, "cpu")[1]
distributed.wrap_ddp(trainer.sae, d)
torch.manual_seed(100 + d.rank)  # different data on each process
before = torch.cat([p.detach().flatten() for p in trainer.sae.parameters()])
trainer.step(torch.randn(128, 64))
flat = torch.cat([p.detach().flatten() for p in trainer.sae.parameters()])
gathered = [torch.empty_like(flat) for _ in range(d.world_size)]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), "parameters differ across processes"
assert not torch.equal(flat, before), "the step changed nothing"
open(os.path.join({out!r}, f"equal_{{d.rank}}"), "w").close()
distributed.shutdown(d)
"""


def _torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # A session of its own, so a timeout can end the launcher and both workers together.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_ddp_averages_gradients(tmp_path, tiny_llama_dir):
    script = tmp_path / "check.py"
    script.write_text(_DDP_CHECK.format(repo=str(REPO), model=str(tiny_llama_dir), out=str(tmp_path)))
    proc = _torchrun([str(script)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "equal_0").exists() and (tmp_path / "equal_1").exists()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_llama_dir, text_file):
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file, name="one", training_tokens=256 * 200, checkpoint_every=50)
    single = train(cfg)
    config = tmp_path / "two.yaml"
    cfg.name = "two"
    config.write_text(dump_yaml(cfg))
    proc = _torchrun(["-m", "sae_training", str(config), "--no-wandb"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "runs" / "two" / "sae_eval.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == single["steps"]
    ev1, ev2 = single["layers"]["1"]["explained_variance"], two["layers"]["1"]["explained_variance"]
    assert ev2 > 0.6 and abs(ev1 - ev2) < 0.1, (ev1, ev2)
    # Each process kept its own firing statistics in the checkpoint.
    final = tmp_path / "runs" / "two" / "checkpoints" / "step_00000200"
    assert (final / "layer_1" / "trainer_state.pt").is_file()
    assert (final / "rank_1" / "layer_1" / "trainer_state.pt").is_file()
    load_sae(str(tmp_path / "runs" / "two" / "sae" / "layer_1"), load_model(str(tiny_llama_dir))[0])


def test_cfg_json_says_which_weights_a_gguf_model_had(tmp_path, tiny_llama_dir, text_file):
    """The offline default model is a dequantized Q4_1 GGUF, not the hub checkpoint its cfg.json names for other
    tools: the saved cfg.json says so, for a sae-lens user who would boot the hub model."""
    import dataclasses

    from ipg_sae.models import load_model
    from sae_training.saes import build_sae

    model, _ = load_model(str(tiny_llama_dir))
    cfg = make_cfg(tmp_path, tiny_llama_dir, text_file)
    gguf = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="smollm2-135m-instruct"))
    sae = build_sae(gguf, model, layer=1, device="cpu")
    sae.save_inference_model(str(tmp_path / "sae"))
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1.gguf" in meta["model_weights_source"] and "dequantized" in meta["model_weights_source"]
    plain = build_sae(cfg, model, layer=1, device="cpu")  # a local HF directory: its own weights, nothing to say
    assert plain.cfg.metadata.model_weights_source is None


@pytest.mark.parametrize("kind,context_size", [("llama", 4096), ("gpt2", 1024)])
def test_context_size_longer_than_the_models_positions_is_one_line_before_any_work(
        tmp_path, tiny_tokenizer, kind, context_size, text_file, monkeypatch):
    """Issue 36, item 6: 4096 on a 512-position RoPE model trained silently; 1024 on GPT-2 was an IndexError."""
    import sae_training.trainer as trainer
    from tests import tiny

    model_dir = tmp_path / kind
    tiny.build_model(kind, model_dir, vocab_size=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model_dir)
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = make_cfg(tmp_path, model_dir, text_file, context_size=context_size)
    with pytest.raises(IPGError, match=rf"^context_size {context_size} is longer than the 512 positions model "
                                       rf".*; lower context_size to at most 512$"):
        train(cfg)
    assert not cfg.run_dir.exists()
