// The bf16-output instance of w8a8_sm90.cuh (one output dtype per file so they compile in parallel).
#include "w8a8_sm90.cuh"
LLMC_W8A8_SM90(w8a8_sm90_bf16, cutlass::bfloat16_t)
