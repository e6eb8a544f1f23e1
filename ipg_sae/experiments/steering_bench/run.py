r"""Steering that helps? IPG-based recipes against the tools practitioners already use, on one footing.

Every method steers through :func:`ipg_sae.steering.steer` (or, for prompting, a system prompt):

* ``ipg_topk``: IPG's top ``k`` scaled by ``gamma`` (the method's own control);
* ``ipg_step``: every scored latent scaled by ``1 + eta * score / max|score|`` (:func:`vectors.ipg_weighted_step`);
* ``act``, ``grad_x_act``, ``reason_words``, ``ig_likelihood``: each baseline's top ``k`` scaled by ``gamma``;
* ``diffmean``: the advantage-weighted mean residual (:func:`vectors.diffmean`), its unit direction added at
  generated positions with coefficient ``alpha * mean residual norm``;
* ``diffmean_projected``: DiffMean's least-squares part in the span of IPG's top ``k`` decoder rows
  (:func:`vectors.project_on_latents`), added like DiffMean (scaled by DiffMean's norm, so a projection that
  carries little of DiffMean pushes little);
* ``prompting``: an instruction as the system prompt;
* nulls, not tuned but mirroring a chosen recipe: ``random_direction`` (a random unit direction at DiffMean's
  chosen coefficient) and ``random_latents`` (a random set matched to IPG's chosen set in activation frequency,
  at its gamma).

Protocol (``docs/steering/``): the attribution problems, **dev**, **test** and **transfer** splits are disjoint
(:func:`ipg_sae.splits.disjoint_splits`, checked before any work). Each method gets at most
``grid.max_settings`` settings, each scored on dev: off-policy on unsteered dev samples
(:mod:`ipg_sae.faithfulness`) when the setting's mean ESS is at least ``min_ess`` of ``G``, else on-policy.
Each method's best dev setting (the largest effect on the reward: accuracy for ``correctness``) alone is then sampled **on-policy** on test and on
every transfer split, ``eval_seeds`` x ``eval_sampling.n_samples`` per problem, paired by problem and seed with
the unsteered run; and its capability cost measured on neutral text (:mod:`ipg_sae.capability`). Test and
transfer never influence a choice (``tune`` reads dev only).

Stages (resumable; every sampled or scored setting is a cell of :class:`ipg_sae.cells.CellStore`): ``sample``,
``sae``, ``attribute`` (or ``attribution_dir``: an existing attribution run), ``diffmean``, ``dev``, ``tune``,
``evaluate``, ``capability``, ``report``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ...attribution import AttributionResult
from ...cells import TRAJECTORIES, CellStore, Inputs, LogprobCells
from ...errors import IPGError
from ...evaluation import EvalConfig, degenerate_flags
from ...faithfulness import TrajectoryScorer, estimate
from ...io import read_json, write_json, write_text
from ...jobs import method_dir
from ...models import load_model
from ...nulls import LatentPool
from ...provenance import PROVENANCE_FILE, read_provenance, sae_identity, write_provenance
from ...rewards import get_reward
from ...sampling import SamplingConfig, eos_ids, sample
from ...saes import as_layer_dict, load_saes
from ...splits import disjoint_splits, question_key
from ...steering import Intervention, steering
from ...tasks import TaskConfig, build_prompts, load_problems
from ...trajectories import Trajectory, load_trajectories, prompt_groups, save_trajectories
from ...vectors import diffmean, latent_diffmean
from ..common import attribute, attribution_sampling_stage, reward_dir, sample_stage
from ..stages import SAE_STAGE, Stage, run_job_stages, sae_specs, task_files
from .config import SteeringBenchConfig, splits
from .recipes import KINDS, UNSTEERED, Ingredients, Recipe, kind_of, null_recipes, recipes, tuned_name
from .push import matched_recipes
from .report import answer, markdown, plot_gain_vs_cost
from .summary import BenchSummary, summarize

log = logging.getLogger(__name__)


# ---- stages -------------------------------------------------------------------------------------


def _attribution_root(cfg: SteeringBenchConfig) -> Path:
    return Path(cfg.attribution_dir) if cfg.attribution_dir else reward_dir(cfg, cfg.reward)


def _baselines(cfg: SteeringBenchConfig) -> list[str]:
    """The baselines' attributions the chosen methods rank by (IPG's is always made)."""
    wanted = (k.attribution for name, k in KINDS.items() if name in cfg.methods)
    return list(dict.fromkeys(a for a in wanted if a not in (None, "ipg")))


def _attribution_dirs(cfg: SteeringBenchConfig) -> dict[str, Path]:
    """Each attribution the recipes rank by (IPG and the baselines) -> its directory."""
    root = _attribution_root(cfg)
    return {m: method_dir(root, m) for m in ["ipg", *_baselines(cfg)]}


def _attribution_files(cfg: SteeringBenchConfig) -> list[Path]:
    from ...tracking import attribution_files

    files = [f for d in _attribution_dirs(cfg).values() for f in attribution_files(d)]
    return files + [_attribution_root(cfg) / PROVENANCE_FILE]


def _run_attribute(cfg: SteeringBenchConfig) -> dict:
    if cfg.attribution_dir:
        check_reused_saes(cfg)
        return {"reused": cfg.attribution_dir}
    summaries = attribute(cfg, reward_dir(cfg, cfg.reward), _baselines(cfg), max(cfg.grid.ks))
    write_provenance(_attribution_root(cfg), cfg.task, sae_specs(cfg), get_reward(cfg.reward).identity)
    return {m: s["selection"][:8] for m, s in summaries.items()}


REUSED = "steering_bench.attribution_dir"


def check_reused_attribution(cfg: SteeringBenchConfig) -> None:
    """Before any work: a reused attribution exists for every method, was made with this reward, and none of its
    problems is in the dev, test or transfer splits (by id or question text); its SAEs too when they are loaded
    (trained ones are checked when the attribute stage takes the run up: :func:`check_reused_saes`)."""
    if not cfg.attribution_dir:
        return
    root = _attribution_root(cfg)
    missing = [m for m, d in _attribution_dirs(cfg).items() if not (d / "attribution.json").is_file()]
    if missing:
        raise IPGError(f"{REUSED} {cfg.attribution_dir} has no {missing[0]} attribution; run the job that makes it "
                       "first (for configs/steering_bench_smollm2.yaml: `ipg-sae study configs/study_smollm2.yaml`, "
                       "through its attribute stage), or leave attribution_dir empty to attribute here")
    doc = read_provenance(root, REUSED)
    if doc.get("reward") != get_reward(cfg.reward).identity:
        made = doc.get("reward", {}).get("name") if isinstance(doc.get("reward"), dict) else None
        raise IPGError(f"{REUSED} {root} was attributed with the reward {made!r}, not steering_bench.reward "
                       f"{cfg.reward!r} (or that reward's code changed since): point it at an attribution of this "
                       "reward, or leave it empty to attribute here")
    owner: dict[str, tuple[str, str]] = {}
    for split, problems in disjoint_splits({k: t for k, t in splits(cfg).items() if k != "attribution"}).items():
        for p in problems:
            owner.setdefault(f"id:{p.id}", (split, p.id))
            owner.setdefault(f"question:{question_key(p.question)}", (split, p.id))
    for p in doc["problems"]:
        hit = owner.get(f"id:{p.get('id')}") or owner.get(f"question:{question_key(str(p.get('question')))}")
        if hit:
            raise IPGError(f"{REUSED} {root} was attributed on problem {p.get('id')}, which is in the {hit[0]} split "
                           f"(as {hit[1]}): point it at an attribution of other problems, or leave it empty to "
                           "attribute here")
    if cfg.sae.load:
        check_reused_saes(cfg)


def check_reused_saes(cfg: SteeringBenchConfig) -> None:
    """A reused attribution was made with the SAEs this benchmark steers with (by the digests of their files)."""
    root = _attribution_root(cfg)
    if read_provenance(root, REUSED).get("saes") != sae_identity(sae_specs(cfg)):
        raise IPGError(f"{REUSED} {root} was made with other SAEs than steering_bench.sae: point it at an "
                       "attribution made with these SAEs, or leave it empty to attribute here")


def _sample_attribution(cfg: SteeringBenchConfig) -> dict:
    if cfg.attribution_dir:
        return {"reused": cfg.attribution_dir}
    return sample_stage(cfg, cfg.task, cfg.sampling, "trajectories.jsonl", cfg.attribute_prompts)


def _bench(cfg: SteeringBenchConfig) -> Path:
    return cfg.run_dir / "bench"


def _diffmean_stage(cfg: SteeringBenchConfig) -> dict:
    from safetensors.torch import save_file

    model, _ = load_model(cfg.model)
    layers = sorted(as_layer_dict(load_saes(sae_specs(cfg), model)))
    trajectories = load_trajectories(_attribution_root(cfg) / "trajectories.jsonl")
    dm = diffmean(model, trajectories, layers[0])
    path = _bench(cfg) / "diffmean.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"vector": dm.vector.contiguous()}, str(path),
              metadata={"layer": str(dm.layer), "residual_norm": repr(dm.residual_norm)})
    return {"layer": dm.layer, "norm": float(dm.vector.norm()), "residual_norm": dm.residual_norm}


def _vectors_stage(cfg: SteeringBenchConfig) -> dict:
    """DiffMean in the latent basis (every SAE layer) and DiffMean at ``grid.diffmean_layers``, from the
    attribution trajectories: ``bench/vectors.safetensors``."""
    from safetensors.torch import save_file

    model, _ = load_model(cfg.model)
    saes = as_layer_dict(load_saes(sae_specs(cfg), model))
    trajectories = load_trajectories(_attribution_root(cfg) / "trajectories.jsonl")
    tensors, meta = {}, {}
    for layer, w in latent_diffmean(model, saes, trajectories).items():
        tensors[f"latent_{layer}"] = w.contiguous()
    for layer in cfg.grid.diffmean_layers:
        dm = diffmean(model, trajectories, layer)
        tensors[f"residual_{layer}"] = dm.vector.contiguous()
        meta[f"residual_norm_{layer}"] = repr(dm.residual_norm)
    path = _bench(cfg) / "vectors.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return {name: float(t.norm()) for name, t in tensors.items()}


def _dev_stage(cfg: SteeringBenchConfig) -> dict:
    model, tokenizer = load_model(cfg.model)
    problems = load_problems(cfg.dev)  # checked disjoint from the other splits before any work (run_bench)
    out = sample(model, tokenizer, problems, build_prompts(tokenizer, problems, cfg.dev), cfg.dev_sampling, cfg.reward,
                 desc="dev (unsteered)")
    save_trajectories(_bench(cfg) / "dev.jsonl", out)
    return {"problems": len(problems), "accuracy": float(np.mean([t.correct for t in out]))}


STAGES = [
    attribution_sampling_stage("reward", ("attribution_dir",), run=_sample_attribution, files=lambda c: _reused(c),
                               outputs=lambda c: [_attribution_root(c) / "trajectories.jsonl"]),
    SAE_STAGE,
    Stage("attribute", _run_attribute, outputs=_attribution_files,
          fields=("attribution", "methods", "grid.ks", "attribution_dir")),
    Stage("diffmean", _diffmean_stage, outputs=lambda c: [_bench(c) / "diffmean.safetensors"]),
    Stage("vectors", _vectors_stage, outputs=lambda c: [_bench(c) / "vectors.safetensors"],
          fields=("grid.diffmean_layers",)),
    Stage("dev", _dev_stage, outputs=lambda c: [_bench(c) / "dev.jsonl"], fields=("dev", "dev_sampling"),
          files=lambda c: task_files(c.dev)),
    Stage("tune", lambda c: tune(c), outputs=lambda c: [_bench(c) / "tuning.json"],
          fields=("methods", "grid", "min_ess", "dev_on_policy_samples", "seed", "problems_per_batch")),
    Stage("match", lambda c: match(c), outputs=lambda c: [_bench(c) / "matched.json"],
          fields=("match_reference", "match_texts", "match_rtol", "match_methods", "grid.test_draws",
                  "capability_max_tokens")),
    Stage("evaluate", lambda c: evaluate_chosen(c), outputs=lambda c: [_bench(c) / "evaluation.json"],
          fields=("test", "transfer", "eval_sampling", "eval_seeds", "nulls", "seed", "grid.test_draws", "test_only"),
          files=lambda c: task_files(c.test, *c.transfer)),
    Stage("capability", lambda c: capability(c), outputs=lambda c: [_bench(c) / "capability.json"],
          fields=("capability_task", "capability_levels", "capability_max_tokens", "offtask_texts"),
          files=lambda c: task_files(c.capability_task)),
    Stage("recipes", lambda c: export_recipes(c), outputs=lambda c: [_bench(c) / "recipes"]),
    Stage("report", lambda c: report(c), outputs=lambda c: [_bench(c) / f for f in ("report.md", "leaderboard.json")],
          fields=("n_bootstrap",)),
]


def _reused(cfg: SteeringBenchConfig) -> list[Path]:
    """A reused attribution run's folder: its contents are in the key of the stage that takes it up."""
    return [Path(cfg.attribution_dir)] if cfg.attribution_dir else []


