from __future__ import annotations

import copy
import json
import operator
import re

import pytest

from ipg_sae.digest import file_digest
from ipg_sae.errors import IPGError
from ipg_sae.rewards import answers_match, extract_answer
from ipg_sae.tasks import (
    Problem,
    TaskConfig,
    arithmetic_problems,
    build_prompts,
    few_shot_examples,
    format_prompt,
    load_problems,
)


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


GSM8K_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A farm has 1,000 hens and buys 234 more. How many hens?",
     "answer": "1,000 + 234 = 1,234 hens.\n#### 1,234"},
    {"question": "Sam has 5 apples and eats 2. How many are left?", "answer": "5 - 2 = 3\n#### 3"},
]

MATH_ROWS = [
    {"problem": "Compute $\\frac{1}{4} + \\frac{1}{4}$.", "answer": "\\frac{1}{2}",
     "solution": "$\\frac{1}{4} + \\frac{1}{4} = \\boxed{\\frac{1}{2}}$."},
    {"problem": "What is $2^5$?", "answer": "32", "solution": "$2^5 = \\boxed{32}$."},
]


@pytest.fixture
def gsm8k_file(tmp_path):
    return _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)


@pytest.fixture
def math_file(tmp_path):
    return _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)


@pytest.fixture
def plain_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arithmetic_is_deterministic(level):
    assert arithmetic_problems(20, level, seed=0) == arithmetic_problems(20, level, seed=0)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arithmetic_problem_i_independent_of_window(level):
    full = arithmetic_problems(30, level, seed=3)
    assert arithmetic_problems(10, level, seed=3, offset=20) == full[20:30]
    assert arithmetic_problems(5, level, seed=3) == full[:5]
    assert [p.id for p in full[:2]] == [f"arith-L{level}-s3-000000", f"arith-L{level}-s3-000001"]


def test_arithmetic_seeds_and_levels_differ():
    seed0 = [p.question for p in arithmetic_problems(20, 1, seed=0)]
    seed1 = [p.question for p in arithmetic_problems(20, 1, seed=1)]
    assert len(set(seed0) & set(seed1)) <= 1
    assert arithmetic_problems(1, 1, 0)[0].question != arithmetic_problems(1, 2, 0)[0].question


def test_arithmetic_uses_varied_templates():
    questions = [p.question for p in arithmetic_problems(200, 1, seed=0)]
    nouns = {"apples", "pencils", "books", "coins", "marbles", "oranges", "stickers", "birds"}
    assert {noun for noun in nouns if any(noun in q for q in questions)} == nouns


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arithmetic_answers_follow_from_solutions(level):
    for problem in arithmetic_problems(300, level, seed=7):
        assert problem.solution.endswith(f"The answer is {problem.answer}.")
        assert answers_match(extract_answer(problem.solution), problem.answer)
        assert int(problem.answer) >= 0
        # Each step "a op b = c" is arithmetically right, and the last one gives the answer.
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", problem.solution)
        assert len(steps) == level
        for a, op, b, result in steps:
            assert _OPS[op](int(a), int(b)) == int(result)
        assert steps[-1][3] == problem.answer


@pytest.mark.parametrize("level", [1, 2, 3])
def test_levels_differ_in_number_of_steps(level):
    for problem in arithmetic_problems(100, level, seed=0):
        assert problem.solution.count(" = ") == level


def test_arithmetic_number_ranges():
    level1 = arithmetic_problems(300, 1, seed=0)
    assert max(int(p.answer) for p in level1) <= 40
    level3 = arithmetic_problems(300, 3, seed=0)
    assert max(int(p.answer) for p in level3) > 40


def test_load_problems_arithmetic():
    problems = load_problems(TaskConfig(name="arithmetic", level=2, n_problems=5, offset=3, seed=1))
    assert problems == arithmetic_problems(5, 2, seed=1, offset=3)


