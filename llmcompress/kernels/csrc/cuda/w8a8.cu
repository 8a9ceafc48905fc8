// W8A8: int8 activations x int8 weights on the int8 tensor cores (mma.sync m16n8k32), int32 accumulation,
// and a fused epilogue y = acc * x_scale[m] * w_scale[n] + bias[n] in the output dtype.
//
// Decode shapes (M <= 16, or any shape the prefill GEMMs cannot take): one block of 8 warps per 16 output
// features; the warps split K and reduce their int32 partials in shared memory. Each lane loads 16
// contiguous bytes of weight (rows g and g + 8) and of activations (token g): the mma's k order only has to
// be the same for A and B, so 16-byte loads feed two k32 steps without any repacking of the checkpoint.
// Prefill shapes: the CUTLASS sm90 wgmma GEMM with the epilogue fused (w8a8_sm90.cuh) where built, else
// cuBLASLt's int8 GEMM (torch._int_mm) for the int32 product and a separate epilogue kernel.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "common.cuh"
#include "ops.h"
#include "w8a8_sm90.cuh"

namespace llmc::cuda {
namespace {

// 16 bytes of row `row` from column k (k % 16 == 0); zero past the matrix. `vec`: K % 16 == 0.
template <bool kStream>
__device__ __forceinline__ uint4 load16(const int8_t* p, int row, int rows, int64_t k, int64_t K, bool vec) {
  if (row >= rows || k >= K) return make_uint4(0, 0, 0, 0);
  const int8_t* src = p + (int64_t)row * K + k;
  if (vec) return kStream ? ld_stream_l2_256(src) : *reinterpret_cast<const uint4*>(src);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i)  // unrolled so w stays in registers
    if (k + i < K) w[i >> 2] |= uint32_t(uint8_t(src[i])) << (8 * (i & 3));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// This lane's activation rows for the decode kernels: token g of each 8-token tile, its 16-byte column t (chunk
// c at + 4 c); rows past M read row 0 and are flagged invalid.
template <int MT>
struct TokenRows {
  const uint4* r[MT];
  bool v[MT];
  __device__ __forceinline__ TokenRows(const int8_t* x, int m0, int g, int t, int M, int64_t K) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int tok = m0 + mt * 8 + g;
      v[mt] = tok < M;
      r[mt] = reinterpret_cast<const uint4*>(x + (int64_t)(v[mt] ? tok : 0) * K) + t;
    }
  }
};

// The fused epilogue: y = acc * x_scale[tok] * w_scale[row] + bias[row] in the output dtype.
template <typename TO>
__device__ __forceinline__ void store_scaled(TO* out, const float* xs, const float* ws, const float* bias, int N,
                                             int row, int tok, int v) {
  float y = float(v) * xs[tok] * ws[row];
  if (bias != nullptr) y += bias[row];
  out[(int64_t)tok * N + row] = from_float<TO>(y);
}

