// Registers the CUDA kernels of the llmc ops (schemas: ../cpu/ops.cpp), and the op that forces a kernel choice.
#include <torch/library.h>

#include <optional>
#include <string>

#include "common.cuh"
#include "ops.h"

namespace {

// Tests and sweeps: force one of the dispatchers' choices (common.cuh: Knob), or with None restore the choice
// by shape. Not thread-safe against concurrent GEMM calls; the tests set it between calls.
void force_cuda_variant(const std::string& name, std::optional<int64_t> value) {
  using namespace llmc::cuda;
  for (int k = 0; k < int(Knob::kCount); ++k) {
    if (name == kKnobNames[k]) {
      forced_knobs().set[k] = value.has_value();
      forced_knobs().value[k] = value.has_value() ? int(*value) : 0;
      return;
    }
  }
  std::string known;
  for (const char* n : kKnobNames) known += std::string(known.empty() ? "" : ", ") + n;
  TORCH_CHECK(false, "_force_cuda_variant: unknown knob '", name, "' (known: ", known, ")");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmc, m) {
  m.def("_force_cuda_variant(str name, int? value) -> ()", &force_cuda_variant);
}

TORCH_LIBRARY_IMPL(llmc, CUDA, m) {
  m.impl("quantize_int8", &llmc::cuda::quantize_int8_cuda);
  m.impl("quantize_fp8", &llmc::cuda::quantize_fp8_cuda);
  m.impl("w8a8_mm", &llmc::cuda::w8a8_mm_cuda);
  m.impl("w4a16_mm", &llmc::cuda::w4a16_mm_cuda);
}
