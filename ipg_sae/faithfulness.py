r"""Off-policy faithfulness: the expected reward of a steered policy, estimated on shared samples.

Does scaling a set ``S`` of latents by ``gamma`` move the outcome more than another set would?
Sampling every (set, gamma) cell is too expensive to compare many sets, so every cell is scored
on the same samples of the *unsteered* policy (``docs/ipg-method.md`` §5 gives the steering):

* For each held-out prompt ``x``, ``G`` trajectories ``tau_g ~ pi_T(. | x)`` are sampled once, at
  temperature ``T`` with ``top_p = 1`` (so the sampler's support is the whole vocabulary).
* For a cell, ``log pi'_T(tau_g)`` is computed teacher-forced with exactly the steering hooks that
  generation uses (live encoding, prompt and generated positions, the same first-token
  exclusion) and the same temperature, so it is the log-probability the steered sampler would
  give that trajectory.
* Self-normalised importance weights per prompt, ``w_g = exp(log pi'(tau_g) - log pi(tau_g))``:

      R_hat(x) = sum_g w_g R_g / sum_g w_g,        ESS(x) = (sum_g w_g)^2 / sum_g w_g^2

  ``R_hat`` is consistent for ``E_{pi'}[R | x]`` (bias ``O(1/G)``), for any reward (correctness,
  length, ...). The cell's value is the mean of ``R_hat`` over prompts; ESS is reported as a
  fraction of ``G`` and cells whose mean ESS is below ``min_ess`` are flagged. Every cell is
  scored on the same trajectories, so differences between cells are paired over prompts.

Cost (:class:`TrajectoryScorer`). A cell is one teacher-forced forward pass, computed as a
prefix tree: the tokens every prompt shares (system prompt, worked example) once, then each
problem's own question once, then its ``G`` completions, each segment on the KV cache of the
one before, under the cell's intervention. The blocks up to the lowest steered layer do not
change with the intervention: their output there is computed once (unsteered) and replayed,
and only the blocks above run per cell. Logits are computed only at the scored positions.

Assumption: the model's logits are ``lm_head(final hidden)`` (optionally soft-capped, as in
Gemma), and its base model accepts a 4-D additive attention mask and explicit position ids
(true of Llama, Qwen2, Mistral, Gemma and GPT-2 in transformers 5).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import IPGError
from .kv_cache import attention_mask, repeated
from .models import ReplayedBlock, SkippedBlock, block_hidden, decoder_layers, replace_block_hidden
from .saes import as_layer_dict
from .stats import effective_sample_size
from .steering import Intervention, steer, steered_positions
from .trajectories import Trajectory, group_by_prompt

# ---- the prefix tree ------------------------------------------------------------------------


@dataclass
class PrefixTree:
    """Trajectories as shared prefix -> per-problem question -> per-sample completion."""

    prefix: list[int]  # tokens every prompt starts with
    questions: list[list[int]]  # per problem: the rest of its prompt (at least one token)
    completions: list[list[list[int]]]  # per problem: its completions, in sample order
    index: list[list[int]]  # per problem and sample: the trajectory's position in the input list

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + sum(map(len, self.questions)) + sum(len(c) for cs in self.completions for c in cs)

    @property
    def n_tokens_flat(self) -> int:
        """Tokens a pass without sharing would run (every trajectory's prompt and completion)."""
        return sum((len(self.prefix) + len(q)) * len(cs) + sum(map(len, cs))
                   for q, cs in zip(self.questions, self.completions))


def prefix_tree(trajectories: Sequence[Trajectory]) -> PrefixTree:
    """Group ``trajectories`` by prompt and split off the longest prefix all prompts share."""
    position = {t.id: i for i, t in enumerate(trajectories)}
    groups = list(group_by_prompt(list(trajectories)).values())
    if not groups:
        raise IPGError("no trajectories to score; sample some first")
    prompts = []
    for group in groups:
        if any(t.prompt_ids != group[0].prompt_ids for t in group):
            raise IPGError(f"the samples of prompt {group[0].prompt_id} have different prompt tokens; score "
                           "trajectories that come from one sampling run")
        if not group[0].prompt_ids:
            raise IPGError(f"trajectory {group[0].id} has no prompt tokens")
        if any(not t.completion_ids for t in group):
            empty = next(t for t in group if not t.completion_ids)
            raise IPGError(f"trajectory {empty.id} has no generated tokens; there is nothing to score")
        prompts.append(group[0].prompt_ids)
    shared = 0
    shortest = min(map(len, prompts))
    while shared < shortest - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1  # every question keeps at least its last token: it predicts the first completion token
    return PrefixTree(prefix=list(prompts[0][:shared]), questions=[list(p[shared:]) for p in prompts],
                      completions=[[list(t.completion_ids) for t in g] for g in groups],
                      index=[[position[t.id] for t in g] for g in groups])


# ---- scoring --------------------------------------------------------------------------------


class TrajectoryScorer:
    """``log pi_T(completion | prompt)`` of fixed trajectories under any steering intervention.

    Args:
        model: the policy (frozen).
        trajectories: what to score (G per prompt, from one sampling run).
        temperature: the sampler's temperature ``T`` (scores are ``log_softmax(logits / T)``).
        saes: ``{layer: SAE}`` the interventions steer through.
        problems_per_batch: problems whose questions share one pass (their completions follow on it).
        rows_per_pass: completions per pass, grouped by length.
        scope: ``all`` steers prompt and generated positions, ``generated`` only generated ones
            (as :func:`ipg_sae.steering.steer` with that scope).
        exclude_first: leave each sequence's first token unsteered, as generation does.
    """

    def __init__(self, model: nn.Module, trajectories: Sequence[Trajectory], temperature: float, saes=None,
                 problems_per_batch: int = 8, scope: str = "all", exclude_first: bool = True, rows_per_pass: int = 32):
        if not temperature > 0:
            raise IPGError(f"importance sampling needs a sampling temperature > 0 (got {temperature}): greedy "
                           "decoding puts all its probability on one continuation")
        for name, value in (("problems_per_batch", problems_per_batch), ("rows_per_pass", rows_per_pass)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IPGError(f"{name} is {value!r}; it must be a whole number >= 1 (problems scored together, "
                               "e.g. 8)")
        self.model, self.temperature = model, float(temperature)
        self.saes = as_layer_dict(saes or {})
        self.tree = prefix_tree(trajectories)
        self.trajectories = list(trajectories)
        self.n = len(trajectories)
        self.batch, self.rows_per_pass = problems_per_batch, rows_per_pass
        self.scope, self.exclude_first = scope, exclude_first
        self.base = model.base_model
        self.blocks = decoder_layers(model)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.param = next(model.parameters())
        self._replay_cache: dict[int, list[torch.Tensor]] = {}  # layer -> its clean output, segment by segment
        self._tuple_blocks = False  # whether the decoder blocks return tuples (seen in the clean pass)
        self._segments: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    # -- public ---------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        """``[n]`` float64: each trajectory's summed log-probability of its completion tokens, in input order."""
        interventions = list(interventions)
        if not interventions:
            return self._pass(None, interventions)
        lowest = min(iv.layer for iv in interventions)
        if lowest not in self._replay_cache:
            self._replay_cache[lowest] = self._capture(lowest)
        return self._pass(lowest, interventions)

    # -- passes ---------------------------------------------------------------------------

    @torch.no_grad()
    def activation_frequencies(self) -> dict[int, np.ndarray]:
        """Per SAE layer, how often each latent fires on the scored trajectories: the share of their
        token positions (shared prompt tokens counted once per trajectory, the first token left
        out as steering leaves it out) where the latent is active."""
        out = {}
        for layer, sae in self.saes.items():
            counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
            total = 0.0
            for x, (keep, weight, _) in self._clean_segments(layer):
                f = sae.encode(x[keep].to(sae.W_dec.dtype))
                w = weight[keep].double()
                counts += ((f > 0).double() * w[:, None]).sum(0).cpu()
                total += float(w.sum())
            out[layer] = (counts / max(total, 1.0)).numpy()
        return out

    @torch.no_grad()
    def latent_push(self) -> dict[int, np.ndarray]:
        """Per SAE layer, each latent's *push* on the scored completions: the mean over their tokens of
        ``|f_i| * ||W_dec[i]||``, how far switching the latent off moves the residual stream where the policy
        acts (0 where it does not fire). What :func:`ipg_sae.nulls.push_matched_sets` matches on."""
        from .saes import decoder_matrix

        out = {}
        for layer, sae in self.saes.items():
            total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
            n = 0.0
            for x, (keep, _, completion) in self._clean_segments(layer):
                if completion:
                    total += sae.encode(x[keep].to(sae.W_dec.dtype)).abs().double().sum(0).cpu()
                    n += float(keep.sum())
            norms = decoder_matrix(sae).detach().double().norm(dim=-1).cpu()
            out[layer] = (total / max(n, 1.0) * norms).numpy()
        return out

    def latent_policy_change(self, per_trajectory: bool = False, progress: bool = False) -> dict[int, np.ndarray]:
        """Per SAE layer, how far each latent alone moves the policy on the scored trajectories, to first order:
        the mean over trajectories of ``|d log pi_T(tau) / d gamma_i|`` at ``gamma = 1`` (scaling latent ``i`` by
        ``gamma`` at the positions steering acts on; removal is ``gamma = 0``, so this is the first-order
        ``|log pi'/pi|`` of removing it alone). What :func:`ipg_sae.nulls.policy_matched_sets` matches on.
        ``per_trajectory``: the signed derivatives, ``[n, d_sae]`` per layer, in input order."""
        return policy_change(self.model, self.trajectories, self.temperature, self.saes, self.scope,
                             self.exclude_first, per_trajectory=per_trajectory, progress=progress)

    def _clean_segments(self, layer: int):
        """Block ``layer``'s clean output for every segment of the tree, each with (positions that count, how many
        trajectories each stands for, whether it is a completion); captured once per layer."""
        if layer not in self._replay_cache:
            self._replay_cache[layer] = self._capture(layer)
        return zip(self._replay_cache[layer], self._segments)

    def _capture(self, layer: int) -> list[torch.Tensor]:
        """The clean output of block ``layer`` for every segment of the tree, in pass order."""
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, out):
            self._tuple_blocks = isinstance(out, tuple)
            captured.append(block_hidden(out))

        handle = self.blocks[layer].register_forward_hook(hook)
        self._segments = []  # (positions that count, how many trajectories each stands for, completion?), per segment
        try:
            self._pass(None, [], record=self._segments)
        finally:
            handle.remove()
        return captured

    def _pass(self, replay_layer: int | None, interventions: list[Intervention], record: list | None = None):
        out = torch.zeros(self.n, dtype=torch.float64)
        segments = iter(self._replay_cache[replay_layer]) if replay_layer is not None else None
        with self._replaying(replay_layer) as replay, self._steering(interventions) as control:
            def run(ids, mask2d, positions, cache, keep, weight, completion=False):
                if record is not None:
                    record.append((self._counted(positions, mask2d[:, -ids.shape[1]:]), weight, completion))
                if replay is not None:
                    replay.x = next(segments)
                if control is not None:
                    control.next_call(keep, positions)  # no left padding: a position is its real-token index
                mask = attention_mask(mask2d, ids.shape[1], self.param.dtype)
                return self.base(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                 use_cache=True).last_hidden_state

            self._walk(run, out)
        return out

    def _walk(self, run, out: torch.Tensor) -> None:
        """Feed the tree through ``run`` segment by segment and add each token's log-probability to ``out``."""
        from transformers import DynamicCache

        tree, device = self.tree, self.param.device
        P = len(tree.prefix)
        prefix_cache = DynamicCache(config=self.model.config)
        if P:
            ids = torch.tensor([tree.prefix], device=device)
            positions = torch.arange(P, device=device)[None]
            real = torch.ones_like(ids, dtype=torch.bool)
            run(ids, real, positions, prefix_cache, self._keep(positions, real, prompt=True),
                torch.full_like(ids, self.n, dtype=torch.float64))
        for start in range(0, len(tree.questions), self.batch):
            problems = list(range(start, min(start + self.batch, len(tree.questions))))
            self._problem_batch(problems, prefix_cache, P, run, out)

    def _problem_batch(self, problems: list[int], prefix_cache, P: int, run, out: torch.Tensor) -> None:
        tree, device = self.tree, self.param.device
        b = len(problems)
        # the questions, right-padded, on the prefix cache
        q_ids, q_real = _pad([tree.questions[i] for i in problems], device)
        L = q_ids.shape[1]
        cache = repeated(prefix_cache, b)
        mask = torch.cat([torch.ones(b, P, dtype=torch.bool, device=device), q_real], dim=1)
        positions = P + torch.arange(L, device=device)[None].expand(b, L)
        samples = torch.tensor([len(tree.completions[i]) for i in problems], dtype=torch.float64, device=device)
        hidden = run(q_ids, mask, positions, cache, self._keep(positions, q_real, prompt=True),
                     samples[:, None].expand(b, L))
        last = q_real.sum(1) - 1  # each question's last token predicts its first completion token
        first_h = hidden[torch.arange(b, device=device), last]
        # the completions, G per problem, on their question's cache: in passes of similar lengths (a
        # long sample does not pad every other row), each pass selecting its rows' question caches
        pairs = [(j, g) for j, i in enumerate(problems) for g in range(len(tree.completions[i]))]
        pairs.sort(key=lambda p: len(tree.completions[problems[p[0]]][p[1]]))
        for start in range(0, len(pairs), self.rows_per_pass):
            chunk = pairs[start:start + self.rows_per_pass]
            c_ids, c_real = _pad([tree.completions[problems[j]][g] for j, g in chunk], device)
            M = c_ids.shape[1]
            owner = torch.tensor([j for j, _ in chunk], device=device)
            mask = torch.cat([torch.ones(len(chunk), P, dtype=torch.bool, device=device), q_real[owner], c_real], dim=1)
            positions = (P + q_real.sum(1)[owner])[:, None] + torch.arange(M, device=device)[None]
            hidden = run(c_ids, mask, positions, _select_rows(cache, owner), self._keep(positions, c_real, prompt=False),
                         torch.ones(c_ids.shape, dtype=torch.float64, device=device), completion=True)
            # token 0 from the question's last position, token t from completion position t - 1
            lp = torch.zeros(len(chunk), M, dtype=torch.float64, device=device)
            lp[:, 0] = self._token_logprobs(first_h[owner], c_ids[:, 0])
            if M > 1:
                r, t = c_real[:, 1:].nonzero(as_tuple=True)
                lp[r, t + 1] = self._token_logprobs(hidden[r, t], c_ids[r, t + 1])
            out[[tree.index[problems[j]][g] for j, g in chunk]] = (lp * c_real).sum(1).cpu()

    def _keep(self, positions: torch.Tensor, real: torch.Tensor, prompt: bool) -> torch.Tensor:
        """The positions of a segment that steering acts on."""
        return steered_positions(self.scope if prompt else "all", self.exclude_first, positions, real)

    def _counted(self, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The positions of a segment that count for activation statistics: those steering can act on."""
        return steered_positions("all", self.exclude_first, positions, real)

    def _token_logprobs(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.head, h, targets, self.temperature, self.softcap)

    @contextlib.contextmanager
    def _steering(self, interventions: list[Intervention]) -> Iterator:
        if not interventions:
            yield None
            return
        with steer(self.model, self.saes, interventions, exclude_first=self.exclude_first) as control:
            yield control

    @contextlib.contextmanager
    def _replaying(self, layer: int | None) -> Iterator[ReplayedBlock | None]:
        """Skip the blocks below ``layer`` and replay its clean output (the steering hooks then act on it)."""
        if layer is None:
            yield None
            return
        originals = {i: self.blocks[i] for i in range(layer + 1)}
        as_tuple = self._tuple_blocks
        replay = ReplayedBlock(originals[layer], as_tuple)
        try:
            for i in range(layer):
                self.blocks[i] = SkippedBlock(originals[i], as_tuple)
            self.blocks[layer] = replay
            yield replay
        finally:
            for i, block in originals.items():
                self.blocks[i] = block


def _pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    real = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        real[i, :len(s)] = True
    return ids.to(device), real.to(device)


def _select_rows(cache, rows: torch.Tensor):
    out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out


# ---- the estimator ------------------------------------------------------------------------


@dataclass
class CellEstimate:
    """The off-policy estimate of one (set, gamma) cell."""

    per_prompt: np.ndarray  # [N] R_hat(x): self-normalised importance-weighted reward
    ess: np.ndarray  # [N] effective sample size as a fraction of G
    log_ratio_sd: float  # spread of log pi' - log pi over trajectories

    @property
    def value(self) -> float:
        return float(self.per_prompt.mean())


def estimate(logp_base: torch.Tensor, logp_cell: torch.Tensor, rewards: torch.Tensor,
             groups: list[list[int]]) -> CellEstimate:
    """Self-normalised importance estimate of ``E_{pi'}[R | x]`` per prompt (``groups``: trajectory indices)."""
    log_ratio = (logp_cell - logp_base).double()
    per_prompt, ess = [], []
    for idx in groups:
        lr = log_ratio[idx]
        w = torch.exp(lr - lr.max())  # the common factor cancels in both ratios
        r = rewards[idx].double()
        per_prompt.append(float((w * r).sum() / w.sum()))
        ess.append(effective_sample_size(w) / len(idx))
    sd = float(log_ratio.std()) if log_ratio.numel() > 1 else 0.0
    return CellEstimate(np.array(per_prompt), np.array(ess), sd)


def token_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float, softcap=None,
                   chunk: int = 512) -> torch.Tensor:
    """``log_softmax(logits / T)[target]`` per row of hidden states ``h``, as ``z_target - logsumexp(z)`` (no
    [rows, vocab] log-softmax is materialised), in the model's precision (at least float32), returned as float64."""
    out = []
    for s in range(0, h.shape[0], chunk):
        z = head(h[s:s + chunk])
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 logits are too coarse for log-probs
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        z = z / temperature
        lp = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
        out.append(lp.double())
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float64)


# ---- each latent's first-order effect on the policy ------------------------------------------


def policy_change(model: nn.Module, trajectories: Sequence[Trajectory], temperature: float, saes, scope: str = "all",
                  exclude_first: bool = True, rows: int = 8, per_trajectory: bool = False,
                  progress: bool = False) -> dict[int, np.ndarray]:
    r"""``d log pi_T(tau) / d gamma_i`` at ``gamma = 1`` for every latent ``i`` of every SAE layer and trajectory.

    Scaling latent ``i`` by ``gamma`` moves the block's output by ``(gamma - 1) f_{t,i} W_dec[i]`` at each steered
    position ``t`` (its encoding ``f`` is computed below the layer, so it does not move), hence exactly

        d log pi_T(tau) / d gamma_i = sum_t f_{t,i} (W_dec[i] . g_t),    g_t = d log pi_T(tau) / d x_t,

    with one backward pass per batch of trajectories (each row's ``log pi`` depends on its own row only). Full
    sequences, no prefix tree: a position's gradient differs per trajectory. Returns the mean over trajectories
    of the absolute value, or (``per_trajectory``) the signed values ``[n, d_sae]``.
    """
    from tqdm.auto import tqdm

    from .saes import decoder_matrix

    saes = as_layer_dict(saes or {})
    layers = sorted(saes)
    blocks = decoder_layers(model)
    head, base = model.get_output_embeddings(), model.base_model
    softcap = getattr(model.config, "final_logit_softcapping", None)
    device = next(model.parameters()).device
    decoders = {layer: decoder_matrix(saes[layer]).detach().double() for layer in layers}
    out = {layer: [] for layer in layers}
    for start in tqdm(range(0, len(trajectories), rows), desc="policy change per latent", unit="batch",
                      disable=not progress):
        batch = trajectories[start:start + rows]
        ids, real = _pad([t.prompt_ids + t.completion_ids for t in batch], device)
        prompt_len = torch.tensor([len(t.prompt_ids) for t in batch], device=device)[:, None]
        positions = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
        generated = real & (positions >= prompt_len)
        captured: dict[int, torch.Tensor] = {}

        def hook(layer):
            def fn(_module, _inputs, output):
                h = block_hidden(output)
                if layer == layers[0]:  # the graph starts here: nothing below is differentiated
                    h = h.detach().requires_grad_(True)
                    captured[layer] = h
                    return replace_block_hidden(output, h)
                captured[layer] = h
            return fn

        handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
        try:
            with torch.enable_grad():
                hidden = base(input_ids=ids, attention_mask=real.long()).last_hidden_state
                # every completion token, predicted from the position before it; one row per token
                row, col = generated.nonzero(as_tuple=True)
                lp = token_logprobs(head, hidden[row, col - 1], ids[row, col], temperature, softcap)
                grads = torch.autograd.grad(lp.sum(), [captured[layer] for layer in layers])
        finally:
            for h in handles:
                h.remove()
        # prompt tokens as the scope steers them, generated tokens under every scope (as the scorer)
        keep = torch.where(generated, steered_positions("all", exclude_first, positions, real),
                           steered_positions(scope, exclude_first, positions, real))
        with torch.no_grad():
            for layer, g in zip(layers, grads):
                sae = saes[layer]
                f = sae.encode(captured[layer].detach().to(sae.W_dec.dtype)).double() * keep[..., None]
                out[layer].append(torch.einsum("btk,btk->bk", f, g.double() @ decoders[layer].T).cpu())
    per = {layer: torch.cat(v).numpy() for layer, v in out.items()}
    return per if per_trajectory else {layer: np.abs(v).mean(0) for layer, v in per.items()}
