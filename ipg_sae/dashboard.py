"""The explorer's full panels in SAEDashboard's Neuronpedia feature layout (``explorer/dashboard/layer_<L>.json``),
for dashboards that ingest it: :func:`export_dashboard`, called by :func:`ipg_sae.explorer.build`."""

from __future__ import annotations

from pathlib import Path

from .io import write_json


# Keys of an exported feature that SAEDashboard's NeuronpediaDashboardFeature (0.8.0) does not take.
NOT_SAEDASHBOARD = ("maxActApprox", "topkCosSimIndices", "topkCosSimValues", "ipg", "explanations")


def export_dashboard(data: dict, out_dir: str | Path) -> list[Path]:
    """The panel latents in the feature layout of SAEDashboard's Neuronpedia output, one file per layer
    (``layer_<L>.json``: ``{"layer", "model", "features": [...]}``), for dashboards that ingest it.

    Each feature has ``feature_index``, ``activations`` (per context: ``tokens``, ``values``,
    ``qualifying_token_index``, ``bin_min``/``bin_max``/``bin_contains`` set to the top bin),
    ``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` (direct logit effect),
    ``frac_nonzero`` (activation frequency), ``freq_hist_data_bar_heights`` and
    ``freq_hist_data_bar_values`` (counts and bin centres, parallel arrays), ``maxActApprox``,
    ``topkCosSimIndices``/``topkCosSimValues`` (nearest latents by decoder cosine), and the
    attribution statistics under ``ipg`` (``mean``, ``lo``, ``hi``, ``t``, ``rank``), and ``explanations``
    (:func:`dashboard_explanations`: empty until ``ipg-sae explain`` ran). The field
    names follow SAEDashboard's ``NeuronpediaDashboardFeature``; no importer was run against the
    files here: the ``sae-dashboard`` package (0.8.0) does not install beside the pinned stack (it
    needs ``datasets<4``, ``transformers<4.57``, ``safetensors<0.5``, ``transformer-lens<3``; pip
    reports the conflict). Its data classes (``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``,
    which needs only numpy, loaded alone from its wheel) accept the features once the keys in
    :data:`NOT_SAEDASHBOARD` are dropped (Neuronpedia's own ``maxActApprox`` and ``topkCosSim*``, and
    this project's ``ipg`` and ``explanations``); ``NeuronpediaDashboardFeature`` refuses unknown keys.
    """
    rows = {(r["layer"], r["latent"]): r for r in data["latents"]}
    per_layer: dict[int, list[dict]] = {}
    for key, d in data["details"].items():
        layer, latent = (int(x) for x in key.split(":"))
        row = rows.get((layer, latent), {})
        acts = [{"tokens": c["strings"], "values": c["activations"], "qualifying_token_index": c["max_index"],
                 "bin_min": -1, "bin_max": -1, "bin_contains": -1} for c in d["contexts"]]
        edges, counts = d["histogram"]["edges"], d["histogram"]["counts"]
        logits = d.get("logits") or {"promoted": [], "suppressed": []}
        per_layer.setdefault(layer, []).append({
            "feature_index": latent, "activations": acts,
            "pos_str": [s for _, s, _ in logits["promoted"]], "pos_values": [v for _, _, v in logits["promoted"]],
            "neg_str": [s for _, s, _ in logits["suppressed"]], "neg_values": [v for _, _, v in logits["suppressed"]],
            "frac_nonzero": row.get("activation_frequency", 0.0), "freq_hist_data_bar_heights": counts,
            "freq_hist_data_bar_values": [round((a + b) / 2, 4) for a, b in zip(edges, edges[1:])],
            "maxActApprox": max((c["max"] for c in d["contexts"]), default=0.0),
            "topkCosSimIndices": [i for _, i, _ in row.get("near", [])],
            "topkCosSimValues": [c for _, _, c in row.get("near", [])],
            "ipg": {k: row.get(k) for k in ("mean", "lo", "hi", "t", "rank")},
            "explanations": dashboard_explanations(row.get("explanation"))})
    paths = []
    for layer, features in sorted(per_layer.items()):
        path = Path(out_dir) / f"layer_{layer}.json"
        write_json(path, {"layer": layer, "model": data["run"].get("model"), "features": features})
        paths.append(path)
    return paths


def dashboard_explanations(explanation: dict | None) -> list[dict]:
    """A latent's explanations in Neuronpedia's explanation layout (``description``, ``typeName``,
    ``explanationModelName``, ``scores``: ``[{"method", "value"}]``)."""
    if not explanation:
        return []
    out = [{"description": explanation["explanation"], "typeName": "ngram-log-odds", "explanationModelName": "ipg-sae",
            "scores": [{"method": "detection_balanced_accuracy", "value": explanation["detection_bacc"]},
                       {"method": "detection_auroc", "value": explanation["detection_auroc"]}]},
           {"description": explanation["vocab_proj"], "typeName": "vocab-proj", "explanationModelName": "ipg-sae",
            "scores": [{"method": "output_score", "value": explanation["output_score"]},
                       {"method": "output_percentile", "value": explanation["output_percentile"]}]},
           {"description": explanation["token_change"], "typeName": "token-change", "explanationModelName": "ipg-sae",
            "scores": []}]
    if explanation.get("llm_explanation"):
        out.append({"description": explanation["llm_explanation"], "typeName": "llm", "explanationModelName": "llm",
                    "scores": [{"method": "detection_balanced_accuracy", "value": explanation.get("llm_detection")},
                               {"method": "fuzzing_balanced_accuracy", "value": explanation.get("llm_fuzzing")}]})
    return out
