"""Tasks: the problems a policy is scored on, and the prompts that pose them.

A task yields :class:`Problem` records (id, question, short reference answer, worked
solution when known):

* ``arithmetic`` -- generated word problems with 1, 2 or 3 steps (``level``; levels 4-6 are a transfer family
  on other surfaces, :mod:`ipg_sae.tasks_transfer`). Problem ``i``
  depends only on (seed, level, i), so any ``n_problems``/``offset`` window of the same
  seed agrees with any other, and different seeds give different problems.
* ``gsm8k`` -- hub ``openai/gsm8k`` (config ``main``) or a local file; the reference is the
  text after ``####`` with commas removed.
* ``math500`` -- hub ``HuggingFaceH4/MATH-500`` or a local file; fields ``problem``/``answer``.
* ``jsonl`` -- any local .jsonl/.json/.parquet/.csv file with a question and an answer field.

File and hub rows are taken in their stored order: ``offset`` skips rows and
``n_problems`` takes the next ones (0 = all), so held-out splits are made with a different
``offset``. ``seed`` only affects the arithmetic generator. A problem's id names its source
(:func:`id_prefix`): ``<task>-<file digest>-<row>`` for a file, ``<task>-<split>-<row>`` for a hub
split other than ``test``, so two sources never share an id.

Prompts (:func:`build_prompts`) put ``few_shot`` worked examples before the question. The
examples never come from the evaluated problems: arithmetic draws them from a separate
seed stream; the other tasks use a small built-in set written in their style. Each
example's solution ends with "The answer is N." so the model learns the format that
:mod:`ipg_sae.rewards` extracts. A tokenizer with a chat template gets chat turns; one
without gets plain "Question: ... / Answer: ..." text.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import IPGError
from .tasks_transfer import TRANSFER_TEMPLATES

log = logging.getLogger(__name__)

TASK_NAMES = ("arithmetic", "gsm8k", "math500", "jsonl")
_HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}
_DEFAULT_QUESTION_FIELD = {"gsm8k": "question", "math500": "problem", "jsonl": "question"}
_DEFAULT_ANSWER_FIELD = "answer"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # reference answer, canonical short form ("42", "\frac{1}{2}")
    solution: str | None = None  # worked solution when known


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # arithmetic | gsm8k | math500 | jsonl
    level: int = 1  # arithmetic only: 1, 2, 3; 4, 5, 6: the transfer family (other surfaces: tasks_transfer)
    n_problems: int = 64  # how many problems to take (after offset); 0 = all for file/hub tasks
    offset: int = 0  # skip this many first problems (held-out splits use a different offset/seed)
    seed: int = 0  # arithmetic: the generator's seed (another seed, other problems)
    split: str = "test"  # hub split for gsm8k/math500
    path: str | None = None  # local .jsonl/.json/.parquet file for gsm8k/math500/jsonl; None = hub dataset
    question_field: str | None = None  # None = the task's default ("question"; "problem" for math500)
    answer_field: str | None = None  # None = "answer"
    few_shot: int = 1  # worked examples put before the question
    system_prompt: str | None = None  # a system turn before the examples (chat models)
    # the instruction put before each question
    instruction: str = "Solve the problem step by step. Finish with 'The answer is N.'"


# --------------------------------------------------------------------------- loading


def load_problems(cfg: TaskConfig) -> list[Problem]:
    """The problems ``cfg`` selects, in a fixed order."""
    _check_task_name(cfg.name)
    _check_window(cfg)
    if cfg.name == "arithmetic":
        if cfg.n_problems < 1:
            raise IPGError(
                f"task.n_problems is {cfg.n_problems} but arithmetic generates problems on demand; "
                "set task.n_problems >= 1"
            )
        return arithmetic_problems(cfg.n_problems, cfg.level, cfg.seed, cfg.offset)
    rows, source = _load_rows(cfg)
    return _rows_to_problems(cfg, rows, source, id_prefix(cfg))


def id_prefix(cfg: TaskConfig) -> str:
    """What a file or hub task's problem ids start with: the task name and its source's identity, so that two
    sources never share an id. A file: the first 12 hex digits of its content's sha256 (the same file anywhere
    gives the same ids; an edited one, other ids). A hub dataset: its split, unless it is the default (``test``),
    whose ids stay ``<task>-<row>``."""
    if cfg.path is not None:
        from .digest import file_digest

        return f"{cfg.name}-{file_digest(cfg.path)[:12]}"
    return cfg.name if cfg.split == TaskConfig.split else f"{cfg.name}-{cfg.split}"


def _check_task_name(name: str) -> None:
    if name not in TASK_NAMES:
        raise IPGError(f"unknown task {name!r}; set task.name to one of {list(TASK_NAMES)}")


def _check_window(cfg: TaskConfig) -> None:
    if cfg.offset < 0 or cfg.n_problems < 0:
        raise IPGError(
            f"task.offset={cfg.offset} and task.n_problems={cfg.n_problems} must not be negative; fix them"
        )


def _load_rows(cfg: TaskConfig):
    """(datasets.Dataset, a description of where it came from for error messages)."""
    if cfg.path is not None:
        return _load_file(cfg.path), str(cfg.path)
    if cfg.name == "jsonl":
        raise IPGError("task 'jsonl' needs a file; set task.path to a local .jsonl/.json/.parquet file")
    return _load_hub(cfg.name, cfg.split), f"hub dataset {_HUB_DATASETS[cfg.name][0]!r} split {cfg.split!r}"


def _load_file(path: str):
    return load_local_dataset(path, "task.path", FILE_FORMATS, "problem",
                              "fix task.path (or unset it to use the hub dataset)")


def load_local_dataset(path: str, key: str, formats: dict[str, str], item: str, missing_fix: str):
    """A local file (``formats``: suffix -> ``datasets`` builder) as a ``datasets.Dataset``.

    User errors name the config ``key`` the path came from: a missing file (``missing_fix``
    says what to do), an unsupported suffix, a file with no rows (``item`` names what a row
    is), a file ``datasets`` cannot read.
    """
    import datasets

    file = Path(path).expanduser()
    if not file.is_file():
        raise IPGError(f"{key} {path!r} does not exist or is not a file; {missing_fix}")
    fmt = formats.get(file.suffix.lower())
    if fmt is None:
        raise IPGError(f"{key} {path!r} has an unsupported extension; use one of {sorted(formats)}")
    empty = IPGError(f"{path} has no rows; point {key} at a file with at least one {item}")
    if _is_blank_text_file(file, fmt):
        raise empty
    try:
        return datasets.load_dataset(fmt, data_files=str(file), split="train")
    except Exception as e:
        if "corresponds to no data" in str(e):  # how datasets reports a file with zero rows ("[]", empty parquet)
            raise empty from None
        cause = e.__cause__ or e
        raise IPGError(
            f"could not read {key} {path!r} as {fmt} ({type(cause).__name__}: {first_line(cause)}); fix the file"
        ) from None


def _is_blank_text_file(file: Path, fmt: str) -> bool:
    # datasets fails on an empty JSON file with a bare StopIteration, so catch it first.
    if fmt == "parquet":
        return False
    if file.stat().st_size == 0:
        return True
    return file.stat().st_size < 4096 and not file.read_text(encoding="utf-8", errors="replace").strip()


def _load_hub(name: str, split: str):
    import datasets
    from huggingface_hub import constants, try_to_load_from_cache

    from .hub import unreachable as hub_unreachable

    repo, config = _HUB_DATASETS[name]
    cached = isinstance(try_to_load_from_cache(repo, "README.md", repo_type="dataset"), str)
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    why = None if offline else hub_unreachable()
    if why and not cached:
        raise IPGError(f"cannot reach the Hugging Face hub ({why}) to download dataset {repo!r}, which is not in the "
                       "local cache; check your network, or set task.path to a local .jsonl/.parquet file")
    if why:  # cached: read the cache without a minute of retries
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        raise IPGError(
            f"could not load hub dataset {repo!r} split {split!r} ({type(e).__name__}: {first_line(e)}); "
            "it needs a hub connection (or a cached copy), or set task.path to a local .jsonl/.parquet file"
        ) from None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no details"


def _empty_error(source: str) -> IPGError:
    return IPGError(f"{source} has no rows; point task.path at a file with at least one problem")


def _rows_to_problems(cfg: TaskConfig, rows, source: str, prefix: str) -> list[Problem]:
    if len(rows) == 0:
        raise _empty_error(source)
    question_field = cfg.question_field or _DEFAULT_QUESTION_FIELD[cfg.name]
    answer_field = cfg.answer_field or _DEFAULT_ANSWER_FIELD
    _check_field(rows.column_names, question_field, "task.question_field", source)
    _check_field(rows.column_names, answer_field, "task.answer_field", source)
    start, stop = _window(cfg, len(rows), source)
    to_problem = _gsm8k_problem if cfg.name == "gsm8k" else _plain_problem
    return [
        to_problem(f"{prefix}-{start + i:06d}", row, question_field, answer_field, source, start + i)
        for i, row in enumerate(rows.select(range(start, stop)))
    ]


def _check_field(columns: list[str], field: str, config_key: str, source: str) -> None:
    if field not in columns:
        raise IPGError(f"{source} has no field {field!r} (its fields are {columns}); set {config_key} to one of them")


def _window(cfg: TaskConfig, n_rows: int, source: str) -> tuple[int, int]:
    if cfg.offset >= n_rows:
        raise IPGError(f"task.offset={cfg.offset} skips all {n_rows} rows of {source}; lower task.offset")
    stop = n_rows if cfg.n_problems == 0 else min(cfg.offset + cfg.n_problems, n_rows)
    if cfg.n_problems and stop - cfg.offset < cfg.n_problems:
        log.warning("%s: asked for %d problems after offset %d, only %d exist",
                    source, cfg.n_problems, cfg.offset, stop - cfg.offset)
    return cfg.offset, stop


def _field_text(row: dict, field: str, source: str, index: int) -> str:
    value = row.get(field)
    if value is None or not str(value).strip():
        raise IPGError(f"{source} row {index} has an empty {field!r}; fill it in or remove that row")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise IPGError(f"{source} row {index}: {field!r} is a {type(value).__name__} ({value!r:.40}), not text or a "
                       f"number; write it as a single value, e.g. \"10\"")
    return str(value).strip()


def _gsm8k_problem(pid: str, row: dict, question_field: str, answer_field: str, source: str, index: int) -> Problem:
    question = _field_text(row, question_field, source, index)
    answer, solution = split_gsm8k_answer(_field_text(row, answer_field, source, index))
    return Problem(id=pid, question=question, answer=answer, solution=solution)


def _plain_problem(pid: str, row: dict, question_field: str, answer_field: str, source: str, index: int) -> Problem:
    question = _field_text(row, question_field, source, index)
    answer_text = _field_text(row, answer_field, source, index)
    # A jsonl file in GSM8K format ("... #### 72") still yields the short answer.
    answer, gsm8k_solution = split_gsm8k_answer(answer_text) if "####" in answer_text else (answer_text, None)
    solution = row.get("solution")
    return Problem(id=pid, question=question, answer=answer, solution=str(solution) if solution else gsm8k_solution)


def split_gsm8k_answer(text: str) -> tuple[str, str | None]:
    """(short answer, worked solution ending "The answer is N.") from a GSM8K answer field.

    The calculator annotations ``<<3*4=12>>`` are dropped; without ``####`` the whole text
    is the answer and there is no solution.
    """
    if "####" not in text:
        return text.replace(",", "").strip(), None
    reasoning, _, final = text.rpartition("####")
    answer = final.strip().replace(",", "")
    reasoning = re.sub(r"<<[^<>]*>>", "", reasoning).strip()
    solution = f"{reasoning}\nThe answer is {answer}." if reasoning else f"The answer is {answer}."
    return answer, solution


# --------------------------------------------------------------------------- arithmetic

_NAMES = ["Tom", "Sara", "Ali", "Mei", "Lucas", "Priya", "Omar", "Elena", "Kofi", "Hana", "Diego", "Nina"]


@dataclass(frozen=True)
class _Generated:
    question: str
    steps: list[str]  # one "a op b = c" sentence per step
    answer: int


def arithmetic_problems(n: int, level: int, seed: int, offset: int = 0) -> list[Problem]:
    """Problems ``offset .. offset+n-1`` of the (seed, level) stream."""
    _check_level(level)
    return [_arithmetic_problem(str(seed), level, i) for i in range(offset, offset + n)]


def _check_level(level: int) -> None:
    if level not in _TEMPLATES:
        raise IPGError(f"task.level is {level!r}; arithmetic has levels 1, 2 and 3 (and the transfer family's 4, 5 "
                       "and 6: ipg_sae.tasks_transfer), set task.level to one of them")


def _arithmetic_problem(stream: str, level: int, index: int) -> Problem:
    # Seeding per problem (string seeds hash with SHA-512, stable across runs and
    # PYTHONHASHSEED) makes problem i independent of how many problems are requested.
    rng = random.Random(f"{stream}-{level}-{index}")
    template = rng.choice(_TEMPLATES[level])
    generated = template(rng, rng.choice(_NAMES))
    solution = " ".join(generated.steps) + f" The answer is {generated.answer}."
    return Problem(
        id=f"arith-L{level}-s{stream}-{index:06d}",
        question=generated.question,
        answer=str(generated.answer),
        solution=solution,
    )


def _step(a: int, op: str, b: int, result: int, why: str) -> str:
    return f"{why} {a} {op} {b} = {result}."


# Level 1: one step, numbers 1..20, result >= 0.


def _l1_pick_apples(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return _Generated(f"{name} has {a} apples and picks {b} more apples. How many apples does {name} have now?",
                      [_step(a, "+", b, a + b, f"{name} starts with {a} apples and picks {b} more, so")], a + b)


def _l1_buy_pencils(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return _Generated(f"{name} has {a} pencils and buys {b} more. How many pencils does {name} have?",
                      [_step(a, "+", b, a + b, "Buying more pencils adds to the total:")], a + b)


def _l1_shelf_books(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return _Generated(f"There are {a} books on a shelf. {name} puts {b} more books on the shelf. "
                      "How many books are on the shelf now?",
                      [_step(a, "+", b, a + b, "The shelf gains books, so")], a + b)


def _l1_found_coins(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return _Generated(f"{name} found {a} coins on Monday and {b} coins on Tuesday. "
                      f"How many coins did {name} find in total?",
                      [_step(a, "+", b, a + b, "The coins from both days add up:")], a + b)


def _l1_give_marbles(rng: random.Random, name: str) -> _Generated:
    a = rng.randint(1, 20)
    b = rng.randint(1, a)
    return _Generated(f"{name} has {a} marbles and gives {b} of them to a friend. "
                      f"How many marbles does {name} have left?",
                      [_step(a, "-", b, a - b, "Giving marbles away removes them:")], a - b)


def _l1_eat_oranges(rng: random.Random, name: str) -> _Generated:
    a = rng.randint(1, 20)
    b = rng.randint(1, a)
    return _Generated(f"A basket holds {a} oranges. {name} eats {b} of them. How many oranges are left in the basket?",
                      [_step(a, "-", b, a - b, "The eaten oranges leave the basket:")], a - b)


def _l1_lose_stickers(rng: random.Random, name: str) -> _Generated:
    a = rng.randint(1, 20)
    b = rng.randint(1, a)
    return _Generated(f"{name} had {a} stickers and lost {b}. How many stickers does {name} have now?",
                      [_step(a, "-", b, a - b, f"{name} loses {b} of the {a} stickers, so")], a - b)


def _l1_birds_fly(rng: random.Random, name: str) -> _Generated:
    a = rng.randint(1, 20)
    b = rng.randint(1, a)
    return _Generated(f"{name} sees {a} birds on a fence. Then {b} birds fly away. "
                      "How many birds are still on the fence?",
                      [_step(a, "-", b, a - b, "The birds that fly away leave the fence:")], a - b)


# Level 2: two steps, numbers up to ~50.


def _l2_buy_then_give(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(5, 50), rng.randint(1, 30)
    c = rng.randint(1, a + b)
    s = a + b
    return _Generated(f"{name} has {a} apples, buys {b} more, and then gives {c} to a neighbor. "
                      f"How many apples does {name} have now?",
                      [_step(a, "+", b, s, "After buying,"), _step(s, "-", c, s - c, "After giving some away,")], s - c)


def _l2_boxes_plus_loose(rng: random.Random, name: str) -> _Generated:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 50)
    s = a * b
    return _Generated(f"{name} buys {a} boxes of pencils with {b} pencils in each box. {name} already had {c} pencils. "
                      f"How many pencils does {name} have now?",
                      [_step(a, "*", b, s, "The boxes hold"),
                       _step(s, "+", c, s + c, "Adding the pencils from before,")], s + c)


def _l2_trays_sold(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    s = a * b
    c = rng.randint(1, s)
    return _Generated(f"{name} bakes {a} trays of cookies with {b} cookies on each tray and sells {c} cookies. "
                      "How many cookies are left?",
                      [_step(a, "*", b, s, "The trays hold"), _step(s, "-", c, s - c, "After selling,")], s - c)


def _l2_pages_left(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    s = a + b
    c = rng.randint(s, 60)
    return _Generated(f"A book has {c} pages. {name} reads {a} pages on Monday and {b} pages on Tuesday. "
                      "How many pages are left to read?",
                      [_step(a, "+", b, s, f"{name} has read"), _step(c, "-", s, c - s, "The pages left are")], c - s)


def _l2_bus_stops(rng: random.Random, name: str) -> _Generated:
    a = rng.randint(5, 50)
    b = rng.randint(1, a)
    c = rng.randint(1, 30)
    s = a - b
    return _Generated(f"A bus has {a} passengers. At the first stop {b} get off and {c} get on. "
                      f"{name} wants to know how many passengers are on the bus now. How many are there?",
                      [_step(a, "-", b, s, "After people get off,"),
                       _step(s, "+", c, s + c, "After people get on,")], s + c)


def _l2_coins_saved(rng: random.Random, name: str) -> _Generated:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 40)
    s = a * b
    return _Generated(f"{name} saves {a} coins every day for {b} days and also gets {c} coins as a gift. "
                      f"How many coins does {name} have?",
                      [_step(a, "*", b, s, "The daily savings are"), _step(s, "+", c, s + c, "With the gift,")], s + c)


# Level 3: three steps, numbers up to ~200.


def _l3_cards(rng: random.Random, name: str) -> _Generated:
    a, b, c = rng.randint(3, 12), rng.randint(3, 12), rng.randint(5, 60)
    s1, s2 = a * b, a * b + c
    d = rng.randint(1, s2)
    return _Generated(f"{name} buys {a} packs of cards with {b} cards in each pack, gets {c} cards from a friend, "
                      f"and then gives away {d} cards. How many cards does {name} have?",
                      [_step(a, "*", b, s1, "The packs hold"), _step(s1, "+", c, s2, "With the gift,"),
                       _step(s2, "-", d, s2 - d, "After giving some away,")], s2 - d)


def _l3_orchard(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(3, 14), rng.randint(3, 14)
    s1 = a * b
    c = rng.randint(1, s1)
    d = rng.randint(5, 60)
    s2 = s1 - c
    return _Generated(f"{name}'s orchard has {a} rows of {b} trees. {c} trees are cut down and then {d} new trees "
                      "are planted. How many trees are in the orchard now?",
                      [_step(a, "*", b, s1, "At first there are"), _step(s1, "-", c, s2, "After cutting,"),
                       _step(s2, "+", d, s2 + d, "After planting,")], s2 + d)


def _l3_wages(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(8, 25), rng.randint(4, 8)
    s1 = a * b
    c = rng.randint(1, s1 // 2)
    d = rng.randint(1, s1 - c)
    s2 = s1 - c
    return _Generated(f"{name} earns {a} dollars a day for {b} days, then spends {c} dollars on a bike and {d} dollars "
                      f"on a helmet. How many dollars does {name} have left?",
                      [_step(a, "*", b, s1, f"{name} earns"), _step(s1, "-", c, s2, "After the bike,"),
                       _step(s2, "-", d, s2 - d, "After the helmet,")], s2 - d)


def _l3_teams(rng: random.Random, name: str) -> _Generated:
    a, b, d = rng.randint(3, 8), rng.randint(10, 25), rng.randint(2, 6)
    s1 = a * b
    c = rng.randint(5, 40)
    c += (-(s1 + c)) % d  # make the total split evenly into teams
    s2 = s1 + c
    return _Generated(f"A school has {a} classes with {b} students each. {c} new students join, and then "
                      f"{name} splits all the students equally into {d} teams. How many students are on each team?",
                      [_step(a, "*", b, s1, "The classes hold"), _step(s1, "+", c, s2, "With the new students,"),
                       _step(s2, "/", d, s2 // d, "Split into teams,")], s2 // d)


def _l3_shopping(rng: random.Random, name: str) -> _Generated:
    b, c, d = rng.randint(2, 9), rng.randint(3, 15), rng.randint(2, 20)
    s1 = b * c
    a = rng.randint(s1 + d, 200)
    s2 = a - s1
    return _Generated(f"{name} has {a} dollars and buys {b} notebooks that cost {c} dollars each and a pen that costs "
                      f"{d} dollars. How many dollars does {name} have left?",
                      [_step(b, "*", c, s1, "The notebooks cost"), _step(a, "-", s1, s2, "After the notebooks,"),
                       _step(s2, "-", d, s2 - d, "After the pen,")], s2 - d)


_Template = Callable[[random.Random, str], _Generated]
_TEMPLATES: dict[int, list[_Template]] = {
    1: [_l1_pick_apples, _l1_buy_pencils, _l1_shelf_books, _l1_found_coins,
        _l1_give_marbles, _l1_eat_oranges, _l1_lose_stickers, _l1_birds_fly],
    2: [_l2_buy_then_give, _l2_boxes_plus_loose, _l2_trays_sold, _l2_pages_left, _l2_bus_stops, _l2_coins_saved],
    3: [_l3_cards, _l3_orchard, _l3_wages, _l3_teams, _l3_shopping],
}
_TEMPLATES.update(TRANSFER_TEMPLATES)  # levels 4-6: the transfer family on other surfaces


# --------------------------------------------------------------------------- few-shot examples

_GSM8K_EXAMPLES = [
    Problem("fewshot-gsm8k-0",
            "A bakery sells muffins for $3 each. On Monday it sold 24 muffins and on Tuesday it sold 18 muffins. "
            "How much money, in dollars, did the bakery make from muffins on those two days?",
            "126",
            "Over the two days the bakery sold 24 + 18 = 42 muffins. At $3 each that is 42 * 3 = 126 dollars. "
            "The answer is 126."),
    Problem("fewshot-gsm8k-1",
            "Maya has 5 boxes of crayons with 12 crayons in each box. She gives 17 crayons to her brother. "
            "How many crayons does Maya have left?",
            "43",
            "Maya starts with 5 * 12 = 60 crayons. After giving 17 away she has 60 - 17 = 43 crayons. "
            "The answer is 43."),
    Problem("fewshot-gsm8k-2",
            "A train travels at 60 miles per hour for 2.5 hours and then at 40 miles per hour for 1 hour. "
            "How many miles does it travel in total?",
            "190",
            "In the first part it travels 60 * 2.5 = 150 miles. In the second part it travels 40 * 1 = 40 miles. "
            "In total that is 150 + 40 = 190 miles. The answer is 190."),
    Problem("fewshot-gsm8k-3",
            "A class of 28 students is split into groups of 4. Each group needs 3 markers. "
            "How many markers does the class need?",
            "21",
            "There are 28 / 4 = 7 groups. The groups need 7 * 3 = 21 markers. The answer is 21."),
]

_MATH_EXAMPLES = [
    Problem("fewshot-math-0",
            "What is the value of $\\frac{1}{2} + \\frac{1}{3}$?",
            "\\frac{5}{6}",
            "With the common denominator 6, "
            "$\\frac{1}{2} + \\frac{1}{3} = \\frac{3}{6} + \\frac{2}{6} = \\frac{5}{6}$. "
            "The answer is \\frac{5}{6}."),
    Problem("fewshot-math-1",
            "Solve for $x$: $3x - 7 = 11$.",
            "6",
            "Adding 7 to both sides gives $3x = 18$, so $x = 6$. The answer is 6."),
    Problem("fewshot-math-2",
            "How many positive divisors does $36$ have?",
            "9",
            "Since $36 = 2^2 \\cdot 3^2$, it has $(2+1)(2+1) = 9$ positive divisors. The answer is 9."),
    Problem("fewshot-math-3",
            "What is the remainder when $2^{10}$ is divided by $7$?",
            "2",
            "Since $2^3 = 8 \\equiv 1 \\pmod 7$, we get $2^{10} = (2^3)^3 \\cdot 2 \\equiv 2 \\pmod 7$. "
            "The answer is 2."),
]

_BUILTIN_EXAMPLES = {"gsm8k": _GSM8K_EXAMPLES, "math500": _MATH_EXAMPLES, "jsonl": _GSM8K_EXAMPLES}


def few_shot_examples(cfg: TaskConfig, k: int) -> list[Problem]:
    """``k`` worked examples for ``cfg``'s task, disjoint from the problems it evaluates."""
    _check_task_name(cfg.name)
    if k <= 0:
        return []
    if cfg.name == "arithmetic":
        return _arithmetic_examples(cfg, k)
    examples = _BUILTIN_EXAMPLES[cfg.name]
    if k > len(examples):
        raise IPGError(f"task.few_shot={k} but {cfg.name} has {len(examples)} built-in worked examples; "
                       f"set task.few_shot to at most {len(examples)}")
    return examples[:k]


