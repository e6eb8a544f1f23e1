"""Issue 39.2: every SAE source is checked against the model (config and tokenizer only) before the first stage
runs: a local SAE of the wrong width or layer, a published SAE that is neither cached nor downloadable offline, and a
train-sae config whose rows are longer than the model's positions all fail before any trajectory is sampled."""

import dataclasses

import pytest
import yaml

from ipg_sae.errors import IPGError
from ipg_sae.experiments.pipeline import run_pipeline
from ipg_sae.saes import SAESpec
from tests import tiny


def _nothing_ran(cfg) -> None:
    assert not (cfg.run_dir / "trajectories.jsonl").exists()
    assert not (cfg.run_dir / "stages").exists()


def _with_load(cfg, spec: dict):
    return dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, load=[SAESpec(**spec)]))


def test_a_local_sae_of_the_wrong_width_fails_before_sampling(pipeline_cfg, tmp_path):
    wrong = tmp_path / "wide_sae"
    tiny.random_sae("topk", 32, layer=2, d_sae=64, k=8).save_model(str(wrong))  # the tiny model's hidden size is 64
    cfg = _with_load(pipeline_cfg, {"path": str(wrong)})
    with pytest.raises(IPGError, match=r"sae.load\[0\]: SAE .*wide_sae has d_in 32, but model .* has hidden size 64"):
        run_pipeline(cfg)
    _nothing_ran(cfg)


def test_a_local_sae_for_a_layer_the_model_lacks_fails_before_sampling(pipeline_cfg, tmp_path):
    deep = tmp_path / "deep_sae"
    tiny.random_sae("topk", 64, layer=40, d_sae=64, k=8).save_model(str(deep))
    cfg = _with_load(pipeline_cfg, {"path": str(deep)})
    with pytest.raises(IPGError, match=r"reads layer 40, but model .* decoder layers"):
        run_pipeline(cfg)
    _nothing_ran(cfg)


@pytest.mark.parametrize("release, sae_id, message", [
    # sae-lens infers Gemma Scope's config offline: the width is the reason given (the quick start + Gemma Scope)
    ("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical",
     r"sae.load\[0\]: SAE gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical has d_in 2304, but model .* "
     r"has hidden size 64"),
    # a release whose config is a file on the hub: not cached, and offline
    ("gpt2-small-res-jb", "blocks.8.hook_resid_pre",
     r"sae.load\[0\]: SAE gpt2-small-res-jb/blocks.8.hook_resid_pre .* is not in the local Hugging Face cache and "
     r"HF_HUB_OFFLINE is set"),
])
def test_a_published_sae_not_cached_offline_fails_before_sampling(pipeline_cfg, tmp_path, monkeypatch, release,
                                                                  sae_id, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cfg = _with_load(pipeline_cfg, {"release": release, "sae_id": sae_id})
    with pytest.raises(IPGError, match=message):
        run_pipeline(cfg)
    _nothing_ran(cfg)


def test_a_train_config_longer_than_the_models_positions_fails_before_sampling(pipeline_cfg, tmp_path):
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(pipeline_cfg.model.name).max_position_embeddings
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({"layers": [2], "context_size": positions + 1}))
    cfg = dataclasses.replace(pipeline_cfg, sae=dataclasses.replace(pipeline_cfg.sae, load=[],
                                                                    train_config=str(train_yaml)))
    with pytest.raises(IPGError, match=f"sae.train_config {train_yaml}: context_size {positions + 1} is longer"):
        run_pipeline(cfg)
    _nothing_ran(cfg)
