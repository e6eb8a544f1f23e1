"""The arithmetic transfer family: levels 4, 5 and 6 of the ``arithmetic`` task, word problems on surfaces the
levels-1-3 templates never use (measurements, money, timetables, scores; the question first or the numbers in a
list), for measuring whether steering found on levels 1-3 transfers to other wording. The difficulty is set by
the level so the unsteered model can be put where it has room (the issue-37 target: 15-45% correct):

* level 4: one step, numbers 1..20 (level 1's difficulty, another surface);
* level 5: one step, numbers 10..99 (larger numbers);
* level 6: two steps, additions and subtractions of numbers up to 30.

Problem ``i`` depends only on (seed, level, i), like every arithmetic level; ids ``arith-L{level}-s{seed}-i``
(levels 1-3 keep theirs). The solutions use the same "a op b = c" sentences as levels 1-3 (:mod:`ipg_sae.tasks`
imports these templates; this module imports nothing of it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class _Generated:
    question: str
    steps: list[str]  # one "a op b = c" sentence per step
    answer: int


def _step(a: int, op: str, b: int, result: int, why: str) -> str:
    return f"{why} {a} {op} {b} = {result}."


def _range(level: int) -> tuple[int, int]:
    return (1, 20) if level == 4 else (10, 99)


def _adding(question: str, why: str):
    """A one-step template that adds two numbers of the level's range (``{a}``, ``{b}``, ``{name}`` in the text)."""
    def template(level: int):
        def make(rng: random.Random, name: str) -> _Generated:
            lo, hi = _range(level)
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            return _Generated(question.format(a=a, b=b, name=name), [_step(a, "+", b, a + b, why)], a + b)
        return make
    return template


def _taking(question: str, why: str):
    """A one-step template that takes a smaller number (1..a) from one of the level's range."""
    def template(level: int):
        def make(rng: random.Random, name: str) -> _Generated:
            lo, hi = _range(level)
            a = rng.randint(lo, hi)
            b = rng.randint(1, a)
            return _Generated(question.format(a=a, b=b, name=name), [_step(a, "-", b, a - b, why)], a - b)
        return make
    return template


_rain = _adding("How much rain fell in total, in millimetres, if {a} mm fell in the morning and {b} mm in the "
                "afternoon?", "Both amounts of rain add up:")
_train = _taking("A train leaves the station carrying {a} passengers. At the first stop, {b} passengers get off and "
                 "nobody gets on. How many passengers are on the train now?", "Passengers who get off leave the train:")
_score = _adding("Points scored: first half {a}, second half {b}. What was the team's final score?",
                 "The final score is the sum of both halves:")
_wallet = _taking("{name}'s wallet held ${a}. After paying ${b} for a ticket, how many dollars remain in the wallet?",
                  "Paying for the ticket takes money out:")
_temperature = _adding("At dawn the thermometer read {a} degrees; by noon it had climbed another {b} degrees. What "
                       "did it read at noon?", "The temperature rose, so")
_tank = _taking("Litres of water in a tank: {a}. A leak drains {b} litres overnight. Litres in the tank by morning?",
                "The leak drains water:")


def _parking(rng: random.Random, name: str) -> _Generated:
    a, b = rng.randint(5, 30), rng.randint(1, 30)
    c = rng.randint(1, a + b)
    return _Generated(f"A car park opens with {a} cars inside. During the morning {b} cars drive in, and at lunch {c} "
                      "cars drive out. How many cars are in the car park after lunch?",
                      [_step(a, "+", b, a + b, "Cars driving in add up:"),
                       _step(a + b, "-", c, a + b - c, "Cars driving out leave:")], a + b - c)


def _recipe(rng: random.Random, name: str) -> _Generated:
    a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
    return _Generated(f"What is the total weight, in grams, of {a} g of flour, {b} g of sugar and {c} g of butter?",
                      [_step(a, "+", b, a + b, "Flour and sugar together weigh"),
                       _step(a + b, "+", c, a + b + c, "Adding the butter gives")], a + b + c)


def _library(rng: random.Random, name: str) -> _Generated:
    a = rng.randint(10, 30)
    b = rng.randint(1, a)
    c = rng.randint(1, 30)
    return _Generated(f"{name} borrowed {a} library books, returned {b} of them on Friday, and borrowed {c} new ones "
                      f"on Saturday. How many library books does {name} have at home now?",
                      [_step(a, "-", b, a - b, "Returning books leaves"),
                       _step(a - b, "+", c, a - b + c, "Borrowing new ones adds:")], a - b + c)


def _one_step(level: int) -> list:
    return [make(level) for make in (_rain, _train, _score, _wallet, _temperature, _tank)]


TRANSFER_TEMPLATES = {4: _one_step(4), 5: _one_step(5), 6: [_parking, _recipe, _library]}
STEPS = {4: 1, 5: 1, 6: 2}  # solution sentences per problem
