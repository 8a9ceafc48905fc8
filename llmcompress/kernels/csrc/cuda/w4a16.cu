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
// Kernels by M (run() below picks; the fast ones need K % 64 == 0 and a power-of-two group >= 64):
//   w4a16_gemv    M <= 16 (32 off Hopper or with few features): weights streamed through registers.
//   w4a16_wgmma   Hopper, M = 17..512 (w4a16_sm90.cu): the codes as wgmma's register A operand.
//   w4a16_tiled   other GPUs, M <= 256: mma.sync on shared-memory tiles.
//   w4a16_decode  any shape the fast kernels refuse, M <= 64: 8 warps per 16 features split K.
//   prefill       larger M: 2048-row chunks of the weight are dequantized to the activation dtype and
//                 multiplied with cuBLAS, so at most one chunk of full-precision weight exists at a time.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "../checks.h"
#include "common.cuh"
#include "ops.h"
#include "w4a16.cuh"

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

  reduce_warps_store<kWarps, MT>(acc, nt, m0, M, N, [&](int row, int tok, float v) {
    if (bias != nullptr) v += to_float(bias[row]);
    out[(int64_t)tok * N + row] = from_float<T>(v);
  });
}

// Rows [n0, n0 + rows) of the weight, dequantized into w [rows, K]; one thread per packed word. A word is one
// 16-column k-step of rows g and g + 8, so it lies in one group (group_size % 16 == 0): one scale and zero
// point per row, and its columns come in adjacent pairs, stored two at a time when K is even.
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
  const int64_t k0 = (c * 4 + s) * 16;
  if (k0 >= K) return;
  const uint32_t word = qw[(((int64_t)nt * chunks + c) * 32 + lane) * 4 + s];
  const int g = lane >> 2, t = lane & 3, gi = int(k0 / group_size);
  const bool pairs = (K & 1) == 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = nt * 16 + g + 8 * half;
    if (row >= N || row - n0 >= rows) continue;
    const float sc = scales[(int64_t)row * G + gi];
    const float z = zeros != nullptr ? float(zeros[(int64_t)row * G + gi]) : 8.f;
    T* out = w + (int64_t)(row - n0) * K;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int r = half + 2 * kk;  // fragment register: nibble r holds column k, nibble r + 4 column k + 1
      const int64_t k = k0 + 2 * t + 8 * kk;
      const T v0 = from_float<T>((float((word >> (4 * r)) & 0xF) - z) * sc);
      const T v1 = from_float<T>((float((word >> (4 * (r + 4))) & 0xF) - z) * sc);
      if (pairs && k + 1 < K) {
        const T pair[2] = {v0, v1};
        *reinterpret_cast<uint32_t*>(out + k) = *reinterpret_cast<const uint32_t*>(pair);
      } else {
        if (k < K) out[k] = v0;
        if (k + 1 < K) out[k + 1] = v1;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Fast paths. They need K % 64 == 0 (whole chunks), a power-of-two group of >= 64 (so a chunk lies in one
// group, found by a shift), and 16-byte aligned activations; run() sends anything else to the kernels above.
//

// Decode, M <= 32 (16-token tiles side by side past 16): a block of 4 warps per 16 output features (few registers: 4 blocks, one wave, per SM at
// N = 8192), each warp a contiguous run of K chunks, two register banks of U slots so one bank's loads are in flight while the other is computed. A chunk's
// partial sums are scaled once into the fp32 total; the warps' totals are added in shared memory.
// W warps per 16-feature tile; MINB blocks per SM asked of the register allocator (128 registers at 4 x 4 warps);
// BANK: a bank's chunks computed together (bank() below), their loads predicated (Slot::load<true>).
template <typename T, int MT, int U, bool HAS_Z, int W = 4, int MINB = 4, bool BANK = false>
__global__ void __launch_bounds__(W * 32, MINB)
    w4a16_gemv(const T* __restrict__ x, const uint4* __restrict__ qw, const float* __restrict__ scales,
               const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
               int G, int cshift, int chunks) {
  const int nt = blockIdx.x, m0 = blockIdx.y * 8 * MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  // a tile past N (the last block's, N ragged) reads the last tile's codes (its results are never stored)
  const int ntc = min(nt, (N + 15) / 16 - 1);
  const int row0 = nt * 16 + g, row1 = row0 + 8;
  const int per = (chunks + W - 1) / W;
  const int cb = min(chunks, warp * per), ce = min(chunks, cb + per);
  const uint4* wp = qw + ((int64_t)ntc * chunks + cb) * 32 + lane;
  const int o0 = min(row0, N - 1) * G, o1 = min(row1, N - 1) * G;  // scale / zero-point rows (run() checks N x G fits)
  // Symmetric weights (HAS_Z false) take the constant zero point 8: no loads, no conversions.
  const uint8_t* zp = HAS_Z ? zeros : nullptr;
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;

  // Each warp copies the activations of the chunks it is about to load into its own shared-memory ring with
  // cp.async, one bank ahead like the weights, and reads them with ldmatrix.
  static_assert(MT <= 2, "the activation ring holds one or two 8-token tiles");
  constexpr int R = 2 * U;                    // ring entries per warp: one per slot of the two banks
  extern __shared__ __align__(128) uint4 xring_all[];
  uint4* xring = xring_all + warp * (R * MT * 64);  // [R][MT * 8 tokens][8 units of 16 bytes], swizzled
  auto stage_x = [&](int ring, int c) {
    if (c < ce) {
#pragma unroll
      for (int j = 0; j < MT * 2; ++j) {
        const int i = lane + 32 * j, tok = i >> 3, unit = i & 7;
        const bool valid = m0 + tok < M;
        cp_async16(xring + ring * (MT * 64) + tok * 8 + (unit ^ (tok & 7)),
                   x + (int64_t)(valid ? m0 + tok : 0) * K + (int64_t)c * 64 + unit * 8, valid);
      }
    }
  };

  // the activation fragments of one ring entry (4 k-steps x MT 8-token tiles)
  auto fragments = [&](int ring, uint32_t (&b)[MT][4][2]) {
    const uint4* xr_s = xring + ring * (MT * 64);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) {
        const int row = mt * 8 + (lane & 7);
        uint32_t r4[4];
        ldmatrix_x4(r4, xr_s + row * 8 + ((4 * s2 + (lane >> 3)) ^ (lane & 7)));
        b[mt][2 * s2][0] = r4[0], b[mt][2 * s2][1] = r4[1], b[mt][2 * s2 + 1][0] = r4[2], b[mt][2 * s2 + 1][1] = r4[3];
      }
  };
  auto chunk = [&](const Slot<T>& sl, int c, int ring) {
    uint32_t b[MT][4][2];
    fragments(ring, b);
    sl.template mma_scaled<MT>(b, acc);
  };
  // BANK: a bank's U chunks (ring entries r0 .. r0 + U - 1) at once, with no branch between them, so their U x MT
  // mma chains are independent and the scheduler interleaves them (chunk() runs one chunk's chain after another's).
  // A chunk past the run reads the bank's last valid ring entry (landed, finite) and has scale 0 (Slot::load).
  auto bank = [&](const Slot<T> (&sl)[U], int c, int r0) {
    uint32_t b[U][MT][4][2];
    float part[U][MT][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      fragments(r0 + min(c + u, ce - 1) - c, b[u]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[u][mt][e] = 0.f;
    }
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        uint32_t a[4];
        sl[u].codes(s, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) Mma<T>::mma(part[u][mt], a, b[u][mt][s][0], b[u][mt][s][1]);
      }
#pragma unroll
    for (int u = 0; u < U; ++u) sl[u].template add_scaled<MT>(part[u], acc);
  };

  // Launched as a programmatic dependent launch (run()): the next kernel may launch now; this one's first two
  // banks of codes go to L2 while the kernels before finish, and nothing is read until they have.
  pdl_launch_dependents();
  if (lane == 0 && cb < ce) prefetch_l2(wp - lane, uint32_t(min(2 * U, ce - cb)) * 512u);
  pdl_wait();
  Slot<T> sa[U], sb[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    sa[u].template load<BANK>(wp + u * 32, scales, zp, o0, o1, cb + u, cshift, cb + u < ce);
    stage_x(u, cb + u);
  }
  cp_async_commit();
  for (int c = cb; c < ce; c += 2 * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      sb[u].template load<BANK>(wp + (c - cb + U + u) * 32, scales, zp, o0, o1, c + U + u, cshift, c + U + u < ce);
      stage_x(U + u, c + U + u);
    }
    {
      cp_async_commit();
      cp_async_wait<1>();  // bank A's activations have landed (this lane's copies)...
      __syncwarp();        // ...and every lane's
    }
    if (BANK) {
      bank(sa, c, 0);
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c + u < ce) chunk(sa[u], c + u, u);
    }
    __syncwarp();  // bank A's ring entries are read before they are refilled
#pragma unroll
    for (int u = 0; u < U; ++u) {
      sa[u].template load<BANK>(wp + (c - cb + 2 * U + u) * 32, scales, zp, o0, o1, c + 2 * U + u, cshift, c + 2 * U + u < ce);
      stage_x(u, c + 2 * U + u);
    }
    {
      cp_async_commit();
      cp_async_wait<1>();
      __syncwarp();
    }
    if (BANK) {
      if (c + U < ce) bank(sb, c + U, U);
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c + U + u < ce) chunk(sb[u], c + U + u, U + u);
    }
    __syncwarp();
  }
  cp_async_wait<0>();

  reduce_warps_store<W, MT>(acc, nt, m0, M, N, [&](int row, int tok, float v) {
    if (bias != nullptr) v += to_float(bias[row]);
    out[(int64_t)tok * N + row] = from_float<T>(v);
  });
}

