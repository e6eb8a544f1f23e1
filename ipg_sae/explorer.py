r"""The feature explorer: one static page per attribution run, saying what each latent is, where it fires,
and how it moves the outcome.

``build(run_dir)`` (``ipg-sae explore RUN_DIR``, and a pipeline stage) writes
``<run_dir>/explorer/index.html`` (self-contained: its script, styles and data are inline; it opens
from disk with no server and no network) and ``<run_dir>/explorer/data.json``, the same data for
notebooks (:func:`load`). Every piece of text reaches the page through ``textContent``, never
as HTML, so tokens such as ``|``, ``<``, ``&`` or a newline render as themselves.

``data.json`` holds:

* ``run``: name, model, SAEs (with ``neuronpedia_id``), method summary, the selected set, the
  bootstrap size, the prompts (``n_prompts``, ``n_attributed``), ``notes``, the policy below, and
  ``verdict`` (when an evaluation ran: the target set against the mean of the random sets per gamma);
* ``latents``: one summary row per latent with a non-zero score under any method, ranked by IPG:
  ``layer``, ``latent``, ``rank``, ``mean``, ``lo``/``hi`` (mean +- 1.96 se over prompts), ``t``,
  ``sign_consistency``, ``selection_frequency`` (share of bootstrap resamples of prompts whose
  top-k contains it), ``activation_frequency`` (share of scored positions where it fires),
  ``ranks`` (its rank under each baseline), ``selected``, ``neuronpedia`` (a URL or ""),
  ``detail`` (whether it has a panel), ``explanation`` (when ``ipg-sae explain`` or the pipeline's explain stage
  ran: :func:`attach_explanations`);
  Rows up to rank ``on_demand`` (and every panel latent) also carry ``ctx`` (their top contexts as
  ``[text index, position, activation]`` into ``texts``), ``logits`` (``promoted``/``suppressed``:
  ``[token, string, value]``) and ``near`` (``[layer, latent, cosine]`` of the nearest decoder
  directions): the page builds a compact panel from them for any latent without a full one;
* ``texts``: the token strings of every trajectory a ``ctx`` points into (``id``, ``strings``,
  ``prompt_length``);
* ``details``: ``"L:i" ->`` ``contexts`` (top-activating windows: from the attribution's own context
  list, the same as ``features.csv`` (``trajectory``, ``position``), and from held-out text:
  ``source``, ``tokens`` (ids), ``strings``, ``activations``, ``max``),
  ``logits`` (``promoted``/``suppressed``: ``[token, string, value]`` of ``W_dec[i] @ W_U`` after
  the final norm's scale), ``histogram`` (``edges``, ``counts`` of its non-zero activations),
  ``ipg_tokens`` (``correct``/``incorrect``: trajectories where its attribution is largest, with
  the per-token IPG contribution of this latent), ``steering`` (evaluation rows of sets holding it: the whole
  set's effect on the evaluation's primary metric, its size, and the random sets' mean effect at that gamma);
* ``trajectories``: ``id``, ``correct``, ``reward``, ``strings``, ``total`` (per-token attribution
  summed over latents) and ``top`` (per token: up to 5 ``[layer, latent, value]``), from token
  ``start`` on (the last 48 prompt tokens and the completion: the shared system prompt and worked
  example before them are left out; ``prompt_length`` counts the prompt tokens shown). The
  ``ipg_tokens`` entries are cropped the same way. Without token maps in the result (the Python
  API's default), the per-token IPG views and the trajectory view are empty and ``run.notes`` says
  how to get them; every other panel is complete.

``explorer/dashboard/layer_<L>.json`` exports the panel latents for other dashboards
(:func:`ipg_sae.dashboard.export_dashboard`: SAEDashboard's Neuronpedia feature layout).

Statistics over prompts (mean, interval, t, sign consistency, selection frequency) count the
attributed prompts only (``run.n_attributed`` of ``run.n_prompts``; :mod:`ipg_sae.selection`).

Policy (so a 2,304-latent SAE builds in seconds and the page stays small): full detail for the top
``detail`` latents by IPG, the selected set and each baseline's top 8 (:func:`panel_latents` names them
without building the page: the pipeline's explain stage explains exactly these); a summary row for every
other latent with a non-zero score; compact data for on-demand panels up to rank ``on_demand``;
the page shows summary rows ``page_size`` at a time, so a 65k-latent SAE works too. Every
attributed trajectory is encoded once (activation frequencies, histograms, the shading of the
context windows); per-token IPG maps come from the attribution (``token_maps: ["*"]``); held-out
contexts are encoded too. A latent's permalink is ``index.html#L<layer>:<latent>``.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .attribution import AttributionResult
from .dashboard import export_dashboard
from .errors import IPGError
from .explorer_config import ExplorerConfig  # noqa: F401  (re-exported: the config lives torch-free)
from .io import read_json, write_json, write_text
from .latents import Encoded, encode_trajectories, logit_effect, logit_effects, nearest_latents

log = logging.getLogger(__name__)

DATA_FILE = "data.json"
PAGE_FILE = "index.html"


def load(run_dir: str | Path) -> dict:
    """The explorer data of a run (``explorer/data.json``), as written by :func:`build`."""
    path = Path(run_dir) / "explorer" / DATA_FILE
    if not path.is_file():
        raise IPGError(f"no explorer data at {path}; run `ipg-sae explore {run_dir}` first")
    return read_json(path)


# ---- building the data ------------------------------------------------------------------------


def build(run_dir: str | Path, model=None, tokenizer=None, saes=None, trajectories=None,
          cfg: ExplorerConfig | None = None, held_out_texts: list[str] | None = None, tracker=None,
          trust_remote_code: bool = False) -> Path:
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
        trust_remote_code: let the run's model run its own code when it is loaded here (the run's own
            setting is never trusted: viewing a run someone sent you must not run their code).

    Returns:
        The path of ``index.html``.
    """
    from .selection import latent_stats
    from .trajectories import load_trajectories

    cfg = cfg or ExplorerConfig()
    run_dir = Path(run_dir)
    result = AttributionResult.load(run_dir)
    if model is None or tokenizer is None or saes is None:
        model, tokenizer, saes = _load_run_model(run_dir, model, tokenizer, saes, trust_remote_code)
    if trajectories is None:
        trajectories = load_trajectories(run_dir / "trajectories.jsonl")
    by_id = {t.id: t for t in trajectories}
    baselines = _baselines(run_dir)
    selection = read_json(run_dir / "selection.json") if (run_dir / "selection.json").is_file() else {}
    selected = [(int(a), int(b)) for a, b in selection.get("selection", [])]
    k = int(selection.get("k_requested") or len(selected) or 8)
    stats = latent_stats(result)
    pieces = _Pieces(tokenizer)
    maps = _maps(result, by_id)
    acc = _accumulator_contexts(result, by_id)
    rows = _summary_rows(result, stats, baselines, set(selected), _selection_frequency(result, k, cfg.n_bootstrap))
    detail = {pair for group in panel_groups(rows, cfg.detail, selected, baselines).values() for pair in group}
    encoded = encode_trajectories(model, saes, result, by_id, acc, detail)
    for row in rows:
        row["detail"] = (row["layer"], row["latent"]) in detail
        row["activation_frequency"] = encoded.frequency.get((row["layer"], row["latent"]), 0.0)
    texts = _compact_latents(rows, by_id, saes, model, acc, pieces, cfg)
    contexts = {key: [_trajectory_window(by_id[tid], encoded, key, pos, value, cfg, pieces) for tid, pos, value in found]
                for key, found in acc.items() if key in detail}
    if saes and model is not None and cfg.held_out:
        held_texts = held_out_texts if held_out_texts is not None else _held_out_texts(run_dir, cfg.held_out)
        _add_held_out_contexts(contexts, model, tokenizer, saes, held_texts, detail, pieces, cfg)
    evaluation = _evaluation(run_dir)
    steering = _steering_rows(evaluation)
    attach_explanations(run_dir, rows)
    details = {}
    for layer, latent in sorted(detail):
        key = f"{layer}:{latent}"
        found = contexts.get((layer, latent), [])
        held = _distinct([c for c in found if c["source"] == "held-out text"], max(2, cfg.n_contexts // 3))
        ctx = [c for c in found if c["source"] != "held-out text"][:cfg.n_contexts] + held
        details[key] = {
            "contexts": ctx,
            "logits": _logit_effect(model, saes.get(layer), latent, pieces, cfg.logit_tokens) if saes else None,
            "histogram": _histogram(encoded.values.get((layer, latent), [])),
            "ipg_tokens": _ipg_tokens(result, layer, latent, maps, by_id, pieces, cfg.trajectories_per_side),
            "steering": [r for r in steering if [layer, latent] in r["latents"]],
        }
    data = {"run": {**_run_info(run_dir, result, selection, cfg, bool(maps)), "verdict": _verdict(evaluation)},
            "latents": rows, "details": details,
            "texts": texts, "trajectories": _trajectory_view(result, maps, by_id, pieces, cfg.n_trajectories)}
    out = run_dir / "explorer"
    write_json(out / DATA_FILE, data)
    export_dashboard(data, out / "dashboard")
    page = out / PAGE_FILE
    write_text(page, render(data))
    if tracker is not None:
        tracker.html("explorer", page)
        tracker.artifact(f"{run_dir.name}-explorer", "explorer", out)
    return page


def _load_run_model(run_dir: Path, model, tokenizer, saes, trust_remote_code: bool = False):
    """The model and SAEs named in the run's ``attribute_config.yaml``. Viewing a run must never run code that
    came with it: the run's own ``trust_remote_code`` is ignored unless the caller passes ``trust_remote_code``."""
    import dataclasses

    import yaml

    from .config import from_dict
    from .models import ModelConfig, load_model
    from .saes import SAESpec, load_saes, sae_entries

    cfg_path = run_dir / "attribute_config.yaml"
    if not cfg_path.is_file():
        raise IPGError(f"{run_dir} has no attribute_config.yaml to find its model and SAEs; pass model, tokenizer "
                       "and saes to explorer.build, or run `ipg-sae attribute` into it")
    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        model_cfg = from_dict(ModelConfig, data.get("model") or {}, where=str(cfg_path), prefix="model")
        specs = [from_dict(SAESpec, s, where=str(cfg_path), prefix="sae.load") for s in sae_entries(data)]
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise IPGError(f"{cfg_path} is not a readable attribute config ({e}); pass model, tokenizer and saes to "
                       "explorer.build") from None
    if model_cfg.trust_remote_code and not trust_remote_code:
        log.warning("%s asks for trust_remote_code; ignored (viewing a run never runs its code): pass "
                    "--trust_remote_code if you trust this run's model", cfg_path)
    model_cfg = dataclasses.replace(model_cfg, trust_remote_code=trust_remote_code)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(model_cfg)
    if saes is None:
        saes = load_saes(specs, model)
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


def load_run_model(run_dir: Path, model=None, tokenizer=None, saes=None, trust_remote_code: bool = False):
    """``(model, tokenizer, saes)`` of a run, those not given loaded from its ``attribute_config.yaml`` (the run's
    own ``trust_remote_code`` is never used)."""
    return _load_run_model(Path(run_dir), model, tokenizer, saes, trust_remote_code)


# ---- explanations (``ipg-sae explain``, :mod:`ipg_sae.explain_run`) ------------------------------


def attach_explanations(run_dir: Path, rows: list[dict]) -> int:
    """Give each summary row whose latent ``ipg-sae explain`` explained an ``explanation``: the one-line input-side,
    VocabProj, TokenChange and LLM explanations, their scores, and the n-grams / tokens behind them
    (``ngrams``: ``[text, log-odds, count firing, count silent]``; ``vocab_proj``, ``token_change``: ``[text,
    value]``). Returns how many rows got one (0 when the run has no ``explanations/``)."""
    from .explanations import flat_columns, load_explanations

    found = load_explanations(run_dir)
    for row in rows:
        e = found.get((row["layer"], row["latent"]))
        if e is None:
            continue
        row["explanation"] = {**flat_columns(e),
                              "ngrams": [[g.text, g.log_odds, g.active, g.inactive] for g in e.input.ngrams],
                              "vocab_proj_tokens": [[t.text, t.value] for t in e.vocab_proj.promoted[:5]],
                              "token_change_tokens": [[t.text, t.value] for t in e.token_change.promoted[:5]]}
    return sum(1 for r in rows if "explanation" in r)


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


def _accumulator_contexts(result: AttributionResult, by_id: dict) -> dict[tuple[int, int], list[tuple[str, int, float]]]:
    """Every latent's top-activating ``(trajectory id, position, activation)`` as the attribution kept them
    (the same list as ``features.csv``), strongest first."""
    out: dict[tuple[int, int], list[tuple[str, int, float]]] = {}
    for layer, (value, traj, pos) in result.contexts.items():
        for latent, (vs, ts, ps) in enumerate(zip(value.tolist(), traj.tolist(), pos.tolist())):
            found = []
            for v, t, p in zip(vs, ts, ps):
                tid = result.traj_ids[t] if 0 <= t < len(result.traj_ids) else None
                if v < 0 or tid not in by_id or p >= len(by_id[tid].prompt_ids) + len(by_id[tid].completion_ids):
                    continue
                found.append((tid, int(p), float(v)))
            if found:
                out[(layer, latent)] = sorted(found, key=lambda c: -c[2])
    return out


def _selection_frequency(result: AttributionResult, k: int, n_boot: int) -> dict[tuple[int, int], float]:
    """Share of bootstrap resamples of prompts whose top-``k`` (by mean) holds each latent."""
    from .selection import attributed_prompts, per_prompt

    values = per_prompt(result)
    if values is None or n_boot < 1:
        return {}
    rng = np.random.default_rng(0)
    pool = attributed_prompts(result).numpy()  # resample the prompts the statistics count
    n = len(pool)
    counts: dict[tuple[int, int], int] = {}
    stacked = torch.cat([values[layer] for layer in result.layers], dim=1).numpy()
    owners = [(layer, i) for layer in result.layers for i in range(values[layer].shape[1])]
    for _ in range(n_boot):
        mean = stacked[pool[rng.integers(0, n, size=n)]].mean(0)
        for j in np.argsort(-mean, kind="stable")[:k]:
            counts[owners[j]] = counts.get(owners[j], 0) + 1
    return {key: c / n_boot for key, c in counts.items()}


def _summary_rows(result, stats, baselines, selected, sel_freq) -> list[dict]:
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


BASELINE_PANELS = 8  # each baseline's top latents with a full panel, to compare its picks with IPG's


def panel_groups(rows: list[dict], detail: int, selected: list[tuple[int, int]],
                 baselines) -> dict[str, list[tuple[int, int]]]:
    """The latents with a full panel, by group, best first: ``ipg_top`` (the first ``detail`` summary rows, ranked
    by IPG), ``selected`` and ``<baseline>_top`` (each baseline's top :data:`BASELINE_PANELS`). The names are
    :func:`ipg_sae.explain_run.chosen_latents`'s, so an explanation summary reads the same either way."""
    groups = {"ipg_top": [(r["layer"], r["latent"]) for r in rows[:detail]], "selected": list(selected)}
    for name in baselines:
        best = sorted((r for r in rows if r["ranks"].get(name)), key=lambda r: r["ranks"][name])[:BASELINE_PANELS]
        groups[f"{name}_top"] = [(r["layer"], r["latent"]) for r in best]
    return groups


def panel_latents(run_dir: str | Path, detail: int) -> dict[str, list[tuple[int, int]]]:
    """:func:`panel_groups` of a run from its attribution files alone (no model, no page): the latents
    :func:`build` with ``ExplorerConfig(detail=detail)`` gives a full panel."""
    from .selection import latent_stats

    run_dir = Path(run_dir)
    result = AttributionResult.load(run_dir)
    baselines = _baselines(run_dir)
    selection = read_json(run_dir / "selection.json") if (run_dir / "selection.json").is_file() else {}
    selected = [(int(a), int(b)) for a, b in selection.get("selection", [])]
    rows = _summary_rows(result, latent_stats(result), baselines, set(selected), {})
    return panel_groups(rows, detail, selected, baselines)


def _window(ids, acts, pos, cfg: ExplorerConfig, pieces: _Pieces, source: str, value: float | None = None,
            trajectory: str | None = None) -> dict:
    """Tokens around ``pos`` with the latent's activation at each (``value``: the recorded one at ``pos``)."""
    lo, hi = max(0, pos - cfg.window[0]), min(len(ids), pos + cfg.window[1] + 1)
    window_ids = [int(i) for i in ids[lo:hi]]
    out = {"source": source, "tokens": window_ids, "strings": pieces(window_ids),
           "activations": [round(float(a), 4) for a in acts[lo:hi]],
           "max": round(float(acts[pos] if value is None else value), 4), "max_index": pos - lo}
    if trajectory is not None:
        out.update(trajectory=trajectory, position=int(pos))
    return out


def _trajectory_window(t, encoded: Encoded, key: tuple[int, int], pos: int, value: float, cfg: ExplorerConfig,
                       pieces: _Pieces) -> dict:
    """One of the attribution's top contexts as a window: shaded by the latent's activations where they were
    encoded, else with only the activating token's recorded value."""
    ids = list(t.prompt_ids) + list(t.completion_ids)
    acts = encoded.windows.get((t.id, *key))
    if acts is None:
        acts = [0.0] * len(ids)
        acts[pos] = value
    return _window(ids, acts, pos, cfg, pieces, f"trajectory {t.id}", value=value, trajectory=t.id)


def _compact_latents(rows: list[dict], by_id: dict, saes, model, acc, pieces: _Pieces,
                     cfg: ExplorerConfig) -> list[dict]:
    """For the first ``cfg.on_demand`` rows by rank (and every panel latent): the compact data the page builds
    a panel from on demand (``ctx``: ``[text, position, activation]`` of its top contexts; ``logits``: its top
    promoted / suppressed tokens; ``near``: its nearest latents by decoder cosine). Returns the token table
    the contexts point into (``texts``: one entry per trajectory they use)."""
    chosen = [r for r in rows if r["rank"] <= cfg.on_demand or r.get("detail")]
    texts: dict[str, int] = {}
    table: list[dict] = []
    for row in chosen:
        row["ctx"] = []
        for tid, pos, value in acc.get((row["layer"], row["latent"]), [])[:cfg.n_contexts]:
            if tid not in texts:
                texts[tid] = len(table)
                table.append({"id": tid})
            row["ctx"].append([texts[tid], pos, round(value, 4)])
    for layer in sorted({r["layer"] for r in chosen}):
        sae = (saes or {}).get(layer)
        latents = [r for r in chosen if r["layer"] == layer]
        if sae is None or model is None:
            continue
        for r, effect in zip(latents, logit_effects(model, sae, [r["latent"] for r in latents], 5)):
            r["logits"] = {side: [[i, pieces([i])[0], v] for i, v in pairs] for side, pairs in effect.items()}
        for r, near in zip(latents, nearest_latents(sae, [r["latent"] for r in latents], cfg.nearest)):
            r["near"] = [[layer, i, c] for i, c in near]
    for entry in table:
        t = by_id[entry["id"]]
        entry.update(strings=pieces(list(t.prompt_ids) + list(t.completion_ids)), prompt_length=len(t.prompt_ids))
    return table


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


def _evaluation(run_dir: Path):
    """The run's evaluation (``eval/``), or None when none ran."""
    from .evaluation import EvalResult

    found = (run_dir / "eval" / "summary.json").is_file()
    return EvalResult.load(run_dir / "eval", with_samples=False) if found else None


def _steering_rows(evaluation) -> list[dict]:
    """Evaluation rows of the sets the run evaluated, each with its size and, at the same gamma, the mean of the
    random sets: a panel shows a whole set's effect, beside what random sets of that size do."""
    if evaluation is None:
        return []
    sets, metric = evaluation.meta.sets, evaluation.meta.primary_metric
    random = {r.get("gamma"): r for r in evaluation.rows if r.get("condition") == "random_mean"}
    out = []
    for row in evaluation.rows:
        if row.get("set") in sets:
            base = random.get(row.get("gamma"), {})
            out.append({"set": row["set"], "gamma": row.get("gamma"), "latents": sets[row["set"]],
                        "n_latents": len(sets[row["set"]]), "metric": metric,
                        "value": row.get(metric), "delta": row.get(f"{metric}_delta"),
                        "delta_lo": row.get(f"{metric}_delta_lo"), "delta_hi": row.get(f"{metric}_delta_hi"),
                        "random_delta": base.get(f"{metric}_delta"), "length": row.get("length")})
    return out


def _verdict(evaluation) -> dict | None:
    """The evaluation's answer: the target set against the mean of the random sets, per gamma (primary metric)."""
    if evaluation is None:
        return None
    meta = evaluation.meta
    comps = sorted((c for c in evaluation.comparisons
                    if c["against"] == "random" and c["metric"] == meta.primary_metric), key=lambda c: c["gamma"])
    if not comps:
        return None
    return {"target": meta.target, "metric": meta.primary_metric, "reward": meta.reward,
            "n_latents": len(meta.sets.get(meta.target, [])), "n_random": len(meta.random_sets),
            "estimator": meta.estimator, "n_problems": meta.n_problems,
            "comparisons": [{k: c.get(k) for k in ("gamma", "delta", "lo", "hi", "verdict")} for c in comps]}


def _run_info(run_dir: Path, result: AttributionResult, selection: dict, cfg: ExplorerConfig, has_maps: bool) -> dict:
    import base64

    from .selection import attributed_prompts

    summary = result.meta.get("summary", {})
    pngs = sorted((run_dir / "plots").glob("*.png")) + sorted((run_dir / "study").glob("*.png"))
    plots = [{"name": str(p.relative_to(run_dir)), "png": base64.b64encode(p.read_bytes()).decode("ascii")}
             for p in pngs if p.stat().st_size < 2_000_000]  # the steering evaluation's and the study's plots
    return {"name": run_dir.name, "method": result.method_name, "model": result.meta.get("model", {}).get("name"),
            "saes": result.meta.get("saes", []), "summary": {k: v for k, v in summary.items()
                                                             if isinstance(v, (int, float, str))},
            "selected": selection.get("selection", []), "n_bootstrap": cfg.n_bootstrap,
            "page_size": cfg.page_size, "plots": plots,
            "n_prompts": result.n_prompts, "n_attributed": len(attributed_prompts(result)),
            "policy": (f"full detail for the top {cfg.detail} latents by IPG, the selected set and each baseline's "
                       f"top {BASELINE_PANELS}; a panel built on demand (contexts, logit effects, nearest latents) for "
                       f"the next ones up to rank {cfg.on_demand}; a summary row for every other latent with a non-zero "
                       "score"),
            "notes": [] if has_maps else [
                "This result has no token maps, so the per-token IPG views and the trajectory view are empty. "
                "To get them, attribute with token maps: `attribution.token_maps: ['*']` in the config (as "
                "configs/demo.yaml does), or attribute(..., token_maps=['*']) in Python."]}


# ---- the page ----------------------------------------------------------------------------------


PAGE_TEMPLATE = "explorer.html"  # package data: the page with its styles and script, __TITLE__ and __DATA__ to fill
# Characters that could end or confuse a <script> block (``</script>``, ``<!--``) or that JavaScript once read
# as line ends (U+2028/9): written as JSON escapes, so the payload is valid JSON that reads back as the same data.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def render(data: dict) -> str:
    """The self-contained page: the data inline as JSON (safe inside ``<script>``), script and styles inline."""
    from importlib.resources import files

    template = files("ipg_sae").joinpath(PAGE_TEMPLATE).read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=True).translate(_SCRIPT_SAFE)
    title = html.escape(f"ipg-sae explorer: {data['run']['name']}")
    head, tail = template.split("__DATA__")
    return head.replace("__TITLE__", title) + payload + tail
