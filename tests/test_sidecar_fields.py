"""An ``attribution.json`` edited into the wrong types or lengths is refused on read, by ``explore`` too, with one
line naming the file and the field (issue 36, items 7 and 15)."""

from __future__ import annotations

import json
import shutil

import pytest

from ipg_sae.attribution import AttributionResult
from ipg_sae.errors import IPGError


def length_reward(prompt, completion, reference):
    return float(len(completion) % 7)


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory, tiny_llama_dir):
    from ipg_sae.attribution import attribute
    from ipg_sae.trajectories import save_trajectories
    from tests import tiny

    model, tok, trajs = tiny.sample_tiny(tiny_llama_dir, n_problems=3, n_samples=3, max_new_tokens=6,
                                         reward="tests.test_sidecar_fields:length_reward")
    run_dir = tmp_path_factory.mktemp("sidecar") / "run"
    save_trajectories(run_dir / "trajectories.jsonl", trajs)
    sae = tiny.random_sae("topk", 64, layer=2, d_sae=32, k=4, seed=1)
    attribute(model, {2: sae}, trajs, n_steps=2, tokenizer=tok, out_dir=run_dir, n_contexts=4, progress=False)
    return run_dir, dict(model=model, tokenizer=tok, saes={2: sae}, trajectories=trajs)


EDITS = {
    "trajectory_ids shorter than the tensors": ("trajectory_ids", lambda v: v[:-2]),
    "prompt_ids cut to one": ("prompt_ids", lambda v: v[:1]),
    "saes a string": ("saes", lambda v: "abc"),
    "summary a string": ("summary", lambda v: "x"),
    "model a string": ("model", lambda v: "x"),
    "saes entries without a layer": ("saes", lambda v: [{"d_sae": 32}]),
    "a duplicated trajectory id": ("trajectory_ids", lambda v: [v[0]] + v[:-1]),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_sidecar_field_is_one_line_naming_file_and_field(result_dir, tmp_path, case):
    from ipg_sae.explorer import ExplorerConfig, build

    field, edit = EDITS[case]
    source, loaded = result_dir
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    sidecar = run_dir / "attribution.json"
    meta = json.loads(sidecar.read_text())
    meta[field] = edit(meta[field])
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(IPGError, match=rf"attribution\.json: `{field}` must be") as err:
        build(run_dir, cfg=ExplorerConfig(detail=4, n_contexts=4, held_out=0, page_size=25), **loaded)
    assert "\n" not in str(err.value)
    with pytest.raises(IPGError, match=rf"`{field}`"):
        AttributionResult.load(run_dir)


def test_the_untouched_sidecar_reads_back(result_dir):
    result = AttributionResult.load(result_dir[0])
    assert result.n_prompts == 3 and len(result.traj_ids) == 9
