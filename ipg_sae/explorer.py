r"""The feature explorer: one static page per attribution run, saying what each latent is, where it fires,
and how it moves the outcome.

``build(run_dir)`` (``ipg-sae explore RUN_DIR``, and a pipeline stage) writes
``<run_dir>/explorer/index.html`` (self-contained: its script, styles and data are inline; it opens
from disk with no server and no network) and ``<run_dir>/explorer/data.json``, the same data for
notebooks (:func:`load`). Every piece of text reaches the page through ``textContent``, never
as HTML, so tokens such as ``|``, ``<``, ``&`` or a newline render as themselves.

``data.json`` holds:

* ``run``: name, model, SAEs (with ``neuronpedia_id``), method summary, the selected set, the
  bootstrap size, the policy below;
* ``latents``: one summary row per latent with a non-zero score under any method, ranked by IPG:
  ``layer``, ``latent``, ``rank``, ``mean``, ``lo``/``hi`` (mean +- 1.96 se over prompts), ``t``,
  ``sign_consistency``, ``selection_frequency`` (share of bootstrap resamples of prompts whose
  top-k contains it), ``activation_frequency`` (share of scored positions where it fires),
  ``ranks`` (its rank under each baseline), ``selected``, ``neuronpedia`` (a URL or ""),
  ``detail`` (whether it has a panel);
* ``details``: ``"L:i" ->`` ``contexts`` (top-activating windows from the attributed trajectories
  and from held-out text: ``source``, ``tokens`` (ids), ``strings``, ``activations``, ``max``),
  ``logits`` (``promoted``/``suppressed``: ``[token, string, value]`` of ``W_dec[i] @ W_U`` after
  the final norm's scale), ``histogram`` (``edges``, ``counts`` of its non-zero activations),
  ``ipg_tokens`` (``correct``/``incorrect``: trajectories where its attribution is largest, with
  the per-token IPG contribution of this latent), ``steering`` (evaluation rows of sets holding it);
* ``trajectories``: ``id``, ``correct``, ``reward``, ``strings``, ``total`` (per-token attribution
  summed over latents) and ``top`` (per token: up to 5 ``[layer, latent, value]``), from token
  ``start`` on (the last 48 prompt tokens and the completion: the shared system prompt and worked
  example before them are left out; ``prompt_length`` counts the prompt tokens shown). The
  ``ipg_tokens`` entries are cropped the same way.

Policy (so a 2,304-latent SAE builds in seconds and the page stays small): full detail for the top
``detail`` latents by IPG, the selected set and each baseline's top 8; a summary row for every
other latent with a non-zero score; the page shows summary rows ``page_size`` at a time, so a
65k-latent SAE works too. Per-token maps come from the attribution (``token_maps: ["*"]``); held-out
contexts are encoded when the model is at hand.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attribution import AttributionResult
from .errors import IPGError
from .io import read_json, write_json, write_text
from .tracking import WandbConfig

log = logging.getLogger(__name__)

DATA_FILE = "data.json"
PAGE_FILE = "index.html"


@dataclass
class ExplorerConfig:
    detail: int = 48  # latents with a full panel (top by IPG), besides the selected set and baselines' top 8
    n_contexts: int = 12  # top-activating contexts per latent
    window: list[int] = field(default_factory=lambda: [10, 4])  # tokens before / after the activating token
    held_out: int = 32  # held-out texts to encode for contexts (0: none)
    logit_tokens: int = 10  # promoted / suppressed tokens shown
    trajectories_per_side: int = 2  # per latent, the correct and the incorrect trajectories it matters most in
    n_bootstrap: int = 100  # prompt resamples for the selection frequency
    page_size: int = 200  # summary rows per page
    n_trajectories: int = 24  # trajectories in the trajectory view


def load(run_dir: str | Path) -> dict:
    """The explorer data of a run (``explorer/data.json``), as written by :func:`build`."""
    path = Path(run_dir) / "explorer" / DATA_FILE
    if not path.is_file():
        raise IPGError(f"no explorer data at {path}; run `ipg-sae explore {run_dir}` first")
    return read_json(path)


# ---- building the data ------------------------------------------------------------------------


def build(run_dir: str | Path, model=None, tokenizer=None, saes=None, trajectories=None,
          cfg: ExplorerConfig | None = None, held_out_texts: list[str] | None = None, tracker=None) -> Path:
    """Write ``explorer/index.html`` and ``explorer/data.json`` for the attribution run in ``run_dir``.

    Args:
        run_dir: an attribution run (``attribution.safetensors``, ``trajectories.jsonl``; baselines,
            ``selection.json`` and ``eval/`` are used when present).
        model, tokenizer, saes: the model and its SAEs (``{layer: SAE}``); loaded from the run's
            ``attribute_config.yaml`` when not given. The tokenizer decodes tokens; the model and
            SAEs give the logit effects and the held-out contexts.
        trajectories: the attributed trajectories (default: the run's ``trajectories.jsonl``).
        cfg: what to show (:class:`ExplorerConfig`).
        held_out_texts: texts for held-out contexts (default: held-out arithmetic problems with their
            worked solutions when the run's task is arithmetic).
        tracker: a :class:`~ipg_sae.tracking.Tracker` to log the page to (``wandb.Html`` + artifact).

    Returns:
        The path of ``index.html``.
    """
    from .selection import latent_stats
    from .trajectories import load_trajectories

    cfg = cfg or ExplorerConfig()
    run_dir = Path(run_dir)
    result = AttributionResult.load(run_dir)
    if model is None or tokenizer is None or saes is None:
        model, tokenizer, saes = _load_run_model(run_dir, model, tokenizer, saes)
    if trajectories is None:
        trajectories = load_trajectories(run_dir / "trajectories.jsonl")
    by_id = {t.id: t for t in trajectories}
    baselines = _baselines(run_dir)
    selection = read_json(run_dir / "selection.json") if (run_dir / "selection.json").is_file() else {}
    selected = {(int(a), int(b)) for a, b in selection.get("selection", [])}
    k = int(selection.get("k_requested") or len(selected) or 8)
    stats = latent_stats(result)
    pieces = _Pieces(tokenizer)
    maps = _maps(result, by_id)
    freq, hist_values = _activation_frequency(result, maps)
    rows = _summary_rows(result, stats, baselines, selected, freq, _selection_frequency(result, k, cfg.n_bootstrap))
    detail = _detail_set(rows, cfg, selected, baselines)
    for row in rows:
        row["detail"] = (row["layer"], row["latent"]) in detail
    contexts = _contexts(result, detail, maps, by_id, pieces, cfg)
    if saes and model is not None and cfg.held_out:
        texts = held_out_texts if held_out_texts is not None else _held_out_texts(run_dir, cfg.held_out)
        _add_held_out_contexts(contexts, model, tokenizer, saes, texts, detail, pieces, cfg)
    steering = _steering_rows(run_dir)
    details = {}
    for layer, latent in sorted(detail):
        key = f"{layer}:{latent}"
        found = contexts.get((layer, latent), [])
        held = _distinct([c for c in found if c["source"] == "held-out text"], max(2, cfg.n_contexts // 3))
        ctx = _distinct([c for c in found if c["source"] != "held-out text"], cfg.n_contexts) + held
        details[key] = {
            "contexts": ctx,
            "logits": _logit_effect(model, saes.get(layer), latent, pieces, cfg.logit_tokens) if saes else None,
            "histogram": _histogram(hist_values.get((layer, latent), [])),
            "ipg_tokens": _ipg_tokens(result, layer, latent, maps, by_id, pieces, cfg.trajectories_per_side),
            "steering": [r for r in steering if [layer, latent] in r["latents"]],
        }
    data = {"run": _run_info(run_dir, result, selection, cfg), "latents": rows, "details": details,
            "trajectories": _trajectory_view(result, maps, by_id, pieces, cfg.n_trajectories)}
    out = run_dir / "explorer"
    write_json(out / DATA_FILE, data)
    page = out / PAGE_FILE
    write_text(page, render(data))
    if tracker is not None:
        tracker.html("explorer", page)
        tracker.artifact(f"{run_dir.name}-explorer", "explorer", out)
    return page


def _load_run_model(run_dir: Path, model, tokenizer, saes):
    from .config import load_config
    from .jobs import AttributeJobConfig, load_saes
    from .models import load_model

    cfg_path = run_dir / "attribute_config.yaml"
    if not cfg_path.is_file():
        raise IPGError(f"{run_dir} has no attribute_config.yaml to find its model and SAEs; pass model, tokenizer "
                       "and saes to explorer.build, or run `ipg-sae attribute` into it")
    cfg = load_config(AttributeJobConfig, cfg_path)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model)
    if saes is None:
        saes = load_saes(cfg.saes, model)
    return model, tokenizer, saes


class _Pieces:
    """Token ids to the text each contributes (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i])
            out.append(self.cache[i])
        return out


def _baselines(run_dir: Path) -> dict[str, AttributionResult]:
    out = {}
    root = run_dir / "baselines"
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if (p / "attribution.json").is_file()):
            try:
                out[d.name] = AttributionResult.load(d)
            except IPGError as e:
                log.warning("explorer: skipping baseline %s (%s)", d.name, e)
    return out