// Mid-size M (prefill of short prompts, batched decode): a block computes TOK tokens x 128 NW output features,
// NW 16-feature tiles per warp, all warps walking the same K chunks. Each pipeline stage holds one chunk:
// the block's activations (TOK tokens x 64 k, XOR-swizzled so ldmatrix reads hit 8 distinct bank groups,
// reused by all 8 warps), every warp's weight words, scales and zero-point bytes, all copied by cp.async
// S - 1 chunks ahead, so no register waits on memory. The group scale multiplies the dequantized
// weight in the activation dtype (one rounding, as a bf16 copy of the weight would have), which keeps one
// fp32 accumulator set. Token blocks vary fastest in the grid, so the blocks that read the same weights run
// together and share them through L2.
template <int TOK, int NW>
struct TiledStage {
  uint4 x[TOK * 8];             // [token][8 units of 16 bytes], unit ^ (token % 8)
  uint4 w[kWarps * NW][32];     // each 16-feature tile's 512 bytes of codes
  float s[kWarps * NW][16];     // scale of each of the tile's 16 rows
  uint32_t z[kWarps * NW][16];  // the aligned 4-byte word holding each row's zero point
};
template <int TOK, int NW, int S>
constexpr int tiled_smem() { return S * int(sizeof(TiledStage<TOK, NW>)); }


