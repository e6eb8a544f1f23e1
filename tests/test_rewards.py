from __future__ import annotations

import math
from fractions import Fraction

import pytest

from ipg_sae.errors import IPGError
from ipg_sae.rewards import Reward, Score, answers_match, extract_answer, get_reward, parse_number, summarize


def my_reward(prompt: str, completion: str, reference: str) -> float:
    """A user reward referenced by spec as ``tests.test_rewards:my_reward``."""
    return 2.0 if reference in completion else -1.0


def nan_reward(prompt: str, completion: str, reference: str) -> float:
    return float("nan")


NOT_A_FUNCTION = 3


# (completion, expected extracted answer)
EXTRACTION_CASES = [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234", "1,234"),
    ("first #### 5\nthen corrected #### 6", "6"),
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\dfrac{\\sqrt{3}}{2}"),
    ("try \\boxed{3}, no wait, \\boxed{4}", "4"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5", "5"),
    ("$\\boxed{8 \\text{ apples}}$", "8"),
    ("\\boxed{10\\%}", "10"),
    ("\\boxed{5x}", "5x"),
    ("\\boxed{2, 5}", "2, 5"),
    ("done: \\boxed{3} and then \\boxed{\\frac{1", "3"),  # truncated last box -> previous complete one
    ("#### 9 beats \\boxed{7}", "9"),
    ("#### Step 1: add\n3 + 5 = 8. The answer is 8.", "8"),  # a markdown heading is not a GSM8K marker
    ("#### $1,500", "1,500"),  # priority: GSM8K marker before boxed
    ("\\boxed{7} The answer is 9.", "7"),  # priority: boxed before "The answer is"
    ("The answer is -7.", "-7"),
    ("the answer is $12.50", "12.50"),
    ("**The answer is 8**", "8"),
    ("The answer is **8**.", "8"),
    ("The final answer is: 42", "42"),
    ("Answer: 17", "17"),
    ("ANSWER IS 3", "3"),
    ("The answer is 8 apples.", "8"),
    ("The answer is 5 dollars. Thanks!", "5"),
    ("answer is 3/4", "3/4"),
    ("The answer is +5.", "5"),
    ("The answer is 1,000,000.", "1,000,000"),
    ("The answer is 12 (since 3 * 4 = 12).", "12"),
    ("The answer is 5 + 3 = 8.", "8"),
    ("The answer is 15 (as 3 * 4 = 12 plus 3).", "15"),
    ("The answer is x = 5.", "5"),
    ("The answer is therefore 8.", "8"),
    ("The answer is \\frac{1}{2}.", "\\frac{1}{2}"),
    ("The answer is 2\\pi.", "2\\pi"),
    ("Answer: x + 1", "x + 1"),
    ("The answer is 1e3.", "1e3"),
    ("The answer is 4. Then the answer is 9.", "9"),
    ("She has 3 apples and buys 5, so 8 total", "8"),
    ("so we get -4", "-4"),
    ("10-3 leaves 7 and then 10-3", "3"),  # a dash between digits is subtraction, not a sign
    ("it is 0.25 of the cake", "0.25"),
    ("about 1,234 people", "1,234"),
    ("3/4 of the pie", "3/4"),
    ("I did step2 twice", None),  # a number glued after letters is part of a word
    ("There were 3rd-place winners", "3"),  # ...but a number followed by letters counts
    ("no number here at all", None),
    ("", None),
]


@pytest.mark.parametrize("completion,expected", EXTRACTION_CASES)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


# (string, expected value)
PARSE_CASES = [
    ("1,234", Fraction(1234)),
    ("1,000,000", Fraction(10**6)),
    ("-3", Fraction(-3)),
    ("+3", Fraction(3)),
    ("0.50", Fraction(1, 2)),
    (".5", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)),
    ("-3 / 4", Fraction(-3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("\\dfrac{3}{4}", Fraction(3, 4)),
    ("-\\frac{1}{2}", Fraction(-1, 2)),
    ("\\frac12", Fraction(1, 2)),
    ("$5", Fraction(5)),
    ("-$5", Fraction(-5)),
    ("50%", Fraction(50)),
    ("50\\%", Fraction(50)),
    ("1e3", Fraction(1000)),
    ("2.5E-1", Fraction(1, 4)),
    ("8.", Fraction(8)),
    ("\u22124", Fraction(-4)),  # unicode minus
    ("3/0", None),
    ("abc", None),
    ("5 apples", None),
    ("2x", None),
    ("1,2345", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# (prediction, reference, match?)
MATCH_CASES = [
    ("0.5", "1/2", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("3/4", "0.75", True),
    ("1,000", "1000", True),
    ("8.0", "8", True),
    ("8", "8.000", True),
    ("-7", "-7", True),
    ("7", "-7", False),
    ("1e3", "1000", True),
    ("50%", "50", True),
    ("$12.50", "12.5", True),
    ("0.333", "1/3", False),  # exact comparison, no tolerance
    ("\\text{(C)}", "(C)", True),
    ("(c)", "\\text{(C)}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("Monday.", "monday", True),
    ("90^\\circ", "90", True),
    ("x + 1", "x+1", True),
    ("x + 2", "x+1", False),
    (None, "5", False),
    ("", "5", False),
]


@pytest.mark.parametrize("pred,reference,expected", MATCH_CASES)
def test_answers_match(pred, reference, expected):
    assert answers_match(pred, reference) is expected


def test_end_to_end_extraction_and_match():
    assert answers_match(extract_answer("#### 1,234"), "1234")
    assert answers_match(extract_answer("so \\boxed{\\frac{3}{4}}"), "0.75")
    assert answers_match(extract_answer("**The answer is 8.0 dollars**"), "8")


# --------------------------------------------------------------------------- rewards


def test_correctness_reward():
    reward = get_reward("correctness")
    assert isinstance(reward, Reward) and reward.name == "correctness"
    right = reward.score("q", "3 + 5 = 8. The answer is 8.", "8", n_generated_tokens=12)
    assert right == Score(reward=1.0, answer="8", correct=True, parsed=True)
    wrong = reward.score("q", "The answer is 9.", "8", 5)
    assert wrong == Score(reward=0.0, answer="9", correct=False, parsed=True)


def test_unparseable_never_raises():
    for spec in ("correctness", "length", "neg_length", "tests.test_rewards:my_reward"):
        score = get_reward(spec).score("q", "I have no idea.", "8", 4)
        assert score.parsed is False and score.answer is None and score.correct is False
    assert get_reward("correctness").score("q", "I have no idea.", "8", 4).reward == 0.0


def test_length_rewards_still_judge_correctness():
    length = get_reward("length").score("q", "The answer is 8.", "8", 37)
    assert length == Score(reward=37.0, answer="8", correct=True, parsed=True)
    assert isinstance(length.reward, float)
    neg = get_reward("neg_length").score("q", "The answer is 7.", "8", 37)
    assert neg == Score(reward=-37.0, answer="7", correct=False, parsed=True)


def test_user_reward_by_module_spec():
    reward = get_reward("tests.test_rewards:my_reward")
    assert reward.name == "tests.test_rewards:my_reward"
    score = reward.score("q", "The answer is 8.", "8", 3)
    assert score == Score(reward=2.0, answer="8", correct=True, parsed=True)
    assert reward.score("q", "The answer is 7.", "8", 3).reward == -1.0


def test_user_reward_as_callable():
    reward = get_reward(lambda prompt, completion, reference: len(completion))  # ints are accepted
    score = reward.score("q", "abc 4", "4", 1)
    assert score.reward == 5.0 and isinstance(score.reward, float) and score.correct
    assert get_reward(reward) is reward


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), "1.0", None, True])
def test_user_reward_bad_value_raises(bad_value):
    reward = get_reward(lambda prompt, completion, reference: bad_value)
    with pytest.raises(IPGError) as err:
        reward.score("q", "The answer is 1.", "1", 1)
    message = str(err.value)
    assert message.startswith("reward ") and "<lambda>" in message and "\n" not in message
    assert "finite float" in message
    if isinstance(bad_value, float):
        assert str(bad_value) in message


def test_nan_from_module_reward_names_reward_and_value():
    with pytest.raises(IPGError, match=r"reward 'tests.test_rewards:nan_reward' returned nan"):
        get_reward("tests.test_rewards:nan_reward").score("q", "8", "8", 1)


@pytest.mark.parametrize("spec", ["accuracy", "", "correct ness", "Correctness"])
def test_bad_spec_lists_valid_names(spec):
    with pytest.raises(IPGError) as err:
        get_reward(spec)
    message = str(err.value)
    for name in ("correctness", "length", "neg_length", "module.path:function"):
        assert name in message


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("tests.no_such_module:fn", "cannot import module 'tests.no_such_module'"),
        ("tests.test_rewards:no_such_fn", "has no attribute 'no_such_fn'"),
        ("tests.test_rewards:NOT_A_FUNCTION", "not a function"),
        (":fn", "not of the form 'module.path:function'"),
    ],
)
def test_bad_module_spec(spec, fragment):
    with pytest.raises(IPGError, match=fragment):
        get_reward(spec)


def test_summarize():
    scores = [
        Score(reward=1.0, answer="8", correct=True, parsed=True),
        Score(reward=0.0, answer="7", correct=False, parsed=True),
        Score(reward=0.0, answer=None, correct=False, parsed=False),
        Score(reward=1.0, answer="3", correct=True, parsed=True),
    ]
    assert summarize(scores) == {"accuracy": 0.5, "mean_reward": 0.5, "unparseable": 1, "n": 4}
    empty = summarize([])
    assert empty["n"] == 0 and not any(isinstance(v, float) and math.isnan(v) for v in empty.values())


def test_summarize_length_reward_reports_accuracy():
    reward = get_reward("length")
    scores = [reward.score("q", c, "8", n) for c, n in [("The answer is 8.", 10), ("The answer is 9.", 20)]]
    assert summarize(scores) == {"accuracy": 0.5, "mean_reward": 15.0, "unparseable": 0, "n": 2}


# MATH-style answers: symbolic equivalence through math-verify when the reference is not a plain number.
MATH_EQUAL = [
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    ("x=5", "5"),
    ("5", "x=5"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\frac{2}{4}", r"\frac{1}{2}"),
    (r"2\pi", r"\pi \cdot 2"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"3\sqrt{3}", r"\sqrt{27}"),
    (r"x^2+2x+1", r"(x+1)^2"),
    (r"\{1,2,3\}", r"\{3,2,1\}"),
    (r"(-\infty, 2)", r"(-\infty,2)"),
    (r"[0, 1]", r"[0,1]"),
    (r"\frac{7}{3}", r"2\frac{1}{3}"),
    (r"10^{3}", "1000"),
    (r"\left(\frac{1}{2}\right)", r"\frac{1}{2}"),
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),
    (r"2 + \sqrt{3}", r"\sqrt{3} + 2"),
    (r"a+b", r"b+a"),
    (r"\sin^2 x + \cos^2 x", "1"),
]
MATH_UNEQUAL = [
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt2}{2}"),
    (r"\pi", r"\frac{\pi}{2}"),
    (r"\sqrt{8}", r"3\sqrt{2}"),
    ("x=6", "5"),
    (r"\frac{1}{3}", "0.33"),
    (r"x^2+1", r"(x+1)^2"),
    (r"\{1,2\}", r"\{1,2,3\}"),
    (r"(0, 1)", r"[0, 1]"),
    (r"2\pi", r"\pi"),
    (r"\frac{7}{3}", r"\frac{3}{7}"),
    ("not a formula at all", r"\frac{1}{2}"),
    (r"\frac{", r"\frac{1}{2}"),  # malformed: unequal, never an exception
]


@pytest.mark.parametrize("pred,reference", MATH_EQUAL)
def test_math_answers_that_are_equal(pred, reference):
    assert answers_match(pred, reference), (pred, reference)


@pytest.mark.parametrize("pred,reference", MATH_UNEQUAL)
def test_math_answers_that_differ(pred, reference):
    assert not answers_match(pred, reference), (pred, reference)


def test_math_verify_time_is_bounded():
    import time

    from ipg_sae import rewards

    t0 = time.perf_counter()
    answers_match("9" * 20000 + r"^{9^{9^{9}}}", r"\frac{1}{2}")  # a pathological expression
    assert time.perf_counter() - t0 < 4 * rewards.MATH_VERIFY_TIMEOUT_S + 2