def run_bench(cfg: SteeringBenchConfig) -> dict:
    """Run (or resume) every stage of the steering benchmark; return each stage's summary."""
    disjoint_splits(splits(cfg))  # before any work: no problem in two splits
    check_reused_attribution(cfg)  # and a reused attribution fits (its problems, reward and SAEs)
    checks = [(t, s.max_new_tokens, "max_new_tokens") for t, s in [(cfg.task, cfg.sampling), (cfg.dev, cfg.dev_sampling),
                                                                   (cfg.test, cfg.eval_sampling),
                                                                   *[(t, cfg.eval_sampling) for t in cfg.transfer]]]
    return run_job_stages(cfg, STAGES, "steering_bench_config.yaml", checks)


# ---- the work -------------------------------------------------------------------------------------


class Bench:
    """The model, the SAEs, the recipes' ingredients and the cell store, loaded once per stage."""

    def __init__(self, cfg: SteeringBenchConfig):
        from safetensors import safe_open

        self.cfg = cfg
        self.model, self.tokenizer = load_model(cfg.model)
        self.saes = as_layer_dict(load_saes(sae_specs(cfg), self.model))
        self.inputs = Inputs.of(self.model, self.saes)
        self.store = CellStore(_bench(cfg) / "cells")
        self.reward = get_reward(cfg.reward)
        results = {m: AttributionResult.load(d) for m, d in _attribution_dirs(cfg).items()}
        with safe_open(str(_bench(cfg) / "diffmean.safetensors"), "pt") as f:
            meta = f.metadata()
            vector = f.get_tensor("vector")
        latent, layer_vectors = {}, {}
        with safe_open(str(_bench(cfg) / "vectors.safetensors"), "pt") as f:
            meta_v = f.metadata() or {}
            for name in f.keys():
                kind, layer = name.rsplit("_", 1)
                if kind == "latent":
                    latent[int(layer)] = f.get_tensor(name)
                else:
                    layer_vectors[int(layer)] = (f.get_tensor(name), float(meta_v[f"residual_norm_{layer}"]))
        self.ing = Ingredients(results, vector, int(meta["layer"]), float(meta["residual_norm"]), self.saes,
                               latent, layer_vectors, cfg.seed)
        self.stops = eos_ids(self.model, self.tokenizer)
        self._cells: dict[str, LogprobCells] = {}

    def cells(self, samples: list[Trajectory], scope: str) -> LogprobCells:
        """The off-policy cells on the dev samples, one panel per steered scope (all positions, generated only)."""
        if scope not in self._cells:
            scorer = TrajectoryScorer(self.model, samples, self.cfg.dev_sampling.temperature, saes=self.saes,
                                      problems_per_batch=self.cfg.problems_per_batch, scope=scope)
            self._cells[scope] = LogprobCells(self.store, scorer, self.inputs, samples,
                                              self.cfg.dev_sampling.temperature, scope)
        return self._cells[scope]

    def scorer(self, samples: list[Trajectory], scope: str) -> TrajectoryScorer:
        return self.cells(samples, scope).scorer

    def logprobs(self, recipe: Recipe, samples: list[Trajectory]) -> torch.Tensor:
        """Every dev sample's log-probability under ``recipe`` (an off-policy cell)."""
        latents = [(iv.layer, iv.latent) for iv in recipe.interventions if isinstance(iv, Intervention)]
        return self.cells(samples, recipe.scope).steered(recipe.key(), recipe.interventions, latents,
                                                          f"logp_{recipe.label}", name=recipe.label)

    def sampled(self, recipe: Recipe, split: str, task: TaskConfig, sampling: SamplingConfig) -> list[Trajectory]:
        """``recipe``'s on-policy samples of a split (cell)."""
        problems = load_problems(task)
        prompt_task = dataclasses.replace(task, system_prompt=recipe.system_prompt) if recipe.system_prompt else task
        if recipe.few_shot is not None:
            prompt_task = dataclasses.replace(prompt_task, few_shot=recipe.few_shot)
        prompts = build_prompts(self.tokenizer, problems, prompt_task)
        key = {"estimator": "sampling", "split": split, "task": dataclasses.asdict(task), "recipe": recipe.key(),
               "sampling": dataclasses.asdict(sampling), "reward": self.reward.identity,
               "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16], **self._weights(recipe)}

        def compute() -> list[Trajectory]:
            intervention = (steering(self.model, self.saes, recipe.interventions, scope=recipe.scope)
                            if recipe.interventions else None)
            return sample(self.model, self.tokenizer, problems, prompts, sampling, self.reward,
                          intervention=intervention, desc=f"{split}: {recipe.label} (seed {sampling.seed})")

        label = f"{split}_{recipe.label}_s{sampling.seed}"
        return self.store.fetch(label, key, compute, TRAJECTORIES, name=label)

    def _weights(self, recipe: Recipe) -> dict:
        latents = [(iv.layer, iv.latent) for iv in recipe.interventions if isinstance(iv, Intervention)]
        return self.inputs.steered(latents)

    def outcomes(self, trajectories: list[Trajectory]) -> dict[str, dict[str, list[float]]]:
        """Per problem (in order of first appearance): mean accuracy, length, parse and degenerate rates."""
        flags = [degenerate_flags(t, EvalConfig(), self.stops) for t in trajectories]
        ids, groups = prompt_groups([t.prompt_id for t in trajectories])
        metric = {"reward": [float(t.reward) for t in trajectories], "accuracy": [float(t.correct) for t in trajectories],
                  "length": [float(len(t.completion_ids)) for t in trajectories],
                  "parse_failure": [1.0 - f["parsed"] for f in flags], "degenerate": [float(f["degenerate"]) for f in flags]}
        return {"problems": ids, **{m: [float(np.mean([v[i] for i in g])) for g in groups] for m, v in metric.items()}}


def tune(cfg: SteeringBenchConfig, progress: bool = True) -> dict:
    """Every method's settings scored on dev (off-policy where the ESS allows, on-policy otherwise); the best
    setting of each method chosen by its dev effect on the reward (accuracy for correctness). Reads dev only."""
    from tqdm.auto import tqdm

    bench = Bench(cfg)
    dev = load_trajectories(_bench(cfg) / "dev.jsonl")
    ids, groups = prompt_groups([t.prompt_id for t in dev])
    rewards = torch.tensor([float(t.reward) for t in dev], dtype=torch.float64)
    base = bench.logprobs(UNSTEERED, dev)  # no intervention: the same under either scope
    base_value = float(rewards.mean())
    on_policy = dataclasses.replace(cfg.dev_sampling, n_samples=cfg.dev_on_policy_samples, seed=cfg.seed)
    on_base = None
    rows = []
    plan = [(m, r) for m in cfg.methods for r in recipes(cfg, m, bench.ing)]
    for method, recipe in tqdm(plan, desc="tune on dev", unit="setting", disable=not progress):
        row = {"method": method, "name": tuned_name(recipe), "setting": recipe.setting, "label": recipe.label}
        if recipe.interventions:
            est = estimate(base, bench.logprobs(recipe, dev), rewards, groups)
            row["ess"] = float(np.mean(est.ess))
            if row["ess"] >= cfg.min_ess:
                row.update(estimator="off-policy", value=float(est.per_prompt.mean()),
                           effect=float(est.per_prompt.mean()) - base_value)
        if "estimator" not in row:  # prompting, or a push too large for the dev samples to stand in for
            if on_base is None:
                on_base = float(np.mean(bench.outcomes(bench.sampled(UNSTEERED, "dev", cfg.dev, on_policy))["reward"]))
            value = float(np.mean(bench.outcomes(bench.sampled(recipe, "dev", cfg.dev, on_policy))["reward"]))
            row.update(estimator="on-policy", value=value, effect=value - on_base)
        rows.append(row)
    chosen = {}
    for name in dict.fromkeys(r["name"] for r in rows):  # each method, each draw of a method with draws
        best = max((r for r in rows if r["name"] == name), key=lambda r: r["effect"])
        best["chosen"] = True
        chosen[name] = best["setting"]
    write_json(_bench(cfg) / "tuning.json", {"rows": rows, "chosen": chosen, "dev_reward": base_value,
                                             "dev_problems": len(ids), "min_ess": cfg.min_ess})
    return {"chosen": chosen}


def _chosen_recipes(cfg: SteeringBenchConfig, bench: Bench) -> dict[str, Recipe]:
    tuning = read_json(_bench(cfg) / "tuning.json")
    out = {}
    for name, setting in tuning["chosen"].items():
        if "draw" in setting and setting["draw"] >= cfg.grid.test_draws:
            continue  # a null's dev-only draw
        matches = [r for r in recipes(cfg, kind_of(name), bench.ing) if _jsonable(r.setting) == setting]
        if len(matches) != 1:
            raise IPGError(f"the chosen {name} setting {setting} is not in the grid any more; rerun the tune stage")
        out[name] = matches[0]
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _pool(cfg: SteeringBenchConfig, bench: Bench) -> LatentPool:
    dev = load_trajectories(_bench(cfg) / "dev.jsonl")
    return LatentPool.of(bench.saes, frequencies=bench.scorer(dev, "all").activation_frequencies())


def match(cfg: SteeringBenchConfig) -> dict:
    """Every chosen recipe with a push knob also at the setting whose off-task KL/token matches
    ``match_reference``'s chosen setting's (:mod:`.push`): ``bench/matched.json``. Reads no test data."""
    from ...capability import capability_cost, offtask_texts

    if not cfg.match_reference or cfg.match_reference not in cfg.methods:  # nothing to match against
        write_json(_bench(cfg) / "matched.json", {"reference": None, "recipes": {}})
        return {}
    bench = Bench(cfg)
    docs = offtask_texts(max_texts=cfg.match_texts)

    def cost(recipe: Recipe) -> float:
        return capability_cost(bench.model, bench.tokenizer, bench.saes, recipe.interventions, docs,
                               max_tokens=cfg.capability_max_tokens).kl

    out = matched_recipes(_chosen_recipes(cfg, bench), cfg.match_reference, bench.ing, cost, cfg.match_rtol,
                          cfg.match_methods)
    write_json(_bench(cfg) / "matched.json", out)
    return {name: round(r["kl"], 5) for name, r in out["recipes"].items()}


def _evaluated(cfg: SteeringBenchConfig, bench: Bench) -> dict[str, Recipe]:
    """What test, transfer and the capability cost run: the chosen recipes, the nulls mirroring them and the
    recipes at matched push (``matched.json``)."""
    chosen = _chosen_recipes(cfg, bench)
    out = {**chosen, **{r.method: r for r in null_recipes(cfg, chosen, bench.ing, _pool(cfg, bench))}}
    for name, m in read_json(_bench(cfg) / "matched.json")["recipes"].items():
        out[name] = KINDS[kind_of(name)].build(m["method"], m["setting"], bench.ing)
    return out


def evaluate_chosen(cfg: SteeringBenchConfig) -> dict:
    """Each chosen recipe (and the nulls and the unsteered model) sampled on-policy on test and every transfer
    split, ``eval_seeds`` x ``eval_sampling.n_samples`` per problem."""
    bench = Bench(cfg)
    everything = {"unsteered": UNSTEERED, **_evaluated(cfg, bench)}
    evaluation: dict = {"recipes": {name: {"label": r.label, "setting": r.setting} for name, r in everything.items()},
                        "splits": {}}
    for split, task in splits(cfg).items():
        if split in ("attribution", "dev"):
            continue
        per_recipe = {}
        for name, recipe in everything.items():
            if split != "test" and (kind_of(name) in cfg.test_only or ("@push" in cfg.test_only and "@" in name)):
                continue  # a recipe run on test only (a null's draws, the recipes at matched push: compute)
            seeds = [bench.outcomes(bench.sampled(recipe, split, task, dataclasses.replace(cfg.eval_sampling, seed=s)))
                     for s in cfg.eval_seeds]
            per_recipe[name] = {"problems": seeds[0]["problems"],
                                **{m: np.mean([s[m] for s in seeds], axis=0).tolist()
                                   for m in ("reward", "accuracy", "length", "parse_failure", "degenerate")}}
        evaluation["splits"][split] = {"task": dataclasses.asdict(task), "recipes": per_recipe}
    write_json(_bench(cfg) / "evaluation.json", evaluation)
    return {split: len(v["recipes"]) for split, v in evaluation["splits"].items()}


def neutral_texts(cfg: SteeringBenchConfig, tokenizer) -> dict[str, list[str]]:
    """Held-out documents of the SAE corpus (task prompts with worked solutions, never trained on) and the
    generic check texts (prose, code, arithmetic), both in-domain or near it; and the off-task English text that
    ships with the package (:func:`ipg_sae.capability.offtask_texts`: ~26.7k tokens of BSD fortunes)."""
    from ...capability import offtask_texts
    from ...saes import CHECK_TEXTS
    from ...tasks import load_problems

    corpus = []
    for level in cfg.capability_levels:
        task = dataclasses.replace(cfg.capability_task, level=level)
        problems = load_problems(task)
        corpus += [p + (q.solution or f"The answer is {q.answer}.")
                   for p, q in zip(build_prompts(tokenizer, problems, task), problems)]
    return {"corpus": corpus, "generic": list(CHECK_TEXTS), "offtask": offtask_texts(max_texts=cfg.offtask_texts or None)}


def capability(cfg: SteeringBenchConfig) -> dict:
    """Per chosen recipe and null: per-token KL against the unsteered model and the perplexity ratio, on the SAE
    corpus's held-out documents and on generic text (prompting changes no weight or activation: 0 by construction)."""
    from ...capability import capability_cost

    bench = Bench(cfg)
    everything = _evaluated(cfg, bench)
    texts = neutral_texts(cfg, bench.tokenizer)
    out = {}
    for name, recipe in everything.items():
        out[name] = {}
        for kind, docs in texts.items():
            if not recipe.interventions:
                out[name][kind] = {"kl": 0.0, "ppl_ratio": 1.0, "tokens": 0, "note": "no intervention on the model"}
                continue
            cost = capability_cost(bench.model, bench.tokenizer, bench.saes, recipe.interventions, docs,
                                   max_tokens=cfg.capability_max_tokens)
            out[name][kind] = {"kl": cost.kl, "ppl_ratio": cost.ppl_ratio, "ppl_clean": cost.ppl_clean,
                               "tokens": cost.n_tokens}
    write_json(_bench(cfg) / "capability.json", out)
    return {name: v["generic"]["kl"] for name, v in out.items()}


def export_recipes(cfg: SteeringBenchConfig) -> dict:
    """Every evaluated recipe as a folder a reader can apply (:mod:`.apply`): ``bench/recipes/``."""
    from .apply import write_recipes

    bench = Bench(cfg)
    dirs = {layer: spec.path for layer, spec in zip(sorted(bench.saes), sae_specs(cfg))}
    return write_recipes(_bench(cfg) / "recipes", _evaluated(cfg, bench), cfg.model.name, dirs)


def report(cfg: SteeringBenchConfig) -> dict:
    """``bench/report.md``, ``bench/leaderboard.json`` and the plot of accuracy gain against capability cost."""
    out = _bench(cfg)
    summary = summarize(cfg, read_json(out / "evaluation.json"), read_json(out / "capability.json"),
                        read_json(out / "tuning.json"), read_json(out / "matched.json"))
    summary.answer = answer(cfg, summary)
    plot = plot_gain_vs_cost(cfg, summary, out / "gain_vs_cost.png")
    summary.save(out / "leaderboard.json")
    write_text(out / "report.md", markdown(cfg, summary))
    log_to_wandb(cfg, summary, plot)
    return {"answer": summary.answer, "report": str(out / "report.md"), "plot": str(plot)}


LEADERBOARD_COLUMNS = ["recipe", "setting", "effect", "lo", "hi", "accuracy", "length", "parse_failure", "degenerate",
                       "kl_generic", "kl_corpus", "kl_offtask"]


def log_to_wandb(cfg: SteeringBenchConfig, summary: BenchSummary, plot: Path) -> None:
    """The report's numbers as one W&B run: a leaderboard table per split, the plot, the answer and each recipe's
    effect in the summary, and the lineage from the SAE and the attributions it steered with."""
    from ...tracking import Tracker, use_inputs

    with Tracker(cfg.wandb, cfg.run_dir, cfg.name, "steering-bench") as tracker:
        use_inputs(tracker, saes=sae_specs(cfg), attribution_dirs=list(_attribution_dirs(cfg).values()))
        tracker.image("steering_bench/gain_vs_cost", plot)
        metrics = {"steering_bench/answer": summary.answer}
        for split, rows in summary.splits.items():
            table = []
            for name, row in rows.items():
                effect = row.effect or [0.0, 0.0, 0.0]
                cost = summary.capability.get(name, {})
                table.append([name, json.dumps(summary.recipes[name]["setting"]), *effect, row.accuracy,
                              row.length, row.parse_failure, row.degenerate,
                              cost.get("generic", {}).get("kl", 0.0), cost.get("corpus", {}).get("kl", 0.0),
                              cost.get("offtask", {}).get("kl", 0.0)])
                if name != "unsteered":
                    metrics[f"steering_bench/{split}/{name}/effect"] = effect[0]
            tracker.table(f"steering_bench/{split}", LEADERBOARD_COLUMNS, table)
        tracker.summary(metrics)
