r"""LLM explanations and their scores, when the user has an LLM: an explainer and Delphi's detection and fuzzing
scorers, over any OpenAI-compatible ``/v1/chat/completions`` endpoint (a vLLM server, an API) or a local
transformers model.

Why not ``eai-delphi`` itself: its wheel (0.1.3) requires ``vllm>=0.10.2`` (with ``eai-sparsify``,
``bitsandbytes``, ``faiss-cpu``, ``sentence_transformers``), and no vllm release that satisfies it installs beside
the pinned ``torch==2.13.0`` and ``constraints.txt``: each pins its own torch stack (vllm 0.33 pins
``torchaudio==2.11.0``, i.e. torch 2.11), and ``pip install --dry-run eai-delphi -c constraints.txt`` with torch
2.13.0 backtracked through every vllm from 0.34 down to 0.4.2 without finding a solution. It would also pull a
GPU inference server into a CPU install. The prompts below follow Delphi's
(``delphi/explainers/default/prompts.py``, ``delphi/scorers/classifier/prompts/{detection,fuzz}_prompt.py``,
Apache-2.0), shortened; the scoring is Delphi's: the model labels each example 1 or 0, and the score is the
balanced accuracy of those labels.

* explainer (:func:`explain`): the latent's strongest *build* windows, the firing token between ``<<`` and ``>>``
  with its activation; the answer's last ``[EXPLANATION]:`` line is the explanation;
* detection (:func:`score_detection`): *held-out* windows (firing ones and as many silent ones, half of them
  hard negatives, :func:`ipg_sae.explanations.detection_sample`), unmarked: "does this example have the
  latent?";
* fuzzing (:func:`score_fuzzing`): held-out firing windows with the firing token marked, and the same number
  with a token marked where the latent is silent: "is every marked token correctly labelled?".

Failures: the endpoint is called with ``timeout_s`` (default 10 s) and no retries, so a missing or silent
endpoint fails in seconds with one :class:`~ipg_sae.errors.IPGError` line naming the URL and the setting to
fix. :func:`explain_all` writes each latent's result as soon as it is computed (atomically, :mod:`ipg_sae.io`)
and keeps what is already in the file, so a rerun continues where a failure stopped it.
"""

from __future__ import annotations

import ast
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import IPGError
from .explain_config import LLMConfig  # noqa: F401  (re-exported: the config lives torch-free)
from .explanations import Activations, Corpus, ExplainConfig, NGramCounts, binary_scores, detection_sample

Chat = Callable[[list[dict]], str]