@pytest.mark.parametrize("level", [0, 7, -1])
def test_bad_level(level):
    with pytest.raises(IPGError, match="task.level"):
        load_problems(TaskConfig(level=level))


def test_arithmetic_needs_positive_n():
    with pytest.raises(IPGError, match="task.n_problems"):
        load_problems(TaskConfig(n_problems=0))


# --------------------------------------------------------------------------- files


def test_gsm8k_local_jsonl(gsm8k_file):
    problems = load_problems(TaskConfig(name="gsm8k", path=str(gsm8k_file)))
    assert [p.answer for p in problems] == ["72", "1234", "3"]
    tag = file_digest(gsm8k_file)[:12]  # ids name the file's content (issue 36, item 10)
    assert [p.id for p in problems] == [f"gsm8k-{tag}-000000", f"gsm8k-{tag}-000001", f"gsm8k-{tag}-000002"]
    first = problems[0]
    assert first.question == GSM8K_ROWS[0]["question"]
    assert "<<" not in first.solution and first.solution.endswith("The answer is 72.")


def test_gsm8k_offset_and_count(gsm8k_file):
    problems = load_problems(TaskConfig(name="gsm8k", path=str(gsm8k_file), offset=1, n_problems=1))
    assert [(p.id, p.answer) for p in problems] == [(f"gsm8k-{file_digest(gsm8k_file)[:12]}-000001", "1234")]
    assert len(load_problems(TaskConfig(name="gsm8k", path=str(gsm8k_file), n_problems=0))) == 3


def test_math500_local_jsonl(math_file):
    problems = load_problems(TaskConfig(name="math500", path=str(math_file)))
    assert problems[0] == Problem(id=f"math500-{file_digest(math_file)[:12]}-000000", question=MATH_ROWS[0]["problem"], answer="\\frac{1}{2}",
                                  solution=MATH_ROWS[0]["solution"])
    assert problems[1].answer == "32"


def test_parquet_file(tmp_path):
    import datasets

    path = tmp_path / "gsm8k.parquet"
    datasets.Dataset.from_list(GSM8K_ROWS).to_parquet(str(path))
    problems = load_problems(TaskConfig(name="gsm8k", path=str(path)))
    assert [p.answer for p in problems] == ["72", "1234", "3"]


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"question": "What is 2 + 2?", "answer": 4}]), encoding="utf-8")
    problems = load_problems(TaskConfig(name="jsonl", path=str(path)))
    assert problems[0].question == "What is 2 + 2?" and problems[0].answer == "4"


def test_jsonl_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "custom.jsonl", [
        {"prompt": "What is 6 * 7?", "target": 42, "solution": "6 * 7 = 42. The answer is 42."},
        {"prompt": "What is 1/2 + 1/4?", "target": "3/4"},
    ])
    cfg = TaskConfig(name="jsonl", path=str(path), question_field="prompt", answer_field="target")
    problems = load_problems(cfg)
    assert [(p.question, p.answer) for p in problems] == [("What is 6 * 7?", "42"), ("What is 1/2 + 1/4?", "3/4")]
    assert problems[0].solution.endswith("The answer is 42.") and problems[1].solution is None


def test_gsm8k_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"q": "How many?", "a": "2 + 2 = 4\n#### 4"}])
    problems = load_problems(TaskConfig(name="gsm8k", path=str(path), question_field="q", answer_field="a"))
    assert problems[0].answer == "4"


# --------------------------------------------------------------------------- errors


def _error(cfg: TaskConfig) -> str:
    with pytest.raises(IPGError) as err:
        load_problems(cfg)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_task_lists_valid_names():
    message = _error(TaskConfig(name="mmlu"))
    assert "'mmlu'" in message and "task.name" in message
    for name in ("arithmetic", "gsm8k", "math500", "jsonl"):
        assert name in message


