"""Token rows to train on: documents from a text dataset, a task, or saved trajectories.

Everything downstream sees one fixed tensor of rows (``TokenRows``): ``tokens [N, T]``,
``attention [N, T]`` (1 = real token) and ``mask [N, T]`` (positions whose residual the SAE
trains and is evaluated on). The rows are a pure function of the config and tokenizer,
so row ``i`` is the same in every run: activation chunks can then be cached by content
and a resumed run finds its data position from the step count alone.

Documents are tokenized one by one and, with ``pack``, concatenated (each followed by EOS)
and cut into rows of BOS + ``context_size - 1`` tokens, as sae-lens does; otherwise each
document is one right-padded row. The first position of every row is masked out: its
residual norm is ~100x the others (an attention sink), and it would dominate the
reconstruction loss. Padding is masked out too.

The rows are shuffled once with the run seed (so a file sorted by topic or level does not
put one topic in the held-out set) and the last ``n_eval_sequences`` are held out.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from ipg_sae.errors import IPGError
from ipg_sae.tasks import FILE_FORMATS, first_line, load_local_dataset

from .config import DataConfig, TrainSAEConfig

log = logging.getLogger(__name__)

_FILE_FORMATS = {**FILE_FORMATS, ".txt": "text"}


@dataclass
class TokenRows:
    tokens: torch.Tensor  # [N, T] int64
    attention: torch.Tensor  # [N, T] int64, 1 = real token
    mask: torch.Tensor  # [N, T] bool, positions to train / evaluate on

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> "TokenRows":
        return TokenRows(self.tokens[index], self.attention[index], self.mask[index])

    def n_valid(self) -> int:
        return int(self.mask.sum())

    def digest(self) -> str:
        """A content hash: equal digests mean equal rows (the activation cache key)."""
        h = hashlib.sha256()
        for t in (self.tokens, self.attention, self.mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def check_context_size(cfg: TrainSAEConfig) -> None:
    """Before any work: ``context_size`` fits the model's positions (read from its config, no weights loaded).
    A RoPE model would otherwise train silently past the positions it was trained on, a learned-position one
    fail with an index error."""
    from ipg_sae.models import context_length, load_tokenizer_and_config

    _, config = load_tokenizer_and_config(cfg.model)
    limit = context_length(config)
    if limit and cfg.context_size > limit:
        raise IPGError(f"context_size {cfg.context_size} is longer than the {limit} positions model "
                       f"{cfg.model.name!r} takes; lower context_size to at most {limit}")


def build_rows(cfg: TrainSAEConfig, tokenizer, model_fingerprint: dict | None = None) -> TokenRows:
    """All rows the config's data gives, in a fixed shuffled order (held-out rows last)."""
    # Enough positions for the token budget plus the held-out rows; more is not read.
    per_row = cfg.context_size / (cfg.context_size - 1)  # the first position of each row is not trained on
    needed = int(cfg.training_tokens * per_row) + (cfg.n_eval_sequences + 1) * cfg.context_size
    docs = _documents(cfg.data, tokenizer, needed, model_fingerprint)
    rows = _pack(docs, cfg.context_size, tokenizer) if cfg.data.pack else _pad(docs, cfg.context_size, tokenizer)
    if len(rows) == 0:
        raise IPGError(f"the data gives no complete row of context_size {cfg.context_size} tokens; "
                       "add data or lower context_size")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
    return rows[order]


def split_rows(rows: TokenRows, n_eval: int) -> tuple[TokenRows, TokenRows]:
    """(training rows, held-out rows): the last ``n_eval`` rows are held out."""
    if len(rows) <= n_eval:
        raise IPGError(f"the data gives only {len(rows)} rows of tokens but n_eval_sequences is {n_eval}; "
                       "add data, lower context_size or lower n_eval_sequences")
    return rows[: len(rows) - n_eval], rows[len(rows) - n_eval:]


# ---- documents --------------------------------------------------------------------------


def excluded_questions(data: DataConfig) -> set[str]:
    """The question texts (as :func:`ipg_sae.splits.question_key`) the corpus must not hold: ``data.exclude_tasks``'s."""
    from ipg_sae.splits import question_key
    from ipg_sae.tasks import load_problems

    return {question_key(p.question) for task in data.exclude_tasks for p in load_problems(task)}


def task_problems(data: DataConfig) -> list:
    """The problems a ``task`` corpus is made of, levels interleaved, without those of ``data.exclude_tasks``."""
    return [p for p, _ in _task_items(data, None)]


