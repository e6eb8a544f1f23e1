"""The own reward of examples/own_task: full credit for the right number, a penalty for no answer at all.

Named in the config as ``my_rewards:reward``; the folder must be importable (``PYTHONPATH=examples/own_task``).
It uses the answer helpers the built-in rewards use: ``extract_answer`` finds the final answer ("####",
``\\boxed{}``, "The answer is N", else the last number), ``answers_match`` compares it exactly (as fractions).
"""

from ipg_sae.rewards import answers_match, extract_answer


def reward(prompt: str, completion: str, reference: str) -> float:
    answer = extract_answer(completion)
    if answer is None:
        return -0.5  # no number at all
    return 1.0 if answers_match(answer, reference) else 0.0
