"""Sample G completions per prompt, score them, and keep their exact token ids.

Generation is batched (left padding, KV cache) with ``model.generate``. Each batch reseeds
torch's generator from ``(seed, batch index)``, so a run is reproducible on one machine and
a batch's samples do not depend on how many batches came before it. Completions are cut
after their first end-of-sequence token (which is kept: the policy chose it, so it is
scored like any other token) and padding is dropped.

An optional ``intervention`` (a zero-argument callable returning a context manager, e.g. a
steering splice) is entered around every ``generate`` call.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from .decode import decode_loop
from .errors import IPGError
from .models import check_finite_logits, context_length, model_fingerprint
from .rewards import Reward, get_reward
from .sampling_config import SamplingConfig  # noqa: F401  (re-exported: the config lives torch-free)
from .tasks import Problem, TaskConfig
from .trajectories import Trajectory


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def sample(model, tokenizer, problems: list[Problem], prompts: list[str], cfg: SamplingConfig,
           reward: Reward | str = "correctness", intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
           progress: bool = True, desc: str = "sampling") -> list[Trajectory]:
    """Generate ``cfg.n_samples`` completions for each prompt and score them with ``reward``."""
    cfg.validate()
    if len(problems) != len(prompts):
        raise IPGError(f"{len(problems)} problems but {len(prompts)} prompts")
    if not problems:
        raise IPGError("no problems to sample: the task produced an empty dataset; check task.n_problems")
    reward = get_reward(reward)
    _check_context(model, tokenizer, problems, prompts, cfg.max_new_tokens)
    fingerprint = model_fingerprint(model, tokenizer)
    per_call = max(1, cfg.batch_size // cfg.n_samples)
    stops = eos_ids(model, tokenizer)
    if cfg.backend == "loop":
        return _sample_loop(model, tokenizer, problems, prompts, cfg, reward, intervention, progress, desc,
                            fingerprint, stops)
    out: list[Trajectory] = []
    n_generated, t0 = 0, time.perf_counter()
    with tqdm(total=len(problems) * cfg.n_samples, desc=desc, unit="seq", disable=not progress, leave=False) as bar:
        for batch_index, start in enumerate(range(0, len(problems), per_call)):
            batch = list(range(start, min(start + per_call, len(problems))))
            if cfg.backend == "vllm":
                prompt_ids, completions = _generate_vllm(model, tokenizer, [prompts[i] for i in batch], cfg,
                                                         seed=_batch_seed(cfg.seed, batch_index), stops=stops,
                                                         intervention=intervention)
            else:
                prompt_ids, completions = _generate(model, tokenizer, [prompts[i] for i in batch], cfg,
                                                    seed=_batch_seed(cfg.seed, batch_index), stops=stops,
                                                    intervention=intervention, on_step=_step_postfix(bar, cfg))
            for j, i in enumerate(batch):
                for g in range(cfg.n_samples):
                    ids = completions[j * cfg.n_samples + g]
                    out.append(_trajectory(problems[i], prompts[i], prompt_ids[j], ids, g, tokenizer, reward,
                                           fingerprint))
                    n_generated += len(ids)
            bar.update(len(batch) * cfg.n_samples)
            bar.set_postfix(tok_s=f"{n_generated / (time.perf_counter() - t0):.1f}")
    return out


def _sample_loop(model, tokenizer, problems, prompts, cfg: SamplingConfig, reward: Reward, intervention, progress,
                 desc, fingerprint, stops) -> list[Trajectory]:
    """All prompts through one continuous-batching decode loop (``cfg.batch_size`` rows at a time)."""
    g = cfg.n_samples
    seeds = [row_seed(cfg.seed, p.id, i) for p in problems for i in range(g)]
    with tqdm(total=len(seeds), desc=desc, unit="seq", disable=not progress, leave=False) as bar:
        prompt_ids, completions, _ = decode_loop(model, tokenizer, prompts, cfg, seeds, stops, intervention,
                                                 on_finish=lambda _sample: bar.update(1))
    return [_trajectory(problems[r // g], prompts[r // g], prompt_ids[r // g], ids, r % g, tokenizer, reward,
                        fingerprint) for r, ids in enumerate(completions)]


def check_fits_context(model_cfg, checks: list[tuple[TaskConfig, int, str]]) -> None:
    """Before any stage of a job runs: each ``(task, max_new_tokens, field)`` leaves room in the model's context
    (tokenizer and config only; tasks that need a download to list their problems are checked when sampled)."""
    from .models import load_tokenizer_and_config
    from .tasks import build_prompts, load_problems

    cheap = [c for c in checks if c[0].name == "arithmetic" or c[0].path]
    if not cheap:
        return
    tokenizer, config = load_tokenizer_and_config(model_cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for task, max_new_tokens, field in cheap:
        problems = load_problems(task)
        _check_context(config, tokenizer, problems, build_prompts(tokenizer, problems, task), max_new_tokens, field)


def _check_context(model, tokenizer, problems: list[Problem], prompts: list[str], max_new_tokens: int,
                   field: str = "sampling.max_new_tokens") -> None:
    """Refuse prompts that cannot fit ``max_new_tokens`` more tokens in the model's context, before sampling."""
    limit = context_length(model)
    if not limit:
        return
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    long = [(p.id, n) for p, n in zip(problems, lengths) if n + max_new_tokens > limit]
    if long:
        shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in long[:3])
        raise IPGError(f"{len(long)} prompts do not leave room for max_new_tokens {max_new_tokens} in the model's "
                       f"context of {limit} tokens: {shown}{' ...' if len(long) > 3 else ''}; lower "
                       f"{field} or shorten the prompts (task.few_shot)")


