"""The SAE's training corpus holds no question of a problem set the job attributes on or evaluates on (issue 36):
a job that trains its SAE leaves its own sets out of the corpus, and a loaded SAE trained here on one of them is
refused."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ipg_sae.config import dump_yaml, load_config
from ipg_sae.errors import IPGError
from ipg_sae.splits import problem_sets, question_key
from ipg_sae.tasks import load_problems


def _questions(tasks) -> set[str]:
    return {question_key(p.question) for task in tasks for p in load_problems(task)}


def _corpus(data) -> set[str]:
    from sae_training.data import task_problems

    return {question_key(p.question) for p in task_problems(data)}


@pytest.mark.parametrize("module, cls, path", [("ipg_sae.experiments.study", "StudyConfig", "configs/study_smollm2.yaml"),
                                               ("ipg_sae.experiments.pipeline", "PipelineConfig", "configs/demo.yaml"),
                                               ("ipg_sae.experiments.pipeline", "PipelineConfig", "configs/quickstart.yaml")])
def test_a_trained_sae_never_sees_a_question_of_the_jobs_splits(module, cls, path):
    import importlib

    from ipg_sae.experiments.stages import train_job

    cfg = load_config(getattr(importlib.import_module(module), cls), path)
    train = train_job(cfg)
    splits = problem_sets(cfg)
    assert len(splits) >= 2 and all(t in train.data.exclude_tasks for t in splits)
    bare = dataclasses.replace(train.data, exclude_tasks=[])
    if path.endswith("study_smollm2.yaml"):  # the recipe alone holds 2 attributed and 4 held-out study questions
        assert [len(_questions([t]) & _corpus(bare)) for t in splits] == [2, 4]
    for task in splits:
        assert not _questions([task]) & _corpus(train.data), task


def _sae_run(tmp_path, train) -> str:
    (tmp_path / "study" / "sae" / "layer_15").mkdir(parents=True)
    (tmp_path / "study" / "train_sae_config.yaml").write_text(dump_yaml(train))
    return str(tmp_path / "study" / "sae" / "layer_15")


def test_the_steering_bench_refuses_an_sae_trained_on_its_transfer_questions(tmp_path):
    from ipg_sae.experiments.stages import run_sae_stage, train_job
    from ipg_sae.experiments.steering_bench import SteeringBenchConfig
    from ipg_sae.experiments.study import StudyConfig

    study_cfg = load_config(StudyConfig, "configs/study_smollm2.yaml")
    study = train_job(study_cfg)
    own = [t for t in study.data.exclude_tasks if t in problem_sets(study_cfg)]  # without the bench's splits
    without_bench = dataclasses.replace(study.data, exclude_tasks=own)
    sae = _sae_run(tmp_path, dataclasses.replace(study, data=without_bench))
    bench = load_config(SteeringBenchConfig, "configs/steering_bench_smollm2.yaml", {"sae.load": [{"path": sae}]})
    with pytest.raises(IPGError, match=r"was trained on 1 question\(s\) of a problem set .*level 2, offset 3000"):
        run_sae_stage(bench)
    (tmp_path / "study" / "train_sae_config.yaml").write_text(dump_yaml(study))  # the study's recipe as shipped
    assert run_sae_stage(bench) == {"loaded": [{"path": sae, "release": None, "sae_id": None, "layer": None}]}


def test_a_text_corpus_drops_documents_holding_an_excluded_question(tmp_path, tiny_tokenizer):
    from sae_training.config import DataConfig
    from sae_training.data import _documents

    from ipg_sae.tasks import TaskConfig

    task = TaskConfig(n_problems=3, offset=50, few_shot=0)
    question = load_problems(task)[1].question
    spaced = question.replace("?", " ?").replace(" ", "  ")
    docs = ["Tom has 3 apples and buys 5 more.", f"Here is one: {spaced} The answer is 7.", "Sara had 12 pencils."]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = DataConfig(source="text", path=str(path))
    read = lambda d: [tiny_tokenizer.decode(ids, skip_special_tokens=True) for ids in _documents(d, tiny_tokenizer, 10**6, None)]  # noqa: E731
    assert len(read(data)) == 3
    kept = read(dataclasses.replace(data, exclude_tasks=[task]))
    assert len(kept) == 2 and not any("Here is one" in d for d in kept)


def test_a_corpus_made_only_of_evaluation_questions_is_refused_by_name(tmp_path, tiny_tokenizer):
    from sae_training.config import DataConfig
    from sae_training.data import _documents

    from ipg_sae.tasks import TaskConfig

    task = TaskConfig(n_problems=2, few_shot=0)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"{p.question} The answer is {p.answer}."}) + "\n"
                            for p in load_problems(task)))
    with pytest.raises(IPGError, match="every document .* holds a question .*data.exclude_tasks"):
        _documents(DataConfig(source="text", path=str(path), exclude_tasks=[task]), tiny_tokenizer, 10**6, None)
