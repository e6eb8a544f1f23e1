"""Shipped steering recipes, reproducible by a reader (issue 37 item 7).

The benchmark writes one folder per evaluated recipe under ``bench/recipes/<name>/`` (:func:`write_recipes`):
``recipe.json`` (the method, its chosen setting, the system prompt and worked examples, every SAE latent
intervention ``[layer, latent, kind, value, start]`` -- for a weighted step these are IPG's score vector turned
into per-latent gains -- and the model's name) and, for DiffMean-type recipes, ``vectors.safetensors`` (the
steering vectors); the SAEs they steer through are copied once to ``bench/recipes/sae/`` (sae-lens format).

``ipg-sae steer RECIPE_DIR --task.name jsonl --task.path FILE`` (:func:`run_apply`) applies such a folder
on-policy to any task or JSONL file, paired with the unsteered run (same prompts, same seeds), without
recomputing attribution: ``<runs_dir>/<name>/apply.json`` holds the per-problem rewards of both, the paired
effect with its bootstrap interval, and the shares of problems helped and hurt.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from ...errors import IPGError
from ...io import read_json, write_json
from ...steering import Intervention, VectorIntervention, add_vector
from .apply_config import SteerApplyConfig  # noqa: F401  (re-exported: the config lives torch-free)
from .recipes import Recipe

FORMAT = "ipg-sae-steering-recipe/1"


def write_recipes(root: Path, recipes: dict[str, Recipe], model_name: str, sae_dirs: dict[int, str | None]) -> dict:
    """One folder per recipe under ``root`` and the SAEs (local folders) copied to ``root/sae/layer_<L>``."""
    from safetensors.torch import save_file

    saes = {}
    for layer, path in sorted(sae_dirs.items()):
        if path is None:
            continue
        target = root / "sae" / f"layer_{layer}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(path, target)
        saes[str(layer)] = f"../sae/layer_{layer}"
    for name, recipe in recipes.items():
        folder = root / name.replace("@", "_at_").replace("#", "_draw")
        folder.mkdir(parents=True, exist_ok=True)
        vectors = [iv for iv in recipe.interventions if isinstance(iv, VectorIntervention)]
        doc = {"format": FORMAT, "name": name, "method": recipe.method, "setting": recipe.setting,
               "label": recipe.label, "scope": recipe.scope, "system_prompt": recipe.system_prompt,
               "few_shot": recipe.few_shot, "model": model_name, "saes": saes,
               "interventions": [[iv.layer, iv.latent, iv.kind, iv.value, iv.start] for iv in recipe.interventions
                                 if isinstance(iv, Intervention)],
               "vectors": [{"layer": iv.layer, "coef": iv.coef, "start": iv.start, "tensor": f"vector_{i}"}
                           for i, iv in enumerate(vectors)]}
        if vectors:
            save_file({f"vector_{i}": iv.vector.detach().float().contiguous() for i, iv in enumerate(vectors)},
                      str(folder / "vectors.safetensors"))
        write_json(folder / "recipe.json", doc)
    return {"recipes": len(recipes), "saes": sorted(saes)}


def load_recipe(folder: str | Path) -> tuple[Recipe, dict]:
    """A shipped recipe folder as a :class:`Recipe` (and its ``recipe.json``)."""
    folder = Path(folder)
    path = folder / "recipe.json"
    if not path.is_file():
        raise IPGError(f"{folder} is not a steering recipe folder (no recipe.json); the steering benchmark writes "
                       "them under <run>/bench/recipes/")
    doc = read_json(path)
    if doc.get("format") != FORMAT:
        raise IPGError(f"{path} is not a steering recipe of this version (format {doc.get('format')!r})")
    interventions: list = [Intervention(int(l), int(i), k, float(v), int(s)) for l, i, k, v, s in doc["interventions"]]
    if doc["vectors"]:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "vectors.safetensors"))
        interventions += [add_vector(v["layer"], tensors[v["tensor"]], v["coef"], v["start"]) for v in doc["vectors"]]
    recipe = Recipe(doc["method"], doc["setting"], interventions, doc["system_prompt"], doc["scope"], doc["few_shot"])
    return recipe, doc


def run_apply(cfg: SteerApplyConfig) -> dict:
    """Apply ``cfg.recipe`` on-policy to ``cfg.task``, paired with the unsteered run: ``apply.json``."""
    from ...models import load_model
    from ...saes import SAESpec, as_layer_dict, load_saes
    from ...sampling import sample
    from ...stats import bootstrap
    from ...steering import steering
    from ...tasks import build_prompts, load_problems
    from ...trajectories import prompt_groups, save_trajectories
    from .summary import helped_hurt

    recipe, doc = load_recipe(cfg.recipe)
    model_cfg = dataclasses.replace(cfg.model, name=doc["model"])
    model, tokenizer = load_model(model_cfg)
    folder = Path(cfg.recipe)
    saes = as_layer_dict(load_saes([SAESpec(path=str((folder / p).resolve())) for p in doc["saes"].values()], model)) \
        if doc["saes"] else {}
    problems = load_problems(cfg.task)
    task = cfg.task
    if recipe.system_prompt:
        task = dataclasses.replace(task, system_prompt=recipe.system_prompt)
    if recipe.few_shot is not None:
        task = dataclasses.replace(task, few_shot=recipe.few_shot)
    runs = {"unsteered": (build_prompts(tokenizer, problems, cfg.task), None),
            "steered": (build_prompts(tokenizer, problems, task),
                        steering(model, saes, recipe.interventions, scope=recipe.scope) if recipe.interventions
                        else None)}
    per_problem = {}
    for which, (prompts, intervention) in runs.items():
        rewards = []
        for seed in cfg.seeds:
            out = sample(model, tokenizer, problems, prompts, dataclasses.replace(cfg.sampling, seed=seed),
                         cfg.reward, intervention=intervention, desc=f"{which} (seed {seed})")
            save_trajectories(cfg.run_dir / f"{which}_s{seed}.jsonl", out)
            _, groups = prompt_groups([t.prompt_id for t in out])
            rewards.append([float(np.mean([out[i].reward for i in g])) for g in groups])
        per_problem[which] = np.mean(rewards, axis=0)
    steered, base = per_problem["steered"], per_problem["unsteered"]
    helped, hurt = helped_hurt(list(steered), list(base))
    result = {"recipe": doc["name"], "label": doc["label"], "task": dataclasses.asdict(cfg.task),
              "problems": [p.id for p in problems], "seeds": cfg.seeds,
              "unsteered": base.tolist(), "steered": steered.tolist(),
              "effect": list(bootstrap(steered, base, n_boot=cfg.n_bootstrap)), "helped": helped, "hurt": hurt}
    write_json(cfg.run_dir / "apply.json", result)
    return result
