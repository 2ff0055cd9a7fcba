#!/usr/bin/env bash
# One device call for the kernel and the engine: GPU correctness tests of the kernel, the attention
# benchmark, then engine benchmarks on Llama-3-8B-shaped dummy weights. Logs go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 scripts/bench_ceilings.py | tee -a "$OUT/results.jsonl"
if [ -z "${SKIP_KERNEL:-}" ]; then
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=line -rf tests/pallas_kernels > "$OUT/kernel_tests.txt" 2>&1; tail -3 "$OUT/kernel_tests.txt"
timeout 240 python3 scripts/bench_attention.py ${ATTN_ARGS:-} 2>&1 | grep -v Warn | tee "$OUT/attention.jsonl" | grep '^{' >> "$OUT/results.jsonl"
fi
M="--model llama-3-8b --load-format dummy --max-model-len 2048 --json"
for spec in "latency --batch-size 1 --input-len 32 --output-len 128 --num-iters 2" \
            "throughput --input-len 128 --output-len 128 --num-prompts 512 --max-num-seqs 256 --max-num-batched-tokens 4096" \
            "throughput --input-len 1024 --output-len 128 --num-prompts 256 --max-num-seqs 256 --max-num-batched-tokens 8192"; do
  timeout ${ENGINE_TIMEOUT:-200} python3 -m jaxserve bench $spec $M ${ENGINE_ARGS:-} 2>&1 | grep -v "Processed\|Warn\|bfc_alloc" | tee -a "$OUT/engine.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
done