def test_missing_file(tmp_path):
    message = _error(TaskConfig(name="gsm8k", path=str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl" in message and "task.path" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello", encoding="utf-8")
    message = _error(TaskConfig(name="jsonl", path=str(path)))
    assert ".jsonl" in message and ".parquet" in message


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    message = _error(TaskConfig(name="jsonl", path=str(path)))
    assert "has no rows" in message and "task.path" in message


def test_empty_parquet(tmp_path):
    import datasets

    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"question": [], "answer": []}).to_parquet(str(path))
    assert "has no rows" in _error(TaskConfig(name="gsm8k", path=str(path)))


def test_empty_json_array(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]", encoding="utf-8")
    assert "has no rows" in _error(TaskConfig(name="jsonl", path=str(path)))


def test_invalid_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{broken\n', encoding="utf-8")
    message = _error(TaskConfig(name="jsonl", path=str(path)))
    assert "bad.jsonl" in message and "fix the file" in message


def test_missing_question_field(gsm8k_file):
    message = _error(TaskConfig(name="math500", path=str(gsm8k_file)))  # math500 expects "problem"
    assert "'problem'" in message and "task.question_field" in message
    assert "'question'" in message and "'answer'" in message  # the fields that do exist


def test_missing_answer_field(gsm8k_file):
    message = _error(TaskConfig(name="gsm8k", path=str(gsm8k_file), answer_field="final"))
    assert "'final'" in message and "task.answer_field" in message and "'answer'" in message


def test_empty_answer_value(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "1"}, {"question": "q2", "answer": ""}])
    message = _error(TaskConfig(name="jsonl", path=str(path)))
    assert "row 1" in message and "'answer'" in message


def test_jsonl_without_path():
    message = _error(TaskConfig(name="jsonl"))
    assert "task.path" in message


def test_offset_past_end(gsm8k_file):
    message = _error(TaskConfig(name="gsm8k", path=str(gsm8k_file), offset=3))
    assert "task.offset" in message


def test_negative_window():
    assert "task.offset" in _error(TaskConfig(offset=-1))


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_hub_unreachable_offline(name):
    # conftest sets HF_DATASETS_OFFLINE=1; with no cached copy the hub load fails.
    try:
        message = _error(TaskConfig(name=name))
    except pytest.fail.Exception:
        pytest.skip("a cached copy of the hub dataset exists on this machine")
    assert "hub connection" in message and "task.path" in message


