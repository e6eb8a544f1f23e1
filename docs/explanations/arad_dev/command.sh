#!/bin/bash
# Arad et al.'s filter on the study's SAE: IPG's top 16 (correctness, the study's 60 attributed problems) vs its
# output-score-filtered subset, on-policy on the steering benchmark's dev split (50 level-1 problems at offset 2000,
# left out of the SAE's corpus, disjoint from the study's attributed and held-out problems).
# From the repository root, after `ipg-sae study configs/study_smollm2.yaml` (through its attribute stage) and
# benchmarks/explain_measure.py on runs/study/correctness (see ../README.md).
OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/ipg-sae evaluate runs/study/correctness/explanations/evaluate_filtered.yaml \
  --wandb.enabled false \
  --evaluation.k null --evaluation.estimator sampling --evaluation.gammas '[0, 2]' --evaluation.seeds '[0]' --evaluation.n_random_sets 0 \
  --evaluation.task.name arithmetic --evaluation.task.level 1 --evaluation.task.n_problems 50 --evaluation.task.offset 2000 \
  --evaluation.task.seed 0 --evaluation.task.few_shot 1 \
  --evaluation.sampling.n_samples 8 --evaluation.sampling.temperature 0.5 --evaluation.sampling.max_new_tokens 96 \
  --evaluation.sampling.batch_size 96 --evaluation.sampling.backend loop --evaluation.reward correctness
