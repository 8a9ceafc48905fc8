// W4A16 on CUDA: int4 weights (group scales, optional zero points) x bf16/fp16 activations.
//
// Packed layout (made once by ops.pack_w4a16 on a CUDA tensor, "cuda-mma"): int32 words
// [ceil(N/16), Kp/64, 32 lanes, 4 steps], Kp = K rounded up to 64. Word (tile, chunk, lane, s) holds the
// 8 codes that lane owns in the mma.m16n8k16 A fragment of k-step 4 * chunk + s: nibble j is register
// r = j % 4 element j / 4, so `(word >> 4r) & 0x000F000F | magic` yields the register's two values as
// bf16/fp16 (128 + u or 1024 + u) in one LOP3, and subtracting (magic + zero) leaves u - z exactly. The
// group scale is applied to the fp32 accumulator once per group run, not to every weight. A lane's 16-byte
// load covers 4 k-steps, and a warp's load is 512 contiguous bytes.
//
// Decode (M <= 64): one block of 8 warps per 16 output features, warps splitting K, partial sums reduced in
// shared memory. Prefill (larger M): 2048-row chunks of the weight are dequantized to the activation dtype
// and multiplied with cuBLAS, so at most one chunk of full-precision weight exists at a time.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>

#include "../checks.h"
#include "common.cuh"
#include "ops.h"

namespace llmc::cuda {
namespace {

// Two consecutive activations x[tok][k], x[tok][k + 1] as one register (zero past M or K).
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* x, int tok, int M, int64_t k, int64_t K) {
  if (tok >= M || k >= K) return 0u;
  const T* p = x + (int64_t)tok * K + k;
  if ((K & 1) == 0) return *reinterpret_cast<const uint32_t*>(p);
  const uint16_t lo = *reinterpret_cast<const uint16_t*>(p);
  const uint16_t hi = k + 1 < K ? *reinterpret_cast<const uint16_t*>(p + 1) : uint16_t(0);
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
    w4a16_decode(const T* __restrict__ x, const uint4* __restrict__ qw, const float* __restrict__ scales,
                 const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N,
                 int64_t K, int G, int group_size, int chunks) {
  using Op = Mma<T>;
  constexpr int U = 4;  // 16-byte weight loads in flight per lane
  const int nt = blockIdx.x, m0 = blockIdx.y * 8 * MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = nt * 16 + g, row1 = row0 + 8;
  float acc[MT][4], part[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = part[mt][e] = 0.f;
  int group = -1;
  float s0 = 0.f, s1 = 0.f;
  uint32_t z0 = 0, z1 = 0;
  const uint4* base = qw + (int64_t)nt * chunks * 32 + lane;

  for (int c0 = warp; c0 < chunks; c0 += kWarps * U) {
    uint4 q[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kWarps;
      q[u] = c < chunks ? ld_stream(base + (int64_t)c * 32) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kWarps;
      const uint32_t words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int64_t k0 = (int64_t(c) * 4 + s) * 16;
        if (c >= chunks || k0 >= K) continue;  // warp-uniform
        const int gi = int(k0 / group_size);
        if (gi != group) {  // warp-uniform: fold the finished group into the total, then load the new one
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            acc[mt][0] += s0 * part[mt][0], acc[mt][1] += s0 * part[mt][1];
            acc[mt][2] += s1 * part[mt][2], acc[mt][3] += s1 * part[mt][3];
            part[mt][0] = part[mt][1] = part[mt][2] = part[mt][3] = 0.f;
          }
          group = gi;
          s0 = row0 < N ? scales[(int64_t)row0 * G + gi] : 0.f;
          s1 = row1 < N ? scales[(int64_t)row1 * G + gi] : 0.f;
          const float zf0 = zeros != nullptr && row0 < N ? float(zeros[(int64_t)row0 * G + gi]) : 8.f;
          const float zf1 = zeros != nullptr && row1 < N ? float(zeros[(int64_t)row1 * G + gi]) : 8.f;
          z0 = Op::pair(Op::kBias + zf0, Op::kBias + zf0);
          z1 = Op::pair(Op::kBias + zf1, Op::kBias + zf1);
        }
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = Op::sub(((words[s] >> (4 * r)) & 0x000F000Fu) | Op::kMagic, (r & 1) ? z1 : z0);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int tok = m0 + mt * 8 + g;
          Op::mma(part[mt], a, load_pair(x, tok, M, k0 + 2 * t, K), load_pair(x, tok, M, k0 + 2 * t + 8, K));
        }
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    acc[mt][0] += s0 * part[mt][0], acc[mt][1] += s0 * part[mt][1];
    acc[mt][2] += s1 * part[mt][2], acc[mt][3] += s1 * part[mt][3];
  }

  __shared__ float red[kWarps][MT * 4][32];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][mt * 4 + e][lane] = acc[mt][e];
  __syncthreads();
  for (int i = threadIdx.x; i < MT * 4 * 32; i += blockDim.x) {
    const int l = i & 31, e = i >> 5;
    float v = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) v += red[wi][e][l];
    const int row = nt * 16 + (l >> 2) + ((e & 3) >= 2 ? 8 : 0);
    const int tok = m0 + (e >> 2) * 8 + 2 * (l & 3) + (e & 1);
    if (row < N && tok < M) {
      if (bias != nullptr) v += to_float(bias[row]);
      out[(int64_t)tok * N + row] = from_float<T>(v);
    }
  }
}