def openai_chat(cfg: LLMConfig) -> Chat:
    """A chat function over ``{base_url}/chat/completions`` (standard library only, one try, ``timeout_s``)."""
    url = cfg.resolved_url() + "/chat/completions"
    key = cfg.resolved_key()

    def chat(messages: list[dict]) -> str:
        body = json.dumps({"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens,
                           "temperature": cfg.temperature}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                answer = json.loads(response.read().decode("utf-8"))
            return str(answer["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as e:
            raise IPGError(f"LLM endpoint {url} answered HTTP {e.code} ({e.reason}); check llm.model "
                           f"({cfg.model!r}) and llm.api_key") from None
        except (TimeoutError, OSError) as e:  # URLError, refused connections and socket timeouts are OSErrors
            reason = getattr(e, "reason", e)
            raise IPGError(f"LLM endpoint {url} did not answer within {cfg.timeout_s:g} s ({reason}); start the "
                           "server or fix llm.base_url (explanations already computed are kept)") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise IPGError(f"LLM endpoint {url} did not answer like /v1/chat/completions (no choices[0].message."
                           "content); point llm.base_url at an OpenAI-compatible server") from None

    return chat


def transformers_chat(cfg: LLMConfig, model=None, tokenizer=None) -> Chat:
    """A chat function over a local transformers model (greedy, ``max_tokens`` new tokens): the model named by
    ``cfg.model`` or the one given."""
    import torch

    if model is None or tokenizer is None:
        from .models import load_model

        model, tokenizer = load_model(cfg.model)

    @torch.no_grad()
    def chat(messages: list[dict]) -> str:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = {k: v.to(next(model.parameters()).device) for k, v in ids.items()}
        out = model.generate(**ids, max_new_tokens=cfg.max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return chat


def make_chat(cfg: LLMConfig, model=None, tokenizer=None) -> Chat:
    return transformers_chat(cfg, model, tokenizer) if cfg.backend == "transformers" else openai_chat(cfg)


def preflight(chat: Chat) -> None:
    """One short request, so that a missing or silent endpoint fails before any other work (in ``timeout_s``)."""
    chat([{"role": "user", "content": "Reply with the word OK."}])


# ---- prompts (after Delphi's) ------------------------------------------------------------------

EXPLAINER_SYSTEM = """You are a meticulous AI researcher conducting an important investigation into patterns found \
in language. Your task is to analyze text and provide an explanation that thoroughly encapsulates possible patterns \
found in it.
Guidelines:

You will be given a list of text examples on which special words are selected and between delimiters like <<this>>. \
How important each token is for the behavior is listed after each example in parentheses.

- Try to produce a concise final description. Simply describe the text latents that are common in the examples, and \
what patterns you found.
- If the examples are uninformative, you don't need to mention them. Don't focus on giving examples of important \
tokens, but try to summarize the patterns found in the examples.
- Do not mention the marker tokens (<< >>) in your explanation.
- Do not make lists of possible explanations. Keep your explanations short and concise.
- The last line of your response must be the formatted explanation, using [EXPLANATION]:"""

DETECTION_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment".

You will then be given several text examples. Your task is to determine which examples possess the latent.

For each example in turn, return 1 if the sentence is correctly labeled or 0 if the tokens are mislabeled. You must \
return your response in a valid Python list. Do not return anything else besides a Python list."""

FUZZING_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment". You will be \
given a few examples of text that contain this latent. Portions of the sentence which strongly represent this \
latent are between tokens << and >>.

Some examples might be mislabeled. Your task is to determine if every single token within << and >> is correctly \
labeled. Consider that all provided examples could be correct, none of the examples could be correct, or a mix. An \
example is only correct if every marked token is representative of the latent

For each example in turn, return 1 if the sentence is correctly labeled or 0 if the tokens are mislabeled. You must \
return your response in a valid Python list. Do not return anything else besides a Python list."""

SCORER_PROMPT = "Latent explanation: {explanation}\n\nText examples:\n\n{examples}\n"


def window_text(acts: Activations, k: int, pieces, before: int, mark: bool) -> str:
    """The tokens up to flat position ``k`` (``before`` of them before it), the last one in ``<<>>`` if ``mark``."""
    lo = max(int(acts.offsets[acts.seq[k]]), k - before)
    head = "".join(pieces([int(t) for t in acts.ids[lo:k]]))
    last = "".join(pieces([int(acts.ids[k])]))
    return head + (f"<<{last}>>" if mark else last)


def parse_explanation(answer: str) -> str:
    """The text after the last ``[EXPLANATION]:`` (the whole answer's last line when there is none)."""
    found = re.findall(r"\[EXPLANATION\]:\s*(.+)", answer)
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return (found[-1] if found else (lines[-1] if lines else "")).strip()


def parse_labels(answer: str, n: int) -> list[int] | None:
    """The list of ``n`` 0/1 labels in the answer (the first ``[...]`` that parses), else None."""
    for match in re.findall(r"\[[^\[\]]*\]", answer):
        try:
            values = ast.literal_eval(match)
        except (ValueError, SyntaxError):
            continue
        if isinstance(values, (list, tuple)) and len(values) == n and all(v in (0, 1) for v in values):
            return [int(v) for v in values]
    return None


# ---- explainer and scorers ---------------------------------------------------------------------


def explain(chat: Chat, acts: Activations, latent: int, pieces, cfg: LLMConfig) -> str:
    """The LLM's explanation of the latent from its strongest build windows."""
    idx, val = acts.fires.get(latent, (np.array([], dtype=int), np.array([])))
    keep = ~acts.held[idx]
    idx, val = idx[keep], val[keep]
    if not len(idx):
        return ""
    top = np.argsort(-val, kind="stable")[:cfg.n_explain]
    lines = []
    for n, j in enumerate(top, 1):
        k = int(idx[j])
        lines.append(f"Example {n}: {window_text(acts, k, pieces, cfg.window, True)}\n"
                     f"Activations: ({json.dumps(pieces([int(acts.ids[k])])[0])}, {float(val[j]):.3g})")
    messages = [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
    return parse_explanation(chat(messages))


def _ask(chat: Chat, system: str, explanation: str, texts: list[str], per_prompt: int) -> list[int | None]:
    out: list[int | None] = []
    for lo in range(0, len(texts), per_prompt):
        chunk = texts[lo:lo + per_prompt]
        examples = "\n".join(f"Example {j}: {t}" for j, t in enumerate(chunk))
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": SCORER_PROMPT.format(explanation=explanation, examples=examples)}]
        labels = parse_labels(chat(messages), len(chunk))
        out += labels if labels is not None else [None] * len(chunk)
    return out


def _balanced(labels: list[int | None], truth: np.ndarray) -> dict:
    """Balanced accuracy of the parsed labels (an unparsed answer counts as wrong) and the share parsed."""
    given = np.array([v if v is not None else -1 for v in labels])
    predicted = np.where(given < 0, ~truth, given == 1)
    bacc, _ = binary_scores(predicted.astype(bool), truth)
    return {"balanced_accuracy": bacc, "parsed": round(float((given >= 0).mean()), 4) if len(given) else None,
            "n": int(len(given))}


def _held_out(counts: NGramCounts, latent: int, cfg: LLMConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    pos, neg, _ = detection_sample(counts, latent, ExplainConfig(n_detect=cfg.n_score, seed=seed))
    return pos, neg


def score_detection(chat: Chat, counts: NGramCounts, latent: int, explanation: str, pieces, cfg: LLMConfig,
                    seed: int = 0) -> dict:
    """Delphi's detection score on held-out windows (unmarked), firing and silent (hard negatives included)."""
    pos, neg = _held_out(counts, latent, cfg, seed)
    if not len(pos) or not explanation:
        return {"balanced_accuracy": None, "parsed": None, "n": 0}
    order = np.random.default_rng(seed + latent).permutation(len(pos) + len(neg))
    points = np.concatenate([pos, neg])[order]
    truth = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])[order]
    texts = [window_text(counts.acts, int(k), pieces, cfg.window, False) for k in points]
    return _balanced(_ask(chat, DETECTION_SYSTEM, explanation, texts, cfg.per_prompt), truth)


def score_fuzzing(chat: Chat, counts: NGramCounts, latent: int, explanation: str, pieces, cfg: LLMConfig,
                  seed: int = 0) -> dict:
    """Delphi's fuzzing score: held-out windows with the firing token marked, and windows with a silent token
    marked (mislabelled); the LLM says which are correctly labelled."""
    pos, neg = _held_out(counts, latent, cfg, seed + 1)
    if not len(pos) or not explanation:
        return {"balanced_accuracy": None, "parsed": None, "n": 0}
    order = np.random.default_rng(seed + latent + 1).permutation(len(pos) + len(neg))
    points = np.concatenate([pos, neg])[order]
    truth = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])[order]
    texts = [window_text(counts.acts, int(k), pieces, cfg.window, True) for k in points]
    return _balanced(_ask(chat, FUZZING_SYSTEM, explanation, texts, cfg.per_prompt), truth)


def explain_all(chat: Chat, corpus: Corpus, acts: Activations, layer: int, latents: list[int], pieces,
                cfg: LLMConfig, path: str | Path, max_n: int = 3) -> dict[int, dict]:
    """Explain and score every latent, writing ``path`` (JSON lines, one per latent, ``{layer, latent,
    explanation, detection_bacc, fuzzing_bacc, detection, fuzzing}``) after each one. Latents already in the
    file are kept and not asked again. Returns ``{latent: row}``."""
    from .io import read_jsonl, write_jsonl

    path = Path(path)
    rows = {(int(r["layer"]), int(r["latent"])): r for r in (read_jsonl(path) if path.is_file() else [])}
    counts = NGramCounts(acts, max_n)
    for latent in latents:
        if (layer, latent) in rows:
            continue
        text = explain(chat, acts, latent, pieces, cfg)
        detection = score_detection(chat, counts, latent, text, pieces, cfg)
        fuzzing = score_fuzzing(chat, counts, latent, text, pieces, cfg)
        rows[(layer, latent)] = {"layer": layer, "latent": latent, "explanation": text,
                                 "detection_bacc": detection["balanced_accuracy"],
                                 "fuzzing_bacc": fuzzing["balanced_accuracy"],
                                 "detection": detection, "fuzzing": fuzzing}
        write_jsonl(path, rows.values())
    return {latent: rows[(layer, latent)] for latent in latents}
