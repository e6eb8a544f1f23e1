"""Issue 24 point 7: reproduce study v1's held-out samples (seed 0, G 8) and its confirmation's unsteered run
(seed 1, 4 per problem) at the v1 code (a88ad21), and check the evaluation path against the held-out path.
Run: cd <worktree at a88ad21> && PYTHONPATH=. OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python v1_gap.py OUT_DIR"""
import dataclasses, json, sys, time
from pathlib import Path
import numpy as np
import ipg_sae
from ipg_sae.config import load_config
from ipg_sae.experiments.study import StudyConfig
from ipg_sae.models import load_model
from ipg_sae.tasks import load_problems, build_prompts
from ipg_sae.sampling import sample
from ipg_sae.evaluation import EvalConfig, evaluate

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
print("ipg_sae from", ipg_sae.__file__, flush=True)
cfg = load_config(StudyConfig, "configs/study_smollm2.yaml")
model, tok = load_model(cfg.model)
problems = load_problems(cfg.heldout)
prompts = build_prompts(tok, problems, cfg.heldout)
res = {"code": "a88ad21", "heldout_sampling": dataclasses.asdict(cfg.heldout_sampling)}

def stats(acc, lens):
    return {"accuracy": float(np.mean(acc)), "mean_length": float(np.mean(lens)), "n": len(acc)}

t = time.time()
held = sample(model, tok, problems, prompts, cfg.heldout_sampling, "correctness", progress=False)
res["heldout_path_seed0_g8"] = {**stats([x.correct for x in held], [len(x.completion_ids) for x in held]),
                                "seconds": time.time() - t}
print(res, flush=True)

def eval_path(seed, n):
    sampling = dataclasses.replace(cfg.heldout_sampling, n_samples=n, seed=seed)
    ev = EvalConfig(estimator="sampling", gammas=[0.0], seeds=[seed], k=None, n_random_sets=0, sampling=sampling,
                    reward="correctness", task=cfg.heldout, n_bootstrap=cfg.n_bootstrap)
    d = out / f"eval_s{seed}_g{n}"
    r = evaluate(model, tok, {}, problems, prompts, {}, ev, out_dir=d, progress=False)
    rows = [s for s in r.samples if s["set"] == "none"]
    cell = next((d / "cells").glob(f"none__s{seed}*.jsonl"))
    traj = [json.loads(l) for l in cell.read_text().splitlines()[1:]]
    return rows, traj

t = time.time()
rows_b, traj_b = eval_path(0, 8)
key = lambda x: (x["prompt_id"], x["sample_index"])
by_b = {key(x): x for x in traj_b}
same = sum(by_b[(h.prompt_id, h.sample_index)]["completion_ids"] == h.completion_ids and
           by_b[(h.prompt_id, h.sample_index)]["prompt_ids"] == h.prompt_ids for h in held)
res["eval_path_seed0_g8"] = {**stats([r["correct"] for r in rows_b], [r["length"] for r in rows_b]),
                             "token_identical_to_heldout_path": same, "seconds": time.time() - t}
print(res, flush=True)
t = time.time()
rows_c, _ = eval_path(1, 4)
res["eval_path_seed1_g4"] = {**stats([r["correct"] for r in rows_c], [r["length"] for r in rows_c]),
                             "seconds": time.time() - t}
# per problem, for a paired comparison
pid = [p.id for p in problems]
def per_problem(rows, f):
    return [float(np.mean([f(r) for r in rows if r["problem_id"] == p])) for p in pid]
res["per_problem"] = {"heldout_seed0_g8": [float(np.mean([x.correct for x in held if x.prompt_id == p])) for p in pid],
                      "eval_seed1_g4": per_problem(rows_c, lambda r: r["correct"])}
(out / "v1_gap.json").write_text(json.dumps(res, indent=1))
print({k: v for k, v in res.items() if k != "per_problem"}, flush=True)