// Rows [n0, n0 + rows) of the weight, dequantized into w [rows, K]; one thread per packed word.
template <typename T>
__global__ void w4a16_dequant(const uint32_t* __restrict__ qw, const float* __restrict__ scales,
                              const uint8_t* __restrict__ zeros, T* __restrict__ w, int n0, int rows, int N, int64_t K,
                              int G, int group_size, int chunks) {
  const int64_t words = (int64_t)((rows + 15) / 16) * chunks * 128;
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= words) return;
  const int s = i & 3, lane = (i >> 2) & 31;
  const int64_t c = (i >> 7) % chunks;
  const int nt = int((i >> 7) / chunks) + n0 / 16;
  const uint32_t word = qw[(((int64_t)nt * chunks + c) * 32 + lane) * 4 + s];
  const int g = lane >> 2, t = lane & 3;
  const int64_t k0 = (c * 4 + s) * 16;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int r = j & 3, half = j >> 2;
    const int row = nt * 16 + g + 8 * (r & 1);
    const int64_t k = k0 + 2 * t + 8 * (r >> 1) + half;
    if (row < N && row - n0 < rows && k < K) {
      const int gi = int(k / group_size);
      const float z = zeros != nullptr ? float(zeros[(int64_t)row * G + gi]) : 8.f;
      w[(int64_t)(row - n0) * K + k] = from_float<T>((float((word >> (4 * j)) & 0xF) - z) * scales[(int64_t)row * G + gi]);
    }
  }
}

int decode_max_m() {
  const char* env = std::getenv("LLMC_W4_DECODE_MAX_M");
  return env != nullptr ? std::atoi(env) : 64;
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
         const at::Tensor& bias, int group_size, at::Tensor& out) {
  const int M = x.size(0), N = scales.size(0), G = scales.size(1);
  const int64_t K = x.size(1);
  const int chunks = int((K + 63) / 64);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const uint8_t* zp = zeros.defined() ? zeros.data_ptr<uint8_t>() : nullptr;
  if (M <= decode_max_m()) {
    const T* bp = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
    T* op = reinterpret_cast<T*>(out.data_ptr());
    auto go = [&](auto kernel, int mt) {
      const dim3 grid((N + 15) / 16, (M + 8 * mt - 1) / (8 * mt));
      kernel<<<grid, kWarps * 32, 0, stream>>>(xp, reinterpret_cast<const uint4*>(qweight.data_ptr()),
                                               scales.data_ptr<float>(), zp, bp, op, M, N, K, G, group_size, chunks);
    };
    if (M <= 8) go(w4a16_decode<T, 1>, 1);
    else if (M <= 16) go(w4a16_decode<T, 2>, 2);
    else if (M <= 32) go(w4a16_decode<T, 4>, 4);
    else go(w4a16_decode<T, 8>, 8);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int kRows = 2048;
  at::Tensor w = at::empty({std::min(N, kRows), K}, x.options());
  for (int n0 = 0; n0 < N; n0 += kRows) {
    const int rows = std::min(kRows, N - n0);
    const int64_t words = (int64_t)((rows + 15) / 16) * chunks * 128;
    w4a16_dequant<T><<<(words + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(qweight.data_ptr()), scales.data_ptr<float>(), zp,
        reinterpret_cast<T*>(w.data_ptr()), n0, rows, N, K, G, group_size, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor wc = w.narrow(0, 0, rows);
    if (rows == N) at::mm_out(out, x, wc.t());
    else out.narrow(1, n0, rows).copy_(at::mm(x, wc.t()));
  }
  if (bias.defined()) out.add_(bias);
}

}  // namespace

at::Tensor w4a16_mm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "llmc::w4a16_mm: x must be contiguous 2-D [M, K], got ", x.sizes());
  check_float(x, "x");
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0,
              "llmc::w4a16_mm (CUDA): group_size must be a multiple of 16, got ", group_size);
  const int64_t K = x.size(1), N = scales.size(0), G = (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == G && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "llmc::w4a16_mm (CUDA): scales must be contiguous float32 [N, ceil(K/group_size)]=[", N, ", ", G,
              "] (use ops.pack_w4a16), got ", scales.scalar_type(), " ", scales.sizes());
  const int64_t words = (N + 15) / 16 * ((K + 63) / 64) * 128;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.numel() == words,
              "llmc::w4a16_mm (CUDA): qweight must be the int32 'cuda-mma' layout of ops.pack_w4a16 with ", words,
              " words for N=", N, ", K=", K, "; got ", qweight.scalar_type(), " ", qweight.sizes());
  if (zeros)
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->sizes() == scales.sizes() && zeros->is_contiguous(),
                "llmc::w4a16_mm: zeros must be contiguous uint8 like scales ", scales.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  // fp32 activations run through the bf16 tensor cores; the result is returned as fp32.
  const at::Tensor xc = x.scalar_type() == at::kFloat ? x.to(at::kBFloat16) : x;
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "llmc::w4a16_mm: bias must be [", N, "], got ", bias->sizes());
    b = bias->to(xc.scalar_type()).contiguous();
  }
  at::Tensor out = at::empty({x.size(0), N}, xc.options());
  if (x.size(0) > 0 && N > 0) {
    const at::Tensor z = zeros ? *zeros : at::Tensor();
    if (xc.scalar_type() == at::kHalf) run<__half>(xc, qweight, scales, z, b, group_size, out);
    else run<__nv_bfloat16>(xc, qweight, scales, z, b, group_size, out);
  }
  return x.scalar_type() == at::kFloat ? out.to(at::kFloat) : out;
}

}  // namespace llmc::cuda
