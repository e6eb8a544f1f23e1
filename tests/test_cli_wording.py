"""Issue 39.8: a typo in `sae.train_overrides` is blamed on the job config it is in (not on the train-sae YAML),
and loading an exported SAE does not print sae-lens's advice to use `HookedSAETransformer`."""

import warnings

import pytest
import yaml

from ipg_sae.cli import main


@pytest.fixture
def pipeline_yaml(tmp_path):
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({"layers": [2], "context_size": 16}))
    path = tmp_path / "my_pipeline.yaml"
    path.write_text(yaml.safe_dump({"runs_dir": str(tmp_path / "runs"), "sae": {
        "train_config": str(train), "train_overrides": {"trainng_tokens": 1000}}}))
    return path, train


def test_a_train_overrides_typo_names_the_pipeline_config(pipeline_yaml, capsys):
    path, train = pipeline_yaml
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {path}: sae.train_overrides (fields of {train}): unknown field `trainng_tokens` "
                             "(did you mean `training_tokens`?)"), err[0]
    assert "command-line overrides" not in err[0]


def test_a_nested_train_overrides_typo_is_found_too(pipeline_yaml, capsys):
    path, train = pipeline_yaml
    doc = yaml.safe_load(path.read_text())
    doc["sae"]["train_overrides"] = {"data.tsk.n_problems": 4}
    path.write_text(yaml.safe_dump(doc))
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: sae.train_overrides" in err and "unknown field `data.tsk` (did you mean `data.task`?)" in err


def test_an_exported_sae_loads_without_the_hooked_sae_transformer_advice(tmp_path):
    from sae_lens import SAE

    from ipg_sae.export import export_for_transformer_lens, load_exported
    from ipg_sae.saes import write_sae_sidecar
    from tests.tiny import random_sae

    sae = tmp_path / "sae"
    random_sae("topk", 32, layer=1, d_sae=48, k=4).save_model(str(sae))
    write_sae_sidecar(sae, "tiny-model", 1)
    out = export_for_transformer_lens(sae, tmp_path / "export")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        SAE.load_from_disk(str(out))  # sae-lens itself gives the advice for an export (model_from_pretrained_kwargs)
    assert any("HookedSAETransformer" in str(w.message) for w in seen)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loaded = load_exported(out)
    assert not [w for w in seen if "HookedSAETransformer" in str(w.message)]
    assert loaded.cfg.d_sae == 48
