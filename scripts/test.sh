#!/usr/bin/env bash
# The test suite on the CPU (what CI runs): set up, then pytest. GPU tests are skipped here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -m "not gpu" --durations=15 tests --nbmake notebooks "$@"