def _arithmetic_examples(cfg: TaskConfig, k: int) -> list[Problem]:
    _check_level(cfg.level)
    # A separate seed stream; also skip any example whose question is being evaluated,
    # since small level-1 numbers can collide by chance.
    evaluated = {p.question for p in arithmetic_problems(max(cfg.n_problems, 0), cfg.level, cfg.seed, cfg.offset)}
    examples: list[Problem] = []
    index = 0
    while len(examples) < k:
        example = _arithmetic_problem(f"fewshot{cfg.seed}", cfg.level, index)
        if example.question not in evaluated:
            examples.append(example)
        index += 1
    return examples


# --------------------------------------------------------------------------- prompts


def format_prompt(tokenizer: Any, problem: Problem, cfg: TaskConfig, examples: list[Problem]) -> str:
    """The prompt text for ``problem``: chat turns when the tokenizer has a chat template, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        return _chat_prompt(tokenizer, problem, cfg, examples)
    return _plain_prompt(problem, cfg, examples)


def build_prompts(tokenizer: Any, problems: list[Problem], cfg: TaskConfig) -> list[str]:
    examples = few_shot_examples(cfg, cfg.few_shot)
    return [format_prompt(tokenizer, problem, cfg, examples) for problem in problems]


def _user_turn(question: str, cfg: TaskConfig) -> str:
    return f"{cfg.instruction}\n\n{question}" if cfg.instruction else question


def _worked_solution(example: Problem) -> str:
    return example.solution or f"The answer is {example.answer}."


def _chat_prompt(tokenizer: Any, problem: Problem, cfg: TaskConfig, examples: list[Problem]) -> str:
    turns: list[dict[str, str]] = []
    for example in examples:
        turns.append({"role": "user", "content": _user_turn(example.question, cfg)})
        turns.append({"role": "assistant", "content": _worked_solution(example)})
    turns.append({"role": "user", "content": _user_turn(problem.question, cfg)})
    if not cfg.system_prompt:
        return _apply_template(tokenizer, turns)
    try:
        return _apply_template(tokenizer, [{"role": "system", "content": cfg.system_prompt}, *turns])
    except Exception:
        # Some templates (older Gemma, Mistral) reject a system role; put it in the first user turn instead.
        turns[0] = {"role": "user", "content": f"{cfg.system_prompt}\n\n{turns[0]['content']}"}
        return _apply_template(tokenizer, turns)


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _plain_prompt(problem: Problem, cfg: TaskConfig, examples: list[Problem]) -> str:
    header = "\n\n".join(part for part in (cfg.system_prompt, cfg.instruction) if part)
    blocks = [f"Question: {example.question}\nAnswer: {_worked_solution(example)}\n\n" for example in examples]
    prefix = f"{header}\n\n" if header else ""
    return prefix + "".join(blocks) + f"Question: {problem.question}\nAnswer:"
