#!/usr/bin/env bash
# Issue 40's GPU rows in one device session (about 9 minutes of a 10-minute command): the IPG group pass, the
# sampler against its floor (with and without sampling.compile) and SAE training, at Qwen2.5-Math-1.5B shapes in
# bfloat16 with random weights. Each script has its own time limit, so one that runs long costs only its own row;
# each writes its section of results/cuda-<gpu>.json as it finishes (the machine is named from the GPU).
#
#   bash benchmarks/gpu_rows.sh            # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_rows.sh    # the same commands on a tiny CPU model (tests/test_benchmarks_smoke.py)
set -u
PY=${PY:-python3}
if [ -n "${SMOKE:-}" ]; then
    A=(--smoke --threads 1 --machine "${MACHINE:-smoke-test}" --results-dir "${RESULTS_DIR:-benchmarks/results}")
else
    A=(--device cuda --dtype bfloat16 --shape qwen2.5-math-1.5b)
fi
failed=0
run() {  # run LIMIT_S SCRIPT ARGS...: one benchmark under its own limit; a failure is reported, the rest still run
    local limit=$1 script=$2
    shift 2
    echo "== $script $* (limit ${limit} s)"
    if ! timeout "$limit" "$PY" "benchmarks/$script" "$@" "${A[@]}"; then
        echo "!! $script failed or ran past ${limit} s" >&2
        failed=1
    fi
}
run 200 bench_attribution.py --repeats 3 --skip-memory
run 150 bench_sampling.py --compile --repeats 1 --new-tokens 64
run 180 bench_training.py --repeats 1
exit $failed
