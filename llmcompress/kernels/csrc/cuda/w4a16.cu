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


// ---------------------------------------------------------------------------------------------------------
// Fast paths. They need K % 64 == 0 (whole chunks), a power-of-two group of >= 16 (so the group of a k-step
// is a shift), and 16-byte aligned activations; run() sends anything else to the kernels above.

// Group bookkeeping shared by the fast kernels: a warp walks its k-steps in order, so the group advances by
// one at a time and the next group's scales / zero points are loaded one group ahead, off the critical path.
template <typename T>
struct GroupCursor {
  const float *s0p, *s1p;
  const uint8_t *z0p, *z1p;
  int G, cur;
  float s0, s1, ns0, ns1;
  uint32_t z0, z1, nz0, nz1;  // (bias + zero) pairs to subtract from the magic-number codes

  __device__ __forceinline__ static uint32_t zpair(const uint8_t* zp, int gi) {
    const float z = zp != nullptr ? float(zp[gi]) : 8.f;
    return Mma<T>::pair(Mma<T>::kBias + z, Mma<T>::kBias + z);
  }
  __device__ __forceinline__ void start(const float* scales, const uint8_t* zeros, int row0, int row1, int N, int G_,
                                        int g0) {
    G = G_;
    s0p = scales + (int64_t)min(row0, N - 1) * G;
    s1p = scales + (int64_t)min(row1, N - 1) * G;
    z0p = zeros != nullptr ? zeros + (int64_t)min(row0, N - 1) * G : nullptr;
    z1p = zeros != nullptr ? zeros + (int64_t)min(row1, N - 1) * G : nullptr;
    cur = g0;
    s0 = s0p[g0], s1 = s1p[g0], z0 = zpair(z0p, g0), z1 = zpair(z1p, g0);
    prefetch(min(g0 + 1, G - 1));
  }
  __device__ __forceinline__ void prefetch(int gn) {
    ns0 = s0p[gn], ns1 = s1p[gn], nz0 = zpair(z0p, gn), nz1 = zpair(z1p, gn);
  }
  __device__ __forceinline__ void advance() {  // to group cur + 1
    ++cur;
    s0 = ns0, s1 = ns1, z0 = nz0, z1 = nz1;
    prefetch(min(cur + 1, G - 1));
  }
  // The A fragment of one k-step (word: 8 codes), zero point removed, unscaled (exact small integers).
  __device__ __forceinline__ void codes(uint32_t word, uint32_t* a) const {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = Mma<T>::sub(((word >> (4 * r)) & 0x000F000Fu) | Mma<T>::kMagic, (r & 1) ? z1 : z0);
  }
};

