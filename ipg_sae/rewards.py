"""Rewards: extract a final answer from a completion, judge it, turn it into a number.

What is extracted (:func:`extract_answer`), first rule that finds something wins:

1. GSM8K style ``#### <answer>`` (last occurrence; a markdown heading "#### Step 1" is skipped).
2. The last balanced ``\\boxed{...}`` or ``\\fbox{...}``; nested braces are matched, so
   ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A truncated (unclosed) last box falls
   back to the previous complete one.
3. The last "The answer is X" / "the final answer is: X" / "Answer: X" (any case).
4. The last number anywhere in the text.

For rules 1-3 the text after the marker is cleaned: markdown ``**``, ``$`` and a
trailing period are stripped; when it starts with a number followed only by unit words
("8 apples", "5 dollars.", "10\\%", "12 (since ...)") the number alone is kept; "5 + 3 = 8"
and "x = 5" keep the number after the last "=". A number glued to a letter or an operator
("5x", "2\\pi", "1/x") is not numeric, so the whole expression is kept.

What counts as a number: integers, signed numbers, decimals, comma thousands
(``1,234``), fractions ``3/4``, scientific ``1e3``. A number glued to a preceding letter
("step2", "x2") is part of a word and is NOT a number for rule 4; "3rd" or "5kg" do count.

How equivalence is decided (:func:`answers_match`): both sides are lightly normalized
(spaces, ``$``, ``\\text{}``/``\\mbox{}`` wrappers, ``\\left``/``\\right``, ``\\dfrac``, degree
signs, a trailing period, case). If both then parse as numbers (:func:`parse_number`) they
are compared exactly as fractions, so ``0.5 == 1/2 == \\frac{1}{2}``, ``1,000 == 1000`` and
``8.0 == 8``; ``50%`` parses as 50 (not 0.5). Otherwise equal normalized strings match, and
Hugging Face's ``math-verify`` (what MATH-style grading uses) decides symbolic equivalence:
``\\frac{\\pi}{2} == \\pi/2``, ``2\\sqrt{2} == \\sqrt{8}``, ``x = 5 == 5``, sets and intervals; each
parse and comparison is bounded to ``MATH_VERIFY_TIMEOUT_S`` seconds.

An unparseable completion never raises: its answer is ``None`` and it is never correct.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from .digest import UnstableIdentity, code_identity
from .errors import IPGError

# --------------------------------------------------------------------------- numbers

# Comma thousands must be followed by a non-digit, so "1,2345" is not read as 1,234.
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,3})?(?:/\d+)?"
_NUMBER = rf"[-+]?{_UNSIGNED}"
# Lookbehind: not glued to a word ("step2") or inside another number ("1.5" -> not "5").
_FREE_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}")
_LEADING_NUMBER_RE = re.compile(rf"(?:\\?\$\s*)?({_NUMBER})")

_DECIMAL_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_RE = re.compile(r"([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_FRAC_SHORT_RE = re.compile(r"([-+]?)\\[dt]?frac(\d)(\d)")


def parse_number(s: str | None) -> Fraction | None:
    """The exact value of a numeric answer string, or None when it is not a plain number.

    Accepts "1,234", "-3", "+3", "0.50", "3/4", "\\frac{3}{4}", "\\dfrac34", "$5", "50%"
    (read as 50), "1e3". Units or variables ("5 apples", "2x") make it non-numeric.
    """
    if s is None:
        return None
    t = _strip_number_decorations(str(s))
    frac = _FRAC_RE.fullmatch(t) or _FRAC_SHORT_RE.fullmatch(t)
    if frac:
        sign, num, den = frac.groups()
        value = _ratio(parse_number(num), parse_number(den))
        return None if value is None else (-value if sign == "-" else value)
    if "/" in t:
        num, _, den = t.partition("/")
        return _ratio(_parse_decimal(num), _parse_decimal(den))
    return _parse_decimal(t)


def _strip_number_decorations(s: str) -> str:
    t = s.strip().replace("\u2212", "-")  # unicode minus sign
    t = re.sub(r"\s*/\s*", "/", t)
    t = re.sub(r"^([-+])\s+", r"\1", t)
    t = re.sub(r"^([-+]?)\s*\\?\$\s*", r"\1", t)  # "$5", "-$5", "\$5"
    t = re.sub(r"\s*\\?%$", "", t)  # percent is read as the number itself
    return t.rstrip(".").strip()


def _parse_decimal(s: str | None) -> Fraction | None:
    if s is None:
        return None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if not _DECIMAL_RE.fullmatch(s):
        return None
    return Fraction(s)


def _ratio(num: Fraction | None, den: Fraction | None) -> Fraction | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


# --------------------------------------------------------------------------- extraction

# "####" followed by an answer-like start, so a markdown heading "#### Step 1" is not an answer.
_GSM8K_MARKER_RE = re.compile(r"(?<!#)####(?!#)[ \t]*(?=[-+$\\\d.(])")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE_RE = re.compile(r"\\boxed\s+([^\s{$]+)")  # "\boxed 5"
_ANSWER_MARKER_RE = re.compile(r"\banswer\b\s*(?:is\b\s*:?|:|=)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
# After a leading number, these start an expression ("5 + 3", "2\pi", "5x", "2, 5").
_EXPRESSION_TAIL_RE = re.compile(
    r"\s*[-+*/^=×÷·<>]"  # an operator
    r"|[A-Za-z0-9{(\[]"  # glued to a variable or group: "5x", "2(3)"
    r"|\s*\\(?!text|mbox|%|,|;|!|quad|\s)"  # a LaTeX command other than text/spacing: "2\pi"
    r"|\s*,\s*[-+]?\d"  # a list: "2, 5"
)
# "therefore 8": prose after the marker; the answer is the last number in it.
_PROSE_RE = re.compile(r"[A-Za-z]{3,}\s")


def extract_answer(text: str | None) -> str | None:
    """The final answer in a completion, as written (e.g. "1,234", "\\frac{1}{2}"), or None."""
    if not text:
        return None
    for rule in (_gsm8k_answer, _boxed_answer, _stated_answer, _last_number):
        answer = rule(text)
        if answer:
            return answer
    return None


def _gsm8k_answer(text: str) -> str | None:
    markers = list(_GSM8K_MARKER_RE.finditer(text))
    if not markers:
        return None
    return _clean_answer(_rest_of_line(text, markers[-1].end()), cut_sentence=True)


def _boxed_answer(text: str) -> str | None:
    # Walk backwards so a generation cut off inside its last box still scores the previous one.
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _braced_content(text, match.end())
        if content is not None:
            return _clean_answer(content, cut_sentence=False)
    bare = list(_BOX_BARE_RE.finditer(text))
    return _clean_answer(bare[-1].group(1), cut_sentence=True) if bare else None


def _braced_content(text: str, start: int) -> str | None:
    """Text from ``start`` up to the brace that closes the one just before it; None if unclosed."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _stated_answer(text: str) -> str | None:
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if not markers:
        return None
    return _clean_answer(_rest_of_line(text, markers[-1].end()), cut_sentence=True)