// TOK tokens x (128 * NW) features per block of 8 warps; warp w owns the NW 16-feature tiles
// blockIdx.y * 8 * NW + w * NW + j, so one ldmatrix'd activation fragment feeds NW mma (fewer shared-memory
// reads per mma as NW grows) and a larger TOK re-reads each weight tile from L2 fewer times.
template <typename T, int TOK, int NW, int S>
__global__ void __launch_bounds__(kWarps * 32)
    w4a16_tiled(const T* __restrict__ x, const uint4* __restrict__ qw, const float* __restrict__ scales,
                const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                int G, int cshift, int chunks) {
  constexpr int MT = TOK / 8;
  using Stage = TiledStage<TOK, NW>;
  static_assert(TOK * 8 % (kWarps * 32) == 0, "whole activation units per thread");
  extern __shared__ __align__(128) uint4 tiled_smem_raw[];
  Stage* st = reinterpret_cast<Stage*>(tiled_smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * TOK;
  const int tiles = (N + 15) / 16;
  int nt[NW], zb0[NW], zb1[NW];
  bool store[NW];
  const uint4* wp[NW];
  const float* srow[NW];
  const uint8_t* zrow[NW];
#pragma unroll
  for (int j = 0; j < NW; ++j) {
    const int want = (blockIdx.y * kWarps + warp) * NW + j;
    nt[j] = min(want, tiles - 1);  // a tile past N recomputes the last one, unstored
    store[j] = want < tiles;
    wp[j] = qw + (int64_t)nt[j] * chunks * 32 + lane;
    // Lanes 0-15 copy the scale of row nt * 16 + lane; lanes 16-31 its zero-point word.
    const int crow = min(nt[j] * 16 + (lane & 15), N - 1);
    srow[j] = scales + (int64_t)crow * G;
    zrow[j] = zeros != nullptr ? zeros + (int64_t)crow * G : nullptr;
    // byte position of this lane's rows' zero points inside their aligned words (rows g and g + 8)
    zb0[j] = int(((int64_t)min(nt[j] * 16 + g, N - 1) * G) & 3);
    zb1[j] = int(((int64_t)min(nt[j] * 16 + g + 8, N - 1) * G) & 3);
  }
  auto stage = [&](int c) {
    if (c < chunks) {
      Stage& sg = st[c % S];
      const int gi = c >> cshift;
#pragma unroll
      for (int u = 0; u < TOK * 8 / (kWarps * 32); ++u) {  // activations: unit i % 8 of token row i / 8
        const int i = threadIdx.x + u * kWarps * 32, lr = i >> 3, lu = i & 7;
        const bool valid = m0 + lr < M;
        cp_async16(&sg.x[lr * 8 + (lu ^ (lr & 7))], x + (int64_t)(valid ? m0 + lr : 0) * K + (int64_t)c * 64 + lu * 8,
                   valid);
      }
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        const int tl = warp * NW + j;
        cp_async16(&sg.w[tl][lane], wp[j] + (int64_t)c * 32, true);
        if (lane < 16) cp_async4(&sg.s[tl][lane], srow[j] + gi, true);
        else if (zrow[j] != nullptr)
          cp_async4(&sg.z[tl][lane - 16],
                    reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(zrow[j] + gi) & ~uintptr_t(3)), true);
      }
    }
    cp_async_commit();  // an empty group keeps the wait counts uniform
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) stage(s);

  float acc[NW][MT][4];
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][mt][e] = 0.f;

  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<S - 2>();
    __syncthreads();   // chunk c is visible to all; everyone is done with chunk c - 1's stage
    stage(c + S - 1);  // refill that stage
    const Stage& sg = st[c % S];
    const int gi = c >> cshift;
    uint32_t a[NW][4][4];
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      const int tl = warp * NW + j;
      Slot<T> sl;
      sl.q = sg.w[tl][lane];
      sl.s0 = sg.s[tl][g], sl.s1 = sg.s[tl][g + 8];
      sl.z0 = zeros != nullptr ? (sg.z[tl][g] >> (8 * ((zb0[j] + gi) & 3))) & 0xFFu : 8u;
      sl.z1 = zeros != nullptr ? (sg.z[tl][g + 8] >> (8 * ((zb1[j] + gi) & 3))) & 0xFFu : 8u;
      const uint32_t sc0 = Mma<T>::pair(sl.s0, sl.s0), sc1 = Mma<T>::pair(sl.s1, sl.s1);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        sl.codes(s, a[j][s]);