// Decode, M <= 32: one block of 8 warps per 16 output features; each warp takes a contiguous run of K chunks
// and keeps U of its 512-byte weight loads in flight. Partial sums stay unscaled in fp32 for a group and are
// scaled once when the group ends; the warps' sums are added in shared memory.
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
    w4a16_gemv(const T* __restrict__ x, const uint4* __restrict__ qw, const float* __restrict__ scales,
               const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
               int G, int gshift, int chunks) {
  constexpr int U = 8;
  const int nt = blockIdx.x, m0 = blockIdx.y * 8 * MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = nt * 16 + g, row1 = row0 + 8;
  const int per = (chunks + kWarps - 1) / kWarps;
  const int cb = min(chunks, warp * per), ce = min(chunks, cb + per);
  float acc[MT][4], part[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = part[mt][e] = 0.f;

  if (cb < ce) {  // warp-uniform; a warp past the end still joins the reduction below
    const uint4* wp = qw + ((int64_t)nt * chunks + cb) * 32 + lane;
    const unsigned int* xr[MT];
    bool xv[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int tok = m0 + mt * 8 + g;
      xv[mt] = tok < M;
      xr[mt] = reinterpret_cast<const unsigned int*>(x + (int64_t)(xv[mt] ? tok : 0) * K + 2 * t);
    }
    GroupCursor<T> gc;
    gc.start(scales, zeros, row0, row1, N, G, (cb * 4) >> gshift);
    for (int c = cb; c < ce; c += U) {
      uint4 q[U];
#pragma unroll
      for (int u = 0; u < U; ++u) q[u] = c + u < ce ? ld_stream(wp + (int64_t)(c - cb + u) * 32) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u >= ce) break;
        const uint32_t words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const int ks = (c + u) * 4 + s;
          if ((ks >> gshift) != gc.cur) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              acc[mt][0] += gc.s0 * part[mt][0], acc[mt][1] += gc.s0 * part[mt][1];
              acc[mt][2] += gc.s1 * part[mt][2], acc[mt][3] += gc.s1 * part[mt][3];
              part[mt][0] = part[mt][1] = part[mt][2] = part[mt][3] = 0.f;
            }
            gc.advance();
          }
          uint32_t a[4];
          gc.codes(words[s], a);
          const int k2 = ks * 8;  // k / 2: index in 32-bit pairs
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint32_t b0 = xv[mt] ? __ldg(xr[mt] + k2) : 0u;
            const uint32_t b1 = xv[mt] ? __ldg(xr[mt] + k2 + 4) : 0u;
            Mma<T>::mma(part[mt], a, b0, b1);
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] += gc.s0 * part[mt][0], acc[mt][1] += gc.s0 * part[mt][1];
      acc[mt][2] += gc.s1 * part[mt][2], acc[mt][3] += gc.s1 * part[mt][3];
    }
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