// kAligned (K % 64 == 0, 16-byte aligned rows, K < 2^30) is the decode fast path: 32-bit indexing, rows
// clamped instead of bounds-checked per load, and few enough registers for four blocks per SM (one wave at
// N = 8192). Otherwise every 16-byte load checks its row and columns (ragged K, any alignment).
// kPipe (aligned path only, the default there): two register banks of two chunks each, the weights and activations of one bank in
// flight while the other is multiplied, so a warp's loads never drain between batches (the plain loop loads
// four chunks, waits for them, multiplies, and only then loads the next four).
template <typename TO, int MT, bool kAligned, bool kPipe = false>
__global__ void __launch_bounds__(kWarps * 32, kAligned ? (MT == 1 ? 4 : 3) : 1)
    w8a8_decode(const int8_t* __restrict__ x, const float* __restrict__ xs, const int8_t* __restrict__ w,
                const float* __restrict__ ws, const float* __restrict__ bias, TO* __restrict__ out, int M, int N,
                int64_t K) {
  constexpr int U = 4;  // 64-column chunks in flight per warp
  const int nt = blockIdx.x, m0 = blockIdx.y * 8 * MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = nt * 16 + g, row1 = row0 + 8;
  const bool vec = (K & 15) == 0;
  const int chunks = int((K + 63) / 64);
  // aligned path: this lane's 16-byte column of rows g, g + 8 and of its tokens, chunk c at + 4 c
  const uint4* w0 = reinterpret_cast<const uint4*>(w + (int64_t)min(row0, N - 1) * K) + t;
  const uint4* w1 = reinterpret_cast<const uint4*>(w + (int64_t)min(row1, N - 1) * K) + t;
  const TokenRows<MT> tr(x, m0, g, t, M, K);
  const uint4* const* xr = tr.r;
  const bool* xv = tr.v;
  int acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0;

  if constexpr (kPipe) {
    static_assert(kAligned, "the pipelined loop has no bounds checks");
    constexpr int P = 2;  // chunks per bank (3, with three blocks per SM, ran 27.4 against 26.8 us at M = 1)
    struct Bank {
      uint4 wa[P], wb[P], xb[P][MT];
    };
    auto load = [&](Bank& bk, int cbase) {
#pragma unroll
      for (int u = 0; u < P; ++u) {
        const int c = cbase + u * kWarps;
        const bool in = c < chunks;
        bk.wa[u] = in ? ld_stream_l2_256(w0 + c * 4) : make_uint4(0, 0, 0, 0);
        bk.wb[u] = in ? ld_stream_l2_256(w1 + c * 4) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) bk.xb[u][mt] = in && xv[mt] ? __ldg(xr[mt] + c * 4) : make_uint4(0, 0, 0, 0);
      }
    };
    auto multiply = [&](const Bank& bk) {
#pragma unroll
      for (int u = 0; u < P; ++u) {  // chunks past K hold zeros: multiplying them adds nothing
        const uint32_t a_lo[4] = {bk.wa[u].x, bk.wb[u].x, bk.wa[u].y, bk.wb[u].y};
        const uint32_t a_hi[4] = {bk.wa[u].z, bk.wb[u].z, bk.wa[u].w, bk.wb[u].w};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_s8(acc[mt], a_lo, bk.xb[u][mt].x, bk.xb[u][mt].y);
          mma_s8(acc[mt], a_hi, bk.xb[u][mt].z, bk.xb[u][mt].w);
        }
      }
    };
    Bank b0, b1;
    load(b0, warp);
    for (int c0 = warp; c0 < chunks; c0 += 2 * kWarps * P) {
      load(b1, c0 + kWarps * P);
      multiply(b0);
      load(b0, c0 + 2 * kWarps * P);
      multiply(b1);
    }
  } else
  for (int c0 = warp; c0 < chunks; c0 += kWarps * U) {
    uint4 wa[U], wb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kWarps;
      if constexpr (kAligned) {
        wa[u] = c < chunks ? ld_stream_l2_256(w0 + c * 4) : make_uint4(0, 0, 0, 0);
        wb[u] = c < chunks ? ld_stream_l2_256(w1 + c * 4) : make_uint4(0, 0, 0, 0);
      } else {
        const int64_t k = (int64_t)c * 64 + 16 * t;
        wa[u] = load16<true>(w, row0, N, k, K, vec);
        wb[u] = load16<true>(w, row1, N, k, K, vec);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kWarps;
      if (kAligned && c >= chunks) break;  // (the general path's loads gave zeros there)
      const uint32_t a_lo[4] = {wa[u].x, wb[u].x, wa[u].y, wb[u].y};
      const uint32_t a_hi[4] = {wa[u].z, wb[u].z, wa[u].w, wb[u].w};
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint4 b;
        if constexpr (kAligned) b = xv[mt] ? __ldg(xr[mt] + c * 4) : make_uint4(0, 0, 0, 0);
        else b = load16<false>(x, m0 + mt * 8 + g, M, (int64_t)c * 64 + 16 * t, K, vec);
        mma_s8(acc[mt], a_lo, b.x, b.y);
        mma_s8(acc[mt], a_hi, b.z, b.w);
      }
    }
  }

  reduce_warps_store<kWarps, MT>(acc, nt, m0, M, N, [&](int row, int tok, int v) {
    store_scaled(out, xs, ws, bias, N, row, tok, v);
  });
}

