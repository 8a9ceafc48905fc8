// Lab only (scripts/lab/gemv_lab.py --ring): a W4A16 decode kernel tried in session 6 and not adopted. It keeps
// w4a16_gemv's work split but copies each chunk (codes, valid activation rows, scales, zero-point words) by
// cp.async into a per-warp ring of S shared-memory stages, S - 1 chunks ahead, issued before the current chunk is
// computed. On H100 it ran slower than the register kernel at every M <= 16 on the issue's shapes except two
// 8-warp cases at N = 4096 (scripts/results/h100_s6_gemv/README.md). Needs Slot, cp_async*, ldmatrix_x4 and
// reduce_warps_store from the extension's headers, which the lab harness puts before it.
// The hypothesis: w4a16_gemv refills a register bank only after computing it, so its loads wait out a bank's
// arithmetic; a ring filled ahead would not. (Measured: it does not help.)
// Token rows past M are never copied: their ldmatrix rows read 16 zero bytes.
template <typename T, int MT, int S, bool HAS_Z, int W = 4>
__global__ void __launch_bounds__(W * 32)
    w4a16_gemv_ring(const T* __restrict__ x, const uint4* __restrict__ qw, const float* __restrict__ scales,
                    const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N,
                    int K, int G, int cshift, int chunks, int xrows) {
  const int nt = blockIdx.x, m0 = blockIdx.y * 8 * MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int per = (chunks + W - 1) / W;
  const int cb = min(chunks, warp * per), ce = min(chunks, cb + per);
  const int xv = min(M - m0, xrows);  // token rows copied
  // A stage, in 16-byte units: 32 of codes, xrows * 8 of activations (unit ^ (token % 8)), 4 of scales (rows
  // 0-15), 4 of zero-point words.
  const int stage_u4 = 40 + xrows * 8;
  extern __shared__ __align__(128) uint4 ring_all[];
  uint4* const ring = ring_all + warp * S * stage_u4;
  uint4* const zero16 = ring_all + W * S * stage_u4;
  const uint4* const wp = qw + (int64_t)nt * chunks * 32 + lane;
  // Lanes 0-15 copy the scale of row nt * 16 + lane; lanes 16-31 its zero-point word.
  const int crow = min(nt * 16 + (lane & 15), N - 1);
  const float* const srow = scales + (int64_t)crow * G;
  const uint8_t* const zrow = HAS_Z ? zeros + (int64_t)crow * G : nullptr;
  // byte position of this lane's rows' zero points inside their aligned words (rows g and g + 8)
  const int zb0 = HAS_Z ? int(((int64_t)min(nt * 16 + g, N - 1) * G) & 3) : 0;
  const int zb1 = HAS_Z ? int(((int64_t)min(nt * 16 + g + 8, N - 1) * G) & 3) : 0;

  auto stage = [&](int c) {  // chunk c into slot c % S; an empty group past the run keeps the wait counts uniform
    if (c < ce) {
      uint4* sg = ring + (c % S) * stage_u4;
      cp_async16(sg + lane, wp + (int64_t)c * 32, true);
      for (int i = lane; i < xv * 8; i += 32) {
        const int tok = i >> 3, unit = i & 7;
        cp_async16(sg + 32 + tok * 8 + (unit ^ (tok & 7)), x + (int64_t)(m0 + tok) * K + (int64_t)c * 64 + unit * 8,
                   true);
      }
      const int gi = c >> cshift;
      if (lane < 16) cp_async4(reinterpret_cast<float*>(sg + 32 + xrows * 8) + lane, srow + gi, true);
      else if (HAS_Z)
        cp_async4(reinterpret_cast<uint32_t*>(sg + 36 + xrows * 8) + (lane - 16),
                  reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(zrow + gi) & ~uintptr_t(3)), true);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) stage(cb + s);
  if (threadIdx.x == 0) *zero16 = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;

  for (int c = cb; c < ce; ++c) {
    cp_async_wait<S - 2>();
    __syncwarp();         // chunk c has landed for every lane, and every lane is done with chunk c - 1's slot...
    stage(c + S - 1);     // ...which is refilled now, before chunk c is computed
    const uint4* sg = ring + (c % S) * stage_u4;
    Slot<T> sl;
    sl.q = sg[lane];
    const float* ss = reinterpret_cast<const float*>(sg + 32 + xrows * 8);
    sl.s0 = ss[g], sl.s1 = ss[g + 8];
    if (HAS_Z) {
      const uint32_t* zw = reinterpret_cast<const uint32_t*>(sg + 36 + xrows * 8);
      const int gi = c >> cshift;
      sl.z0 = (zw[g] >> (8 * ((zb0 + gi) & 3))) & 0xFFu, sl.z1 = (zw[g + 8] >> (8 * ((zb1 + gi) & 3))) & 0xFFu;
    } else {
      sl.z0 = sl.z1 = 8u;
    }
    uint32_t b[MT][4][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) {  // lanes 8j..8j+7: rows of matrix j, 16-byte unit 4 s2 + j of the chunk
        const int tok = mt * 8 + (lane & 7);
        const uint4* src = tok < xv ? sg + 32 + tok * 8 + ((4 * s2 + (lane >> 3)) ^ (tok & 7)) : zero16;
        uint32_t r4[4];
        ldmatrix_x4(r4, src);
        b[mt][2 * s2][0] = r4[0], b[mt][2 * s2][1] = r4[1], b[mt][2 * s2 + 1][0] = r4[2], b[mt][2 * s2 + 1][1] = r4[3];
      }
    sl.mma_scaled<MT>(b, acc);
  }
  cp_async_wait<0>();

  reduce_warps_store<W, MT>(acc, nt, m0, M, N, [&](int row, int tok, float v) {
    if (bias != nullptr) v += to_float(bias[row]);
    out[(int64_t)tok * N + row] = from_float<T>(v);
  });
}

