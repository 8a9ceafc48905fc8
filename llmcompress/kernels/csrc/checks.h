// Argument checks shared by the CPU and CUDA implementations of the llmc ops (defined in cpu/ops.cpp),
// so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace llmc {

void check_float(const at::Tensor& t, const char* name);
void check_quantize_args(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                         const char* op = "llmc::quantize_int8");
void check_w8a8_args(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale);
void check_w4a16_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, int64_t group_size);

}  // namespace llmc
