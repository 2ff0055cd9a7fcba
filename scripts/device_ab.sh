#!/usr/bin/env bash
# Same-call A/B of the engine suite: a baseline tree (BASE, e.g. `git archive <commit>` unpacked)
# against this tree, on the same machine, one process each, baseline first.
# Usage (GPU machine, repo root): BASE=.bench_base STEPS="1 16" WORKLOADS="b1 128x128" \
#   ASYNC="on off" NEW_ARGS="--timeline" ARGS="--kv-cache-dtype fp8" bash scripts/device_ab.sh
# (ARGS: for both trees; NEW_ARGS: this tree only)
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
PYTHONPATH=$PWD python3 scripts/bench_ceilings.py 2>&1 | grep '^{' | tee -a "$OUT/results.jsonl"
(cd "$BASE" && PYTHONPATH=$PWD python3 scripts/bench_engine_suite.py --steps ${STEPS:-1 16} \
   --workloads ${WORKLOADS:-b1 128x128} ${ARGS:-} 2>&1 | tee -a "$OUT/log_base.txt" | grep '^{' \
   | sed 's/^{/{"tree": "base", /' | tee -a "$OUT/results.jsonl")
PYTHONPATH=$PWD python3 scripts/bench_engine_suite.py --steps ${STEPS:-1 16} --async-scheduling ${ASYNC:-on off} ${NEW_ARGS:-} ${ARGS:-} \
   --workloads ${WORKLOADS:-b1 128x128} 2>&1 | tee -a "$OUT/log_new.txt" | grep '^{' \
   | sed 's/^{/{"tree": "new", /' | tee -a "$OUT/results.jsonl"
