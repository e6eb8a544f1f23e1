import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _model_dir(tmp_path_factory, tiny_tokenizer, kind):
    d = tmp_path_factory.mktemp(f"tiny-{kind}")
    tiny.build_model(kind, d, vocab_size=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer):
    """A saved tiny model directory (model + tokenizer) for each supported layout."""
    return _model_dir(tmp_path_factory, tiny_tokenizer, request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    return _model_dir(tmp_path_factory, tiny_tokenizer, "llama")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    """``model_dirs(kind)`` -> a saved tiny model of that layout, built once per test module."""
    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            d = tmp_path_factory.mktemp(f"attr-{kind}")
            tiny.build_model(kind, d, vocab_size=len(tiny_tokenizer))
            tiny_tokenizer.save_pretrained(d)
            made[kind] = d
        return made[kind]

    return get


@pytest.fixture(scope="module")
def models(model_dirs):
    """``models(kind)`` -> (float64 model, tokenizer), loaded once per kind."""
    loaded = {}

    def get(kind: str = "llama"):
        if kind not in loaded:
            from ipg_sae.models import load_model

            loaded[kind] = load_model(str(model_dirs(kind)), dtype="float64")
        return loaded[kind]

    return get


@pytest.fixture
def pipeline_cfg(tiny_llama_dir, tmp_path, monkeypatch):
    """A pipeline on the tiny llama with a random SAE at layer 2: a few seconds end to end."""
    from ipg_sae.config import load_config
    from ipg_sae.experiments.pipeline import PipelineConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    overrides = {
        "name": "p", "runs_dir": str(tmp_path / "runs"), "model.name": str(tiny_llama_dir),
        "task.n_problems": 3, "task.few_shot": 0, "sampling.n_samples": 3, "sampling.max_new_tokens": 6,
        "reward": "tests.helpers:text_length_mod_7", "sae.load": [{"path": str(sae_dir)}], "attribution.n_steps": 2,
        "baselines": ["act"], "selection.k": 2, "selection.n_bootstrap": 5, "selection.table_size": 5,
        "evaluation.gammas": [0.0, 2.0], "evaluation.seeds": [0], "evaluation.n_random_sets": 1,
        "evaluation.task.n_problems": 2, "evaluation.task.few_shot": 0, "evaluation.sampling.max_new_tokens": 6,
        "evaluation.n_bootstrap": 200,
    }
    return load_config(PipelineConfig, None, overrides)


@pytest.fixture
def study_overrides(tiny_llama_dir, tmp_path, monkeypatch):
    """A two-reward study on the tiny llama with a random SAE at layer 2, as config overrides (seconds to run)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    task = {"name": "arithmetic", "n_problems": 3, "few_shot": 0}
    overrides = {
        "name": "s", "runs_dir": str(tmp_path / "runs"), "model.name": str(tiny_llama_dir), "task": task,
        "sampling.n_samples": 3, "sampling.max_new_tokens": 6, "sae.load": [{"path": str(sae_dir)}],
        "attribution.delta_tol": 0.05, "attribution.max_nodes": 9,
        "rewards": ["tests.helpers:text_length_mod_7", "tests.helpers:text_length_is_even"],
        "methods": ["ipg", "act"],
        "heldout": {**task, "offset": 500}, "heldout_sampling.n_samples": 3, "heldout_sampling.max_new_tokens": 6,
        "k": 2, "ks": [1, 2], "null_sets": 4, "other_null_sets": 3, "curve_null_sets": 2, "confirm_samples": 2, "n_bootstrap": 200,
        "push_null_sets": 3, "policy_null_sets": 3, "permutation_sets": 5,
    }
    return overrides


@pytest.fixture
def study_cfg(study_overrides):
    from ipg_sae.config import load_config
    from ipg_sae.experiments.study import StudyConfig

    return load_config(StudyConfig, None, study_overrides)


@pytest.fixture
def bench_overrides(tiny_llama_dir, tmp_path, monkeypatch):
    """A steering benchmark on the tiny llama (every method, two transfer splits, one the user's JSONL file), as
    config overrides."""
    import json

    from ipg_sae.experiments.steering_bench import METHODS

    monkeypatch.setenv("WANDB_MODE", "offline")
    sae_dir = tmp_path / "sae"
    tiny.random_sae("topk", 64, layer=2, d_sae=64, k=8, seed=3).save_model(str(sae_dir))
    task = {"name": "arithmetic", "n_problems": 4, "few_shot": 0}
    user_file = tmp_path / "word_problems.jsonl"  # a transfer task the user points at
    user_file.write_text("".join(json.dumps({"question": f"Sam has {a} pens and buys {a + 3} more. How many now?",
                                             "answer": str(2 * a + 3)}) + "\n" for a in range(2, 6)))
    tiny_sampling = {"n_samples": 3, "max_new_tokens": 6, "temperature": 0.7, "batch_size": 12}
    overrides = {
        "name": "b", "runs_dir": str(tmp_path / "runs"), "model.name": str(tiny_llama_dir), "task": task,
        "sampling": tiny_sampling, "sae.load": [{"path": str(sae_dir)}],
        "attribution.delta_tol": 0.05, "attribution.max_nodes": 9, "reward": "tests.helpers:text_length_is_even",
        "dev": {**task, "offset": 100}, "dev_sampling": tiny_sampling, "dev_on_policy_samples": 2,
        "test": {**task, "offset": 200}, "transfer": [{**task, "level": 2, "offset": 300},
                                                   {"name": "jsonl", "path": str(user_file), "few_shot": 0}],
        "eval_sampling": {**tiny_sampling, "n_samples": 2}, "eval_seeds": [1, 2],
        "capability_task": {**task, "n_problems": 1, "offset": 900}, "capability_max_tokens": 32, "offtask_texts": 2,
        "grid": {"ks": [1, 2], "gammas": [2.0], "etas": [1.0, 4.0], "alphas": [0.1, 0.5], "projected_ks": [2],
                 "projected_alphas": [0.5], "instructions": ["Answer with a number.", "Think step by step."],
                 "shots": [0, 1], "shot_instructions": 1, "diffmean_layers": [1], "layer_alphas": [0.1, 0.5], "dev_draws": 3, "test_draws": 2, "max_settings": 4},
        "min_ess": 0.5, "n_bootstrap": 100, "test_only": ["ipg_step_shuffled"],
        "methods": [*METHODS, "diffmean_layer"],
    }
    return overrides


@pytest.fixture
def bench_cfg(bench_overrides):
    from ipg_sae.config import load_config
    from ipg_sae.experiments.steering_bench import SteeringBenchConfig

    return load_config(SteeringBenchConfig, None, bench_overrides)


@pytest.fixture
def stage_reads_declared(monkeypatch, tmp_path_factory):
    """While an experiment's stages run, record every file they open (Python ``open``, safetensors) and, at the
    end, fail if a stage opened a file made by the test (the model, an SAE, an origin or problems file) that is
    neither under the run directory, nor declared by the stage or one before it, nor an output of one before it:
    every outside file an experiment reads is in the key of the stage that reads it."""
    import builtins
    import contextlib
    import io
    import threading
    from pathlib import Path

    import safetensors
    import safetensors.torch

    from ipg_sae.experiments import stages

    root = Path(tmp_path_factory.getbasetemp()).resolve()
    undeclared: list[str] = []
    opened: list[str] = []

    @contextlib.contextmanager
    def watch(stage, cfg, allowed):
        run_dir = Path(cfg.run_dir).resolve()
        allowed = [Path(p).resolve() for p in allowed]

        def check(path):
            try:
                p = Path(path).resolve()
            except TypeError:  # a file descriptor
                return
            opened.append(str(p))
            if p.is_relative_to(root) and not p.is_relative_to(run_dir) and \
                    not any(p == a or p.is_relative_to(a) for a in allowed):
                undeclared.append(f"stage {stage} opened {p}")

        def wrap(fn):
            def opener(file, *args, **kwargs):
                mode = str(args[0] if args else kwargs.get("mode", "r"))
                # reads by the stage itself: W&B's background threads of an earlier run write where they like
                if threading.current_thread() is threading.main_thread() and not set(mode) & set("wax+"):
                    check(file)
                return fn(file, *args, **kwargs)
            return opener

        with monkeypatch.context() as m:
            m.setattr(builtins, "open", wrap(builtins.open))
            m.setattr(io, "open", wrap(io.open))
            m.setattr(safetensors, "safe_open", wrap(safetensors.safe_open))
            m.setattr(safetensors.torch, "load_file", wrap(safetensors.torch.load_file))
            yield

    monkeypatch.setattr(stages, "WATCHERS", [watch])
    yield opened
    assert not undeclared, "\n".join(dict.fromkeys(undeclared))