def _last_number(text: str) -> str | None:
    numbers_found = _FREE_NUMBER_RE.findall(text)
    return numbers_found[-1].lstrip("+") if numbers_found else None


def _rest_of_line(text: str, start: int) -> str:
    rest = text[start:].lstrip()
    return rest.split("\n", 1)[0]


def _clean_answer(span: str, cut_sentence: bool) -> str | None:
    s = _strip_wrappers(span)
    if cut_sentence:
        end = _SENTENCE_END_RE.search(s)
        s = s[: end.start()] if end else s
    s = _strip_wrappers(s).rstrip(".").strip()
    number = _number_with_units(s)
    if number is not None:
        return number
    if "=" in s:  # "5 + 3 = 8", "x = 5": the value is what the expression equals
        rhs_number = _number_with_units(s.rsplit("=", 1)[1].strip())
        if rhs_number is not None:
            return rhs_number
    if _PROSE_RE.match(s):
        return _last_number(s) or s
    return s or None


def _strip_wrappers(s: str) -> str:
    s = s.replace("**", "").replace("__", "").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
        if s.startswith(left):
            s = s[len(left):]
        if s.endswith(right):
            s = s[: -len(right)]
    return s.strip()


def _number_with_units(s: str) -> str | None:
    """The leading number of ``s`` when everything after it is units or prose, else None."""
    match = _LEADING_NUMBER_RE.match(s)
    if not match:
        return None
    tail = s[match.end():]
    if tail and _EXPRESSION_TAIL_RE.match(tail):
        return None
    return match.group(1).lstrip("+")


