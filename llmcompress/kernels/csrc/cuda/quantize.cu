// Per-token symmetric quantizers, int8 and fp8 E4M3: one block per row, amax reduction, then an IEEE divide
// and a round-half-to-even conversion, bit-identical to reference.quantize_per_token (int8) and
// quant.fp8.quantize_activations (fp8). Build without fast math.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_fp8.h>

#include "../checks.h"
#include "common.cuh"
#include "ops.h"

namespace llmc::cuda {
namespace {

struct Int8Codes {
  using Q = int8_t;
  static constexpr float kMax = 127.f;
  __device__ __forceinline__ static Q code(float v) { return static_cast<int8_t>(fminf(fmaxf(rintf(v), -kMax), kMax)); }
};
struct Fp8Codes {
  using Q = __nv_fp8_storage_t;
  static constexpr float kMax = 448.f;  // largest finite E4M3
  __device__ __forceinline__ static Q code(float v) {
    return __nv_cvt_float_to_fp8(fminf(fmaxf(v, -kMax), kMax), __NV_SATFINITE, __NV_E4M3);
  }
};

template <typename C, typename T>
__global__ void quantize_rows(const T* __restrict__ x, const float* __restrict__ static_scale,
                              typename C::Q* __restrict__ q, float* __restrict__ scale, int64_t K) {
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
    s = amax / C::kMax;
    if (!(s > 0.f)) s = 1.f;  // an all-zero row (or one whose scale underflows)
  }
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  typename C::Q* qr = q + blockIdx.x * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) qr[k] = C::code(to_float(xr[k]) / s);
}

template <typename C>
std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                 at::ScalarType qtype, const char* op) {
  check_quantize_args(x, scale, op);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(qtype));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  at::Tensor st;
  if (scale) st = scale->to(x.device(), at::kFloat).reshape({1}).contiguous();
  // One block per row: enough threads that a decode-sized call (one row of 4096+) is not one slow block.
  const int threads = K >= 4096 ? 1024 : K >= 1024 ? 256 : 128;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* sp = st.defined() ? st.data_ptr<float>() : nullptr;
  auto* qp = reinterpret_cast<typename C::Q*>(q.data_ptr());
  switch (x.scalar_type()) {
    case at::kFloat:
      quantize_rows<C><<<M, threads, 0, stream>>>(x.data_ptr<float>(), sp, qp, s.data_ptr<float>(), K);
      break;
    case at::kBFloat16:
      quantize_rows<C><<<M, threads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), sp, qp,
                                                  s.data_ptr<float>(), K);
      break;
    default:
      quantize_rows<C><<<M, threads, 0, stream>>>(reinterpret_cast<const __half*>(x.data_ptr()), sp, qp,
                                                  s.data_ptr<float>(), K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  return quantize_cuda<Int8Codes>(x, scale, at::kChar, "llmc::quantize_int8");
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  return quantize_cuda<Fp8Codes>(x, scale, at::kFloat8_e4m3fn, "llmc::quantize_fp8");
}

}  // namespace llmc::cuda