#pragma unroll
        for (int r = 0; r < 4; ++r) a[j][s][r] = Mma<T>::mul(a[j][s][r], (r & 1) ? sc1 : sc0);
      }
    }
#pragma unroll
    for (int s2 = 0; s2 < 2; ++s2) {  // two k-steps per ldmatrix.x4
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = mt * 8 + (lane & 7);
        uint32_t b[4];
        ldmatrix_x4(b, &sg.x[row * 8 + ((4 * s2 + (lane >> 3)) ^ (lane & 7))]);
#pragma unroll
        for (int j = 0; j < NW; ++j) {
          Mma<T>::mma(acc[j][mt], a[j][2 * s2], b[0], b[1]);
          Mma<T>::mma(acc[j][mt], a[j][2 * s2 + 1], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int j = 0; j < NW; ++j) {
    if (!store[j]) continue;
    const int row0 = nt[j] * 16 + g, row1 = row0 + 8;
    const float b0 = bias != nullptr && row0 < N ? to_float(bias[row0]) : 0.f;
    const float b1 = bias != nullptr && row1 < N ? to_float(bias[row1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = e >= 2 ? row1 : row0;
        const int tok = m0 + mt * 8 + 2 * t + (e & 1);
        if (row < N && tok < M) out[(int64_t)tok * N + row] = from_float<T>(acc[j][mt][e] + (e >= 2 ? b1 : b0));
      }
  }
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
  const int cpg = group_size / 64;  // chunks per group
  const bool fast = K % 64 == 0 && group_size % 64 == 0 && (cpg & (cpg - 1)) == 0 &&
                    reinterpret_cast<uintptr_t>(xp) % 16 == 0 && reinterpret_cast<uintptr_t>(zp) % 4 == 0 &&
                    K < (int64_t(1) << 30) && int64_t(N) * G < (int64_t(1) << 31) && knob(Knob::W4_GENERIC, 0) == 0;
  const int cshift = fast ? __builtin_ctz(cpg) : 0;  // chunk -> group: c >> cshift
  // Hopper: the wgmma kernel (w4a16_sm90.cu) where it suits the shape (it decides: M = 17 or 33 to 512).
  if (fast && w4a16_sm90<T>(xp, wq, scales.data_ptr<float>(), zp, bp, op, M, N, int(K), G, cshift, chunks, stream))
    return;
  if (fast && M <= knob(Knob::W4_TILED_MAX_M, 256)) {
    if (M <= knob(Knob::W4_GEMV_MAX_M, 32)) {
      auto go = [&](auto kernel, int mt, int u, int warps) {  // warps: K runs a 16-feature tile
        const dim3 grid((N + 15) / 16, (M + 8 * mt - 1) / (8 * mt));
        const int smem = warps * 2 * u * mt * 64 * 16;  // the activation rings, one per K run
        launch_attrs_once(kernel, smem);
        launch(kernel, grid, dim3(warps * 32), smem, stream, pdl_enabled(), 1, xp, wq, scales.data_ptr<float>(), zp, bp,
               op, M, N, int(K), G, cshift, chunks);
      };
      // By M and by how many 16-feature tiles the SMs get (H100: e3399bd:scripts/results/h100_s9_gemv, lab_head.txt, all
      // against the kernels picked before; Knob::W4_GEMV_WIDE forces the first choice for tests and sweeps):
      // - few tiles (at most 2 per SM: N <= 4224 on H100, "wide"): 8 warps a tile split K, two slots a bank,
      //   BANK (4096 x 4096 M = 1 6.3 -> 5.5 us, M = 8 6.2 -> 5.3; 14336 x 4096 M = 1 15.1 -> 13.3, M = 16 18.4 -> 17.3);
      // - more, M <= 8: 4 warps a tile, four slots a bank, BANK (8192 x 8192 M = 1 16.2 -> 15.5 us, M = 8 17.0 -> 15.6);
      // - more, M = 9-16: two slots a bank, BANK, while the grid fits one wave of 4 blocks per SM (8192 x 8192:
      //   18.8 -> 18.2 us), else three slots chunk by chunk (4096 x 14336: 17.9 against 18.2 with BANK).
      // (M = 1 had its own kernel until then, each warp's activations and scales copied to shared memory once:
      // 16.2 us at 8192 x 8192.)
      const int sms = sm_count(), tiles = (N + 15) / 16;
      const bool wide = knob(Knob::W4_GEMV_WIDE, tiles <= 2 * sms ? 1 : 0) != 0;
      auto pick = [&](auto has_z) {
        constexpr bool Z = decltype(has_z)::value;
        if (M <= 8 && wide) go(w4a16_gemv<T, 1, 2, Z, 8, 2, true>, 1, 2, 8);
        else if (M <= 8) go(w4a16_gemv<T, 1, 4, Z, 4, 4, true>, 1, 4, 4);
        else if (M <= 16 && wide) go(w4a16_gemv<T, 2, 2, Z, 8, 2, true>, 2, 2, 8);
        else if (M <= 16 && tiles <= 4 * sms) go(w4a16_gemv<T, 2, 2, Z, 4, 4, true>, 2, 2, 4);
        else go(w4a16_gemv<T, 2, 3, Z>, 2, 3, 4);  // M > 16: 16-token tiles side by side in the grid
      };
      if (zp != nullptr) pick(std::true_type{});
      else pick(std::false_type{});
    } else {
      // Tile shape by M (Knob::W4_TILED overrides it for sweeps; 0: 32 tokens x 128 features, 1: 64 x 128,
      // 2: 32 x 256, 3: 64 x 256, 4: 32 x 128 with 4 stages). Measured on H100 at 8192 x 8192
      // (e3399bd:scripts/results/h100_tiles): 32 x 128 is best to M = 64; 64 x 128 past it (M = 128: 88.6 vs 98.5 us,
      // M = 256: 133.5 vs 193.7 us), as each weight chunk is dequantized and read from L2 half as often. The
      // 256-feature tiles leave SMs idle (64 blocks at M = 128) and run at no better a rate per SM.
      auto go = [&](auto kernel, int tok, int nw, int smem) {
        const dim3 grid((M + tok - 1) / tok, (N + 16 * kWarps * nw - 1) / (16 * kWarps * nw));
        launch_attrs_once(kernel, smem);
        kernel<<<grid, kWarps * 32, smem, stream>>>(xp, wq, scales.data_ptr<float>(), zp, bp, op, M, N, int(K), G,
                                                    cshift, chunks);
      };
      switch (knob(Knob::W4_TILED, M > 64 ? 1 : 0)) {
        case 1: go(w4a16_tiled<T, 64, 1, 7>, 64, 1, tiled_smem<64, 1, 7>()); break;
        case 2: go(w4a16_tiled<T, 32, 2, 6>, 32, 2, tiled_smem<32, 2, 6>()); break;
        case 3: go(w4a16_tiled<T, 64, 2, 5>, 64, 2, tiled_smem<64, 2, 5>()); break;
        case 4: go(w4a16_tiled<T, 32, 1, 4>, 32, 1, tiled_smem<32, 1, 4>()); break;
        default: go(w4a16_tiled<T, 32, 1, 7>, 32, 1, tiled_smem<32, 1, 7>());
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (M <= knob(Knob::W4_DECODE_MAX_M, 64)) {
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
  // Dequantize into a scratch weight and call cuBLAS. The whole weight in one piece where it is at most 64 Mi
  // elements (128 MB: every linear of an 8B Llama): each further piece costs a dequantize launch, a GEMM and a
  // copy of its output columns into place (2,048-row pieces made a 1B model's W4A16 prefill on an H100 half as
  // fast as bf16, mostly host time). Knob::W4_DEQUANT_ELEMS sets the budget (tests: several ragged pieces).
  const int64_t budget = knob(Knob::W4_DEQUANT_ELEMS, 64 << 20);
  const int kRows = int(std::min<int64_t>(N, std::max<int64_t>(16, budget / K / 16 * 16)));
  at::Tensor w = at::empty({kRows, K}, x.options());
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
