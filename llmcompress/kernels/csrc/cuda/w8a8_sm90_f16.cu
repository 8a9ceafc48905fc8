// The fp16-output instance of w8a8_sm90.cuh.
#include "w8a8_sm90.cuh"
LLMC_W8A8_SM90(w8a8_sm90_f16, cutlass::half_t)