// Decode with two 16-feature tiles per block (aligned shapes, M > 8): each activation load feeds the mmas
// of both tiles, so every block reads the activations for 32 output features instead of 16. At M = 16 and
// K = 8192 the 512 blocks of the one-tile kernel read 64 MB of activations from L2, as much as the weights.
// Two banks of one chunk each (the registers of two tiles), four blocks per SM.
template <typename TO, int MT>
__global__ void __launch_bounds__(kWarps * 32, 4)
    w8a8_decode_pair(const int8_t* __restrict__ x, const float* __restrict__ xs, const int8_t* __restrict__ w,
                     const float* __restrict__ ws, const float* __restrict__ bias, TO* __restrict__ out, int M, int N,
                     int64_t K) {
  constexpr int NT = 2;
  const int nt0 = blockIdx.x * NT, m0 = blockIdx.y * 8 * MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int chunks = int(K / 64);
  const uint4* wr[NT][2];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wr[j][h] = reinterpret_cast<const uint4*>(w + (int64_t)min((nt0 + j) * 16 + g + 8 * h, N - 1) * K) + t;
  const TokenRows<MT> tr(x, m0, g, t, M, K);
  const uint4* const* xr = tr.r;
  const bool* xv = tr.v;
  int acc[NT][MT][4] = {};
  struct Bank {
    uint4 w[NT][2], xb[MT];
  };
  auto load = [&](Bank& bk, int c) {
    const bool in = c < chunks;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) bk.w[j][h] = in ? ld_stream_l2_256(wr[j][h] + c * 4) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) bk.xb[mt] = in && xv[mt] ? __ldg(xr[mt] + c * 4) : make_uint4(0, 0, 0, 0);
  };
  auto multiply = [&](const Bank& bk) {  // chunks past K hold zeros: multiplying them adds nothing
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint32_t a_lo[4] = {bk.w[j][0].x, bk.w[j][1].x, bk.w[j][0].y, bk.w[j][1].y};
      const uint32_t a_hi[4] = {bk.w[j][0].z, bk.w[j][1].z, bk.w[j][0].w, bk.w[j][1].w};
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_s8(acc[j][mt], a_lo, bk.xb[mt].x, bk.xb[mt].y);
        mma_s8(acc[j][mt], a_hi, bk.xb[mt].z, bk.xb[mt].w);
      }
    }
  };
  Bank b0, b1;
  load(b0, warp);
  for (int c0 = warp; c0 < chunks; c0 += 2 * kWarps) {
    load(b1, c0 + kWarps);
    multiply(b0);
    load(b0, c0 + 2 * kWarps);
    multiply(b1);
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    if (j > 0) __syncthreads();  // the reduction's shared buffer is read before it is refilled
    reduce_warps_store<kWarps, MT>(acc[j], nt0 + j, m0, M, N, [&](int row, int tok, int v) {
      store_scaled(out, xs, ws, bias, N, row, tok, v);
    });
  }
}

template <typename TO>
__global__ void scale_epilogue(const int* __restrict__ acc, const float* __restrict__ xs, const float* __restrict__ ws,
                               const float* __restrict__ bias, TO* __restrict__ out, int64_t M, int64_t N) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i - m * N;
  float y = float(acc[i]) * xs[m] * ws[n];
  if (bias != nullptr) y += bias[n];
  out[i] = from_float<TO>(y);
}

