import pytest

from ipg_sae.errors import IPGError
from ipg_sae.splits import disjoint_splits
from ipg_sae.tasks import TaskConfig


def test_disjoint_splits_load_and_overlaps_are_refused_by_id_and_by_question(tmp_path):
    splits = {"attribution": TaskConfig(n_problems=20), "dev": TaskConfig(n_problems=10, offset=20),
              "test": TaskConfig(n_problems=10, offset=30), "transfer": TaskConfig(level=2, n_problems=10)}
    loaded = disjoint_splits(splits)
    assert [len(v) for v in loaded.values()] == [20, 10, 10, 10]
    ids = [p.id for problems in loaded.values() for p in problems]
    assert len(ids) == len(set(ids))
    with pytest.raises(IPGError, match="also in the dev split"):  # windows that overlap by 5 problems
        disjoint_splits({"dev": TaskConfig(n_problems=10, offset=20), "test": TaskConfig(n_problems=10, offset=25)})
    # the same question under another name (a JSONL copy of a dev problem) is caught by its text
    dev = loaded["dev"]
    path = tmp_path / "copy.jsonl"
    path.write_text('{"question": "%s", "answer": "%s"}\n' % (dev[3].question.upper(), dev[3].answer))
    with pytest.raises(IPGError, match="also in the dev split"):
        disjoint_splits({"dev": splits["dev"], "transfer": TaskConfig(name="jsonl", path=str(path), n_problems=0)})
    with pytest.raises(IPGError, match="has no rows"):  # an empty split is refused before any work
        disjoint_splits({"dev": splits["dev"], "empty": TaskConfig(name="jsonl", path=str(_empty(tmp_path)),
                                                                   n_problems=0)})


def _empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


def test_the_pipeline_refuses_a_held_out_window_that_repeats_an_attributed_question(tmp_path):
    """Generated level-1 problems repeat questions across windows (about 13k distinct): a held-out problem with an
    attributed problem's text, under another id, is refused before any work, as an overlapping id is."""
    import re

    from ipg_sae.config import load_config
    from ipg_sae.errors import IPGError
    from ipg_sae.experiments.pipeline import PipelineConfig
    from ipg_sae.tasks import TaskConfig, load_problems

    norm = lambda q: re.sub(r"\s+", " ", q.strip().lower())  # noqa: E731
    attributed = {norm(p.question) for p in load_problems(TaskConfig(n_problems=50))}
    offset = next(o for o in range(1000, 200000, 50)
                  if any(norm(p.question) in attributed for p in load_problems(TaskConfig(n_problems=50, offset=o))))
    overrides = {"runs_dir": str(tmp_path), "sae.load": [{"path": "x"}], "task.n_problems": 50,
                 "evaluation.task.n_problems": 50, "evaluation.task.offset": offset}
    with pytest.raises(IPGError, match="also in the attribution split"):
        load_config(PipelineConfig, None, overrides)


# ---- issue 36, item 10: file problems are named by their file ------------------------------------


def _jsonl(path, questions):
    import json

    path.write_text("".join(json.dumps({"question": q, "answer": str(i)}) + "\n" for i, q in enumerate(questions)))
    return str(path)


def test_two_jsonl_files_with_no_question_in_common_are_disjoint(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["What is 2 + 3?", "What is 7 * 6?"])
    b = _jsonl(tmp_path / "b.jsonl", ["How many legs has a spider?", "What is 10 - 4?"])
    loaded = disjoint_splits({"dev": TaskConfig(name="jsonl", path=a, n_problems=0),
                              "test": TaskConfig(name="jsonl", path=b, n_problems=0)})
    ids = [p.id for problems in loaded.values() for p in problems]
    assert len(set(ids)) == 4
    # an id names the file's content, not its path: a copy elsewhere gives the same ids
    copy = tmp_path / "elsewhere" / "a.jsonl"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / "a.jsonl").read_bytes())
    from ipg_sae.tasks import load_problems

    assert [p.id for p in load_problems(TaskConfig(name="jsonl", path=str(copy), n_problems=0))] == ids[:2]


def test_overlap_advice_names_only_what_can_separate_the_splits(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["What is 2 + 3?", "What is 7 * 6?"])
    b = _jsonl(tmp_path / "b.jsonl", ["How many legs has a spider?", "What is 7 * 6?"])
    with pytest.raises(IPGError) as e:  # the same question in two files: no seed to change
        disjoint_splits({"dev": TaskConfig(name="jsonl", path=a, n_problems=0),
                         "test": TaskConfig(name="jsonl", path=b, n_problems=0)})
    assert "task.seed" not in str(e.value) and f"remove the question from {b} or {a}" in str(e.value)
    with pytest.raises(IPGError) as e:  # one file, overlapping windows
        disjoint_splits({"dev": TaskConfig(name="jsonl", path=a, n_problems=2),
                         "test": TaskConfig(name="jsonl", path=a, n_problems=1, offset=1)})
    assert "disjoint windows (task.offset, task.n_problems)" in str(e.value) and "task.seed" not in str(e.value)
    with pytest.raises(IPGError, match=r"disjoint windows \(task.offset, task.n_problems\) or another task.seed"):
        disjoint_splits({"dev": TaskConfig(n_problems=10), "test": TaskConfig(n_problems=10, offset=5)})


def test_a_hub_split_other_than_the_default_names_itself_in_the_ids():
    from ipg_sae.tasks import id_prefix

    assert id_prefix(TaskConfig(name="gsm8k")) == "gsm8k"  # the default split keeps its ids
    assert id_prefix(TaskConfig(name="gsm8k", split="train")) == "gsm8k-train"
