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