def _task_items(data: DataConfig, tokenizer) -> list[tuple]:
    """``(problem, prompt)`` of a ``task`` corpus (prompts None without a tokenizer), levels interleaved so a partial
    read (token budget reached) still mixes them, less every problem whose question is in ``data.exclude_tasks``."""
    import dataclasses

    from ipg_sae.splits import question_key
    from ipg_sae.tasks import build_prompts, load_problems

    per_level = []
    for level in data.task_levels or [data.task.level]:
        task = dataclasses.replace(data.task, level=level)
        problems = load_problems(task)
        prompts = build_prompts(tokenizer, problems, task) if tokenizer is not None else [None] * len(problems)
        per_level.append(list(zip(problems, prompts)))
    items = [item for group in zip(*per_level) for item in group]
    excluded = excluded_questions(data)
    kept = [(p, prompt) for p, prompt in items if question_key(p.question) not in excluded]
    if len(kept) < len(items):
        log.info("SAE corpus: left out %d of %d problems whose question is in an evaluation split (data.exclude_tasks)",
                 len(items) - len(kept), len(items))
    if not kept:
        raise IPGError("every problem of the SAE's data.task is in an evaluation split (data.exclude_tasks); give "
                       "data.task another offset or seed")
    return kept


def _documents(data: DataConfig, tokenizer, needed: int, fingerprint: dict | None) -> list[list[int]]:
    """Token-id lists, one per document, stopping once about ``needed`` tokens are read."""
    if data.source == "text":
        stream = _text_documents(data, tokenizer)
    elif data.source == "task":
        stream = _task_documents(data, tokenizer)
    else:
        stream = _trajectory_documents(data, tokenizer, fingerprint)
    dropped = [0]
    if data.source != "task" and data.exclude_tasks:
        stream = _without_questions(stream, excluded_questions(data), tokenizer, dropped)
    docs, total = [], 0
    for doc in stream:
        if len(doc) < 2:
            continue  # nothing to predict, nothing but a first token
        docs.append(doc)
        total += len(doc)
        if total >= needed or (data.max_documents and len(docs) >= data.max_documents):
            break
    if not docs and dropped[0]:
        raise IPGError(f"every document of data source {data.source!r} holds a question of a problem set the job "
                       "attributes on or evaluates on (data.exclude_tasks); train the SAE on other text")
    if not docs:
        raise IPGError(f"data source {data.source!r} gave no documents with at least 2 tokens; check the data settings")
    log.info("read %d documents, %d tokens", len(docs), total)
    return docs


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def _text_documents(data: DataConfig, tokenizer) -> Iterator[list[int]]:
    rows = _load_text_dataset(data)
    columns = list(rows.column_names or []) if rows.column_names is not None else None
    if columns is not None and data.text_field not in columns:
        raise IPGError(f"{_describe(data)} has no field {data.text_field!r} (its fields are {columns}); "
                       "set data.text_field to one of them")
    for row in rows:
        text = row.get(data.text_field)
        if text is None:
            raise IPGError(f"{_describe(data)} has no field {data.text_field!r} (its fields are {sorted(row)}); "
                           "set data.text_field to one of them")
        if str(text).strip():
            # The tokenizer adds BOS where its model expects one (Llama-style); it starts each document.
            yield _with_eos(tokenizer(str(text)).input_ids, tokenizer)


def _describe(data: DataConfig) -> str:
    return f"data file {data.path}" if data.path else f"dataset {data.dataset!r} split {data.split!r}"


def _load_text_dataset(data: DataConfig):
    import datasets

    if data.path:
        return load_local_dataset(data.path, "data.path", _FILE_FORMATS, "document",
                                  "give a local .jsonl/.json/.parquet/.csv/.txt file")
    try:
        # Streaming reads only the documents the token budget needs.
        return datasets.load_dataset(data.dataset, data.dataset_config, split=data.split, streaming=True)
    except Exception as e:
        raise IPGError(f"could not load dataset {data.dataset!r} split {data.split!r} ({type(e).__name__}: "
                       f"{first_line(e)}); check the name and your network, or use a local file in data.path") from None


def _task_documents(data: DataConfig, tokenizer) -> Iterator[list[int]]:
    """Prompt + worked solution for each problem, the text the policy is attributed on."""
    for p, prompt in _task_items(data, tokenizer):
        text = prompt + (p.solution or f"The answer is {p.answer}.")
        # The chat template already wrote the special tokens; do not add a BOS twice.
        yield _with_eos(tokenizer(text, add_special_tokens=False).input_ids, tokenizer)


