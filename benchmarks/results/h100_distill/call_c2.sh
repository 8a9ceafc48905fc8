# Call C as run (from a folder with llmcompress/, scripts/, data/; /tmp/site and /tmp/kd/work left by call B):
# scores seed 0, trains + scores seed 1 of each arm, and runs the task students, all concurrently, 400 s each.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD LLMC_CACHE=/tmp/llmc-cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ls /tmp/kd/work
timeout 400 python3 benchmarks/distill_experiment.py --data data --device cuda --seeds 0 --work /tmp/kd/work --out /tmp/kd/s0 > /tmp/kd/s0.log 2>&1 &
for arm in ce kd_stored kd_online; do
  timeout 400 python3 benchmarks/distill_experiment.py --data data --device cuda --seeds 1 --arms $arm --skip-reference --work /tmp/kd/work --out /tmp/kd/s1_$arm > /tmp/kd/s1_$arm.log 2>&1 &
done
timeout 400 python3 benchmarks/task_students.py --data data --device cuda --out /tmp/task --cpu-latency > /tmp/task.log 2>&1 &
wait
for f in s0 s1_ce s1_kd_stored s1_kd_online; do grep -E "^train|^score|Error" /tmp/kd/$f.log | cut -c1-400; cp /tmp/kd/$f/results.json $OUT/kd_$f.json; done
grep -v -E "Loading weights|clean_up" /tmp/task.log | tail -8; cp /tmp/task/task_students.json $OUT/
