r"""Capability cost of a steering intervention, measured on neutral text.

A method that wins accuracy by wrecking the model should be visible. On text unrelated to the
task (e.g. held-out documents of the SAE's training corpus), teacher-forced, with the
intervention at every position (the first token excepted, as in generation):

* ``kl``: the mean over predicted tokens of ``KL(p || p')``, the unsteered next-token
  distribution against the steered one (nats per token);
* ``nll`` / perplexity of the text, unsteered and steered (``ppl_ratio`` = steered / unsteered).

No intervention (or ``gamma = 1``) costs exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import IPGError
from .steering import steer


@dataclass
class CapabilityCost:
    kl: float  # mean KL(unsteered || steered) per predicted token, nats
    nll_clean: float  # mean negative log-likelihood per predicted token, unsteered
    nll_steered: float
    n_tokens: int

    @property
    def ppl_clean(self) -> float:
        return math.exp(self.nll_clean)

    @property
    def ppl_steered(self) -> float:
        return math.exp(self.nll_steered)

    @property
    def ppl_ratio(self) -> float:
        return math.exp(self.nll_steered - self.nll_clean)


@torch.no_grad()
def capability_cost(model, tokenizer, saes, interventions: Sequence, texts: Sequence[str], max_tokens: int = 256,
                    batch_size: int = 8) -> CapabilityCost:
    """:class:`CapabilityCost` of ``interventions`` (through :func:`ipg_sae.steering.steer`) on ``texts``."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise IPGError("capability_cost needs some neutral text (e.g. held-out documents of the SAE's corpus); "
                       "all given texts are empty")
    device = next(model.parameters()).device
    kl_sum = nll_clean = nll_steered = 0.0
    count = 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        clean = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
        with steer(model, saes, list(interventions)):
            steered = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
        counted = (mask[:, 1:] * mask[:, :-1]).bool()  # a real token predicting a real token
        targets = ids[:, 1:, None]
        kl = (clean.exp() * (clean - steered)).sum(-1)
        kl_sum += float(kl[counted].sum())
        nll_clean -= float(clean.gather(-1, targets)[..., 0][counted].sum())
        nll_steered -= float(steered.gather(-1, targets)[..., 0][counted].sum())
        count += int(counted.sum())
    if count == 0:
        raise IPGError("the neutral texts are too short: each needs at least two tokens")
    return CapabilityCost(kl_sum / count, nll_clean / count, nll_steered / count, count)


OFFTASK_FILE = "data/offtask_en.txt"


def offtask_entries() -> list[str]:
    """The shipped off-task English text (``ipg_sae/data/offtask_en.txt``: BSD fortune(6) data files from the Debian
    package fortunes-min, its header naming source and license), one entry per fortune, header excluded."""
    from importlib.resources import files

    text = files("ipg_sae").joinpath(OFFTASK_FILE).read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return [e.strip("\n") for e in body.split("\n%\n") if e.strip()]


def offtask_texts(max_chars: int = 640, max_texts: int | None = None) -> list[str]:
    """The off-task text as documents of at most about ``max_chars`` characters (whole fortunes joined by blank
    lines; at most about 230 tokens of the default tokenizer at 640 characters, so ``capability_max_tokens`` 256 truncates none), in file order;
    ``max_texts``: only the first that many (a cheaper, smaller sample)."""
    docs, current = [], ""
    pieces = []
    for entry in offtask_entries():  # an entry longer than max_chars is cut between lines
        lines, part = entry.split("\n"), ""
        for line in lines:
            if part and len(part) + len(line) + 1 > max_chars:
                pieces.append(part)
                part = ""
            part = f"{part}\n{line}" if part else line
        pieces.append(part)
    for entry in pieces:
        if current and len(current) + len(entry) + 2 > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{entry}" if current else entry
    if current:
        docs.append(current)
    return docs[:max_texts] if max_texts else docs


def proxy_tokens(text: str) -> int:
    """A tokenizer-independent lower bound on a BPE token count: words and punctuation marks."""
    import re

    return len(re.findall(r"\w+|[^\w\s]", text))