def _without_questions(stream: Iterator[list[int]], excluded: set[str], tokenizer,
                       dropped: list[int]) -> Iterator[list[int]]:
    """The documents of a text or trajectories corpus that hold none of the ``excluded`` questions (``dropped[0]``
    counts the others)."""
    from ipg_sae.splits import question_key

    for doc in stream:
        text = question_key(tokenizer.decode(doc, skip_special_tokens=True))
        if any(q in text for q in excluded):
            dropped[0] += 1
            if dropped[0] == 1:
                log.info("SAE corpus: leaving out the documents that hold a question of an evaluation split "
                         "(data.exclude_tasks)")
            continue
        yield doc


def _trajectory_documents(data: DataConfig, tokenizer, fingerprint: dict | None) -> Iterator[list[int]]:
    from ipg_sae.trajectories import check_same_model, load_trajectories

    trajectories = load_trajectories(data.path)
    if fingerprint is not None:
        check_same_model(trajectories, fingerprint)
    for t in trajectories:
        yield _with_eos([*t.prompt_ids, *t.completion_ids], tokenizer)


# ---- rows -------------------------------------------------------------------------------


def _pack(docs: list[list[int]], context: int, tokenizer) -> TokenRows:
    # Every row starts with BOS (EOS if the tokenizer has none), as sae-lens packs: the model
    # parks its attention sink on a row's first token, and when that is an arbitrary token
    # cut from mid-document (a newline, a digit), the sink, with its huge residual norm,
    # lands on a later position that the mask would not exclude.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream = torch.tensor([tok for doc in docs for tok in doc], dtype=torch.long)
    body = context - 1 if start is not None else context
    n = stream.numel() // body
    tokens = stream[: n * body].view(n, body)
    if start is not None:
        tokens = torch.cat([torch.full((n, 1), start, dtype=torch.long), tokens], dim=1)
    attention = torch.ones_like(tokens)
    mask = torch.ones(n, context, dtype=torch.bool)
    mask[:, 0] = False
    return TokenRows(tokens, attention, mask)


def _pad(docs: list[list[int]], context: int, tokenizer) -> TokenRows:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(docs), context), pad, dtype=torch.long)
    attention = torch.zeros(len(docs), context, dtype=torch.long)
    for i, doc in enumerate(docs):
        doc = doc[:context]
        tokens[i, : len(doc)] = torch.tensor(doc)
        attention[i, : len(doc)] = 1
    mask = attention.bool().clone()
    mask[:, 0] = False
    return TokenRows(tokens, attention, mask)


# ---- disjointness from the problems a job evaluates on ------------------------------------


def check_corpus_disjoint(sae_path: str, tasks: list) -> None:
    """Refuse an SAE trained here (its ``train_sae_config.yaml`` beside its ``sae/`` folder) whose ``task`` corpus
    holds a question of one of ``tasks`` (the problem sets a job attributes on or evaluates on). SAEs from
    elsewhere, and text or trajectory corpora, whose documents cannot be listed cheaply, are not checked."""
    from pathlib import Path

    from ipg_sae.config import load_config
    from ipg_sae.splits import question_key
    from ipg_sae.tasks import load_problems

    from .config import TrainSAEConfig

    path = Path(sae_path).expanduser()
    recipe = next((d / "train_sae_config.yaml" for d in (path, path.parent, path.parent.parent)
                   if (d / "train_sae_config.yaml").is_file()), None)
    if recipe is None:
        return
    try:
        train = load_config(TrainSAEConfig, recipe)
    except IPGError as e:
        log.warning("cannot read %s to check the SAE's corpus against this job's problems (%s)", recipe, e)
        return
    if train.data.source != "task":
        log.info("the SAE %s trained on a %s corpus: not checked against this job's problems", path, train.data.source)
        return
    corpus = {question_key(p.question) for p in task_problems(train.data)}
    for task in tasks:
        shared = [p for p in load_problems(task) if question_key(p.question) in corpus]
        if shared:
            raise IPGError(f"the SAE {path} was trained on {len(shared)} question(s) of a problem set this job uses "
                           f"({task.name} level {task.level}, offset {task.offset}, e.g. {shared[0].question!r}); "
                           f"retrain it with that set in data.exclude_tasks of {recipe.name} (a job that trains its "
                           "SAE excludes its own sets), or choose other problems")
