#!/usr/bin/env bash
# One device call: install carried wheels (.whl), measure the ceilings, run jaxserve's benchmarks on
# Llama-3-8B-shaped dummy weights and the HF transformers baseline on the same shapes.
# Usage (on the GPU machine, repo root): bash scripts/device_bench.sh [quick|full]
set -uo pipefail
MODE=${1:-full}
source scripts/device_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())"
python3 scripts/bench_ceilings.py | tee -a "$OUT/results.jsonl"
M="--model llama-3-8b --load-format dummy --max-model-len 2048 --json"
python3 -m jaxserve bench latency $M --batch-size 1 --input-len 32 --output-len 128 --num-iters 2 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
python3 -m jaxserve bench throughput $M --input-len 128 --output-len 128 --num-prompts 512 --max-num-seqs 256 --max-num-batched-tokens 4096 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
if [ "$MODE" != quick ]; then
  python3 -m jaxserve bench throughput $M --input-len 1024 --output-len 128 --num-prompts 256 --max-num-seqs 256 --max-num-batched-tokens 8192 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
fi
if [ "$MODE" = full ]; then
  python3 scripts/bench_hf_baseline.py --batch-sizes 1 32 128 --input-len 128 --output-len 128 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
fi
