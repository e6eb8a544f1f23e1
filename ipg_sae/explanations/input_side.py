"""Input side: the n-grams a latent fires on (log-odds against the base rate) and their detection score on
held-out positions with hard negatives (see :mod:`ipg_sae.explanations`)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .corpus import Activations
from .results import DetectionScore, Example, ExplainConfig, InputExplanation, NGram


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
