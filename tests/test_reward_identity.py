"""A user reward's identity covers the code it closes over and is the same in every process (issue 36, item 4).

Each identity is computed in a fresh interpreter, as a rerun of a job would compute it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipg_sae.errors import IPGError
from ipg_sae.rewards import get_reward

REPO = Path(__file__).resolve().parents[1]

_PRINT = """
import functools, json, sys
from ipg_sae.rewards import get_reward
import user
out = {}
for name in sys.argv[1:]:
    out[name] = get_reward(getattr(user, name)).identity["code"]
print(json.dumps(out))
"""


def _identities(folder: Path, *names: str, hash_seed: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]), "OMP_NUM_THREADS": "1",
           "PYTHONHASHSEED": str(hash_seed)}  # another seed: sets and dicts built from sets iterate otherwise
    out = subprocess.run([sys.executable, "-c", _PRINT, *names], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


@pytest.fixture
def helpers(tmp_path):
    # A constant in a module of its own, imported by the helper that holds a decorator and a factory.
    _write(tmp_path, "consts.py", "LIMIT = 5\n")
    _write(tmp_path, "helper.py", (
        "import functools\n"
        "from consts import LIMIT\n"
        "SCALE = 2.0\n"
        "WORDS = {w: len(w) for w in {'alpha', 'beta', 'gamma', 'delta'}}\n"
        "def scaled(fn):\n"
        "    @functools.wraps(fn)\n"
        "    def wrapped(prompt, completion, reference):\n"
        "        return SCALE * fn(prompt, completion, reference)\n"
        "    return wrapped\n"
        "def make_reward():\n"
        "    def reward(prompt, completion, reference):\n"
        "        return float(len(completion) > LIMIT) + WORDS.get(completion, 0) + (completion in {'x', 'y', 'z'})\n"
        "    return reward\n"
        "class Threshold:\n"
        "    def __init__(self, limit):\n"
        "        self.limit = limit\n"
        "    def __call__(self, prompt, completion, reference):\n"
        "        return float(len(completion) > self.limit)\n"
        "def longer(prompt, completion, reference, limit=3):\n"
        "    return float(len(completion) > limit)\n"
    ))
    _write(tmp_path, "user.py", (
        "import functools\n"
        "import helper\n"
        "@helper.scaled\n"
        "def decorated(prompt, completion, reference):\n"
        "    return 1.0\n"
        "factory = helper.make_reward()\n"
        "instance = helper.Threshold(4)\n"
        "partial = functools.partial(helper.longer, limit=4)\n"
    ))
    return tmp_path


NAMES = ("decorated", "factory", "instance", "partial")


def test_a_callable_instance_and_a_partial_have_the_same_identity_in_every_process(helpers):
    assert _identities(helpers, *NAMES, hash_seed=1) == _identities(helpers, *NAMES, hash_seed=2)


def test_the_same_code_in_another_checkout_has_the_same_identity(helpers, tmp_path_factory):
    """Identity follows the code, not where it lies: a fresh clone elsewhere reuses the stored results."""
    import shutil

    elsewhere = tmp_path_factory.mktemp("another-checkout")
    for name in ("consts.py", "helper.py", "user.py"):
        shutil.copy(helpers / name, elsewhere / name)
    assert _identities(helpers, *NAMES) == _identities(elsewhere, *NAMES)


def test_editing_a_constant_in_a_helper_module_changes_the_identity_of_rewards_built_there(helpers):
    before = _identities(helpers, *NAMES)
    _write(helpers, "helper.py", (helpers / "helper.py").read_text().replace("SCALE = 2.0", "SCALE = 3.0"))
    after_helper = _identities(helpers, *NAMES)
    assert after_helper["decorated"] != before["decorated"]  # the decorator's code lives in helper.py
    _write(helpers, "consts.py", "LIMIT = 6\n")
    after_consts = _identities(helpers, *NAMES)
    assert after_consts["factory"] != after_helper["factory"]  # a constant imported from a third module


def test_a_partials_arguments_and_an_instances_state_are_part_of_the_identity(helpers):
    before = _identities(helpers, *NAMES)
    _write(helpers, "user.py", (helpers / "user.py").read_text().replace("Threshold(4)", "Threshold(5)")
           .replace("limit=4", "limit=5"))
    after = _identities(helpers, *NAMES)
    assert after["instance"] != before["instance"] and after["partial"] != before["partial"]
    assert after["factory"] == before["factory"]  # its code and what it closes over are unchanged


def test_a_reward_that_closes_over_a_value_with_no_stable_digest_refuses_to_key_results():
    import threading

    lock = threading.Lock()
    reward = get_reward(lambda prompt, completion, reference: 1.0 if lock else 0.0)
    assert reward.score("p", "answer: 1", "1", 3).reward == 1.0  # it still scores
    with pytest.raises(IPGError, match="closure variable 'lock' is a _thread.lock") as e:
        reward.identity
    assert "\n" not in str(e.value)
