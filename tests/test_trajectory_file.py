"""A trajectories file with a bad byte or a field of the wrong type is one line naming the file, the line and the
field (issue 36, item 16)."""

from __future__ import annotations

import json

import pytest

from ipg_sae.errors import IPGError
from ipg_sae.trajectories import load_trajectories


def _row(i: int, **change) -> dict:
    row = {"id": f"p0-{i}", "prompt_id": "p0", "sample_index": i, "prompt": "Q", "completion": "A", "reference": "1",
           "prompt_ids": [5, 6], "completion_ids": [7], "reward": 1.0}
    row.update(change)
    return row


def _write(path, rows, raw_line: bytes | None = None) -> None:
    lines = [json.dumps(r).encode() for r in rows]
    if raw_line is not None:
        lines.insert(1, raw_line)
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_a_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    bad = json.dumps(_row(1, completion="caf\u00e9")).encode().replace(b"caf\\u00e9", b"caf\xe9")
    _write(path, [_row(0), _row(2)], raw_line=bad)
    with pytest.raises(IPGError, match=r"trajectories\.jsonl:2: not UTF-8 text \(byte 0xe9") as err:
        load_trajectories(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["zero", None, 1.5, True])
def test_a_sample_index_that_is_not_a_whole_number_names_the_field(tmp_path, value):
    path = tmp_path / "trajectories.jsonl"
    _write(path, [_row(0), _row(1, sample_index=value)], raw_line=b"")  # a blank line 2: the bad row is line 3
    with pytest.raises(IPGError, match=r"trajectories\.jsonl:3: `sample_index` must be a whole number"):
        load_trajectories(path)


def test_a_good_file_still_loads(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    _write(path, [_row(0, completion="caf\u00e9"), _row(1)])
    trajs = load_trajectories(path)
    assert [t.sample_index for t in trajs] == [0, 1] and trajs[0].completion == "caf\u00e9"
