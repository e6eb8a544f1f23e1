r"""``ipg-sae explain RUN_DIR``: explanations and interpretability scores for an attribution run's latents.

Which latents: IPG's top ``top`` (by the run's ranking), the selected set, each baseline's top
``baseline_top`` and ``latents`` given by hand. The corpus is the run's trajectories (the last 48 prompt tokens
and the completion of each, as the explorer shows them), split by prompt into a build and a held-out part
(:func:`ipg_sae.explanations.split_corpus`). Everything goes to ``<run_dir>/explanations/``:

* ``L<layer>.jsonl`` — one :class:`~ipg_sae.explanations.LatentExplanation` per line (``to_dict``); written every
  ``save_every`` latents and at the end, so a stopped run resumes where it was (latents already there are kept);
* ``null_L<layer>.json`` — the raw output scores of the frequency-matched null pool (reused on resume);
* ``llm_L<layer>.jsonl`` — with ``llm_enabled``, the LLM's explanation and its detection / fuzzing scores
  (:mod:`ipg_sae.llm_explain`; resumable the same way);
* ``features.csv`` — the run's ``features.csv`` rows (and one row per other explained latent) with the
  explanation columns (:data:`~ipg_sae.explanations.EXPLANATION_COLUMNS`) added: the feature table with
  explanations. The run's own ``features.csv`` is left as the attribute stage wrote it: it is one of that
  stage's recorded outputs, and rewriting it would make the pipeline redo the attribution;
* ``summary.json`` — settings, counts, seconds taken, and the mean scores per group (IPG's top 16 / top 64,
  each baseline's top k).

The explorer (:func:`ipg_sae.explorer.build`) shows these files when they exist; W&B gets the table.

The pipeline runs this job as its ``explain`` stage (:class:`ExplainStageConfig`, the pipeline's ``explain``
section), on the latents the explorer gives a full panel (:func:`ipg_sae.explorer.panel_latents`), before it
builds the explorer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .errors import IPGError
from .explanations import (EXPLANATION_COLUMNS, OUT, LatentExplanation, encode_corpus, explain_latents,
                           flat_columns, from_dict, split_corpus, to_dict, token_pieces)
# the configs live torch-free in explain_config (`ipg-sae explain --help`, a config's typo); re-exported here
from .explain_config import ExplainJobConfig, ExplainStageConfig, LLMConfig  # noqa: F401

log = logging.getLogger(__name__)


def chosen_latents(run_dir: Path, cfg: ExplainJobConfig) -> dict[str, list[tuple[int, int]]]:
    """The latents to explain, by group: ``ipg_top`` (IPG's top ``top``), ``selected``, ``<baseline>_top``,
    ``given``."""
    from .attribution import AttributionResult
    from .io import read_json
    from .selection import select
    from .steering import as_selection

    result = AttributionResult.load(run_dir)
    groups = {"ipg_top": select(result, cfg.top) if cfg.top else []}
    if (run_dir / "selection.json").is_file():
        groups["selected"] = as_selection(read_json(run_dir / "selection.json").get("selection", []))
    if cfg.baseline_top and (run_dir / "baselines").is_dir():
        for sub in sorted(p for p in (run_dir / "baselines").iterdir() if (p / "attribution.json").is_file()):
            groups[f"{sub.name}_top"] = select(AttributionResult.load(sub), cfg.baseline_top)
    groups["given"] = as_selection(cfg.latents, where="explain.latents")
    return groups


def trajectories_path(run_dir: Path) -> Path:
    """The trajectories the run attributed: its ``attribute_config.yaml``'s ``trajectories`` when it names a file,
    else ``<run_dir>/trajectories.jsonl``."""
    import yaml

    cfg_path = run_dir / "attribute_config.yaml"
    named = None
    if cfg_path.is_file():
        try:
            named = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}).get("trajectories")
        except (yaml.YAMLError, AttributeError):
            named = None
    path = Path(named) if named else run_dir / "trajectories.jsonl"
    if not path.is_file():
        raise IPGError(f"the trajectories of {run_dir} are not at {path}; restore them (the explanations are built "
                       "from the attributed trajectories)")
    return path


def run_corpus(trajectories, max_sequences: int, held_out: float, seed: int):
    """The run's trajectories as a corpus: prompt tail (48 tokens) and completion, split by prompt."""
    trajectories = trajectories[:max_sequences] if max_sequences else trajectories
    seqs = [list(t.prompt_ids) + list(t.completion_ids) for t in trajectories]
    start = [max(1, len(t.prompt_ids) - 48) for t in trajectories]
    return split_corpus(seqs, [t.prompt_id for t in trajectories], held_out, seed, start)


def run_explain(cfg: ExplainJobConfig, group: str | None = None, model=None, tokenizer=None, saes=None,
                groups: dict[str, list[tuple[int, int]]] | None = None) -> dict:
    """Explain and score the latents of ``cfg.run_dir`` (see the module docstring): ``groups`` (``{group: [(layer,
    latent), ...]}``, e.g. the explorer's panels) or, by default, :func:`chosen_latents`; returns the summary."""
    from .explorer import load_run_model
    from .io import run_lock
    from .tracking import Tracker, use_inputs
    from .trajectories import load_trajectories

    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir, lock_hint=False), Tracker(cfg.wandb, run_dir, run_dir.name, "explain",
                                                      group=group) as tracker:
        use_inputs(tracker, attribution_dirs=[run_dir])
        if model is None or tokenizer is None or saes is None:
            model, tokenizer, saes = load_run_model(run_dir, model, tokenizer, saes, cfg.trust_remote_code)
        groups = chosen_latents(run_dir, cfg) if groups is None else groups
        wanted = list(dict.fromkeys(pair for pairs in groups.values() for pair in pairs))
        missing = sorted({layer for layer, _ in wanted} - set(saes))
        if missing:
            raise IPGError(f"latents at layers {missing} have no SAE in {run_dir}; fix explain.latents")
        chat = None
        if cfg.llm_enabled:  # a dead endpoint fails now, in seconds, not after the explanations with no LLM
            from .llm_explain import make_chat, preflight

            chat = make_chat(cfg.llm)
            preflight(chat)
        corpus = run_corpus(load_trajectories(trajectories_path(run_dir)), cfg.max_sequences,
                            cfg.explain.held_out, cfg.explain.seed)
        start = time.monotonic()
        found: dict[tuple[int, int], LatentExplanation] = {}
        for layer in sorted({layer for layer, _ in wanted}):
            latents = [i for lay, i in wanted if lay == layer]
            found.update(_explain_layer(run_dir / OUT, model, saes[layer], layer, latents, corpus,
                                        token_pieces(tokenizer), cfg, chat))
        seconds = time.monotonic() - start
        rows = _feature_rows(run_dir, found)
        from .selection import write_feature_table

        write_feature_table(run_dir / OUT / "features.csv", rows)
        summary = _summary(cfg, groups, found, seconds, corpus)
        from .io import write_json

        write_json(run_dir / OUT / "summary.json", summary)
        if rows:
            columns = list(rows[0])
            tracker.table("explanations/features", columns, [[_cell(r.get(c)) for c in columns] for r in rows])
        tracker.summary({f"explain/{k}": v for k, v in summary["groups_mean"].get("ipg_top", {}).items()
                         if isinstance(v, (int, float))})
        tracker.artifact(f"{run_dir.name}-explanations", "explanations", run_dir / OUT)
        return summary