// Mid-size M (prefill of short prompts, batched decode): a block computes 32 tokens x 128 output features,
// one 16-feature tile per warp, all warps walking the same K chunks. The block's activation chunk (32 tokens
// x 64 k) is staged in shared memory by cp.async, kStages deep, XOR-swizzled so ldmatrix reads hit 8
// distinct bank groups; every warp reuses it, so activations cost 1/8 of what per-warp loads would. Weights
// stream from global memory into registers U chunks ahead. Here the group scale multiplies the dequantized
// weight in the activation dtype (one rounding, as a bf16 copy of the weight would have), which keeps one
// fp32 accumulator set instead of two. Token blocks vary fastest in the grid, so the blocks that read the
// same weights run together and share them through L2.
constexpr int kTileTok = 32;
constexpr int kStages = 4;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    w4a16_tiled(const T* __restrict__ x, const uint4* __restrict__ qw, const float* __restrict__ scales,
                const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                int G, int gshift, int chunks) {
  constexpr int MT = kTileTok / 8, U = 4;
  __shared__ __align__(128) uint4 xs[kStages][kTileTok * 8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * kTileTok;
  const int tiles = (N + 15) / 16;
  const int nt = min(blockIdx.y * kWarps + warp, tiles - 1);  // a warp past N recomputes the last tile, unstored
  const bool store = blockIdx.y * kWarps + warp < tiles;
  const int row0 = nt * 16 + g, row1 = row0 + 8;

  // Staging: thread i copies 16 bytes (8 activations) of token row i / 8, unit i % 8, of every chunk.
  const int lr = threadIdx.x >> 3, lu = threadIdx.x & 7;
  const bool lvalid = m0 + lr < M;
  const T* lsrc = x + (int64_t)(lvalid ? m0 + lr : 0) * K + lu * 8;
  const int ldst = lr * 8 + (lu ^ (lr & 7));
  auto stage = [&](int c) {
    if (c < chunks) cp_async16(&xs[c % kStages][ldst], lsrc + (int64_t)c * 64, lvalid);
    cp_async_commit();  // an empty group keeps the wait counts uniform
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) stage(s);

  const uint4* wp = qw + (int64_t)nt * chunks * 32 + lane;
  uint4 q[U];
#pragma unroll
  for (int u = 0; u < U; ++u) q[u] = u < chunks ? ld_stream(wp + u * 32) : make_uint4(0, 0, 0, 0);

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;
  GroupCursor<T> gc;
  gc.start(scales, zeros, row0, row1, N, G, 0);
  uint32_t sc0 = Mma<T>::pair(gc.s0, gc.s0), sc1 = Mma<T>::pair(gc.s1, gc.s1);

  for (int c0 = 0; c0 < chunks; c0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u;
      if (c >= chunks) break;  // block-uniform
      cp_async_wait<kStages - 2>();
      __syncthreads();          // chunk c is visible to all; everyone is done with chunk c - 1's stage
      stage(c + kStages - 1);   // refill that stage
      const uint32_t words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
      q[u] = c + U < chunks ? ld_stream(wp + (int64_t)(c + U) * 32) : make_uint4(0, 0, 0, 0);
      const uint4* st = xs[c % kStages];
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) {  // two k-steps per ldmatrix.x4
        uint32_t a[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ks = c * 4 + 2 * s2 + h;
          if ((ks >> gshift) != gc.cur) {
            gc.advance();
            sc0 = Mma<T>::pair(gc.s0, gc.s0), sc1 = Mma<T>::pair(gc.s1, gc.s1);
          }
          gc.codes(words[2 * s2 + h], a[h]);
#pragma unroll
          for (int r = 0; r < 4; ++r) a[h][r] = Mma<T>::mul(a[h][r], (r & 1) ? sc1 : sc0);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int row = mt * 8 + (lane & 7);
          uint32_t b[4];
          ldmatrix_x4(b, &st[row * 8 + ((4 * s2 + (lane >> 3)) ^ (lane & 7))]);
          Mma<T>::mma(acc[mt], a[0], b[0], b[1]);
          Mma<T>::mma(acc[mt], a[1], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  if (!store) return;
  const float b0 = bias != nullptr && row0 < N ? to_float(bias[row0]) : 0.f;
  const float b1 = bias != nullptr && row1 < N ? to_float(bias[row1]) : 0.f;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e >= 2 ? row1 : row0;
      const int tok = m0 + mt * 8 + 2 * t + (e & 1);
      if (row < N && tok < M) out[(int64_t)tok * N + row] = from_float<T>(acc[mt][e] + (e >= 2 ? b1 : b0));
    }
}

int env_int(const char* name, int fallback) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::atoi(env) : fallback;
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
  const T* bp = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const uint4* wq = reinterpret_cast<const uint4*>(qweight.data_ptr());
  const int steps = group_size / 16;
  const bool fast = K % 64 == 0 && (steps & (steps - 1)) == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                    K < (int64_t(1) << 30) && !std::getenv("LLMC_W4_GENERIC");
  if (fast && M <= env_int("LLMC_W4_TILED_MAX_M", 256)) {
    const int gshift = __builtin_ctz(steps);
    if (M <= env_int("LLMC_W4_GEMV_MAX_M", 32)) {
      auto go = [&](auto kernel, int mt) {
        const dim3 grid((N + 15) / 16, (M + 8 * mt - 1) / (8 * mt));
        kernel<<<grid, kWarps * 32, 0, stream>>>(xp, wq, scales.data_ptr<float>(), zp, bp, op, M, N, int(K), G, gshift,
                                                 chunks);
      };
      if (M <= 8) go(w4a16_gemv<T, 1>, 1);
      else if (M <= 16) go(w4a16_gemv<T, 2>, 2);
      else go(w4a16_gemv<T, 4>, 4);
    } else {
      const dim3 grid((M + kTileTok - 1) / kTileTok, (N + 16 * kWarps - 1) / (16 * kWarps));
      w4a16_tiled<T><<<grid, kWarps * 32, 0, stream>>>(xp, wq, scales.data_ptr<float>(), zp, bp, op, M, N, int(K), G,
                                                       gshift, chunks);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (M <= env_int("LLMC_W4_DECODE_MAX_M", 64)) {
    auto go = [&](auto kernel, int mt) {
      const dim3 grid((N + 15) / 16, (M + 8 * mt - 1) / (8 * mt));
      kernel<<<grid, kWarps * 32, 0, stream>>>(xp, wq, scales.data_ptr<float>(), zp, bp, op, M, N, K, G, group_size,
                                               chunks);
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
