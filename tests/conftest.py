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