def _explain_layer(out: Path, model, sae, layer: int, latents: list[int], corpus, pieces,
                   cfg: ExplainJobConfig, chat=None) -> dict[tuple[int, int], LatentExplanation]:
    """One layer's explanations, resuming from and saving to ``out / L<layer>.jsonl``; with ``chat``, the LLM's
    too (``out / llm_L<layer>.jsonl``)."""
    from .io import read_json, read_jsonl, write_json, write_jsonl

    path, null_path = out / f"L{layer}.jsonl", out / f"null_L{layer}.json"
    done = {int(r["latent"]): from_dict(r) for r in (read_jsonl(path) if path.is_file() else [])}
    nulls = {int(k): v for k, v in (read_json(null_path) if null_path.is_file() else {}).items()}
    acts = encode_corpus(model, sae, layer, corpus, cfg.explain.batch)
    fresh = [0]

    def save(_e=None) -> None:
        fresh[0] += 1
        if _e is None or fresh[0] % cfg.save_every == 0:
            write_jsonl(path, (to_dict(e) for e in sorted(done.values(), key=lambda e: e.latent)))

    def on_done(e: LatentExplanation) -> None:
        done[e.latent] = e
        save(e)

    explain_latents(model, sae, layer, latents, corpus, pieces, cfg.explain, acts=acts, done=done, on_done=on_done,
                    null_scores=nulls)
    write_json(null_path, {str(k): v for k, v in sorted(nulls.items())})
    if chat is not None:
        from .llm_explain import explain_all

        rows = explain_all(chat, corpus, acts, layer, latents, pieces, cfg.llm, out / f"llm_L{layer}.jsonl",
                           cfg.explain.max_n)
        for latent, row in rows.items():
            done[latent].llm = {k: row[k] for k in ("explanation", "detection_bacc", "fuzzing_bacc")}
    save()
    return {(layer, i): done[i] for i in latents}


def _feature_rows(run_dir: Path, found: dict) -> list[dict]:
    """The run's feature table rows with the explanation columns, then a row for every other explained latent."""
    from .selection import read_feature_table

    base = read_feature_table(run_dir) if (run_dir / "features.csv").is_file() else []
    rows, seen = [], set()
    for row in base:
        key = (int(row["layer"]), int(row["latent"]))
        seen.add(key)
        rows.append({**row, **(flat_columns(found[key]) if key in found else dict.fromkeys(EXPLANATION_COLUMNS, ""))})
    columns = list(rows[0]) if rows else ["layer", "latent", *EXPLANATION_COLUMNS]
    for key, e in sorted(found.items()):
        if key not in seen:
            rows.append({c: "" for c in columns} | {"layer": key[0], "latent": key[1]} | flat_columns(e))
    return rows


def _summary(cfg: ExplainJobConfig, groups: dict, found: dict, seconds: float, corpus) -> dict:
    from dataclasses import asdict

    means = {}
    for name, pairs in groups.items():
        cols = [flat_columns(found[p]) for p in pairs if p in found]
        means[name] = {"n": len(cols)} | {k: _mean([c[k] for c in cols]) for k in
                                          ("detection_bacc", "detection_auroc", "output_score", "output_percentile")}
    if "ipg_top" in groups:
        means["ipg_top16"] = {"n": min(16, len(groups["ipg_top"]))} | {
            k: _mean([flat_columns(found[p])[k] for p in groups["ipg_top"][:16] if p in found])
            for k in ("detection_bacc", "detection_auroc", "output_score", "output_percentile")}
    return {"settings": asdict(cfg.explain), "n_latents": len(found), "seconds": round(seconds, 2),
            "n_sequences": len(corpus.sequences), "n_held_out": int(sum(corpus.held)),
            "groups": {k: [list(p) for p in v] for k, v in groups.items()}, "groups_mean": means}


def _cell(value):
    """A feature-table value as W&B wants it: one type per column (numbers read from the CSV as numbers, an empty
    cell as None)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and v != ""]
    return round(float(np.mean(values)), 4) if values else None
