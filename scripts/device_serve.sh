#!/usr/bin/env bash
# One device call for the serving figures: for each step token budget in BUDGETS, start
# `jaxserve serve` on Llama-3-8B-shaped dummy weights, run `jaxserve bench serve` (random 1024 in /
# 128 out at RATE requests/s, Poisson), stop the server. Needs the server's wheels carried in .whl
# (litestar, msgspec, uvicorn and their dependencies; see /work/.library/device/README.md).
# Usage (GPU machine, repo root): BUDGETS="default 2048 1024" RATE=16 bash scripts/device_serve.sh
set -uo pipefail
source scripts/device_env.sh || exit 1
RATE=${RATE:-16}
NUM=${NUM:-320}
for B in ${BUDGETS:-2048}; do
  # B = "default": neither --max-num-seqs nor --max-num-batched-tokens (the server's usage defaults)
  if [ "$B" = default ]; then sizes=""; else sizes="--max-num-seqs 256 --max-num-batched-tokens $B"; fi
  python3 -m jaxserve serve --model llama-3-8b --load-format dummy --max-model-len 2048 $sizes \
    --port 8000 ${SERVE_ARGS:-} > "$OUT/server_$B.log" 2>&1 &
  pid=$!
  ok=0
  for _ in $(seq 240); do
    if curl -sf http://127.0.0.1:8000/health > /dev/null; then ok=1; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  if [ $ok = 1 ]; then
    python3 -m jaxserve bench serve --base-url http://127.0.0.1:8000 --request-rate "$RATE" --num-prompts "$NUM" \
      --input-len 1024 --output-len 128 --vocab-size 128256 --max-model-len 2048 --json 2>&1 \
      | tee -a "$OUT/log.txt" | grep '^{' | sed "s/^{/{\"max_num_batched_tokens\": \"$B\", \"serve_args\": \"${SERVE_ARGS:-}\", /" | tee -a "$OUT/results.jsonl"
  else
    echo "server with budget $B did not come up"; tail -20 "$OUT/server_$B.log"
  fi
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
done
