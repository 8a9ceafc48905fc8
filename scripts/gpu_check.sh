#!/usr/bin/env bash
# One device call: build the extension (CPU + CUDA) just in time, run the kernel tests (CPU and CUDA), then
# the benchmark. Logs and results land in $OUT (default ./gpu_out). Usage: bash scripts/gpu_check.sh [bench args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} LLMC_CACHE=${LLMC_CACHE:-/tmp/llmc-cache} MAX_JOBS=16
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # 9.0a: wgmma for the CUTLASS W8A8 GEMM
# CUTLASS headers for the W8A8 GEMM: the nvidia-cutlass wheel carried in .whl/ (pip download --no-deps
# nvidia-cutlass); build.py also finds its tools/util/include beside include/
for w in .whl/nvidia_cutlass-*.whl; do
  [ -f "$w" ] && python3 -m zipfile -e "$w" /tmp/cutlass_whl && export LLMC_CUTLASS_DIR=/tmp/cutlass_whl/cutlass_library/source/include
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/build.log"
lscpu | grep -E "Model name|Flags" | grep -o -E "Model name.*|avx512_vnni|avx512f |amx_tile" | sort -u | tee -a "$OUT/build.log"
{ time python3 -c "
from llmcompress.kernels import ops
print('backends:', ops.backend('cpu'), ops.backend('cuda'))
assert ops.backend('cuda') != 'reference', 'CUDA kernels did not build'
"; } 2>&1 | tail -40 | tee -a "$OUT/build.log"
timeout 150 python3 -m pytest -q -rf --tb=line --maxfail=40 tests/kernels -p no:cacheprovider > "$OUT/tests.log" 2>&1; grep -E "^E |Error|^FAILED|passed|failed" "$OUT/tests.log" | tail -45
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_kernels.py --device cuda --out "$OUT/h100" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