def _batch_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def left_padded(tokenizer, prompts: list[str]) -> dict:
    """``input_ids`` and ``attention_mask`` of ``prompts``, padded on the left (generation appends on the right).
    Chat templates already contain their special tokens: no other BOS is added."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side


def _step_postfix(bar, cfg: SamplingConfig, every_s: float = 1.0) -> Callable[[int], None]:
    """A ``generate`` call finishes a whole batch at once (minutes on a CPU): show its decoding step on the bar,
    at most once every ``every_s`` seconds, so that the progress moves while a batch runs."""
    last = [0.0]

    def on_step(step: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            bar.set_postfix_str(f"batch at token {step}/{cfg.max_new_tokens}")
    return on_step


class _OnStep:
    """A stopping criterion that never stops: ``generate`` calls it once per decoding step (our progress hook)."""

    def __init__(self, on_step: Callable[[int], None], prompt_width: int):
        self.on_step, self.prompt_width = on_step, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        self.on_step(input_ids.shape[1] - self.prompt_width)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig, seed: int, stops: set[int], intervention,
              on_step: Callable[[int], None] | None = None):
    """Return each prompt's token ids and each sample's generated ids (cut after EOS); ``on_step(k)`` is called
    after each decoding step ``k``."""
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in left_padded(tokenizer, prompts).items()}
    torch.manual_seed(seed)
    sampling = cfg.temperature > 0
    kwargs = dict(do_sample=sampling, max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n_samples,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stops) or None, use_cache=True)
    if sampling:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if on_step is not None:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_OnStep(on_step, enc["input_ids"].shape[1])])
    ctx = intervention() if intervention is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        generated = model.generate(**enc, **kwargs, logits_processor=[_FiniteLogits(model)])
    width = enc["input_ids"].shape[1]
    prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
    completions = []
    for row in generated[:, width:].tolist():
        cut = next((i + 1 for i, tok in enumerate(row) if tok in stops), len(row))
        completions.append(row[:cut])
    return prompt_ids, completions


class _FiniteLogits:
    """A logits processor that refuses non-finite logits at every step (``models.check_finite_logits``): torch's
    sampler fails on them with a traceback, greedy decoding silently emits token 0."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, scores):
        check_finite_logits(scores, self.model)
        return scores


_VLLM_ENGINES: dict = {}  # model source -> vllm.LLM, built once per process


def _generate_vllm(model, tokenizer, prompts: list[str], cfg: SamplingConfig, seed: int, stops: set[int],
                   intervention=None) -> tuple[list[list[int]], list[list[int]]]:
    """The batch through vLLM (prompts as token ids, so the tokens are exactly the ones other backends see).
    Steering needs the model's own forward hooks, which vLLM does not run: refused."""
    if intervention is not None:
        raise IPGError("sampling.backend vllm samples the unsteered model only (steering hooks run in the HF model); "
                       "use backend hf or loop for steered sampling")
    try:
        import vllm
    except ImportError:
        raise IPGError("sampling.backend vllm needs vLLM and a GPU (pip install vllm); use backend hf or loop "
                       "here") from None
    source = getattr(model.config, "_ipg_source", None) or model.config._name_or_path
    engine = _VLLM_ENGINES.get(source)
    if engine is None:
        engine = _VLLM_ENGINES[source] = vllm.LLM(model=source, tokenizer=source, seed=0,
                                                  dtype=str(model.dtype).replace("torch.", ""))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = vllm.SamplingParams(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, seed=seed, stop_token_ids=sorted(stops))
    results = engine.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
    completions = []
    for result in results:
        for sample in result.outputs:
            ids = list(sample.token_ids)
            cut = next((i + 1 for i, tok in enumerate(ids) if tok in stops), len(ids))
            completions.append(ids[:cut])
    return encoded, completions


def row_seed(seed: int, problem_id: str, sample_index: int) -> int:
    """The random stream of one sample under ``backend: loop``: a function of the seed, the problem and the sample
    index only, so the same sample is drawn in any batch, at any batch size."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{problem_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _trajectory(problem: Problem, prompt: str, prompt_ids: list[int], ids: list[int], g: int, tokenizer,
                reward: Reward, fingerprint: dict) -> Trajectory:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    traj_id = f"{problem.id}/s{g}"
    try:
        score = reward.score(prompt, text, problem.answer, len(ids))
    except IPGError as e:
        raise IPGError(f"trajectory {traj_id}: {e}") from None
    except Exception as e:  # a user reward's own bug: one line that names it, not a traceback mid-run
        raise IPGError(f"the reward {reward.name} raised {type(e).__name__} ({str(e)[:120]}) on trajectory {traj_id}; "
                       "fix the reward function") from None
    return Trajectory(id=traj_id, prompt_id=problem.id, sample_index=g, prompt=prompt, completion=text,
                      reference=problem.answer, prompt_ids=list(prompt_ids), completion_ids=list(ids),
                      reward=score.reward, answer=score.answer, correct=score.correct, parsed=score.parsed,
                      model=fingerprint)
