"""Issue 39.6: one spelling for SAE sources across commands, `sae: {load: [...]}` (the pipeline's, which also allows
`train_config`); `attribute` and `evaluate` still accept the old `saes: [...]` with a one-line deprecation warning."""

import logging

import pytest
import yaml

from ipg_sae.config import load_config
from ipg_sae.errors import IPGError
from ipg_sae.jobs import AttributeJobConfig, EvaluateJobConfig
from ipg_sae.saes import SAESpec


@pytest.mark.parametrize("cls", [AttributeJobConfig, EvaluateJobConfig])
def test_sae_load_is_the_spelling_and_saes_still_works_with_a_warning(cls, tmp_path, caplog):
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"sae": {"load": [{"path": "runs/x/sae/layer_2"}]}}))
    caplog.set_level(logging.WARNING)
    assert load_config(cls, str(new)).sae.load == [SAESpec(path="runs/x/sae/layer_2")]
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]

    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"saes": [{"release": "r", "sae_id": "i"}]}))
    cfg = load_config(cls, str(old))
    assert cfg.sae.load == [SAESpec(release="r", sae_id="i")] and cfg.saes is None
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "sae: {load: [...]}" in warned[0]


def test_both_spellings_at_once_are_refused(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"saes": [{"path": "a"}], "sae": {"load": [{"path": "b"}]}}))
    with pytest.raises(IPGError, match="both `saes:`.*keep only"):
        load_config(AttributeJobConfig, str(both))


def test_the_shipped_configs_use_the_one_spelling():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "configs").glob("*.yaml")):
        assert "saes" not in (yaml.safe_load(path.read_text()) or {}), path
    assert load_config(AttributeJobConfig, str(root / "configs" / "attribute_default.yaml")).sae.load
    assert load_config(EvaluateJobConfig, str(root / "configs" / "evaluate_default.yaml")).sae.load
