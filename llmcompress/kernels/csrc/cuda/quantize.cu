// Per-token symmetric quantizers, int8 and fp8 E4M3: one block per row, amax reduction, then an IEEE divide
// and a round-half-to-even conversion, bit-identical to reference.quantize_per_token (int8) and
// quant.fp8.quantize_activations (fp8). Build without fast math.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_fp8.h>

#include <algorithm>
#include <type_traits>

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

// A row's scale from each thread's partial max |x| over its elements: the block's max (warp shuffles, then the warps'
// maxima through warp_max, 32 floats of shared memory) / C::kMax; 1 for an all-zero row (or one whose scale
// underflows). Every thread of the block must call it.
template <typename C>
__device__ __forceinline__ float row_scale(float amax, float* warp_max) {
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) amax = fmaxf(amax, warp_max[w]);
  const float s = amax / C::kMax;
  return s > 0.f ? s : 1.f;
}

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
    s = row_scale<C>(amax, warp_max);
  }
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  typename C::Q* qr = q + blockIdx.x * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) qr[k] = C::code(to_float(xr[k]) / s);
}

// The same quantizer for rows of 16-byte vectors (K a multiple of 16 / sizeof(T), x 16-byte aligned), each
// thread holding its R vectors in registers between the amax and the conversion: x is read once, in 16-byte loads,
// and the codes stored 4 or 8 at a time. The scalar kernel above read every element twice, 2 bytes at a time, and
// stored bytes: on an H100 it took 20 us a call in a 1B model's 2048-token prefill, a third of its int8 GEMMs' time.
template <typename C, typename T, int R>
__global__ void quantize_rows_vec(const T* __restrict__ x, const float* __restrict__ static_scale,
                                  typename C::Q* __restrict__ q, float* __restrict__ scale, int64_t K) {
  constexpr int E = 16 / sizeof(T);  // elements per vector
  using Packed = std::conditional_t<E == 8, uint2, uint32_t>;
  __shared__ float warp_max[32];
  const int V = int(K / E);
  const uint4* xr = reinterpret_cast<const uint4*>(x + blockIdx.x * K);
  uint4 v[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * blockDim.x;
    v[r] = i < V ? xr[i] : make_uint4(0, 0, 0, 0);
  }
  float s;
  if (static_scale != nullptr) {
    s = *static_scale;
  } else {
    float amax = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const T* e = reinterpret_cast<const T*>(&v[r]);
#pragma unroll
      for (int j = 0; j < E; ++j) amax = fmaxf(amax, fabsf(to_float(e[j])));
    }
    s = row_scale<C>(amax, warp_max);
  }
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  Packed* qr = reinterpret_cast<Packed*>(q + blockIdx.x * K);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * blockDim.x;
    if (i >= V) break;
    const T* e = reinterpret_cast<const T*>(&v[r]);
    union {
      Packed word;
      typename C::Q code[E];
    } out;
#pragma unroll
    for (int j = 0; j < E; ++j) out.code[j] = C::code(to_float(e[j]) / s);
    qr[i] = out.word;
  }
}

// Vectors per thread (R) and threads per block for the vector kernel; false where it does not apply.
inline bool vec_plan(int64_t K, size_t elem_bytes, const void* x, int& R, int& threads) {
  const int64_t E = 16 / int64_t(elem_bytes);
  if (K % E != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) return false;
  const int64_t V = K / E;
  for (R = 1; R <= 8; R *= 2)
    if (V <= int64_t(R) * 1024) break;
  if (R > 8) return false;
  threads = int(std::max<int64_t>(32, (V + R - 1) / R + 31) / 32 * 32);
  return true;
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
  int R = 0, vthreads = 0;
  if (knob(Knob::QUANT_SCALAR, 0) == 0 && vec_plan(K, x.element_size(), x.data_ptr(), R, vthreads)) {
    auto go = [&](auto* xp) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      switch (R) {
        case 1: quantize_rows_vec<C, T, 1><<<M, vthreads, 0, stream>>>(xp, sp, qp, s.data_ptr<float>(), K); break;
        case 2: quantize_rows_vec<C, T, 2><<<M, vthreads, 0, stream>>>(xp, sp, qp, s.data_ptr<float>(), K); break;
        case 4: quantize_rows_vec<C, T, 4><<<M, vthreads, 0, stream>>>(xp, sp, qp, s.data_ptr<float>(), K); break;
        default: quantize_rows_vec<C, T, 8><<<M, vthreads, 0, stream>>>(xp, sp, qp, s.data_ptr<float>(), K);
      }
    };
    if (x.scalar_type() == at::kFloat) go(x.data_ptr<float>());
    else if (x.scalar_type() == at::kBFloat16) go(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()));
    else go(reinterpret_cast<const __half*>(x.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {q, s};
  }
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
