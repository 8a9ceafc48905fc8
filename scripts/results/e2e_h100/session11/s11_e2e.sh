#!/usr/bin/env bash
# session 11: build the extension, then the end-to-end bf16 / W4A16 rows (session 9's table, now with PDL decode)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD LLMC_CACHE=/tmp/llmc-cache MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "from llmcompress.kernels import ops; assert ops.backend('cuda')!='reference'" 2>&1 | tail -3 || exit 1
for m in 8b 1b; do for s in bf16 w4a16_g128; do
  timeout 150 python3 scripts/e2e_speed.py --models $m --schemes $s --out $OUT/e2e_${m}_$s 2>&1 | grep -v -i warn | tail -4
done; done