def test_hub_error_is_wrapped(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    message = _error(TaskConfig(name="gsm8k", split="test"))
    assert "'openai/gsm8k'" in message and "ConnectionError" in message
    assert "hub connection" in message and "task.path" in message


# --------------------------------------------------------------------------- few-shot examples


def test_arithmetic_few_shot_disjoint_from_evaluated():
    cfg = TaskConfig(name="arithmetic", level=1, n_problems=200, seed=0)
    evaluated = {p.question for p in load_problems(cfg)}
    examples = few_shot_examples(cfg, 5)
    assert len(examples) == 5 and not evaluated & {e.question for e in examples}
    assert all(e.solution.endswith(f"The answer is {e.answer}.") for e in examples)
    assert few_shot_examples(cfg, 5) == examples
    assert few_shot_examples(cfg, 0) == []


@pytest.mark.parametrize("name", ["gsm8k", "math500", "jsonl"])
def test_builtin_examples_end_with_answer(name):
    examples = few_shot_examples(TaskConfig(name=name), 4)
    assert len(examples) == 4
    for example in examples:
        assert example.solution.endswith(f"The answer is {example.answer}.")
        assert answers_match(extract_answer(example.solution), example.answer)


def test_too_many_builtin_examples():
    with pytest.raises(IPGError, match="task.few_shot"):
        few_shot_examples(TaskConfig(name="gsm8k"), 50)


# --------------------------------------------------------------------------- prompts


def test_chat_prompt(tiny_tokenizer):
    cfg = TaskConfig(name="arithmetic", n_problems=2, few_shot=2, system_prompt="You are careful.")
    problems = load_problems(cfg)
    prompts = build_prompts(tiny_tokenizer, problems, cfg)
    assert len(prompts) == 2
    examples = few_shot_examples(cfg, 2)
    prompt = prompts[0]
    assert prompt.startswith("<|im_start|>system\nYou are careful.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>assistant") == 3  # two worked examples + the generation prompt
    assert all(e.solution in prompt for e in examples)
    last_user = prompt.rsplit("<|im_start|>user\n", 1)[1]
    assert problems[0].question in last_user and cfg.instruction in last_user
    assert prompt.index(examples[1].solution) < prompt.index(problems[0].question)


def test_chat_prompt_without_system_or_examples(tiny_tokenizer):
    cfg = TaskConfig(name="arithmetic", few_shot=0)
    problem = load_problems(TaskConfig(n_problems=1))[0]
    prompt = format_prompt(tiny_tokenizer, problem, cfg, [])
    assert prompt == (f"<|im_start|>user\n{cfg.instruction}\n\n{problem.question}<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_chat_prompt_system_role_rejected_falls_back(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
    )
    cfg = TaskConfig(few_shot=0, system_prompt="Be brief.", instruction="")
    prompt = format_prompt(tokenizer, Problem("p", "What is 1 + 1?", "2"), cfg, [])
    assert prompt == "<user>Be brief.\n\nWhat is 1 + 1?<assistant>"


def test_plain_text_prompt(plain_tokenizer, gsm8k_file):
    cfg = TaskConfig(name="gsm8k", path=str(gsm8k_file), few_shot=2)
    problems = load_problems(cfg)
    prompt = build_prompts(plain_tokenizer, problems, cfg)[1]
    examples = few_shot_examples(cfg, 2)
    assert "<|im_start|>" not in prompt
    assert prompt.startswith(cfg.instruction + "\n\n")
    for example in examples:
        assert f"Question: {example.question}\nAnswer: {example.solution}\n\n" in prompt
    assert prompt.endswith(f"Question: {problems[1].question}\nAnswer:")


def test_plain_text_prompt_without_tokenizer():
    problem = Problem("p", "What is 1 + 1?", "2")
    cfg = TaskConfig(few_shot=0, instruction="", system_prompt=None)
    assert format_prompt(None, problem, cfg, []) == "Question: What is 1 + 1?\nAnswer:"


def test_levels_1_to_3_are_unchanged_by_the_transfer_family():
    """Issue 37: adding levels 4-6 changes no existing problem id or text (a digest of 200 problems per level,
    taken before the transfer family existed)."""
    import hashlib
    import json

    rows = [[p.id, p.question, p.answer, p.solution] for level in (1, 2, 3) for p in arithmetic_problems(200, level, 0)]
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16] == "3e124f03094e74b3"


@pytest.mark.parametrize("level, steps", [(4, 1), (5, 1), (6, 2)])
def test_the_transfer_family_has_other_surfaces_and_right_answers(level, steps):
    from ipg_sae.tasks_transfer import STEPS

    assert STEPS[level] == steps
    problems = arithmetic_problems(300, level, seed=0)
    assert problems == arithmetic_problems(300, level, seed=0) and problems[0].id == f"arith-L{level}-s0-000000"
    for problem in problems:
        found = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", problem.solution)
        assert len(found) == steps and found[-1][3] == problem.answer and int(problem.answer) >= 0
        assert all(_OPS[op](int(a), int(b)) == int(r) for a, op, b, r in found)
        assert answers_match(extract_answer(problem.solution), problem.answer)

    def skeleton(q):  # the template: numbers and names stripped
        return re.sub(r"\d+|\b[A-Z][a-z]+\b", "#", q)

    seen = {skeleton(p.question) for lv in (1, 2, 3) for p in arithmetic_problems(300, lv, seed=0)}
    assert not seen & {skeleton(p.question) for p in problems}  # no template the attribution levels use
    if level == 5:
        assert max(int(p.answer) for p in problems) > 40
