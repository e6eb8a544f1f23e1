r"""What a latent is, in words and in numbers, with no LLM: input-side and output-side explanations and the
scores that say how good they are.

Everything is computed from a corpus of token sequences (a run's trajectories, held-out text), split into
a *build* part (the explanation is made from it) and a *held-out* part (it is scored on it; the two never
share a sequence, and :func:`split_corpus` keeps the samples of one prompt together).

Input side (:func:`input_explanation`). A latent *fires* at position ``p`` when ``f_p > 0`` (the first
position of every sequence is never read, as in attribution). For every n-gram ``g`` (``n = 1..max_n``)
ending at ``p``, with ``a`` its count at firing build positions (``A`` of them) and ``c`` its count at the
other build positions (``C``), the smoothed log-odds ratio against the base rate (Monroe et al.'s
"fightin' words", add-``alpha`` prior) is

    lo(g) = log((a + alpha) / (A - a + alpha)) - log((c + alpha) / (C - c + alpha))
    z(g)  = lo(g) / sqrt(1 / (a + alpha) + 1 / (c + alpha))

and the explanation is the n-grams with the largest ``z`` (``lo > 0``, ``a >= min_count``), with the
strongest firing windows they came from. ``c`` is the n-gram's total build count minus ``a``, so one pass
over the corpus serves every latent.

Output side. *VocabProj* (:func:`vocab_proj`): the tokens ``W_dec[i]`` promotes and suppresses directly,
``logits(i) = W_U norm_lin(W_dec[i])``. "Through the final norm as the model applies it": a norm is
``N(x) = w * (x - m(x)) / r(x) + b`` with ``m`` the mean over d_model for LayerNorm (0 for RMSNorm) and
``r`` the RMS / standard deviation. Adding ``t * d`` to a residual ``x`` changes the logits, to first order
in ``t`` and ignoring the change of ``r`` (a positive factor shared by every token's logit at a position,
so it changes no ranking), by ``W_U (w * (d - m(d))) / r(x)``. We therefore use
``norm_lin(d) = w * (d - mean(d))`` for LayerNorm and ``w * d`` for RMSNorm (``(1 + w) * d`` for Gemma's
norm, which stores ``w - 1``); the bias ``b`` adds the same vector for every latent and is left out.
(:func:`ipg_sae.latents.logit_effect`, the explorer's panel, scales by ``w`` and does not centre; they
differ only for LayerNorm models such as GPT-2.)

*TokenChange* (:func:`token_change`): the latent amplified (``scale`` by ``gamma``, through
:func:`ipg_sae.steering.steer`) at its own firing positions only, the model run on, and per token ``v``

    delta(v) = mean over firing positions p of  P_steered(v | x_<=p) - P_clean(v | x_<=p)

the tokens with the largest and smallest ``delta`` (measured through every later layer, unlike VocabProj), on
the latent's ``n_contexts`` strongest build sequences, each cut to the ``context_tokens`` tokens ending at its
last firing position (the cost is then a few short forward passes per latent, whatever the prompt length).

Scores. *Detection* (:func:`detection_score`): on held-out positions, the explanation predicts "fires"
at ``p`` with strength ``max z(g)`` over its n-grams ending at ``p`` (0 when none matches). Positives are
held-out firing positions; negatives are as many non-firing ones, half of them *hard* (their token is one
the latent fires on in the build part; positions the explanation matches and the latent does not fire
are the ones that count) and the rest drawn at random. Reported: balanced accuracy of the binary
prediction (``strength > 0``) and AUROC of the strength (Mann-Whitney, ties counted half).

*Output score* (:func:`output_scores`, after Arad et al., arXiv 2505.20063): on held-out firing positions,
the latent amplified as for TokenChange, ``sum_{v in T_i} delta(v)`` with ``T_i`` its top ``m`` VocabProj
tokens: how much amplifying it raises the probability of what its output-side explanation says it
promotes. It is compared with latents of the same activation-frequency decile
(:func:`ipg_sae.nulls.frequency_bins`): ``output_percentile`` is the share of that null pool it beats.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import IPGError


@dataclass
class ExplainConfig:
    """What an explanation is built from and scored on."""

    max_n: int = 3  # longest n-gram ending at the firing token
    alpha: float = 0.5  # add-alpha prior of the log-odds
    min_count: int = 2  # an n-gram must occur at this many firing build positions (1 when it fires fewer times)
    n_ngrams: int = 5  # n-grams kept in an input explanation
    n_examples: int = 6  # firing windows kept with it
    window: int = 8  # tokens before the firing token in an example
    n_tokens: int = 10  # promoted / suppressed tokens of VocabProj and TokenChange
    gamma: float = 4.0  # amplification of TokenChange and the output score (scale by gamma at firing positions)
    n_contexts: int = 8  # sequences a TokenChange / output score is measured on
    context_tokens: int = 64  # each cut to the tokens ending at its last firing position (0: the whole prefix)
    n_detect: int = 64  # held-out positives (and as many negatives) for detection
    output_top: int = 5  # VocabProj tokens whose probability the output score adds up
    null_per_bin: int = 8  # latents per activation-frequency decile in the output score's null pool
    held_out: float = 0.5  # share of prompt groups held out for scoring
    batch: int = 8
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.held_out < 1:
            raise IPGError(f"explain.held_out is {self.held_out}; give a share strictly between 0 and 1")
        for name in ("max_n", "n_ngrams", "n_tokens", "n_contexts", "n_detect", "output_top", "batch"):
            if getattr(self, name) < 1:
                raise IPGError(f"explain.{name} is {getattr(self, name)}; give a positive integer")
        if self.gamma <= 1:
            raise IPGError(f"explain.gamma is {self.gamma}; amplification needs gamma > 1")


# ---- results -----------------------------------------------------------------------------------


@dataclass
class NGram:
    tokens: list[int]
    text: str
    log_odds: float
    z: float
    active: int  # count at firing build positions
    inactive: int  # count at the other build positions


@dataclass
class Example:
    sequence: int
    position: int
    activation: float
    text: str  # the window, the firing token in [brackets]


@dataclass
class InputExplanation:
    ngrams: list[NGram]
    examples: list[Example]
    n_active: int  # firing build positions
    n_positions: int  # build positions

    def label(self, n: int = 3) -> str:
        """One line: the top n-grams, e.g. ``fires on " +" | "3 +"``."""
        return "fires on " + " | ".join(json_quote(g.text) for g in self.ngrams[:n]) if self.ngrams else "no pattern"


@dataclass
class TokenEffect:
    token: int
    text: str
    value: float


@dataclass
class OutputExplanation:
    method: str  # "vocab_proj" or "token_change"
    promoted: list[TokenEffect]
    suppressed: list[TokenEffect]
    n_positions: int = 0  # firing positions it was measured at (token_change)

    def label(self, n: int = 3) -> str:
        return "promotes " + " | ".join(json_quote(t.text) for t in self.promoted[:n]) if self.promoted else "-"


@dataclass
class DetectionScore:
    balanced_accuracy: float | None
    auroc: float | None
    n_positive: int
    n_negative: int
    n_hard: int


@dataclass
class OutputScore:
    score: float | None  # sum over the top VocabProj tokens of the mean change in probability
    null_mean: float | None
    percentile: float | None  # share of the frequency-matched null pool it beats
    n_null: int
    n_positions: int


@dataclass
class LatentExplanation:
    layer: int
    latent: int
    frequency: float  # share of build positions where it fires
    input: InputExplanation
    vocab_proj: OutputExplanation
    token_change: OutputExplanation
    detection: DetectionScore
    output: OutputScore = field(default_factory=lambda: OutputScore(None, None, None, 0, 0))
    llm: dict | None = None  # filled by ipg_sae.llm_explain when an LLM was used

    def summary(self) -> str:
        return f"{self.input.label()}; {self.vocab_proj.label()}"


def token_pieces(tokenizer):
    """A cached ``ids -> [the text each token contributes]`` for ``tokenizer``."""
    cache: dict[int, str] = {}

    def pieces(ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i not in cache:
                cache[i] = tokenizer.decode([i])
            out.append(cache[i])
        return out

    return pieces


def json_quote(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


# ---- the corpus and its activations -------------------------------------------------------------


@dataclass
class Corpus:
    """Token sequences, each in the build part or held out; positions before ``start[j]`` are not read."""

    sequences: list[list[int]]
    held: list[bool]
    start: list[int]


def split_corpus(sequences: list[list[int]], groups: list[str] | None = None, held_out: float = 0.5,
                 seed: int = 0, start: list[int] | None = None) -> Corpus:
    """Assign whole groups (e.g. the samples of one prompt) to the build or the held-out part at random; with
    one group per sequence by default. Both parts are non-empty when there are at least two groups."""
    groups = groups or [str(j) for j in range(len(sequences))]
    names = sorted(set(groups))
    if len(names) < 2:
        raise IPGError(f"the explanation corpus has {len(names)} prompt group(s); give at least two so that some "
                       "are held out for scoring")
    order = np.random.default_rng(seed).permutation(len(names))
    n_held = min(len(names) - 1, max(1, round(held_out * len(names))))
    held_names = {names[j] for j in order[:n_held]}
    return Corpus([list(map(int, s)) for s in sequences], [g in held_names for g in groups],
                  list(start) if start is not None else [1] * len(sequences))


@dataclass
class Activations:
    """Flat positions of a corpus and, per latent, where it fires: ``ids[k]`` is the token at flat position
    ``k`` (sequence ``seq[k]``, position ``pos[k]``); ``fires[latent] = (flat positions, activations)``."""

    ids: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    held: np.ndarray  # bool per flat position
    fires: dict[int, tuple[np.ndarray, np.ndarray]]
    offsets: np.ndarray  # flat index of each sequence's position 0
    readable: np.ndarray  # bool per flat position: at or after its sequence's start (and never position 0)

    def build_frequency(self, latent: int) -> float:
        """Share of build positions where the latent fires."""
        idx, _ = self.fires.get(latent, (np.array([], dtype=int), None))
        return float((~self.held[idx]).sum()) / max(1, int((~self.held).sum()))

    def build_frequencies(self, d_sae: int) -> np.ndarray:
        """:meth:`build_frequency` of every latent ``0 .. d_sae - 1`` at once."""
        n = max(1, int((~self.held).sum()))
        out = np.zeros(d_sae)
        for latent, (idx, _) in self.fires.items():
            if latent < d_sae:
                out[latent] = float((~self.held[idx]).sum()) / n
        return out


@torch.no_grad()
def encode_corpus(model, sae, layer: int, corpus: Corpus, batch: int = 8) -> Activations:
    """Every read position of ``corpus`` through the model up to ``layer`` and the SAE; kept sparse (only
    ``f > 0``) so a wide SAE on a long corpus fits in memory."""
    from .models import capture_residuals

    device = next(model.parameters()).device
    flat_ids, flat_seq, flat_pos, offsets = [], [], [], []
    rows, cols, vals = [], [], []
    total = 0
    for lo in range(0, len(corpus.sequences), batch):
        chunk = corpus.sequences[lo:lo + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
        res = capture_residuals(model, ids.to(device), mask.to(device), [layer])[layer]
        for r, s in enumerate(chunk):
            j = lo + r
            offsets.append(total)
            f = sae.encode(res[r, :len(s)].to(sae.dtype)).float().cpu()
            f[:max(1, corpus.start[j])] = 0
            p, i = torch.nonzero(f > 0, as_tuple=True)
            rows.append(p.numpy() + total)
            cols.append(i.numpy())
            vals.append(f[p, i].numpy())
            flat_ids += s
            flat_seq += [j] * len(s)
            flat_pos += range(len(s))
            total += len(s)
    rows_a, cols_a, vals_a = (np.concatenate(x) if x else np.array([]) for x in (rows, cols, vals))
    order = np.argsort(cols_a, kind="stable")
    rows_a, cols_a, vals_a = rows_a[order], cols_a[order], vals_a[order]
    fires = {}
    for latent, first, count in zip(*np.unique(cols_a, return_index=True, return_counts=True)):
        fires[int(latent)] = (rows_a[first:first + count].astype(int), vals_a[first:first + count])
    seq = np.asarray(flat_seq, dtype=int)
    pos = np.asarray(flat_pos, dtype=int)
    readable = pos >= np.asarray([max(1, corpus.start[j]) for j in seq], dtype=int) if len(seq) else pos > 0
    held = np.asarray([corpus.held[j] for j in seq], dtype=bool)
    return Activations(np.asarray(flat_ids, dtype=int), seq, pos, held, fires, np.asarray(offsets, dtype=int), readable)


# ---- input side --------------------------------------------------------------------------------


class NGramCounts:
    """Counts of every n-gram ending at each readable build position (one pass over the corpus)."""

    def __init__(self, acts: Activations, max_n: int):
        self.acts, self.max_n = acts, max_n
        self.build = np.flatnonzero(~acts.held & acts.readable)
        self.total: Counter = Counter()
        for k in self.build:
            self.total.update(self.ending_at(int(k)))

    def ending_at(self, k: int) -> list[tuple[int, ...]]:
        """The n-grams (``n = 1..max_n``) ending at flat position ``k``, within its sequence."""
        pos = int(self.acts.pos[k])
        return [tuple(int(t) for t in self.acts.ids[k - n + 1:k + 1]) for n in range(1, min(self.max_n, pos + 1) + 1)]


def input_explanation(counts: NGramCounts, latent: int, pieces, cfg: ExplainConfig) -> InputExplanation:
    """The n-grams that characterise the latent's firing build positions against the base rate (log-odds,
    ranked by their z-score; see the module docstring) and its strongest firing windows."""
    acts = counts.acts
    idx, val = acts.fires.get(latent, (np.array([], dtype=int), np.array([])))
    keep = ~acts.held[idx]
    idx, val = idx[keep], val[keep]
    n_all, n_act = len(counts.build), len(idx)
    if n_act == 0:
        return InputExplanation([], [], 0, n_all)
    active: Counter = Counter()
    for k in idx:
        active.update(counts.ending_at(int(k)))
    n_in, a0, need = n_all - n_act, cfg.alpha, cfg.min_count if n_act >= 2 * cfg.min_count else 1
    grams = []
    for g, a in active.items():
        c = counts.total[g] - a
        lo = math.log((a + a0) / (n_act - a + a0)) - math.log((c + a0) / (n_in - c + a0))
        if a >= need and lo > 0:
            grams.append(NGram(list(g), "".join(pieces(list(g))), round(lo, 4),
                               round(lo / math.sqrt(1 / (a + a0) + 1 / (c + a0)), 4), int(a), int(c)))
    grams.sort(key=lambda x: (-x.z, len(x.tokens)))
    top = np.argsort(-val, kind="stable")[:cfg.n_examples]
    examples = [_example(acts, int(idx[j]), float(val[j]), pieces, cfg.window) for j in top]
    return InputExplanation(grams[:cfg.n_ngrams], examples, n_act, n_all)


def _example(acts: Activations, k: int, value: float, pieces, window: int) -> Example:
    lo = max(int(acts.offsets[acts.seq[k]]), k - window)
    text = "".join(pieces([int(t) for t in acts.ids[lo:k]])) + "[" + "".join(pieces([int(acts.ids[k])])) + "]"
    return Example(int(acts.seq[k]), int(acts.pos[k]), round(value, 4), text)


# ---- output side -------------------------------------------------------------------------------


def final_norm(model):
    """The final norm module before the LM head (None where there is none)."""
    base = model.base_model
    return getattr(base, "norm", None) or getattr(base, "ln_f", None) or getattr(base, "final_layernorm", None)


def norm_linear(model, rows: torch.Tensor) -> torch.Tensor:
    """``norm_lin(d)`` of the module docstring for each row: centred for LayerNorm, scaled by the norm's weight
    (``1 + w`` for Gemma's)."""
    norm = final_norm(model)
    if norm is None:
        return rows
    if isinstance(norm, torch.nn.LayerNorm):
        rows = rows - rows.mean(dim=-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return rows
    scale = (1.0 + weight) if "gemma" in type(norm).__name__.lower() else weight
    return rows * scale.to(rows)


@torch.no_grad()
def vocab_proj(model, sae, latents: list[int], pieces, n: int, chunk: int = 256) -> list[OutputExplanation]:
    """Each latent's top ``n`` promoted and suppressed tokens of ``W_U norm_lin(W_dec[i])``."""
    from .saes import decoder_matrix

    unembed = model.get_output_embeddings().weight
    out = []
    for lo in range(0, len(latents), chunk):
        rows = norm_linear(model, decoder_matrix(sae)[latents[lo:lo + chunk]].to(unembed.dtype))
        effect = (rows @ unembed.T).float().cpu()
        for row in effect:
            out.append(_effects("vocab_proj", row, pieces, n))
    return out


def _effects(method: str, row: torch.Tensor, pieces, n: int, positions: int = 0) -> OutputExplanation:
    top, bottom = torch.topk(row, n), torch.topk(-row, n)
    return OutputExplanation(
        method, [TokenEffect(int(i), pieces([int(i)])[0], round(float(v), 6)) for v, i in zip(top.values, top.indices)],
        [TokenEffect(int(i), pieces([int(i)])[0], round(-float(v), 6)) for v, i in zip(bottom.values, bottom.indices)],
        positions)


def firing_contexts(acts: Activations, latent: int, held: bool, n: int) -> list[tuple[int, list[int]]]:
    """Up to ``n`` sequences of one part where the latent fires, strongest first: ``(sequence, positions)``."""
    idx, val = acts.fires.get(latent, (np.array([], dtype=int), np.array([])))
    keep = acts.held[idx] == held
    idx, val = idx[keep], val[keep]
    best: dict[int, float] = {}
    for k, v in zip(idx, val):
        s = int(acts.seq[k])
        best[s] = max(best.get(s, 0.0), float(v))
    chosen = sorted(best, key=lambda s: -best[s])[:n]
    return [(s, sorted(int(acts.pos[k]) for k in idx if acts.seq[k] == s)) for s in chosen]


@torch.no_grad()
def cut_contexts(corpus: Corpus, contexts, context_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Each ``(sequence, firing positions)`` as ``(tokens, positions in them)``: the tokens up to its last firing
    position, cut to the last ``context_tokens`` of them (0: all); firing positions at or before the cut's first
    token are dropped (a window's first token is an outlier position, as a sequence's first is)."""
    out = []
    for s, positions in contexts:
        end = max(positions) + 1
        lo = max(0, end - context_tokens) if context_tokens else 0
        kept = [p - lo for p in positions if p > lo]
        if kept:
            out.append((corpus.sequences[s][lo:end], kept))
    return out


def probability_change(model, sae, layer: int, latent: int, corpus: Corpus, contexts, gamma: float,
                       batch: int = 8, context_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """``delta(v)`` of the module docstring: the mean over the firing positions in ``contexts`` of the change of
    next-token probability when the latent is scaled by ``gamma`` at exactly those positions (each context cut
    by :func:`cut_contexts`). Returns ``(delta [vocab], number of positions)``."""
    from .saes import PositionScope
    from .steering import Intervention, steer

    device = next(model.parameters()).device
    total, count = None, 0
    contexts = cut_contexts(corpus, contexts, context_tokens)
    for lo in range(0, len(contexts), batch):
        chunk = contexts[lo:lo + batch]
        seqs = [tokens for tokens, _ in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        at = torch.zeros(len(seqs), width, dtype=torch.bool)
        for r, (s, (_, positions)) in enumerate(zip(seqs, chunk)):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
            at[r, positions] = True
        ids, mask, at = ids.to(device), mask.to(device), at.to(device)
        clean = torch.softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        with steer(model, {layer: sae}, [Intervention(layer, latent, "scale", gamma)], scope=PositionScope(mask=at)):
            steered = torch.softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        diff = (steered - clean)[at].sum(0).cpu()
        total = diff if total is None else total + diff
        count += int(at.sum())
    if total is None:
        return torch.zeros(0), 0
    return total / max(1, count), count


def token_change(model, sae, layer: int, latent: int, corpus: Corpus, acts: Activations, pieces,
                 cfg: ExplainConfig) -> OutputExplanation:
    """TokenChange on the latent's strongest build contexts (see the module docstring)."""
    contexts = firing_contexts(acts, latent, held=False, n=cfg.n_contexts)
    if not contexts:
        return OutputExplanation("token_change", [], [], 0)
    delta, n = probability_change(model, sae, layer, latent, corpus, contexts, cfg.gamma, cfg.batch,
                                  cfg.context_tokens)
    return _effects("token_change", delta, pieces, cfg.n_tokens, n)


# ---- scores ------------------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater) / (len(pos) * len(neg))


def detection_sample(counts: NGramCounts, latent: int, cfg: ExplainConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Held-out flat positions to score an explanation on: ``(positives, negatives, number of hard negatives)``.
    Up to ``n_detect`` firing positions and as many silent ones, half of those hard (their token is one the
    latent fires on in the build part), the rest at random; seeded by ``cfg.seed`` and the latent."""
    acts = counts.acts
    rng = np.random.default_rng(cfg.seed + latent)
    held = np.flatnonzero(acts.held & acts.readable)
    idx, _ = acts.fires.get(latent, (np.array([], dtype=int), None))
    firing = np.zeros(len(acts.ids), dtype=bool)
    firing[idx] = True
    positives = rng.permutation(held[firing[held]])[:cfg.n_detect]
    silent = held[~firing[held]]
    tokens = sorted({int(acts.ids[k]) for k in idx if not acts.held[k]})
    hard = rng.permutation(silent[np.isin(acts.ids[silent], tokens)])[:len(positives) // 2]
    rest = rng.permutation(np.setdiff1d(silent, hard))[:len(positives) - len(hard)]
    return positives.astype(int), np.concatenate([hard, rest]).astype(int), int(len(hard))


def binary_scores(predicted: np.ndarray, labels: np.ndarray, strength: np.ndarray | None = None
                  ) -> tuple[float | None, float | None]:
    """``(balanced accuracy, AUROC of strength)``: ``(TPR + TNR) / 2`` of the binary predictions."""
    if not labels.any() or labels.all():
        return None, None
    bacc = (float(predicted[labels].mean()) + float((~predicted[~labels]).mean())) / 2
    area = auroc(strength if strength is not None else predicted.astype(float), labels)
    return round(bacc, 4), None if area is None else round(area, 4)


def detection_score(counts: NGramCounts, latent: int, explanation: InputExplanation,
                    cfg: ExplainConfig) -> DetectionScore:
    """Balanced accuracy and AUROC of the explanation predicting where the latent fires on held-out positions,
    with hard negatives (see the module docstring)."""
    positives, negatives, n_hard = detection_sample(counts, latent, cfg)
    if not len(positives):
        return DetectionScore(None, None, 0, 0, 0)
    strength = {tuple(g.tokens): g.z for g in explanation.ngrams}
    points = np.concatenate([positives, negatives])
    scores = np.array([max([strength.get(g, 0.0) for g in counts.ending_at(int(k))], default=0.0) for k in points])
    labels = np.concatenate([np.ones(len(positives), bool), np.zeros(len(negatives), bool)])
    bacc, area = binary_scores(scores > 0, labels, scores)
    return DetectionScore(bacc, area, int(len(positives)), int(len(negatives)), n_hard)


def raw_output_score(model, sae, layer: int, latent: int, corpus: Corpus, acts: Activations,
                     vocab: OutputExplanation, cfg: ExplainConfig) -> tuple[float | None, int]:
    """``sum_{v in T} delta(v)`` on held-out firing contexts, ``T`` the top ``output_top`` VocabProj tokens."""
    contexts = firing_contexts(acts, latent, held=True, n=cfg.n_contexts)
    if not contexts or not vocab.promoted:
        return None, 0
    delta, n = probability_change(model, sae, layer, latent, corpus, contexts, cfg.gamma, cfg.batch,
                                  cfg.context_tokens)
    return float(delta[[t.token for t in vocab.promoted[:cfg.output_top]]].sum()), n


def null_pool(acts: Activations, d_sae: int, cfg: ExplainConfig) -> tuple[dict[int, list[int]], np.ndarray]:
    """Latents drawn at random from each activation-frequency decile (``frequency_bins`` of :mod:`ipg_sae.nulls`,
    over build-part frequencies), ``null_per_bin`` per decile: ``({bin: latents}, the bin of every latent)`` (bin
    -1: never fires on the build part). The pool depends only on the corpus and ``cfg`` (not on which latents are
    explained), so explanations computed in several calls are compared with the same null; a latent that is in
    its own bin's pool is left out of its comparison."""
    from .nulls import frequency_bins

    bins = frequency_bins(acts.build_frequencies(d_sae))
    rng = np.random.default_rng(cfg.seed)
    pool = {}
    for b in sorted(set(bins.tolist()) - {-1}):
        pool[int(b)] = sorted(int(i) for i in rng.permutation(np.flatnonzero(bins == b))[:cfg.null_per_bin])
    return pool, bins


def rank_in_null(score: float | None, null: list[float]) -> tuple[float | None, float | None]:
    """``(null mean, share of the null the score beats (ties half))``."""
    null = [x for x in null if x is not None]
    if score is None or not null:
        return (float(np.mean(null)) if null else None), None
    arr = np.asarray(null)
    return round(float(arr.mean()), 6), round(float(((arr < score).sum() + 0.5 * (arr == score).sum()) / len(arr)), 4)


# ---- everything for a list of latents ----------------------------------------------------------


def explain_latents(model, sae, layer: int, latents: list[int], corpus: Corpus, pieces,
                    cfg: ExplainConfig | None = None, acts: Activations | None = None,
                    done: dict[int, LatentExplanation] | None = None, on_done=None,
                    null_scores: dict[int, float | None] | None = None) -> list[LatentExplanation]:
    """Input and output explanations, detection and output scores of ``latents`` of one SAE.

    ``done`` holds explanations already computed (kept as they are); ``on_done(explanation)`` is called after
    each new one (for resumable writing); ``null_scores`` caches the null pool's raw output scores."""
    cfg = cfg or ExplainConfig()
    cfg.validate()
    acts = acts if acts is not None else encode_corpus(model, sae, layer, corpus, cfg.batch)
    counts = NGramCounts(acts, cfg.max_n)
    d_sae = int(sae.cfg.d_sae)
    for latent in latents:
        if not 0 <= latent < d_sae:
            raise IPGError(f"latent {latent} is outside the SAE at layer {layer} (d_sae {d_sae}); fix the latent list")
    done = dict(done or {})
    null_scores = null_scores if null_scores is not None else {}
    pool, bins = null_pool(acts, d_sae, cfg)
    for b, members in pool.items():
        todo = [i for i in members if i not in null_scores]
        for i, v in zip(todo, vocab_proj(model, sae, todo, pieces, cfg.output_top)):
            null_scores[i] = raw_output_score(model, sae, layer, i, corpus, acts, v, cfg)[0]
    out = []
    for latent in latents:
        if latent not in done:
            done[latent] = _explain_one(model, sae, layer, latent, corpus, acts, counts, pieces, cfg)
            null = [null_scores.get(i) for i in pool.get(int(bins[latent]), []) if i != latent]
            mean, pct = rank_in_null(done[latent].output.score, null)
            done[latent].output.null_mean, done[latent].output.percentile = mean, pct
            done[latent].output.n_null = len([x for x in null if x is not None])
            if on_done is not None:
                on_done(done[latent])
        out.append(done[latent])
    return out


def _explain_one(model, sae, layer, latent, corpus, acts, counts, pieces, cfg) -> LatentExplanation:
    inp = input_explanation(counts, latent, pieces, cfg)
    vocab = vocab_proj(model, sae, [latent], pieces, cfg.n_tokens)[0]
    change = token_change(model, sae, layer, latent, corpus, acts, pieces, cfg)
    score, n = raw_output_score(model, sae, layer, latent, corpus, acts, vocab, cfg)
    return LatentExplanation(layer, latent, round(acts.build_frequency(latent), 6), inp, vocab, change,
                             detection_score(counts, latent, inp, cfg), OutputScore(score, None, None, 0, n))


# ---- reading and writing -----------------------------------------------------------------------


def to_dict(e: LatentExplanation) -> dict:
    from dataclasses import asdict

    return asdict(e)


def from_dict(d: dict) -> LatentExplanation:
    """A :class:`LatentExplanation` from the dict :func:`to_dict` wrote (as read back from JSON)."""
    def out(x):
        return OutputExplanation(x["method"], [TokenEffect(**t) for t in x["promoted"]],
                                 [TokenEffect(**t) for t in x["suppressed"]], x.get("n_positions", 0))

    inp = d["input"]
    return LatentExplanation(
        int(d["layer"]), int(d["latent"]), float(d["frequency"]),
        InputExplanation([NGram(**g) for g in inp["ngrams"]], [Example(**x) for x in inp["examples"]],
                         inp["n_active"], inp["n_positions"]),
        out(d["vocab_proj"]), out(d["token_change"]), DetectionScore(**d["detection"]), OutputScore(**d["output"]),
        d.get("llm"))


def flat_columns(e: LatentExplanation) -> dict:
    """The columns a feature table and a W&B table carry for one latent."""
    return {"explanation": e.input.label(), "vocab_proj": e.vocab_proj.label(), "token_change": e.token_change.label(),
            "detection_bacc": e.detection.balanced_accuracy, "detection_auroc": e.detection.auroc,
            "output_score": e.output.score, "output_percentile": e.output.percentile,
            "llm_explanation": (e.llm or {}).get("explanation", ""),
            "llm_detection": (e.llm or {}).get("detection_bacc"), "llm_fuzzing": (e.llm or {}).get("fuzzing_bacc")}


EXPLANATION_COLUMNS = tuple(flat_columns(LatentExplanation(
    0, 0, 0.0, InputExplanation([], [], 0, 0), OutputExplanation("vocab_proj", [], []),
    OutputExplanation("token_change", [], []), DetectionScore(None, None, 0, 0, 0))))


OUT = "explanations"  # the folder of a run that ``ipg-sae explain`` writes (:mod:`ipg_sae.explain_run`)


def load_explanations(run_dir) -> dict[tuple[int, int], LatentExplanation]:
    """Every explanation written for a run (``explanations/L*.jsonl``): ``{(layer, latent): explanation}``, merged
    with the LLM's (``llm_L*.jsonl``) where those exist."""
    from pathlib import Path

    from .io import read_jsonl

    out = {}
    folder = Path(run_dir) / OUT
    for path in sorted(folder.glob("L*.jsonl")):
        for row in read_jsonl(path):
            e = from_dict(row)
            out[(e.layer, e.latent)] = e
    for path in sorted(folder.glob("llm_L*.jsonl")):
        for row in read_jsonl(path):
            key = (int(row["layer"]), int(row["latent"]))
            if key in out and out[key].llm is None:
                out[key].llm = {k: row.get(k) for k in ("explanation", "detection_bacc", "fuzzing_bacc")}
    return out
