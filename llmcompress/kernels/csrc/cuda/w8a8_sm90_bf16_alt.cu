// Alternative large-M tiles of the bf16-output W8A8 GEMM, for the benchmark's tile sweep (LLMC_W8A8_CFG).
#include "w8a8_sm90.cuh"
LLMC_W8A8_SM90_ALT