def _maps(result: AttributionResult, by_id: dict) -> dict[str, dict]:
    """Per trajectory with a token map: tokens, and per layer its active latents, activations, attributions."""
    return {tid: m for tid, m in result.token_maps.items() if tid in by_id}


def _activation_frequency(result: AttributionResult, maps: dict) -> tuple[dict, dict]:
    """Per latent: share of mapped positions where it fires; and its non-zero activation values."""
    counts: dict[tuple[int, int], int] = {}
    values: dict[tuple[int, int], list[float]] = {}
    positions = 0
    for m in maps.values():
        positions += len(m["tokens"])
        for layer in result.layers:
            lat, act = m.get(f"L{layer}.latents"), m.get(f"L{layer}.activation")
            if lat is None or act is None:
                continue
            on = act > 0
            for i, v in zip(lat[on].tolist(), act[on].tolist()):
                counts[(layer, i)] = counts.get((layer, i), 0) + 1
                values.setdefault((layer, i), []).append(v)
    return {key: c / max(1, positions) for key, c in counts.items()}, values


def _selection_frequency(result: AttributionResult, k: int, n_boot: int) -> dict[tuple[int, int], float]:
    """Share of bootstrap resamples of prompts whose top-``k`` (by mean) holds each latent."""
    from .selection import per_prompt

    values = per_prompt(result)
    if values is None or n_boot < 1:
        return {}
    rng = np.random.default_rng(0)
    n = result.n_prompts
    counts: dict[tuple[int, int], int] = {}
    stacked = torch.cat([values[layer] for layer in result.layers], dim=1).numpy()
    owners = [(layer, i) for layer in result.layers for i in range(values[layer].shape[1])]
    for _ in range(n_boot):
        mean = stacked[rng.integers(0, n, size=n)].mean(0)
        for j in np.argsort(-mean, kind="stable")[:k]:
            counts[owners[j]] = counts.get(owners[j], 0) + 1
    return {key: c / n_boot for key, c in counts.items()}