# --------------------------------------------------------------------------- matching

_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")


def _normalize(s: str) -> str:
    t = s.strip().replace("{,}", ",")
    t = _TEXT_WRAPPER_RE.sub(r"\1", t)
    t = re.sub(r"\\left|\\right", "", t)
    t = re.sub(r"\\[dt]frac", r"\\frac", t)
    t = re.sub(r"\^\s*\{?\\circ\}?|°", "", t)
    t = re.sub(r"\\[!,;: ]", "", t)  # LaTeX spacing commands
    t = re.sub(r"\s+", "", t).replace("$", "")
    return t.rstrip(".").lower()


MATH_VERIFY_TIMEOUT_S = 2  # per parse and per comparison: a pathological expression cannot stall a run


def answers_match(pred: str | None, reference: str) -> bool:
    """Whether the extracted answer ``pred`` equals ``reference``.

    Numbers are compared exactly (as fractions); a numeric reference needs a numeric answer (or the
    same string). When the reference is not a plain number, equal normalized strings match, and
    otherwise Hugging Face's ``math-verify`` decides symbolic
    equivalence (``\\frac{\\sqrt3}{2}`` = ``\\frac{\\sqrt{3}}{2}``, ``2\\sqrt{2}`` = ``\\sqrt{8}``,
    ``x = 5`` = ``5``), with its time bounded per answer.
    """
    if pred is None:
        return False
    pred_norm, ref_norm = _normalize(pred), _normalize(str(reference))
    pred_value, ref_value = parse_number(pred_norm), parse_number(ref_norm)
    if pred_value is not None and ref_value is not None:
        return pred_value == ref_value
    if ref_value is not None and "=" in pred_norm:  # "x=5" states the value 5
        rhs = parse_number(pred_norm.rsplit("=", 1)[1])
        return rhs == ref_value if rhs is not None else pred_norm == ref_norm
    if pred_norm == ref_norm:
        return True
    if ref_value is not None and not re.search(r"[\\^a-z]", pred_norm):
        return False  # a number against plain text: the fast path decides
    return _symbolically_equal(pred, str(reference))