template <typename TO>
void launch_decode(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                   const float* bias, at::Tensor& out) {
  const int M = x_q.size(0), N = w_q.size(0);
  const int64_t K = x_q.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  TO* o = reinterpret_cast<TO*>(out.data_ptr());
  const dim3 block(kWarps * 32);
  auto go = [&](auto kernel, int mt) {
    const dim3 grid((N + 15) / 16, (M + 8 * mt - 1) / (8 * mt));
    kernel<<<grid, block, 0, stream>>>(x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), w_q.data_ptr<int8_t>(),
                                       w_scale.data_ptr<float>(), bias, o, M, N, K);
  };
  const bool fast = K % 64 == 0 && K < (int64_t(1) << 30) && reinterpret_cast<uintptr_t>(x_q.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(w_q.data_ptr()) % 16 == 0;
  // The double-banked loop on the aligned path (Knob::W8_DECODE_PIPE = 0 turns it off, for comparisons). On H100
  // (e3399bd:scripts/results/h100_w8_pipe): M = 16 30.1 against 33.1 us at 8192 x 8192 and 25.7 against 28.7 at
  // 4096 x 14336; M = 8 27.6 / 23.8 against 28.4 / 26.9; M = 1 within run-to-run noise (27.1 / 23.3 against 26.6 / 23.8).
  const bool pipe = knob(Knob::W8_DECODE_PIPE, 1) != 0;
  // Two feature tiles per block at M = 9..16 where their blocks fill the SMs in one wave (four per SM). On H100
  // (e3399bd:scripts/results/h100_w8_pair), M = 16: 8192 x 8192 27.1 against 29.7 us, 4096 x 14336 23.8 against 25.3.
  // Where SMs would sit idle (N = 4096: 10.3 against 8.8) it loses; at M <= 8 it is level or worse.
  // Knob::W8_DECODE_PAIR = 0/1 forces the choice (tests, sweeps).
  const int tiles = (N + 15) / 16;
  const int sms = sm_count();
  const bool one_wave = (tiles + 1) / 2 >= sms && (tiles + 1) / 2 <= 4 * sms;
  if (fast && pipe && knob(Knob::W8_DECODE_PAIR, M > 8 && one_wave ? 1 : 0) != 0) {
    const dim3 grid((tiles + 1) / 2, (M + 15) / 16);
    if (M <= 8) w8a8_decode_pair<TO, 1><<<dim3(grid.x, (M + 7) / 8), block, 0, stream>>>(
        x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), w_q.data_ptr<int8_t>(), w_scale.data_ptr<float>(), bias, o, M, N, K);
    else w8a8_decode_pair<TO, 2><<<grid, block, 0, stream>>>(
        x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), w_q.data_ptr<int8_t>(), w_scale.data_ptr<float>(), bias, o, M, N, K);
  } else if (fast && M <= 8) pipe ? go(w8a8_decode<TO, 1, true, true>, 1) : go(w8a8_decode<TO, 1, true>, 1);
  else if (fast && M <= 16) pipe ? go(w8a8_decode<TO, 2, true, true>, 2) : go(w8a8_decode<TO, 2, true>, 2);
  else if (M <= 8) go(w8a8_decode<TO, 1, false>, 1);
  else if (M <= 16) go(w8a8_decode<TO, 2, false>, 2);
  else if (M <= 32) go(w8a8_decode<TO, 4, false>, 4);
  else go(w8a8_decode<TO, 8, false>, 8);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TO>
void launch_epilogue(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale, const float* bias,
                     at::Tensor& out) {
  const int64_t M = acc.size(0), N = acc.size(1), threads = 256;
  scale_epilogue<<<(M * N + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      acc.data_ptr<int>(), x_scale.data_ptr<float>(), w_scale.data_ptr<float>(), bias,
      reinterpret_cast<TO*>(out.data_ptr()), M, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor w8a8_mm_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_w8a8_args(x_q, x_scale, w_q, w_scale);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "llmc::w8a8_mm: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  const c10::cuda::CUDAGuard guard(x_q.device());
  const int64_t M = x_q.size(0), N = w_q.size(0), K = x_q.size(1);
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "llmc::w8a8_mm: bias must be [", N, "], got ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({M, N}, x_q.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  // cuBLASLt int8 (torch._int_mm) wants M > 16 and K, N multiples of 8; it wins once weights are reused.
  // Measured on H100 at 8192x8192: the decode kernel wins to M = 16; at M = 32 _int_mm already beat it.
  const bool prefill = M > 16 && K % 8 == 0 && N % 8 == 0 && K >= 16;
  if (M > 16) {
    const bool done = out_dtype == at::kBFloat16 ? w8a8_sm90_bf16(x_q, x_scale, w_q, w_scale, bp, out)
                    : out_dtype == at::kHalf     ? w8a8_sm90_f16(x_q, x_scale, w_q, w_scale, bp, out)
                                                 : w8a8_sm90_f32(x_q, x_scale, w_q, w_scale, bp, out);
    if (done) return out;
  }
  if (prefill) {
    const at::Tensor acc = at::_int_mm(x_q, w_q.t());
    if (out_dtype == at::kFloat) launch_epilogue<float>(acc, x_scale, w_scale, bp, out);
    else if (out_dtype == at::kBFloat16) launch_epilogue<__nv_bfloat16>(acc, x_scale, w_scale, bp, out);
    else launch_epilogue<__half>(acc, x_scale, w_scale, bp, out);
  } else {
    if (out_dtype == at::kFloat) launch_decode<float>(x_q, x_scale, w_q, w_scale, bp, out);
    else if (out_dtype == at::kBFloat16) launch_decode<__nv_bfloat16>(x_q, x_scale, w_q, w_scale, bp, out);
    else launch_decode<__half>(x_q, x_scale, w_q, w_scale, bp, out);
  }
  return out;
}

}  // namespace llmc::cuda
