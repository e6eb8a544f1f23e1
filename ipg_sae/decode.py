"""The ``loop`` sampling backend: a decode loop with continuous batching over a slot KV cache.

Each sample has its own random stream (seeded by the run's seed, its problem id and its sample
index: :func:`ipg_sae.sampling.row_seed`), so its tokens do not depend on the batch it runs in.

``rows`` samples decode together, one row (slot) each. A sample that draws a stop token (or
reaches ``max_new_tokens``) frees its row and the next waiting sample takes it at the next step,
so every step's matrix multiplications keep the batch's full width until the work runs out;
then the batch shrinks with it. (A batch that only shrinks spends most of its steps on a few
long samples: at the demo's settings answers stop after ~37 of their 96 allowed tokens.)

Prompts are prefilled in chunks, on top of the tokens every prompt shares (system prompt,
worked example), which are computed once; a prompt's keys and values are then written into
each of its samples' rows, right-aligned so that they end at the current column of the slot
cache (:mod:`ipg_sae.kv_cache`). A row attends to its own prompt and tokens only: a 4-D mask,
rebuilt each step from which columns each row owns. Positions follow ``generate``'s convention
(a token's position is the number of real tokens before it), and steering hooks are told each
call's steered positions and real-token indices (``next_call``), so steering acts exactly where
it acts under ``generate``.

Each token is drawn from ``softmax(logits / T)`` (nucleus-truncated when ``top_p < 1``) by an
inverse-CDF draw from its row's generator, and its log-probability is returned: what
:class:`ipg_sae.faithfulness.TrajectoryScorer` computes for the same tokens.

With ``compile`` (``sampling.compile``), the decoding steps run every block's norms, MLP and
rotary embedding through ``torch.compile`` (:class:`CompiledStep`): a norm is ~7 small kernels
eagerly and one fused kernel compiled, the rotary embedding ~12 and one, the MLP's activation
and product one more. Each compiled call costs ~15 us of its own on a CPU, about what the fused
operations save there; where launches are dear (a GPU) it should pay more. Whether it pays on a
machine is what ``benchmarks/bench_sampling.py --compile`` measures.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .errors import IPGError
from .kv_cache import attention_mask, layer_states, repeated, slot_cache
from .models import check_finite_logits

_SLACK = 64  # columns beyond the longest row, so the cache shifts its columns once per ~64 steps, not every step

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    """Prompts prefilled together, waiting for their samples' rows."""

    first: int  # index of its first prompt
    states: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [prompts, heads, width, dim]
    real: torch.Tensor  # [prompts, width] bool: which columns are tokens (not padding)
    logits: torch.Tensor  # [prompts, vocab]: each prompt's next-token logits
    next_pos: torch.Tensor  # [prompts]: the position of each prompt's first generated token


