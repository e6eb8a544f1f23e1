"""The typed results of :mod:`ipg_sae.explanations`, their settings, and reading them back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IPGError


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
    from ..io import read_jsonl

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