def _symbolically_equal(pred: str, reference: str) -> bool:
    from math_verify import parse, verify

    def latex(text: str) -> str:
        text = text.strip()
        return text if text.startswith("$") else f"${text}$"

    try:
        gold = parse(latex(reference), parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        answer = parse(latex(pred), parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        return bool(gold and answer and verify(gold, answer, timeout_seconds=MATH_VERIFY_TIMEOUT_S))
    except Exception:  # math-verify raises on what it cannot read: such an answer is not equal
        return False


# --------------------------------------------------------------------------- rewards

RewardFn = Callable[[str, str, str], float]  # user-defined R(prompt, completion, reference) -> float
# Internal form of every reward: (prompt, completion, reference, n_generated_tokens, correct) -> float.
_ValueFn = Callable[[str, str, str, int, bool], float]


@dataclass(frozen=True)
class Score:
    reward: float
    answer: str | None  # extracted answer; None = unparseable
    correct: bool  # always judged, whatever the reward, so accuracy is reported for every reward
    parsed: bool


class Reward:
    """A named reward; ``score`` also extracts and judges the answer for reporting.

    ``identity`` is what saved outputs that hold its values are keyed by: the name, and for a user
    callable :func:`digest.code_identity` (its module's file, its code, and everything it closes over:
    defaults, closure values, the globals it names, a partial's arguments, an instance's class and
    state, recursively, so that editing a helper module it uses makes every stage and cell that stored
    its rewards stale). It is the same in every process. A callable that closes over a value with no
    stable digest has no identity: asking for it (to key or to resume stored results) raises
    :class:`IPGError` naming that value, rather than silently recomputing or reusing.
    """

    def __init__(self, name: str, value: _ValueFn, code: str | None = None, unstable: str | None = None):
        self.name = name
        self._value = value
        self.code = code  # digest of a user callable's code (None for a built-in)
        self._unstable = unstable  # why a user callable has no stable identity

    @property
    def identity(self) -> dict:
        if self._unstable:
            raise IPGError(
                f"reward {self.name!r}: {self._unstable}, so results stored with it could not be matched by a "
                "rerun; make the reward a module-level function, or give that value state or a repr without "
                "a memory address"
            )
        return {"name": self.name, "code": self.code}

    def score(self, prompt: str, completion: str, reference: str, n_generated_tokens: int) -> Score:
        answer = extract_answer(completion)
        correct = answers_match(answer, reference)
        reward = self._value(prompt, completion, reference, n_generated_tokens, correct)
        return Score(reward=reward, answer=answer, correct=correct, parsed=answer is not None)

    def __repr__(self) -> str:
        return f"Reward({self.name!r})"


_BUILTIN: dict[str, _ValueFn] = {
    "correctness": lambda prompt, completion, reference, n_tokens, correct: 1.0 if correct else 0.0,
    "length": lambda prompt, completion, reference, n_tokens, correct: float(n_tokens),
    "neg_length": lambda prompt, completion, reference, n_tokens, correct: -float(n_tokens),
}


def get_reward(spec: str | Callable | Reward) -> Reward:
    """A :class:`Reward` from a built-in name, ``"module.path:function"``, or a callable.

    A user callable is ``R(prompt, completion, reference) -> float``.
    """
    if isinstance(spec, Reward):
        return spec
    if callable(spec):
        return _user_reward(_callable_name(spec), spec)
    spec = str(spec).strip()
    if spec in _BUILTIN:
        return Reward(spec, _BUILTIN[spec])
    if ":" in spec:
        return _user_reward(spec, _import_callable(spec))
    import difflib

    close = difflib.get_close_matches(spec, list(_BUILTIN), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? Or use" if close else "use"
    raise IPGError(
        f"unknown reward {spec!r}; {hint} one of {sorted(_BUILTIN)} or 'module.path:function' naming a "
        "function R(prompt, completion, reference) -> float"
    )


def _callable_name(fn: Callable) -> str:
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}:{qualname}" if module else qualname


def _user_reward(name: str, fn: RewardFn) -> Reward:
    def value(prompt: str, completion: str, reference: str, n_tokens: int, correct: bool) -> float:
        return _check_reward_value(name, fn(prompt, completion, reference))

    try:
        return Reward(name, value, code=code_identity(fn))
    except UnstableIdentity as e:
        return Reward(name, value, unstable=str(e))


def _check_reward_value(name: str, value: object) -> float:
    # Starts with "reward ..." so a caller can prefix the trajectory id: f"trajectory {i}: {e}".
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise IPGError(
            f"reward {name!r} returned {value!r} of type {type(value).__name__}; "
            "it must return a finite float (e.g. float(x))"
        )
    value = float(value)
    if not math.isfinite(value):
        raise IPGError(f"reward {name!r} returned {value}; it must return a finite float, not NaN or inf")
    return value


def _import_callable(spec: str) -> Callable:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise IPGError(f"reward {spec!r} is not of the form 'module.path:function'; fix the spec")
    module = _import_user_module(spec, module_name)
    obj = module
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise IPGError(
                f"reward {spec!r}: module {module_name!r} has no attribute {attr_path!r}; check the function name"
            )
        obj = getattr(obj, attr)
    if not callable(obj):
        raise IPGError(
            f"reward {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function; point the spec at a function"
        )
    return obj


def _import_user_module(spec: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Console scripts do not put the working directory on sys.path; user reward files usually live there.
        cwd = os.getcwd()
        if e.name == module_name.split(".")[0] and cwd not in sys.path:
            sys.path.insert(0, cwd)
            return _import_user_module(spec, module_name)
        raise IPGError(
            f"reward {spec!r}: cannot import module {module_name!r} ({e}); "
            "make sure it is on PYTHONPATH or in the current directory"
        ) from None
    except Exception as e:  # the user's module itself failed while importing
        raise IPGError(
            f"reward {spec!r}: importing {module_name!r} failed ({type(e).__name__}: {e}); fix that module"
        ) from None


def summarize(scores: list[Score]) -> dict:
    """{"accuracy": mean of correct, "mean_reward", "unparseable": count, "n"}; zeros when empty."""
    n = len(scores)
    if n == 0:
        return {"accuracy": 0.0, "mean_reward": 0.0, "unparseable": 0, "n": 0}
    return {
        "accuracy": sum(s.correct for s in scores) / n,
        "mean_reward": sum(s.reward for s in scores) / n,
        "unparseable": sum(not s.parsed for s in scores),
        "n": n,
    }
