import os

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


@pytest.fixture
def stage_reads_declared(monkeypatch, tmp_path_factory):
    """While an experiment's stages run, record every file they open (Python ``open``, safetensors) and, at the
    end, fail if a stage opened a file made by the test (the model, an SAE, an origin or problems file) that is
    neither under the run directory, nor declared by the stage or one before it, nor an output of one before it:
    every outside file an experiment reads is in the key of the stage that reads it."""
    import builtins
    import contextlib
    import io
    from pathlib import Path

    import safetensors
    import safetensors.torch

    from ipg_sae import stages

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
