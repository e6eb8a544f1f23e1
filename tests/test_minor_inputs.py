"""Small inputs that used to be read wrongly and silently (issue 36, item 7): each is now one IPGError naming
the file or field."""

from __future__ import annotations

import json

import pytest

from ipg_sae.errors import IPGError


def test_a_nan_rank_is_refused_not_sorted_first(tmp_path):
    from ipg_sae.selection import load_selection

    path = tmp_path / "features.csv"
    path.write_text("layer,latent,rank\n2,10,1\n2,11,nan\n2,12,2\n")
    with pytest.raises(IPGError, match=r"features\.csv:3: rank 'nan'"):
        load_selection(path)
    path.write_text("layer,latent,rank\n2,10,2\n2,11,1\n")
    assert load_selection(path) == [(2, 11), (2, 10)]  # finite ranks still order the table


@pytest.mark.parametrize("pairs", [[[2, 5.7]], [{"layer": 2, "latent": 5.7}], ["2:5.7"], [[2, True]]])
def test_a_fractional_latent_is_refused_not_truncated(tmp_path, pairs):
    from ipg_sae.selection import load_selection

    path = tmp_path / "sel.json"
    path.write_text(json.dumps(pairs))
    with pytest.raises(IPGError, match="sel.json: entry 0 .*whole numbers"):
        load_selection(path)
    assert load_selection([[2, 5.0], ["3", "7"]]) == [(2, 5), (3, 7)]  # whole numbers in any spelling


def test_a_list_answer_in_a_jsonl_file_is_refused(tmp_path):
    from ipg_sae.tasks import TaskConfig, load_problems

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "What is 3 + 7?", "answer": [10]}) + "\n")
    with pytest.raises(IPGError, match=r"qa.jsonl.* 'answer' is a list"):
        load_problems(TaskConfig(name="jsonl", path=str(path), few_shot=0, n_problems=1))
    path.write_text(json.dumps({"question": "What is 3 + 7?", "answer": 10}) + "\n")
    assert load_problems(TaskConfig(name="jsonl", path=str(path), few_shot=0, n_problems=1))[0].answer == "10"


def test_a_question_that_differs_only_in_spacing_is_caught_across_splits(tmp_path):
    from ipg_sae.splits import disjoint_splits, question_key
    from ipg_sae.tasks import TaskConfig

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n"
                         for q in ("How many legs has a cat?", "What is 3 + 5?")))
    b.write_text(json.dumps({"question": "What  is 3+5 ?", "answer": "8"}) + "\n")
    tasks = {"attribution": TaskConfig(name="jsonl", path=str(a), few_shot=0, offset=1, n_problems=1),
             "test": TaskConfig(name="jsonl", path=str(b), few_shot=0, n_problems=1)}
    with pytest.raises(IPGError, match="also in the attribution split"):
        disjoint_splits(tasks)
    assert question_key("What  is 3+5 ?") == question_key("what is 3 + 5?")
    assert question_key("add 3 5") != question_key("add 35")  # spaces between words still count


def test_batch_size_zero_is_refused():
    from ipg_sae.config import load_config
    from ipg_sae.jobs import SampleJobConfig

    with pytest.raises(IPGError, match="sampling.batch_size is 0"):
        load_config(SampleJobConfig, None, {"sampling.batch_size": 0, "wandb.enabled": False})


def test_a_folder_at_features_csv_is_refused_and_nothing_written_inside(tmp_path):
    from ipg_sae.selection import write_feature_table

    folder = tmp_path / "run" / "features.csv"
    folder.mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as err:
        write_feature_table(folder, [{"layer": 2, "latent": 1, "rank": 1}])
    assert err.value.filename == str(folder)  # the command line prints it as one line: move or remove that folder
    assert list(folder.iterdir()) == [] and not list(folder.parent.glob(".*.tmp"))
    assert write_feature_table(tmp_path / "run2", [{"layer": 2, "latent": 1, "rank": 1}]).name == "features.csv"


def test_problems_per_batch_zero_is_refused_not_treated_as_one():
    from ipg_sae.faithfulness import TrajectoryScorer

    with pytest.raises(IPGError, match="problems_per_batch is 0"):
        TrajectoryScorer(None, [], 0.5, problems_per_batch=0)


def test_a_folder_where_an_output_goes_is_one_line_with_its_fix(tmp_path, tiny_llama_dir, capsys):
    from ipg_sae.cli import main

    (tmp_path / "t" / "trajectories.jsonl").mkdir(parents=True)
    code = main(["sample", "--name", "t", "--runs_dir", str(tmp_path), "--model.name", str(tiny_llama_dir),
                 "--task.n_problems", "2", "--task.few_shot", "0", "--sampling.n_samples", "2",
                 "--sampling.max_new_tokens", "4", "--no-wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: cannot write or read {tmp_path / 't' / 'trajectories.jsonl'}")
    assert "move or remove that folder" in err[-1] and not list((tmp_path / "t" / "trajectories.jsonl").iterdir())
