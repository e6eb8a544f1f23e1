"""`ipg-sae export` never copies a damaged SAE, never leaves a failed copy, never overwrites someone else's files
and reads its sidecar in one line (issue 36, items 5, 8 and 17). No model is loaded: the checks run before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipg_sae.cli import main
from ipg_sae.errors import IPGError
from ipg_sae.export import export_for_transformer_lens
from ipg_sae.saes import write_sae_sidecar
from tests.tiny import random_sae


def _sae(folder: Path, seed: int = 0) -> Path:
    random_sae("topk", 32, layer=1, d_sae=48, k=4, seed=seed).save_model(str(folder))
    write_sae_sidecar(folder, "tiny-model", 1)
    return folder


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


# ---- 5: a tampered SAE, with or without the check -------------------------------------------------


@pytest.mark.parametrize("check", ["false", "true"])
def test_a_tampered_sae_is_not_exported_whatever_check_says(tmp_path, capsys, check):
    sae = _sae(tmp_path / "sae")
    weights = sae / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    out = tmp_path / "tl"
    assert main(["export", str(sae), "--out_dir", str(out), "--check", check]) == 2
    assert "sae_weights.safetensors is not the file that was trained" in _error_line(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == [sae]  # no copy, no partial folder


def test_a_copy_that_fails_its_check_is_not_left_behind(tmp_path):
    sae = _sae(tmp_path / "sae")

    def failing(staged: Path) -> None:
        assert (staged / "sae_weights.safetensors").is_file()  # the check sees the assembled copy
        raise IPGError("the bridge's activations differ")

    with pytest.raises(IPGError, match="activations differ"):
        export_for_transformer_lens(sae, tmp_path / "tl", check=failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


# ---- 8: a folder that holds someone else's files -----------------------------------------------


def test_exporting_into_a_folder_holding_another_sae_is_refused_unless_forced(tmp_path, capsys):
    sae = _sae(tmp_path / "sae", seed=0)
    other = _sae(tmp_path / "other", seed=1)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main(["export", str(sae), "--out_dir", str(other), "--check", "false"]) == 2
    line = _error_line(capsys)
    assert "already holds files" in line and "ipg_sae.json" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before  # untouched
    assert main(["export", str(sae), "--out_dir", str(other), "--check", "false", "--force", "true"]) == 0
    assert (other / "sae_weights.safetensors").read_bytes() == (sae / "sae_weights.safetensors").read_bytes()
    assert not (other / "ipg_sae.json").exists()  # the other SAE's sidecar would describe weights no longer there


def test_a_rerun_replaces_its_own_export_but_not_a_file_someone_added(tmp_path, capsys):
    sae = _sae(tmp_path / "sae")
    out = tmp_path / "tl"
    assert main(["export", str(sae), "--out_dir", str(out), "--check", "false"]) == 0
    assert main(["export", str(sae), "--out_dir", str(out), "--check", "false"]) == 0  # its own files: replaced
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(sae), "--out_dir", str(out), "--check", "false"]) == 2
    assert "notes.txt" in _error_line(capsys)
    other = _sae(tmp_path / "other", seed=1)
    (out / "notes.txt").unlink()
    assert main(["export", str(other), "--out_dir", str(out), "--check", "false"]) == 2  # another SAE's export
    assert "cfg.json" in _error_line(capsys)
    assert main(["export", str(sae), "--out_dir", str(sae), "--check", "false", "--force", "true"]) == 2
    assert "the SAE's own folder" in _error_line(capsys)


# ---- 17: a sidecar that is not an object -------------------------------------------------------------


@pytest.mark.parametrize("text", ["null", "[]", "", "   \n", '"smollm2"', "5"])
@pytest.mark.parametrize("check", ["false", "true"])
def test_a_sidecar_that_is_not_an_object_is_one_line(tmp_path, capsys, text, check):
    sae = _sae(tmp_path / "sae")
    (sae / "ipg_sae.json").write_text(text)
    assert main(["export", str(sae), "--out_dir", str(tmp_path / "tl"), "--check", check]) == 2
    line = _error_line(capsys)
    assert "ipg_sae.json is corrupt" in line and "delete it" in line
    assert not (tmp_path / "tl").exists()


def test_the_export_records_its_source(tmp_path):
    sae = _sae(tmp_path / "sae")
    out = export_for_transformer_lens(sae, tmp_path / "tl")
    marker = json.loads((out / "ipg_sae_export.json").read_text())
    assert marker["source"] == str(sae.resolve()) and len(marker["weights_sha256"]) == 64
