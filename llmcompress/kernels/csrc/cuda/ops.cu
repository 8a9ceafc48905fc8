// Registers the CUDA kernels of the llmc ops (schemas: ../cpu/ops.cpp).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(llmc, CUDA, m) {
  m.impl("quantize_int8", &llmc::cuda::quantize_int8_cuda);
  m.impl("quantize_fp8", &llmc::cuda::quantize_fp8_cuda);
  m.impl("w8a8_mm", &llmc::cuda::w8a8_mm_cuda);
  m.impl("w4a16_mm", &llmc::cuda::w4a16_mm_cuda);
}
