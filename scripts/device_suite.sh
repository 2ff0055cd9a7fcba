#!/usr/bin/env bash
# One device call for the engine figures: ceilings, the engine suite (single-step vs multi-step
# on one compiled engine) and the HF transformers baseline, all in the same run.
# Usage (GPU machine, repo root): bash scripts/device_suite.sh [engine|table|probes|mesh|kernel|int4|profile|steps]
#   table: issue 6's whole table in one call (~6 minutes on an H200): the engine suite at K=1 and 16
#          on b1, 128x128, 1024x128 and 1000x1000, serving (scripts/device_serve.sh: carry .whl), HF
#   probes: the GEMM probes (~6 minutes): scripts/bench_fp8_gemv.py (weight-only float8 GEMV, Pallas
#           vs XLA, one call each), scripts/bench_fp8_decode_stream.py (the same over 32 layers in one
#           program), scripts/bench_filter_radix.py (top-k / top-p without a sort),
#           scripts/bench_fp8_gemm.py (both float8 paths at 16-256 rows: where weight-only should stop), scripts/bench_mlp_fusion.py at 1,024 and 8,192 rows
#           (Triton off, row chunks), then the float8 engine on b1 / 128x128 / 1024x128
#   int4: the Mosaic-GPU 4-bit kernel's GPU tests (and the engine's layouts against each other), its per-projection sweep
#         (scripts/bench_int4_shapes.py), then the engine in AWQ-shaped 4 bits with
#         JAXSERVE_INT4_ROWS=0 (the words), unset (the Mosaic-GPU layout on Hopper, quads_zs load) and
#         wgmma (the plain load) on b1, b32, 128x128, 1024x128 (one process each)
#   kernel: the kernel's GPU tests, scripts/bench_attention.py (kernel vs its one-block loop vs JAX's
#           paged attention vs XLA) and the tile sweep; profile: the engine suite under the profiler
set -uo pipefail
MODE=${1:-engine}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
if [ "$MODE" = engine ]; then
  python3 scripts/bench_ceilings.py 2>&1 | grep '^{' | tee -a "$OUT/results.jsonl"
  python3 scripts/bench_engine_suite.py --steps ${STEPS:-1 8} 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  python3 scripts/bench_hf_baseline.py --batch-sizes 1 128 --input-len 128 --output-len 128 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
elif [ "$MODE" = table ]; then
  python3 scripts/bench_ceilings.py 2>&1 | grep '^{' | tee -a "$OUT/results.jsonl"
  python3 scripts/bench_engine_suite.py --steps 1 16 --workloads b1 128x128 1024x128 1000x1000 2>&1 \
    | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  BUDGETS=default bash scripts/device_serve.sh
  python3 scripts/bench_hf_baseline.py --batch-sizes 1 128 --input-len 128 --output-len 128 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
elif [ "$MODE" = probes ]; then
  python3 scripts/bench_ceilings.py 2>&1 | grep '^{' | tee -a "$OUT/results.jsonl"
  timeout 150 python3 scripts/bench_fp8_gemv.py 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  timeout 150 python3 scripts/bench_fp8_decode_stream.py --rows 1 16 2>&1 | tee -a "$OUT/log.txt" | grep '^{' \
    | tee -a "$OUT/results.jsonl"
  timeout 150 python3 scripts/bench_filter_radix.py 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  timeout 120 python3 scripts/bench_fp8_gemm.py --rows 16 64 128 256 2>&1 | tee -a "$OUT/log.txt" | grep '^{' \
    | tee -a "$OUT/results.jsonl"
  timeout 150 python3 scripts/bench_mlp_fusion.py --rows 1024 8192 2>&1 | tee -a "$OUT/log.txt" | grep '^{' \
    | tee -a "$OUT/results.jsonl"
  timeout 240 python3 scripts/bench_engine_suite.py --quantization fp8 --steps 1 --workloads b1 128x128 1024x128 \
    2>&1 | tee -a "$OUT/log.txt" | grep '^{\|jaxserve:' | tee -a "$OUT/results.jsonl"
elif [ "$MODE" = kernel ]; then
  python3 scripts/bench_ceilings.py 2>&1 | grep '^{' | tee -a "$OUT/results.jsonl"
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/pallas_kernels > "$OUT/kernel_tests.txt" 2>&1
  tail -5 "$OUT/kernel_tests.txt"
  timeout 400 python3 scripts/bench_attention.py ${ATTN_ARGS:---sweep} 2>&1 | grep -v Warn | tee "$OUT/attention.jsonl" | grep '^{' >> "$OUT/results.jsonl"
elif [ "$MODE" = int4 ]; then  # the 4-bit Mosaic-GPU layout (the Hopper default) against the words, one call
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -rf -m gpu tests/pallas_kernels/test_int4_mgpu.py \
    tests/models/test_int4.py > "$OUT/int4_tests.txt" 2>&1
  tail -3 "$OUT/int4_tests.txt"
  timeout 200 python3 scripts/bench_int4_shapes.py --rows 1 16 --iters 10 --configs engine engine:wgmma 2>&1 \
    | grep '^{' > "$OUT/int4_shapes.jsonl"
  grep best_over "$OUT/int4_shapes.jsonl" | cut -c1-300
  # the words (Triton kernel), the default (the Mosaic-GPU layout on Hopper, its quads_zs load), and
  # the plain wgmma load (the default until the seventeenth session)
  for rows in 0 "" wgmma; do
    JAXSERVE_INT4_ROWS=$rows timeout 170 python3 scripts/bench_engine_suite.py --quantization awq --steps 1 \
      --workloads ${WORKLOADS:-b1 b32 128x128 1024x128} 2>&1 | tee -a "$OUT/log.txt" | grep '^{' \
      | sed "s/^{/{\"int4_rows\": \"$rows\", /" | tee -a "$OUT/results.jsonl" | cut -c1-300
  done
elif [ "$MODE" = steps ]; then  # one engine step's GPU time: command buffers on (untraced) vs off (traced)
  python3 scripts/profile_engine.py --no-trace 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 scripts/profile_engine.py --trace-dir "$OUT/trace" 2>&1 \
    | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  rm -rf "$OUT/trace"
elif [ "$MODE" = profile ]; then
  python3 scripts/bench_engine_suite.py --steps ${STEPS:-8} --workloads ${WORKLOADS:-b1 128x128 1000x1000} \
    --profile "$OUT/trace" 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  rm -rf "$OUT/trace"
else
  for m in "" "--mesh"; do
    python3 scripts/bench_engine_suite.py $m --steps 1 8 --workloads b1 128x128 2>&1 | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/results.jsonl"
  done
fi
