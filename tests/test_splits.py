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