def _summary_rows(result, stats, baselines, selected, freq, sel_freq) -> list[dict]:
    ranks = {}
    for name, b in baselines.items():
        order = sorted(((float(s[i]), layer, i) for layer, s in b.score.items() for i in range(len(s))
                        if float(s[i]) != 0), key=lambda x: (-x[0], x[1], x[2]))
        ranks[name] = {(layer, i): r + 1 for r, (_, layer, i) in enumerate(order)}
    nonzero = {(layer, i) for layer, s in result.score.items() for i in torch.nonzero(s).flatten().tolist()}
    for r in ranks.values():
        nonzero |= set(r)
    rows = []
    for layer, i in nonzero:
        s = stats[layer]
        mean, se = float(s["mean"][i]), float(s["se"][i])
        rows.append({"layer": layer, "latent": i, "mean": _num(mean), "lo": _num(mean - 1.96 * se),
                     "hi": _num(mean + 1.96 * se), "t": _num(float(s["t"][i])),
                     "sign_consistency": _num(float(s["sign_consistency"][i])),
                     "selection_frequency": sel_freq.get((layer, i), 0.0),
                     "activation_frequency": freq.get((layer, i), 0.0),
                     "ranks": {name: r.get((layer, i)) for name, r in ranks.items()},
                     "selected": (layer, i) in selected, "neuronpedia": _neuronpedia(result, layer, i)})
    rows.sort(key=lambda r: (-(r["mean"] if r["mean"] is not None else -np.inf), r["layer"], r["latent"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def _neuronpedia(result, layer, latent) -> str:
    from .selection import neuronpedia_url

    ids = {s["layer"]: s.get("neuronpedia_id") for s in result.meta.get("saes", [])}
    return neuronpedia_url(ids.get(layer), latent)


def _detail_set(rows, cfg: ExplorerConfig, selected, baselines) -> set[tuple[int, int]]:
    out = {(r["layer"], r["latent"]) for r in rows[:cfg.detail]} | set(selected)
    for name in baselines:
        best = sorted((r for r in rows if r["ranks"].get(name)), key=lambda r: r["ranks"][name])[:8]
        out |= {(r["layer"], r["latent"]) for r in best}
    return out


def _window(ids, acts, pos, cfg: ExplorerConfig, pieces: _Pieces, source: str) -> dict:
    lo, hi = max(0, pos - cfg.window[0]), min(len(ids), pos + cfg.window[1] + 1)
    window_ids = [int(i) for i in ids[lo:hi]]
    return {"source": source, "tokens": window_ids, "strings": pieces(window_ids),
            "activations": [round(float(a), 4) for a in acts[lo:hi]], "max": round(float(acts[pos]), 4),
            "max_index": pos - lo}


def _contexts(result, detail, maps, by_id, pieces, cfg) -> dict:
    """Top-activating windows of each detailed latent in the attributed trajectories."""
    out: dict[tuple[int, int], list[dict]] = {}
    for tid, m in maps.items():
        for layer in result.layers:
            lat, act = m.get(f"L{layer}.latents"), m.get(f"L{layer}.activation")
            if lat is None or act is None:
                continue
            for (lay, i) in [d for d in detail if d[0] == layer]:
                per_pos = (act * (lat == i)).sum(-1)
                for pos in torch.argsort(-per_pos)[:3].tolist():  # a few peaks per trajectory
                    if float(per_pos[pos]) > 0:
                        out.setdefault((lay, i), []).append(_window(m["tokens"].tolist(), per_pos.tolist(), pos, cfg,
                                                                    pieces, f"trajectory {tid}"))
    return out


def _distinct(contexts: list[dict], n: int) -> list[dict]:
    """The ``n`` strongest contexts, one per distinct window of tokens (samples of a prompt share its text)."""
    seen, out = set(), []
    for c in sorted(contexts, key=lambda c: -c["max"]):
        key = (tuple(c["tokens"]), c["max_index"])
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == n:
            break
    return out


def _held_out_texts(run_dir: Path, n: int) -> list[str]:
    """Worked solutions of arithmetic problems no run uses (offset 50000), in the chat format of the run's task."""
    from .tasks import arithmetic_problems

    problems = arithmetic_problems(n, 1, 0, offset=50_000) + arithmetic_problems(n // 2, 2, 0, offset=50_000)
    return [f"{p.question} {p.solution}" for p in problems]


@torch.no_grad()
def _add_held_out_contexts(contexts, model, tokenizer, saes, texts, detail, pieces, cfg, batch: int = 16) -> None:
    """Encode held-out texts (in batches) and keep, per detailed latent, its strongest windows in them."""
    from .models import capture_residuals

    layers = sorted({layer for layer, _ in detail if layer in saes})
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=256, add_special_tokens=False)
            ids, mask = enc["input_ids"], enc["attention_mask"].bool()
            res = capture_residuals(model, ids.to(device), enc["attention_mask"].to(device), layers)
            for layer in layers:
                latents = [i for lay, i in detail if lay == layer]
                f = saes[layer].encode(res[layer].to(saes[layer].dtype))[..., latents].float().cpu()
                f[:, 0] = 0  # the first position is not read by any SAE here (as in attribution)
                f[~mask] = 0
                best, where = f.max(dim=1)  # [texts, latents]: each text's strongest position
                for j, latent in enumerate(latents):
                    for row in torch.argsort(-best[:, j])[:cfg.n_contexts].tolist():
                        if float(best[row, j]) <= 0:
                            break
                        n = int(mask[row].sum())
                        contexts.setdefault((layer, latent), []).append(
                            _window(ids[row, :n].tolist(), f[row, :n, j].tolist(), int(where[row, j]), cfg, pieces,
                                    "held-out text"))
    finally:
        tokenizer.padding_side = side


def final_norm_scale(model) -> torch.Tensor | None:
    """The elementwise scale of the final norm before the LM head (None where there is none)."""
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None) or getattr(base, "final_layernorm", None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    return (1.0 + weight) if "gemma" in type(norm).__name__.lower() else weight


@torch.no_grad()
def logit_effect(model, sae, latent: int) -> torch.Tensor:
    """``(W_dec[i] * final-norm scale) @ W_U^T``: what the latent writes to each logit, directly."""
    from .saes import decoder_matrix

    direction = decoder_matrix(sae)[latent].to(model.get_output_embeddings().weight.dtype)
    scale = final_norm_scale(model)
    if scale is not None:
        direction = direction * scale.to(direction)
    return model.get_output_embeddings().weight @ direction


def _logit_effect(model, sae, latent, pieces, n) -> dict | None:
    if sae is None or model is None:
        return None
    effect = logit_effect(model, sae, latent).float()
    top, bottom = torch.topk(effect, n), torch.topk(-effect, n)
    return {"promoted": [[int(i), pieces([i])[0], round(float(v), 4)] for v, i in zip(top.values, top.indices)],
            "suppressed": [[int(i), pieces([i])[0], round(-float(v), 4)] for v, i in zip(bottom.values, bottom.indices)]}


def _histogram(values: list[float], bins: int = 24) -> dict:
    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values), bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def _ipg_tokens(result, layer, latent, maps, by_id, pieces, per_side) -> dict:
    """Trajectories where the latent's attribution is largest, correct and incorrect, with its per-token IPG."""
    owner, lat, val = result.trajectory_entries(layer)
    hit = lat == latent
    scored = sorted(zip(owner[hit].tolist(), val[hit].tolist()), key=lambda x: -abs(x[1]))
    out = {"correct": [], "incorrect": []}
    for row, value in scored:
        tid = result.traj_ids[row]
        if tid not in maps or tid not in by_id:
            continue
        side = "correct" if by_id[tid].correct else "incorrect"
        if len(out[side]) >= per_side:
            continue
        m = maps[tid]
        per_pos = (m[f"L{layer}.attribution"] * (m[f"L{layer}.latents"] == latent)).sum(-1)
        start = _crop(by_id[tid])
        out[side].append({"id": tid, "reward": by_id[tid].reward, "total": round(float(value), 5),
                          "prompt_length": len(by_id[tid].prompt_ids) - start, "start": start,
                          "strings": pieces(m["tokens"][start:].tolist()),
                          "values": [round(float(v), 5) for v in per_pos[start:].tolist()]})
        if all(len(v) >= per_side for v in out.values()):
            break
    return out


def _crop(t, prompt_tail: int = 48) -> int:
    """Where a trajectory's view starts: the end of its prompt (its question) and its completion; the shared
    system prompt and worked example before them are the same in every trajectory."""
    return max(0, len(t.prompt_ids) - prompt_tail)


def _trajectory_view(result, maps, by_id, pieces, n) -> list[dict]:
    out = []
    for tid in list(maps)[:n]:
        m, t = maps[tid], by_id[tid]
        start = _crop(t)
        total = None
        top = [[] for _ in range(len(m["tokens"]))]
        for layer in result.layers:
            att, lat = m[f"L{layer}.attribution"], m[f"L{layer}.latents"]
            total = att.sum(-1) if total is None else total + att.sum(-1)
            for pos in range(start, att.shape[0]):
                for k in torch.argsort(-att[pos].abs())[:5].tolist():
                    if float(att[pos, k]) != 0:
                        top[pos].append([layer, int(lat[pos, k]), round(float(att[pos, k]), 5)])
        for pos in range(len(top)):
            top[pos] = sorted(top[pos], key=lambda x: -abs(x[2]))[:5]
        out.append({"id": tid, "correct": bool(t.correct), "reward": t.reward,
                    "prompt_length": len(t.prompt_ids) - start, "start": start,
                    "strings": pieces(m["tokens"][start:].tolist()),
                    "total": [round(float(v), 5) for v in total[start:].tolist()], "top": top[start:]})
    return out


def _steering_rows(run_dir: Path) -> list[dict]:
    """Evaluation rows of the run (sets with their latents), when an evaluation ran."""
    path = run_dir / "eval" / "summary.json"
    if not path.is_file():
        return []
    doc = read_json(path)
    sets = doc.get("meta", {}).get("sets", {})
    out = []
    for row in doc.get("rows", []):
        if row.get("set") in sets:
            out.append({"set": row["set"], "gamma": row.get("gamma"), "latents": sets[row["set"]],
                        "accuracy": row.get("accuracy"), "accuracy_delta": row.get("accuracy_delta"),
                        "accuracy_delta_lo": row.get("accuracy_delta_lo"),
                        "accuracy_delta_hi": row.get("accuracy_delta_hi"), "length": row.get("length")})
    return out


def _run_info(run_dir: Path, result: AttributionResult, selection: dict, cfg: ExplorerConfig) -> dict:
    import base64

    summary = result.meta.get("summary", {})
    pngs = sorted((run_dir / "plots").glob("*.png")) + sorted((run_dir / "study").glob("*.png"))
    plots = [{"name": str(p.relative_to(run_dir)), "png": base64.b64encode(p.read_bytes()).decode("ascii")}
             for p in pngs if p.stat().st_size < 2_000_000]  # the steering evaluation's and the study's plots
    return {"name": run_dir.name, "method": result.method_name, "model": result.meta.get("model", {}).get("name"),
            "saes": result.meta.get("saes", []), "summary": {k: v for k, v in summary.items()
                                                             if isinstance(v, (int, float, str))},
            "selected": selection.get("selection", []), "n_bootstrap": cfg.n_bootstrap,
            "page_size": cfg.page_size, "plots": plots,
            "policy": (f"full detail for the top {cfg.detail} latents by IPG, the selected set and each baseline's "
                       "top 8; a summary row for every other latent with a non-zero score")}


# ---- the page ----------------------------------------------------------------------------------


def render(data: dict) -> str:
    """The self-contained page: data inline as JSON (``</`` escaped), script and styles inline."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
    title = html.escape(f"ipg-sae explorer: {data['run']['name']}")
    return (_PAGE.replace("__TITLE__", title).replace("__CSS__", _CSS).replace("__JS__", _JS)
            .replace("__DATA__", payload))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title><style>__CSS__</style></head>
<body data-ready="0">
<header><h1 id="title"></h1><div id="runinfo"></div></header>
<main>
<section id="index"><h2>Latents</h2>
<div class="filters">layer <select id="f-layer"><option value="">all</option></select>
sign <select id="f-sign"><option value="">all</option><option value="pos">positive</option><option value="neg">negative</option></select>
<label><input type="checkbox" id="f-selected"> selected only</label>
<label><input type="checkbox" id="f-detail"> with panel only</label>
latent <input id="f-id" size="6" placeholder="id">
<span id="count"></span></div>
<table id="latents"><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
<div class="pager"><button id="prev">previous</button> <span id="page"></span> <button id="next">next</button></div>
</section>
<section id="panel"><h2 id="panel-title">Select a latent</h2><div id="panel-body"></div></section>
<section id="trajectories"><h2>Trajectories</h2>
<p class="note">Each token coloured by its total attribution (blue: raises the outcome's log-probability weight, red: lowers it). Click a token for the latents behind it.</p>
<select id="traj-select"></select><div id="traj-tokens" class="tokens"></div><div id="traj-top"></div></section>
<section id="plots"><h2>Steering evaluation</h2><div id="plot-list"></div></section>
</main>
<script id="data" type="application/json">__DATA__</script>
<script>__JS__</script>
</body></html>
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:10px 18px;background:#243b55;color:#fff}header h1{margin:0;font-size:20px}
#runinfo{font-size:13px;opacity:.9;margin-top:4px}
main{display:grid;grid-template-columns:minmax(560px,1fr) minmax(420px,1fr);gap:14px;padding:14px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;overflow:auto}
#trajectories,#plots{grid-column:1 / span 2}
h2{font-size:16px;margin:4px 0 8px}h3{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;font-size:12px;width:100%}
th,td{padding:3px 6px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f0f3f7;position:sticky;top:0}th.sorted{background:#dce6f3}
td.l{text-align:left}tr.sel td{font-weight:600}tr.clickable{cursor:pointer}tr.clickable:hover{background:#f4f8ff}
tr.active{background:#e3eefc}.filters{font-size:13px;margin-bottom:6px}.filters>*{margin-right:8px}
.pager{margin-top:6px;font-size:13px}.note{font-size:12px;color:#555;margin:4px 0}
.tokens{font-family:ui-monospace,monospace;font-size:12.5px;line-height:1.9;white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px;padding:1px 0}.tok.max{outline:2px solid #c0392b}.tok.click{cursor:pointer}
.ctx{border-bottom:1px dashed #eee;padding:3px 0}.src{font-size:11px;color:#777;margin-right:6px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:10px}.logit{font-family:ui-monospace,monospace;font-size:12px}
.bar{fill:#5b7db1}.pos{color:#1f5fa8}.neg{color:#b03a2e}.badge{font-size:11px;background:#eee;border-radius:3px;padding:1px 4px}
"""

_JS = r"""
(function(){
'use strict';
window.onerror=function(msg){document.body.dataset.error=String(msg);};
const D=JSON.parse(document.getElementById('data').textContent);
const $=id=>document.getElementById(id);
function el(tag,text,cls){const e=document.createElement(tag);if(text!==undefined&&text!==null)e.textContent=String(text);if(cls)e.className=cls;return e;}
function fmt(x,d){if(x===null||x===undefined)return '-';if(typeof x!=='number')return String(x);if(x===0)return '0';const a=Math.abs(x);return (a>=1000||a<0.001)?x.toExponential(2):x.toFixed(d===undefined?4:d);}
function shade(v,max,signed){if(!max||!v)return '';const a=Math.min(1,Math.abs(v)/max);if(!signed)return 'rgba(230,126,34,'+(0.12+0.78*a).toFixed(3)+')';return v>0?'rgba(41,98,255,'+(0.1+0.75*a).toFixed(3)+')':'rgba(214,48,49,'+(0.1+0.75*a).toFixed(3)+')';}
function tokens(strings,values,opts){const box=el('div',undefined,'tokens');const max=Math.max(1e-12,...values.map(v=>Math.abs(v)));
 strings.forEach((s,i)=>{const t=el('span',s,'tok');const bg=shade(values[i],max,opts.signed);if(bg)t.style.background=bg;
 if(opts.maxIndex===i)t.classList.add('max');if(opts.prompt&&i<opts.prompt)t.style.opacity='0.55';t.title=fmt(values[i]);
 if(opts.onclick){t.classList.add('click');t.addEventListener('click',()=>opts.onclick(i));}box.appendChild(t);});return box;}
const run=D.run;$('title').textContent='ipg-sae explorer: '+run.name;
$('runinfo').textContent='model '+(run.model||'?')+' | method '+run.method+' | '+D.latents.length+' latents with a non-zero score | '+
 Object.keys(D.details).length+' with a panel | selected: '+run.selected.map(p=>'L'+p[0]+':'+p[1]).join(', ');
const baselines=D.latents.length?Object.keys(D.latents[0].ranks):[];
const cols=[['rank','rank'],['layer','layer'],['latent','latent'],['mean','IPG mean'],['ci','95% CI'],['t','t'],
 ['sign_consistency','sign cons.'],['selection_frequency','sel. freq.'],['activation_frequency','act. freq.']]
 .concat(baselines.map(b=>['rank:'+b,'rank '+b])).concat([['selected','sel.'],['neuronpedia','']]);
let sortKey='rank',sortDir=1,page=0,shown=[];
cols.forEach(([k,label])=>{const th=el('th',label);th.dataset.key=k;th.addEventListener('click',()=>{if(k==='ci'||k==='neuronpedia')return;
 sortDir=(sortKey===k)?-sortDir:(k==='rank'||k.startsWith('rank:')?1:-1);sortKey=k;page=0;draw();});$('head').appendChild(th);});
const layers=[...new Set(D.latents.map(r=>r.layer))].sort((a,b)=>a-b);
layers.forEach(l=>{const o=el('option','L'+l);o.value=String(l);$('f-layer').appendChild(o);});
function value(r,k){if(k.startsWith('rank:'))return r.ranks[k.slice(5)];if(k==='selected')return r.selected?1:0;return r[k];}
function filtered(){const L=$('f-layer').value,S=$('f-sign').value,sel=$('f-selected').checked,det=$('f-detail').checked,id=$('f-id').value.trim();
 return D.latents.filter(r=>(!L||String(r.layer)===L)&&(!S||(S==='pos'?r.mean>0:r.mean<0))&&(!sel||r.selected)&&(!det||r.detail)&&(!id||String(r.latent)===id));}
function draw(){shown=filtered();shown.sort((a,b)=>{const x=value(a,sortKey),y=value(b,sortKey);
 if(x===y)return a.rank-b.rank;if(x===null||x===undefined)return 1;if(y===null||y===undefined)return -1;return (x<y?-1:1)*sortDir;});
 document.querySelectorAll('#head th').forEach(th=>th.classList.toggle('sorted',th.dataset.key===sortKey));
 const size=run.page_size,pages=Math.max(1,Math.ceil(shown.length/size));page=Math.min(page,pages-1);
 $('page').textContent='page '+(page+1)+' of '+pages;$('count').textContent=shown.length+' latents';
 const body=$('rows');body.replaceChildren();
 shown.slice(page*size,(page+1)*size).forEach(r=>{const tr=el('tr');tr.dataset.key=r.layer+':'+r.latent;
  if(r.selected)tr.classList.add('sel');if(r.detail){tr.classList.add('clickable');tr.addEventListener('click',()=>openLatent(r.layer+':'+r.latent));}
  const cells=[r.rank,'L'+r.layer,r.latent,fmt(r.mean),'['+fmt(r.lo)+', '+fmt(r.hi)+']',fmt(r.t,2),fmt(r.sign_consistency,2),
   fmt(r.selection_frequency,2),fmt(r.activation_frequency,4)].concat(baselines.map(b=>r.ranks[b]||'-')).concat([r.selected?'yes':'']);
  cells.forEach((c,i)=>tr.appendChild(el('td',c,i===1?'l':undefined)));
  const np=el('td');if(r.neuronpedia){const a=el('a','neuronpedia');a.href=r.neuronpedia;a.target='_blank';a.rel='noopener';np.appendChild(a);}
  tr.appendChild(np);body.appendChild(tr);});}
['f-layer','f-sign','f-selected','f-detail'].forEach(id=>$(id).addEventListener('change',()=>{page=0;draw();}));
$('f-id').addEventListener('input',()=>{page=0;draw();});
$('prev').addEventListener('click',()=>{page=Math.max(0,page-1);draw();});
$('next').addEventListener('click',()=>{page=page+1;draw();});
function histogram(h){const svgNS='http://www.w3.org/2000/svg';const svg=document.createElementNS(svgNS,'svg');svg.setAttribute('width','360');svg.setAttribute('height','90');
 const max=Math.max(1,...h.counts);const w=360/Math.max(1,h.counts.length);
 h.counts.forEach((c,i)=>{const r=document.createElementNS(svgNS,'rect');r.setAttribute('x',String(i*w));r.setAttribute('width',String(Math.max(1,w-1)));
 const hh=80*c/max;r.setAttribute('y',String(85-hh));r.setAttribute('height',String(hh));r.setAttribute('class','bar');
 const title=document.createElementNS(svgNS,'title');title.textContent=fmt(h.edges[i],3)+'..'+fmt(h.edges[i+1],3)+': '+c;r.appendChild(title);svg.appendChild(r);});return svg;}
function openLatent(key){const d=D.details[key];const row=D.latents.find(r=>r.layer+':'+r.latent===key);if(!d||!row)return;
 document.querySelectorAll('#rows tr').forEach(tr=>tr.classList.toggle('active',tr.dataset.key===key));
 $('panel-title').textContent='Latent L'+key.replace(':',':')+' (IPG rank '+row.rank+(row.selected?', selected':'')+')';
 const b=$('panel-body');b.replaceChildren();b.dataset.latent=key;
 b.appendChild(el('div','IPG mean '+fmt(row.mean)+' ['+fmt(row.lo)+', '+fmt(row.hi)+'], t '+fmt(row.t,2)+', sign consistency '+fmt(row.sign_consistency,2)+
  ', bootstrap selection frequency '+fmt(row.selection_frequency,2)+', activation frequency '+fmt(row.activation_frequency,4),'note'));
 b.appendChild(el('h3','Top-activating contexts'));const ctx=el('div');ctx.className='contexts';
 d.contexts.forEach(c=>{const line=el('div',undefined,'ctx');line.appendChild(el('span',c.source+' (max '+fmt(c.max,3)+')','src'));
  line.appendChild(tokens(c.strings,c.activations,{signed:false,maxIndex:c.max_index}));ctx.appendChild(line);});
 if(!d.contexts.length)ctx.appendChild(el('div','no activation in the mapped trajectories','note'));b.appendChild(ctx);
 if(d.logits){b.appendChild(el('h3','Direct logit effect (W_dec[i] after the final norm, through W_U)'));const g=el('div',undefined,'cols');
  [['promoted','pos'],['suppressed','neg']].forEach(([side,cls])=>{const box=el('div');box.appendChild(el('div',side,'badge'));
   d.logits[side].forEach(([id,s,v])=>{const line=el('div',undefined,'logit');line.appendChild(el('span',JSON.stringify(s)+' ',cls));line.appendChild(el('span',fmt(v,3)));box.appendChild(line);});g.appendChild(box);});b.appendChild(g);}
 b.appendChild(el('h3','Activation histogram (non-zero activations, attributed trajectories)'));
 if(d.histogram.counts.length)b.appendChild(histogram(d.histogram));else b.appendChild(el('div','no activations','note'));
 b.appendChild(el('h3','Per-token IPG contribution (where it matters most)'));const cols2=el('div',undefined,'cols');cols2.className='cols ipg-tokens';
 ['correct','incorrect'].forEach(side=>{const box=el('div');box.appendChild(el('div',side+' samples','badge'));
  d.ipg_tokens[side].forEach(t=>{box.appendChild(el('div',t.id+' (reward '+fmt(t.reward,2)+', attribution '+fmt(t.total)+')','src'));
   box.appendChild(tokens(t.strings,t.values,{signed:true,prompt:t.prompt_length}));});
  if(!d.ipg_tokens[side].length)box.appendChild(el('div','no mapped '+side+' trajectory with this latent','note'));cols2.appendChild(box);});b.appendChild(cols2);
 b.appendChild(el('h3','Measured effect of steering sets that contain it'));
 if(d.steering.length){const t=el('table');const hr=el('tr');['set','gamma','accuracy','vs no steering [95% CI]','length'].forEach(h=>hr.appendChild(el('th',h)));t.appendChild(hr);
  d.steering.forEach(r=>{const tr=el('tr');[r.set,r.gamma,fmt(r.accuracy,3),fmt(r.accuracy_delta,3)+' ['+fmt(r.accuracy_delta_lo,3)+', '+fmt(r.accuracy_delta_hi,3)+']',fmt(r.length,1)]
   .forEach(c=>tr.appendChild(el('td',c)));t.appendChild(tr);});b.appendChild(t);}
 else b.appendChild(el('div','no evaluation of a set holding this latent in this run','note'));}
const sel=$('traj-select');D.trajectories.forEach((t,i)=>{const o=el('option',t.id+(t.correct?' (correct)':' (incorrect)')+' reward '+fmt(t.reward,2));o.value=String(i);sel.appendChild(o);});
function showTraj(i){const t=D.trajectories[i];if(!t)return;const box=$('traj-tokens');box.replaceChildren();$('traj-top').replaceChildren();
 box.appendChild(tokens(t.strings,t.total,{signed:true,prompt:t.prompt_length,onclick:pos=>{const top=$('traj-top');top.replaceChildren();
  top.appendChild(el('div','token '+pos+' '+JSON.stringify(t.strings[pos])+': total '+fmt(t.total[pos]),'badge'));
  t.top[pos].forEach(([l,i2,v])=>{const key=l+':'+i2;const line=el('div');const a=el('a','L'+l+':'+i2);a.href='#';
   a.addEventListener('click',e=>{e.preventDefault();if(D.details[key])openLatent(key);});line.appendChild(a);line.appendChild(el('span',' '+fmt(v),v>0?'pos':'neg'));top.appendChild(line);});}}));}
sel.addEventListener('change',()=>showTraj(Number(sel.value)));
(run.plots||[]).forEach(p=>{const fig=el('figure');const img=el('img');img.src='data:image/png;base64,'+p.png;img.alt=p.name;
 img.style.maxWidth='100%';fig.appendChild(img);fig.appendChild(el('figcaption',p.name,'note'));$('plot-list').appendChild(fig);});
if(!(run.plots||[]).length)$('plot-list').appendChild(el('div','no evaluation plots in this run','note'));
draw();if(D.trajectories.length)showTraj(0);
const first=D.latents.find(r=>r.detail);if(first)openLatent(first.layer+':'+first.latent);
document.body.dataset.ready='1';
})();
"""


# ---- the job -------------------------------------------------------------------------------------


@dataclass
class ExploreJobConfig:
    run_dir: str = ""  # the attribution run to explore (a directory with attribution.safetensors)
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)  # what the page shows
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if not self.run_dir or not (Path(self.run_dir) / "attribution.json").is_file():
            raise IPGError(f"{self.run_dir or '(no run_dir)'} is not an attribution run (no attribution.json); give "
                           "the run directory of `ipg-sae attribute` or `ipg-sae pipeline`, e.g. runs/demo")


def run_explore(cfg: ExploreJobConfig, group: str | None = None) -> Path:
    """Build the explorer of ``cfg.run_dir`` and log it to W&B."""
    from .io import run_lock
    from .tracking import Tracker

    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir), Tracker(cfg.wandb, run_dir, run_dir.name, "explore", group=group) as tracker:
        return build(run_dir, cfg=cfg.explorer, tracker=tracker)


# ---- looking at the page in a real browser -------------------------------------------------------

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--virtual-time-budget=5000"]


def find_browser() -> str | None:
    """A Chromium-family browser on this machine (``chromium``, ``chromium-browser``, ``google-chrome``)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browse(page: Path, *flags: str, timeout: int = 120) -> str:
    import subprocess
    import tempfile

    browser = find_browser()
    if browser is None:
        raise IPGError("no Chromium browser found; install one (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *flags,
                               Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise IPGError(f"{browser} failed on {page}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def rendered_dom(page: str | Path) -> str:
    """The page's DOM after its script ran, as headless Chromium serializes it."""
    return _browse(Path(page), "--dump-dom")


def screenshot(page: str | Path, png: str | Path, size: tuple[int, int] = (1400, 1000)) -> Path:
    """A PNG of the page as headless Chromium draws it."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _browse(Path(page), f"--screenshot={png}", f"--window-size={size[0]},{size[1]}")
    return png
