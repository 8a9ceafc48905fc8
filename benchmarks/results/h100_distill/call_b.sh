#!/usr/bin/env bash
# Call B (after a call that copied the first 57 MB of the GGUF to /tmp/g/part0): distill-data (>= 2,000 prompts), seed 0 of the three arms one after another (their tokens/s and peak
# memory are the reported throughput), the teacher and the untrained student as references; everything scored.
set -uo pipefail
bash benchmarks/results/h100_distill/setup.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD LLMC_CACHE=/tmp/llmc-cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 560 python3 benchmarks/distill_experiment.py --data data --device cuda --seeds 0 --work /tmp/kd/work --out /tmp/kd/s0 \
  2>&1 | grep -v -E "Loading weights|clean_up_tokenization" | tee $OUT/kd_s0.log
cp /tmp/kd/s0/results.json $OUT/kd_s0.json
