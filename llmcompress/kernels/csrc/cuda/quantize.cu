// Per-token symmetric int8 quantizer: one block per row, amax reduction, then an IEEE divide and rintf
// (round half to even): bit-identical to reference.quantize_per_token. Build without fast math.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "common.cuh"
#include "ops.h"

namespace llmc::cuda {
namespace {

template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, const float* __restrict__ static_scale, int8_t* __restrict__ q,
                              float* __restrict__ scale, int64_t K) {
  __shared__ float warp_max[32];
  const T* xr = x + blockIdx.x * K;
  float s;
  if (static_scale != nullptr) {
    s = *static_scale;
  } else {
    float amax = 0.f;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(to_float(xr[k])));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) amax = fmaxf(amax, warp_max[w]);
    s = amax == 0.f ? 1.f : amax / 127.f;
  }
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  int8_t* qr = q + blockIdx.x * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    qr[k] = static_cast<int8_t>(fminf(fmaxf(rintf(to_float(xr[k]) / s), -127.f), 127.f));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  check_quantize_args(x, scale);
  TORCH_CHECK(x.is_contiguous(), "llmc::quantize_int8: x must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  at::Tensor st;
  if (scale) st = scale->to(x.device(), at::kFloat).reshape({1}).contiguous();
  // One block per row: enough threads that a decode-sized call (one row of 4096+) is not one slow block.
  const int threads = K >= 4096 ? 1024 : K >= 1024 ? 256 : 128;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* sp = st.defined() ? st.data_ptr<float>() : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat:
      quantize_rows<<<M, threads, 0, stream>>>(x.data_ptr<float>(), sp, q.data_ptr<int8_t>(), s.data_ptr<float>(), K);
      break;
    case at::kBFloat16:
      quantize_rows<<<M, threads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), sp,
                                               q.data_ptr<int8_t>(), s.data_ptr<float>(), K);
      break;
    default:
      quantize_rows<<<M, threads, 0, stream>>>(reinterpret_cast<const __half*>(x.data_ptr()), sp,
                                               q.data_ptr<int8_t>(), s.data_ptr<float>(), K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace llmc::cuda
