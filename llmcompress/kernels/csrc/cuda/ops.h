// CUDA implementations of the llmc ops (one .cu file each), registered in ops.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace llmc::cuda {

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale);
std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale);
at::Tensor w8a8_mm_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);
at::Tensor w4a16_mm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, const std::optional<at::Tensor>& bias);

}  // namespace llmc::cuda
