#!/usr/bin/env bash
# session 12: build the extension, the CUDA decode tests, then one process per end-to-end row, in priority order,
# each bounded by what is left of the call (END). Usage on the device: [PART=2] OUT=dir bash .../run.sh
# (session 12's one call ran an earlier version of this file: all of part 1 and 2 with --modes-b8 graph,compiled)
set -uo pipefail
START=$(date +%s); END=$((START + ${BUDGET_S:-555}))
left() { local l=$((END - $(date +%s))); echo $(( l < $1 ? l : $1 )); }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD LLMC_CACHE=/tmp/llmc-cache MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a
if [ -f .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl ]; then
  python3 -m zipfile -e .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl /tmp/cutlass_whl >/dev/null
  export LLMC_CUTLASS_DIR=/tmp/cutlass_whl/cutlass_library/source/include
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "from llmcompress.kernels import ops, build; print(ops.backend('cuda'), 'cutlass:', build.cutlass_include())" 2>&1 | tail -3
echo "build: $(( $(date +%s) - START )) s"
timeout $(left 120) python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_decode.py -k cuda > $OUT/tests.log 2>&1
tail -3 $OUT/tests.log; echo "tests done at $(( $(date +%s) - START )) s"
W=$OUT/w; mkdir -p $W  # at most 8 files come back: the logs travel as one archive
E="python3 benchmarks/e2e_speed.py --out $W"
row() { local t=$1; shift; timeout -k 5 $(left $t) $E "$@" > $W/log_$2_$4.txt 2>&1; echo "$* rc=$? at $(( $(date +%s) - START )) s"; }
# Each part fits one device call (the build takes 75 s, each torch.compile of the 8B step about 55 s). Ratios need
# bf16 in the same call, so part 2 times it again at batch 1 (graph only: no compile).
if [ "${PART:-1}" = 1 ]; then
  row 170 --model 8b --scheme bf16 --profile
  row 220 --model 8b --scheme w4a16_g128 --profile --pdl-ab
else
  row 40 --model 8b --scheme bf16 --batches 1 --modes graph
  row 90 --model 8b --scheme w8a8_dynamic --batches 1
  row 80 --model 8b --scheme torch_int4_g128 --batches 1 --modes graph,compiled
  row 80 --model 8b --scheme fp8_dynamic --batches 1
  row 60 --model 1b --scheme bf16
  row 60 --model 1b --scheme w4a16_g128
fi
python3 benchmarks/e2e_speed.py --table $W
cp $W/rows.jsonl $W/e2e_speed.md $OUT/; tar czf $OUT/logs.tgz -C $W . && rm -rf $W
