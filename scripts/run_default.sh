#!/usr/bin/env bash
# The main job: set up, then generate with the embedded default model (SmolLM2-135M-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/jaxserve generate --max-tokens 48 --temperature 0 \
  --prompt "The capital of France is" \
  --prompt "Write a haiku about the sea." "$@"