class _Prefill:
    """Prefills prompts chunk by chunk on the cache of their shared prefix (computed once)."""

    def __init__(self, model, encoded: list[list[int]], chunk: int, control, device, split_prefix: bool):
        self.model, self.encoded, self.chunk, self.control, self.device = model, encoded, chunk, control, device
        self.shared = shared_prefix_length(encoded)
        self.prefix_cache = None
        self.split = split_prefix and self.shared > 0  # rows then hold their own tokens only
        if self.shared:
            from transformers import DynamicCache

            ids = torch.tensor([encoded[0][:self.shared]], device=device)
            self.prefix_cache = DynamicCache(config=model.config)
            self._forward(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(self.shared, device=device)[None],
                          self.prefix_cache)

    @property
    def prefix_states(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, the shared prefix's keys and values (``[heads, C, dim]``) when rows do not hold them."""
        return [(k[0], v[0]) for k, v in layer_states(self.prefix_cache)] if self.split else None

    @property
    def width(self) -> int:
        """The most columns a prompt takes in a row of the slot cache."""
        return max(map(len, self.encoded)) - (self.shared if self.split else 0)

    def __call__(self, first: int) -> _Chunk:
        prompts = list(range(first, min(first + self.chunk, len(self.encoded))))
        suffixes = [self.encoded[i][self.shared:] for i in prompts]
        width = max(map(len, suffixes))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        real = torch.zeros(len(prompts), width, dtype=torch.bool)
        for j, s in enumerate(suffixes):  # left-padded: every prompt's last token is in the last column
            ids[j, width - len(s):] = torch.tensor(s)
            real[j, width - len(s):] = True
        ids, real = ids.to(self.device), real.to(self.device)
        positions = self.shared + (real.long().cumsum(-1) - 1).clamp(min=0)
        if self.prefix_cache is not None:
            cache = repeated(self.prefix_cache, len(prompts))
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        key_real = torch.cat([torch.ones(len(prompts), self.shared, dtype=torch.bool, device=self.device), real], 1)
        logits = self._forward(ids, key_real, positions, cache)
        states, cut = layer_states(cache), (self.shared if self.split else 0)
        return _Chunk(first, [(k[:, :, cut:], v[:, :, cut:]) for k, v in states], key_real[:, cut:], logits,
                      positions[:, -1] + 1)

    def _forward(self, ids, key_real, positions, cache) -> torch.Tensor:
        if self.control is not None:
            self.control.next_call(self.control.prompt_keep(positions, key_real[:, -ids.shape[1]:]), positions)
        dtype = next(self.model.parameters()).dtype
        out = self.model(input_ids=ids, attention_mask=attention_mask(key_real, ids.shape[1], dtype),
                         position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()


class DecodeAttention:
    """Attention for one query position per row, reading the shared prompt prefix once for the whole batch.

    Two costs of transformers' SDPA path at decode shapes, both profiled on the default model:
    with a mask it repeats every layer's whole key/value cache for each query head of a group
    (``repeat_kv``: 9 query / 3 key-value heads there), and every row reads its own copy of the
    prompt's keys and values, though all rows share the system prompt and worked example (about
    130 of their ~156 prompt tokens). Here each group's queries read the cache in place, and
    when ``prefix`` holds the shared tokens' keys and values per layer, the rows' cache holds
    only their own tokens: the scores against the prefix are one matrix product for all rows,
    joined with the rows' own scores in one softmax (the same attention, computed in two parts).

    Only calls made while :attr:`on` is set take this path (the loop's decoding steps); prefills and
    anything else go to SDPA.
    """

    def __init__(self):
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: [heads_kv, C, dim] each
        self.on = False

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        batch, heads, q_len, dim = query.shape
        kv_heads = key.shape[1]
        if not self.on:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        if q_len != 1 or kwargs.get("sliding_window") or kwargs.get("softcap") or heads % kv_heads:
            raise IPGError(f"sampling.backend loop: {type(module).__name__} needs an attention this decode loop does "
                           "not compute (sliding window, soft-capping or ungrouped heads); use sampling.backend hf")
        group = heads // kv_heads
        q = query.reshape(batch, kv_heads, group, dim) * (scaling if scaling is not None else dim ** -0.5)
        scores = torch.matmul(q, key.transpose(-1, -2))  # [batch, kv_heads, group, own columns]
        if attention_mask is not None:  # [batch, 1, 1, columns]: additive or boolean (True = attend)
            mask = attention_mask[:, :, :, :key.shape[-2]]
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
                else scores + mask
        if self.prefix is None:
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value)
            return out.reshape(batch, 1, heads, dim), None
        k_pre, v_pre = self.prefix[module.layer_idx]  # [kv_heads, C, dim]
        shared = torch.matmul(q.transpose(0, 1).reshape(kv_heads, batch * group, dim), k_pre.transpose(-1, -2))
        shared = shared.reshape(kv_heads, batch, group, -1).transpose(0, 1)  # [batch, kv_heads, group, C]
        n_shared = k_pre.shape[1]
        weights = torch.softmax(torch.cat([shared, scores], dim=-1), dim=-1, dtype=torch.float32).to(value.dtype)
        w_pre = weights[..., :n_shared].transpose(0, 1).reshape(kv_heads, batch * group, n_shared)
        out = torch.matmul(w_pre, v_pre).reshape(kv_heads, batch, group, dim).transpose(0, 1)
        out = out + torch.matmul(weights[..., n_shared:], value)
        return out.reshape(batch, 1, heads, dim), None


_ATTENTION = "ipg_decode"


@contextlib.contextmanager
def _decode_attention(model) -> Iterator[DecodeAttention | None]:
    """Route the model's SDPA attention through a :class:`DecodeAttention` while the loop runs (None: the
    model's own attention is kept, e.g. flash attention on a GPU)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield None
        return
    from transformers import AttentionInterface

    attention = DecodeAttention()
    AttentionInterface.register(_ATTENTION, attention)
    config._attn_implementation = _ATTENTION
    try:
        yield attention
    finally:
        config._attn_implementation = "sdpa"


class CompiledStep:
    """The decoding steps' norms, MLPs and rotary embeddings as compiled kernels, swapped in only while a step runs
    (:meth:`active`): the prefill, the scorer and anything else keep the eager code.

    Every decoder block's direct children that are norms (a class named ``*Norm*``) or its ``mlp``, and the final
    norm, run ``torch.compile(type(m).forward)(m, x)``: one compiled function per module class, which every layer
    shares (parameters are its inputs, not constants), compiled for any number of rows (and once more for one
    row, which compilers specialise). The attention's rotary embedding (``apply_rotary_pos_emb`` of its modeling
    module: ~12 small kernels per layer and step eagerly) is swapped by name for its compiled self. Hooks on those
    modules still run (only ``forward`` is replaced). A module that already carries its own ``forward`` (an
    accelerate hook) is left eager. When compilation fails (no C++ compiler on a CPU, a backend without inductor)
    it warns once and the loop decodes uncompiled, with the same results as ``compile: false``.
    """

    _compiled: dict[Callable, Callable] = {}  # per module class or function, for the process (code is reused)
    _dynamic: set[Callable] = set()  # those whose compilation was asked for any number of rows

    def __init__(self, model):
        from .models import decoder_layers

        self.targets = []
        for block in decoder_layers(model):
            self.targets += [m for name, m in block.named_children()
                             if name == "mlp" or "norm" in type(m).__name__.lower()]
        self.targets += [m for m in model.base_model.children() if "norm" in type(m).__name__.lower()]
        self.targets = [m for m in self.targets if "forward" not in vars(m)]
        self.functions = []  # (modeling module, its apply_rotary_pos_emb), swapped by name during a step
        for block in decoder_layers(model):
            attention = getattr(block, "self_attn", None)
            module = sys.modules.get(type(attention).__module__) if attention is not None else None
            fn = getattr(module, "apply_rotary_pos_emb", None)
            if callable(fn) and (module, fn) not in self.functions:
                self.functions.append((module, fn))
        self.failed: str | None = None

    @contextlib.contextmanager
    def active(self):
        if self.failed or not (self.targets or self.functions):
            yield
            return
        for m in self.targets:
            m.forward = functools.partial(self._call, m)  # an instance attribute: nn.Module.__call__ runs it
        for module, fn in self.functions:
            setattr(module, fn.__name__, functools.partial(self._call, None, _fn=fn))
        try:
            yield
        finally:
            for m in self.targets:
                vars(m).pop("forward", None)
            for module, fn in self.functions:
                setattr(module, fn.__name__, fn)

    def _call(self, module, *args, _fn=None, **kwargs):
        """``module``'s forward (or the function ``_fn``) compiled, or eager once compilation has failed."""
        prefix = () if _fn is not None else (module,)
        if not self.failed:
            key = _fn if _fn is not None else type(module)  # what its compiled code is kept by
            try:
                if key not in self._compiled:
                    self._compiled[key] = torch.compile(_fn if _fn is not None else key.forward)
                if key not in self._dynamic and args and isinstance(args[0], torch.Tensor) and args[0].shape[0] > 1:
                    # rows come and go (refills, the shrinking tail): the first compilation is for any batch size
                    # (marking every call's inputs, once compiled, only cost time)
                    for x in args:
                        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == args[0].shape[0]:
                            torch._dynamo.maybe_mark_dynamic(x, 0)
                    self._dynamic.add(key)
                return self._compiled[key](*prefix, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure to compile: decode uncompiled (it computes the same)
                lines = str(e).strip().splitlines()
                self.failed = f"{type(e).__name__}: {lines[0][:160] if lines else ''}"
                msg = f"sampling.compile: torch.compile failed ({self.failed}); decoding uncompiled"
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return (_fn if _fn is not None else type(module).forward)(*prefix, *args, **kwargs)


def shared_prefix_length(encoded: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (each keeps at least its last token: it predicts the first
    generated one)."""
    shared, shortest = 0, min(map(len, encoded))
    while shared < shortest - 1 and all(p[shared] == encoded[0][shared] for p in encoded):
        shared += 1
    return shared


class _Slots:
    """Per-row state of the batch: which sample owns each row (-1: free), the columns it reads, its next
    position and its next-token logits."""

    def __init__(self, n: int, capacity: int, device):
        self.owner = torch.full((n,), -1, dtype=torch.long)
        self.real = torch.zeros(n, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(n, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.tokens = torch.zeros(n, dtype=torch.long)

    def busy(self) -> torch.Tensor:
        return torch.nonzero(self.owner >= 0).flatten()

    def free(self) -> torch.Tensor:
        return torch.nonzero(self.owner < 0).flatten()

    def keep(self, rows: torch.Tensor) -> None:
        self.owner, self.tokens = self.owner[rows], self.tokens[rows]
        on_device = rows.to(self.real.device)
        self.real, self.next_pos, self.logits = self.real[on_device], self.next_pos[on_device], self.logits[on_device]


@torch.no_grad()
def decode_loop(model, tokenizer, prompts: list[str], cfg, seeds: list[int], stops: set[int],
                intervention: Callable[[], contextlib.AbstractContextManager] | None = None, rows: int | None = None,
                on_finish: Callable[[int], None] | None = None):
    """``cfg.n_samples`` completions of each prompt (``seeds``: one per sample, prompt-major), ``rows`` of them
    decoding at a time (default ``cfg.batch_size``).

    Returns the prompts' token ids, the completions (cut after their first stop token, which is
    kept) and each completion's log-probability under the sampling distribution.
    ``on_finish(sample)`` is called as each sample finishes.
    """
    g = cfg.n_samples
    if len(seeds) != len(prompts) * g:
        raise IPGError(f"decode_loop got {len(seeds)} seeds for {len(prompts) * g} samples")
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if not encoded or any(not e for e in encoded):
        raise IPGError("a prompt has no tokens; check the task's prompts")
    device = next(model.parameters()).device
    n_rows = max(1, min(rows or cfg.batch_size, len(seeds)))
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    out: list[list[int]] = [[] for _ in seeds]
    logp = [0.0] * len(seeds)
    waiting = deque(range(len(seeds)))
    ctx = intervention() if intervention is not None else contextlib.nullcontext()
    compiled = CompiledStep(model) if getattr(cfg, "compile", False) else None
    with _decode_attention(model) as attention, ctx as handle:
        control = handle if hasattr(handle, "next_call") else None
        prefill = _Prefill(model, encoded, max(1, math.ceil(n_rows / g)), control, device,
                           split_prefix=attention is not None)
        if attention is not None:
            attention.prefix = prefill.prefix_states
        longest = prefill.width
        capacity = longest + cfg.max_new_tokens + _SLACK
        cache = slot_cache(model, n_rows, capacity, length=longest)
        if cache is None:
            raise IPGError("sampling.backend loop needs a model whose layers all use full attention (no sliding "
                           "windows); use sampling.backend hf for this model")
        slots = _Slots(n_rows, capacity, device)
        chunk: _Chunk | None = None
        while True:
            chunk = _fill(slots, cache, prefill, chunk, waiting, g)
            busy = slots.busy()
            if not len(busy):
                break
            logits = slots.logits if len(busy) == len(slots.owner) else slots.logits[busy.to(device)]
            check_finite_logits(logits, model)
            tokens, token_logp = draw_tokens(logits.cpu(), cfg, [generators[int(r)] for r in slots.owner[busy]])
            for j, row in enumerate(busy.tolist()):
                sample = int(slots.owner[row])
                out[sample].append(int(tokens[j]))
                logp[sample] += float(token_logp[j])
                if int(tokens[j]) in stops or len(out[sample]) == cfg.max_new_tokens:
                    slots.owner[row] = -1
                    slots.real[row] = False
                    if on_finish is not None:
                        on_finish(sample)
            slots.tokens[busy] = tokens
            if not len(slots.busy()) and not waiting:
                break
            if not waiting and len(slots.busy()) <= 0.75 * len(slots.owner):  # the tail: shrink the batch with it
                keep = slots.busy()
                cache.batch_select_indices(keep.to(device))
                slots.keep(keep)
            with compiled.active() if compiled is not None else contextlib.nullcontext():
                _step(model, cache, slots, control, longest, capacity, attention)
    return encoded, out, logp


def _fill(slots: _Slots, cache, prefill: _Prefill, chunk: _Chunk | None, waiting: deque, g: int) -> _Chunk | None:
    """Give free rows to waiting samples (prefilling their prompts' chunk when needed); returns the current chunk."""
    free = slots.free().tolist()
    while free and waiting:
        prompt = waiting[0] // g
        if chunk is None or prompt >= chunk.first + chunk.logits.shape[0]:
            chunk = prefill(prompt)
        taken = []
        while free and waiting and waiting[0] // g < chunk.first + chunk.logits.shape[0]:
            taken.append((free.pop(0), waiting.popleft()))
        rows = torch.tensor([r for r, _ in taken])
        samples = torch.tensor([s for _, s in taken])
        j = (samples // g - chunk.first).to(chunk.real.device)
        on_device = rows.to(slots.real.device)
        for layer, (keys, values) in zip(cache.layers, chunk.states):
            layer.insert(on_device, keys[j], values[j])
        length, width = cache.get_seq_length(), chunk.real.shape[1]
        slots.real[on_device] = False
        slots.real[on_device, length - width:length] = chunk.real[j]
        slots.next_pos[on_device] = chunk.next_pos[j]
        if slots.logits is None:
            slots.logits = chunk.logits.new_zeros(len(slots.owner), chunk.logits.shape[1])
        slots.logits[on_device] = chunk.logits[j]
        slots.owner[rows] = samples
    return chunk


def _step(model, cache, slots: _Slots, control, longest: int, capacity: int, attention: DecodeAttention | None) -> None:
    """One decoding step for every row (free rows compute a throwaway token that no row reads)."""
    length = cache.get_seq_length()
    if length + 1 > capacity:  # drop the columns no row reads any more, keeping room for the longest prompt
        busy = slots.busy().to(slots.real.device)
        oldest = int(slots.real[busy].float().argmax(dim=1).min()) if len(busy) else length
        n = min(oldest, length - longest)
        for layer in cache.layers:
            layer.shift(n)
        slots.real[:, :length - n] = slots.real[:, n:length].clone()
        slots.real[:, length - n:] = False
        length -= n
    device = slots.real.device
    busy = (slots.owner >= 0).to(device)
    slots.real[:, length] = busy
    if control is not None:
        control.next_call(busy[:, None], slots.next_pos[:, None])
    dtype = next(model.parameters()).dtype
    if attention is not None:
        attention.on = True
    try:
        hidden = model.base_model(input_ids=slots.tokens[:, None].to(device), position_ids=slots.next_pos[:, None],
                                  attention_mask=attention_mask(slots.real[:, :length + 1], 1, dtype),
                                  past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    finally:
        if attention is not None:
            attention.on = False
    head_into(model, hidden, slots.logits)
    slots.next_pos += 1


def head_into(model, hidden: torch.Tensor, out: torch.Tensor) -> None:
    """The model's next-token logits for ``hidden``, written into ``out`` (float32, reused every step: a fresh
    ``[rows, vocab]`` buffer per step costs page faults comparable to the head's own work, profiled)."""
    head = model.get_output_embeddings()
    if hidden.dtype == out.dtype and head.weight.dtype == out.dtype:
        torch.mm(hidden, head.weight.t(), out=out)
        if getattr(head, "bias", None) is not None:
            out += head.bias
    else:
        out.copy_(head(hidden))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        out.div_(softcap).tanh_().mul_(softcap)


def draw_tokens(logits: torch.Tensor, cfg, generators: list[torch.Generator], block: int = 256):
    """One token per row (greedy at temperature 0), each row from its own generator; and its log-probability under
    ``softmax(logits / T)`` (0 when greedy). ``logits`` (float32, on the CPU) is overwritten.

    An inverse-CDF draw: one uniform number per row from that row's own generator (torch.multinomial
    would spend a random number on every entry of the vocabulary). The CDF is taken in two levels,
    over blocks of ``block`` tokens and then within the chosen block, and every pass over the
    ``[rows, vocab]`` table works in place: converting and scanning the whole table in float64,
    in fresh buffers, cost as much as the model's head (profiled). Exact up to float rounding; a
    zero-probability token is never drawn.
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1).cpu(), torch.zeros(logits.shape[0])
    if cfg.top_p < 1:
        return _draw_nucleus(logits, cfg, generators)
    weights = logits.mul_(1.0 / cfg.temperature)
    weights.sub_(weights.max(dim=-1, keepdim=True).values).exp_()  # unnormalised probabilities; the largest is 1
    rows, vocab = weights.shape
    padded = -(-vocab // block) * block
    blocks = (weights if padded == vocab else torch.nn.functional.pad(weights, (0, padded - vocab))).view(rows, -1, block)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # float32 sums of `block` terms: rounding ~1e-7
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=gen) for gen in generators]) * block_cdf[:, -1]
    chosen = torch.searchsorted(block_cdf, u[:, None], right=True)[:, 0].clamp(max=block_cdf.shape[1] - 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(rows), chosen].double()  # [rows, block]
    within = torch.searchsorted(inner.cumsum(-1), (u - before)[:, None], right=True)[:, 0]
    last_nonzero = block - 1 - (inner.flip(-1) > 0).to(torch.int8).argmax(-1)  # rounding never lands past it
    tokens = chosen * block + torch.minimum(within, last_nonzero)
    log_weight = inner.gather(1, (tokens - chosen * block)[:, None])[:, 0].log()  # log exp(z) = z - max
    return tokens, (log_weight - block_cdf[:, -1].log()).float()


def _draw_nucleus(logits: torch.Tensor, cfg, generators: list[torch.Generator]):
    """The draw restricted to the smallest set of top tokens whose mass reaches ``top_p`` (renormalised)."""
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1).cpu()
    probs = logprobs.exp()
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > cfg.top_p
    sorted_p[outside] = 0
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=gen) for gen in generators]) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
