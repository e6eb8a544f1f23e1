"""Disjoint problem splits: attribution, dev, test and transfer sets that never share a problem.

A steering recipe is chosen on one split and judged on another; a problem in both would leak
the answer into the choice. :func:`disjoint_splits` loads every split and refuses any problem
that appears in two of them, matched by id and by its question text (two task configs can
name the same problem differently: another offset of the same generator, a JSONL copy).
"""

from __future__ import annotations

import dataclasses
import re

from .errors import IPGError
from .tasks import Problem, TaskConfig, load_problems


def disjoint_splits(tasks: dict[str, TaskConfig]) -> dict[str, list[Problem]]:
    """Each split's problems (``{name: task}``, in order), after checking no problem is in two splits.

    Ids name their source (a file's content digest, a hub split, the generator's seed), so a shared id is the
    same problem of the same source: the splits' windows overlap. A shared question under two ids is the same
    question in two sources. Each refusal advises only what can separate the two splits."""
    loaded = {name: load_problems(task) for name, task in tasks.items()}
    owner: dict[str, tuple[str, str]] = {}  # key -> (split, problem id)
    for name, problems in loaded.items():
        if not problems:
            raise IPGError(f"the {name} split has no problems; check its task.n_problems and offset")
        for p in problems:
            for kind, key in (("id", f"id:{p.id}"), ("question", f"question:{question_key(p.question)}")):
                if key in owner and owner[key][0] != name:
                    other, other_id = owner[key]
                    raise IPGError(f"problem {p.id} of the {name} split is also in the {other} split (as {other_id}); "
                                   + _advice(kind, tasks[name], tasks[other]))
                owner.setdefault(key, (name, p.id))
    return loaded


def _advice(kind: str, task: TaskConfig, other: TaskConfig) -> str:
    """What can separate two splits that share a problem (``kind``: matched by id, or only by question text)."""
    seeds = task.name == other.name == "arithmetic"
    if kind == "id":  # the same source: only the windows (and, for the generator, its seed) can differ
        return ("both read the same source: give them disjoint windows (task.offset, task.n_problems)"
                + (" or another task.seed" if seeds else ""))
    files = [t.path for t in (task, other) if t.path]
    fixes = ["move one split's window (task.offset, task.n_problems) past it"]
    if files:
        fixes.insert(0, f"remove the question from {' or '.join(files)}")
    if seeds:
        fixes.append("give one split another task.seed")
    return "the same question comes from two sources: " + ", or ".join(fixes)


def question_key(question: str) -> str:
    """A question's text as splits compare it: lower case, runs of whitespace as one space, and no whitespace next
    to punctuation (``"3 + 5 ?"`` and ``"3+5?"`` are the same question)."""
    text = re.sub(r"\s+", " ", question.strip().lower())
    return re.sub(r" ?([^\w\s]) ?", r"\1", text)


def problem_sets(cfg, skip: tuple[str, ...] = ("sae",)) -> list[TaskConfig]:
    """Every problem set (:class:`TaskConfig`) a job config names, at any depth (attribution, held-out, dev, test,
    transfer splits), once each; the fields named in ``skip`` (the SAE's own training recipe) are not searched."""
    found: list[TaskConfig] = []

    def walk(node) -> None:
        if isinstance(node, TaskConfig):
            if node not in found:
                found.append(node)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                if f.name not in skip:
                    walk(getattr(node, f.name))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(cfg)
    return found
