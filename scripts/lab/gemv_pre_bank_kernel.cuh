// Lab kernel (scripts/lab/gemv_lab.py --prebank, session 9): the M = 1 kernel removed in session 9 (w4a16_gemv_pre of
// commit 617bfe7), with its chunks computed a bank at a time and its code loads predicated.
// Decode for one token (M = 1): w4a16_gemv's work split, with 8 warps per block and register banks of codes,
// but each warp copies all the activations of its K run, and its rows' scales and zero points for the groups of
// that run, into shared memory once, before its loop, which then waits only on its own code loads. In
// w4a16_gemv each bank also waits on its activation copies and scale loads; on H100 at 8192 x 8192 those waits
// cost 3 of its 17.8 us (scripts/results/h100_s6_gemv: 17.7 -> 16.1 us). With more tokens the one-time copy
// (M x 2 KB per warp at K = 8192, from L2 before any arithmetic) costs more than it saves: M = 2 ran 17.9 us
// against the register kernel's 17.6.
struct PreLayout {  // one warp's shared memory: activation rows (16-byte pad), scales [group][16], zero points
  int per, ngroups, x_stride, x_bytes, s_off, z_off, zero_off, bytes;
  // M token rows, W warps splitting `chunks` 64-column chunks (a run of per = ceil(chunks / W) chunks spans at
  // most ceil(per / chunks per group) + 1 groups)
  __host__ __device__ PreLayout(int M, int chunks, int W, int cshift, bool has_z) {
    per = (chunks + W - 1) / W;
    ngroups = (per + (1 << cshift) - 1) / (1 << cshift) + 1;
    x_stride = per * 128 + 16;  // the pad puts the rows an ldmatrix reads in distinct bank groups
    x_bytes = M * x_stride;
    s_off = x_bytes;
    z_off = s_off + ngroups * 16 * 4;
    zero_off = (z_off + (has_z ? ngroups * 16 : 0) + 15) & ~15;
    bytes = zero_off + 16;
  }
};

template <typename T, int U, bool HAS_Z, int W = 8, int MINB = 4>
__global__ void __launch_bounds__(W * 32, MINB)
    w4a16_gemv_pre(const T* __restrict__ x, const uint4* __restrict__ qw, const float* __restrict__ scales,
                   const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N,
                   int K, int G, int cshift, int chunks) {
  const int nt = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const PreLayout lay(M, chunks, W, cshift, HAS_Z);
  const int cb = min(chunks, warp * lay.per), ce = min(chunks, cb + lay.per);
  extern __shared__ __align__(128) uint8_t pre_smem[];
  uint8_t* const base = pre_smem + warp * lay.bytes;
  const uint8_t* const zero16 = base + lay.zero_off;
  float* const ss = reinterpret_cast<float*>(base + lay.s_off);
  uint8_t* const zs = base + lay.z_off;
  const int gb = cb >> cshift;  // first group of the run

  // 1. this warp's activations: M rows x its chunks, 16-byte copies
  const int units = (ce - cb) * 8;
  for (int i = lane; i < M * units; i += 32) {
    const int tok = i / units, u = i - tok * units;
    cp_async16(base + tok * lay.x_stride + u * 16, x + (int64_t)tok * K + (int64_t)cb * 64 + u * 8, true);
  }
  cp_async_commit();
  // 2. the first bank of codes
  const uint4* wp = qw + ((int64_t)nt * chunks + cb) * 32 + lane;
  uint4 qa[U], qb[U];
#pragma unroll
  for (int u = 0; u < U; ++u) qa[u] = ld_stream_if(wp + u * 32, cb + u < ce);
  // 3. scales and zero points of the run's groups, [group][row], rows past N clamped (never stored)
  const int ng = ce > cb ? ((ce - 1) >> cshift) - gb + 1 : 0;
  for (int i = lane; i < ng * 16; i += 32) {
    const int gl = i >> 4, r = i & 15;
    const int64_t src = (int64_t)min(nt * 16 + r, N - 1) * G + gb + gl;
    ss[i] = __ldg(scales + src);
    if (HAS_Z) zs[i] = __ldg(zeros + src);
  }
  if (lane < 4) reinterpret_cast<uint32_t*>(const_cast<uint8_t*>(zero16))[lane] = 0u;
  cp_async_wait<0>();
  __syncwarp();

  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  // A bank's U chunks at once (independent mma chains, no branch); a chunk past the run multiplies the run's
  // last chunk's activations (finite) with scale 0.
  auto bank = [&](const uint4 (&q)[U], int c) {
    uint32_t b[U][1][4][2];
    float part[U][1][4];
    Slot<T> sl[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int cu = min(c + u, ce - 1), gl = (cu >> cshift) - gb;
      sl[u].q = q[u];
      sl[u].s0 = c + u < ce ? ss[gl * 16 + g] : 0.f, sl[u].s1 = c + u < ce ? ss[gl * 16 + g + 8] : 0.f;
      sl[u].z0 = HAS_Z ? uint32_t(zs[gl * 16 + g]) : 8u, sl[u].z1 = HAS_Z ? uint32_t(zs[gl * 16 + g + 8]) : 8u;
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) {  // lanes 8j..8j+7: token rows of matrix j, 16-byte unit 4 s2 + j of the chunk
        const int tok = lane & 7;
        const uint8_t* src = tok < M ? base + tok * lay.x_stride + (cu - cb) * 128 + (4 * s2 + (lane >> 3)) * 16 : zero16;
        uint32_t r4[4];
        ldmatrix_x4(r4, src);
        b[u][0][2 * s2][0] = r4[0], b[u][0][2 * s2][1] = r4[1], b[u][0][2 * s2 + 1][0] = r4[2], b[u][0][2 * s2 + 1][1] = r4[3];
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) part[u][0][e] = 0.f;
    }
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        uint32_t a[4];
        sl[u].codes(s, a);
        Mma<T>::mma(part[u][0], a, b[u][0][s][0], b[u][0][s][1]);
      }
#pragma unroll
    for (int u = 0; u < U; ++u) sl[u].template add_scaled<1>(part[u], acc);
  };
  for (int c = cb; c < ce; c += 2 * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) qb[u] = ld_stream_if(wp + (c - cb + U + u) * 32, c + U + u < ce);
    bank(qa, c);
#pragma unroll
    for (int u = 0; u < U; ++u) qa[u] = ld_stream_if(wp + (c - cb + 2 * U + u) * 32, c + 2 * U + u < ce);
    if (c + U < ce) bank(qb, c + U);
  }

  reduce_warps_store<W, 1>(acc, nt, 0, M, N, [&](int row, int tok, float v) {
    if (bias != nullptr) v += to_float(bias[row]);
    out[(int64_t)tok * N + row] = from_float<T>(v);
  });
}

