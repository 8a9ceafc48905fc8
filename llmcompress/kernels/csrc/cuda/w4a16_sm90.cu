// Hopper W4A16 for mid-size M (batched decode, short prefill): the dequantized weight is wgmma's A operand
// straight from registers, the activations its B operand from shared memory.
//
// The 16-feature tiles of the packed "cuda-mma" layout (w4a16.cu) are already in the register-A fragment
// order of wgmma.m64nNk16 (warp w of a warpgroup holds rows 16w..16w+15, exactly mma.m16n8k16's A layout),
// so a warpgroup computes 64 features x TOK tokens: each warp dequantizes its own tile's codes (zero point
// removed, group scale multiplied in the activation dtype, one rounding, as a bf16 copy of the weight
// would have), and the tensor cores read the activation tile from shared memory themselves, where the
// sm_80 tiled kernel (w4a16.cu) spends most of its shared-memory bandwidth on every warp's ldmatrix of the
// same activations. Pipeline, per warpgroup: S shared-memory stages of one 64-wide K chunk each (the
// activation tile, by TMA in the 128-byte swizzle wgmma reads; every warp's codes, scales and zero points, by
// cp.async), filled S - 2 chunks ahead; two register banks of A fragments, so one chunk is dequantized while
// the previous chunk's wgmma runs. A stage is refilled only after the warpgroup's wgmma on it has completed
// (wait_group 1, then the next chunk's barrier).
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <type_traits>

#include "w4a16.cuh"

namespace llmc::cuda {
namespace {

// acc[N / 2] += A (64 x 16, registers) * B (16 x N, shared memory). One macro per N, instantiated for bf16 and
// fp16: PTX names the shape and types in the instruction and takes every accumulator as its own operand, so
// each N needs its own operand list (CUTLASS's cute/arch/mma_sm90_gmma.hpp spells them out the same way).
template <typename T, int N> struct Wgmma;

#define LLMC_WGMMA_RS_N32(T, PTX)                                                                              \
template <> struct Wgmma<T, 32> {                                                                              \
  __device__ __forceinline__ static void mma(float (&d)[16], const uint32_t (&a)[4], uint64_t desc) {          \
    asm volatile(                                                                                              \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                           \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTX "." PTX " "                                          \
        "{"                                                                                                    \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"                                 \
        "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                                       \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),      \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                                      \
  }                                                                                                            \
};

LLMC_WGMMA_RS_N32(__nv_bfloat16, "bf16")
LLMC_WGMMA_RS_N32(__half, "f16")
#undef LLMC_WGMMA_RS_N32

#define LLMC_WGMMA_RS_N64(T, PTX)                                                                                 \
template <> struct Wgmma<T, 64> {                                                                                 \
  __device__ __forceinline__ static void mma(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {             \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "                                             \
        "{"                                                                                                       \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                   \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                          \
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                                         \
  }                                                                                                               \
};

LLMC_WGMMA_RS_N64(__nv_bfloat16, "bf16")
LLMC_WGMMA_RS_N64(__half, "f16")
#undef LLMC_WGMMA_RS_N64

#define LLMC_WGMMA_RS_N128(T, PTX)                                                                                \
template <> struct Wgmma<T, 128> {                                                                                \
  __device__ __forceinline__ static void mma(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {             \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " "                                            \
        "{"                                                                                                       \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                   \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                         \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                         \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                          \
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                                         \
  }                                                                                                               \
};

LLMC_WGMMA_RS_N128(__nv_bfloat16, "bf16")
LLMC_WGMMA_RS_N128(__half, "f16")
#undef LLMC_WGMMA_RS_N128

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor of a K-major operand tile in the 128-byte swizzle: rows of 128 bytes
// (64 bf16 of K), 8-row groups 1024 bytes apart (the stride byte offset); the tile must be 1024-byte aligned.
__device__ __forceinline__ uint64_t desc_sw128(const void* p) {
  return uint64_t((smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// mbarrier glue for the bulk tensor copies (TMA) of the activation tiles.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int phase) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}" ::"r"(smem_addr(bar)),
      "r"(phase)
      : "memory");
}
// rows [m0, m0 + box rows) x columns [k0, k0 + 64) of the activations into a 128-byte-swizzled tile; rows past M
// arrive as zeros. Completes on `bar` (its transaction count).
__device__ __forceinline__ void tma_load_x(void* dst, const CUtensorMap* map, int k0, int m0, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(m0), "r"(smem_addr(bar))
      : "memory");
}

// One pipeline stage of one warpgroup: a 64-wide K chunk.
template <int TOK>
struct alignas(1024) WgStage {
  uint4 x[TOK * 8];     // [token][8 units of 16 bytes], unit ^ (token % 8): the TMA's (and wgmma's) 128-byte swizzle
  uint4 w[4][32];       // each warp's 16-feature tile: 512 bytes of codes
  float s[4][16];       // scale of each of the tile's 16 rows
  uint32_t z[4][16];    // the aligned 4-byte word holding each row's zero point
};
template <int TOK, int KS, int S>
constexpr int wg_smem() {
  constexpr int bytes = KS * S * int(sizeof(WgStage<TOK>)) + KS * S * 8 + 1024;  // + barriers, alignment
  static_assert(bytes <= 227 * 1024, "more shared memory than a Hopper block may have");
  return bytes;
}

// Named barrier of warpgroup wg alone; immediate ids 1-4 (0 is __syncthreads'), so the compiler reserves
// only these.
__device__ __forceinline__ void wg_barrier(int wg) {
  switch (wg) {
    case 0: asm volatile("bar.sync 1, 128;" ::: "memory"); break;
    case 1: asm volatile("bar.sync 2, 128;" ::: "memory"); break;
    case 2: asm volatile("bar.sync 3, 128;" ::: "memory"); break;
    default: asm volatile("bar.sync 4, 128;" ::: "memory");
  }
}

// The two CTAs of a cluster: this CTA's rank, a barrier of every thread of both (release / acquire, so shared-memory
// writes before it are seen after it), and a store into the other CTA's shared memory at the address `p` has here.
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void st_cluster(const void* p, uint32_t rank, float v) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
}

// A block computes 64 features x TOK tokens. Its KS warpgroups split K (contiguous runs of chunks), each with
// its own stage ring and named barrier, so they run as independent pipelines (one warpgroup alone leaves
// each scheduler a single warp, and the dequantization's dependent instructions then idle it); their
// accumulators are added through shared memory at the end. The activation tile of a stage comes by one bulk
// tensor copy (issued by the warpgroup's first thread, completing on the stage's mbarrier), so the warps'
// own instructions go to their weights: one 16-byte cp.async of codes per lane, plus a scale and a
// zero-point word.
// CL = 2: the grid's z pairs blocks into 2-CTA clusters (launched with that cluster shape) that split K between
// them too, each CTA's KS warpgroups taking a quarter of it at KS = 2: so few feature tiles (N = 4096: 64) still
// fill the SMs with 128-token blocks, whose wgmma (n = 128) keeps the tensor cores busier than 64-token ones in
// the same time. Rank 1 adds its sums into rank 0's shared memory; rank 0 stores.
template <typename T, int TOK, int KS, int S, bool HAS_Z, int CL = 1>
__global__ void __launch_bounds__(KS * 128)
    w4a16_wgmma(const __grid_constant__ CUtensorMap xmap, const uint4* __restrict__ qw,
                const float* __restrict__ scales, const uint8_t* __restrict__ zeros, const T* __restrict__ bias,
                T* __restrict__ out, int M, int N, int K, int G, int cshift, int chunks) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(S >= 3, "a stage is refilled two chunks after its wgmma was issued");
  static_assert(KS >= 1 && KS <= 4, "one named barrier per warpgroup: ids 1 to 4");
  using Stage = WgStage<TOK>;
  extern __shared__ uint8_t wg_smem_raw[];
  Stage* const ring0 = reinterpret_cast<Stage*>(wg_smem_raw + ((1024 - (smem_addr(wg_smem_raw) & 1023)) & 1023));
  const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
  Stage* const st = ring0 + wg * S;
  uint64_t* const bars = reinterpret_cast<uint64_t*>(ring0 + KS * S) + wg * S;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * TOK;
  const int tiles = (N + 15) / 16;
  const int want = blockIdx.y * 4 + warp;
  const int nt = min(want, tiles - 1);  // a tile past N recomputes the last one, unstored
  static_assert(CL == 1 || CL == 2, "clusters of one or two CTAs along K");
  const uint32_t rank = CL > 1 ? cluster_rank() : 0;
  const int split = int(rank) * KS + wg;  // this warpgroup's share of K, of KS x CL
  const int per = (chunks + KS * CL - 1) / (KS * CL), cb = min(chunks, split * per), ce = min(chunks, cb + per);
  const uint4* wnext = qw + ((int64_t)nt * chunks + cb) * 32 + lane;  // codes of the next chunk to copy (loop-carried,
                                                                      // so it stays in registers)
  // Lanes 0-15 copy the scale of row nt * 16 + lane; lanes 16-31 its zero-point word.
  const int crow = min(nt * 16 + (lane & 15), N - 1);
  const float* srow = scales + (int64_t)crow * G;
  const uint8_t* zrow = HAS_Z ? zeros + (int64_t)crow * G : nullptr;
  // byte position of this lane's rows' zero points inside their aligned words (rows g and g + 8)
  const int zb0 = int(((int64_t)min(nt * 16 + g, N - 1) * G) & 3);
  const int zb1 = int(((int64_t)min(nt * 16 + g + 8, N - 1) * G) & 3);
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) mbar_init(&bars[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  int wslot = 0, rslot = 0, rphase = 0;  // ring slots of the next copy and the next wgmma, and its parity
  auto stage = [&](int c) {
    if (c < ce) {
      Stage& sg = st[wslot];
      if (tid == 0) {
        mbar_expect_tx(&bars[wslot], TOK * 128);
        tma_load_x(&sg.x[0], &xmap, c * 64, m0, &bars[wslot]);
      }
      wslot = wslot + 1 == S ? 0 : wslot + 1;
      const int gi = c >> cshift;
      cp_async16(&sg.w[warp][lane], wnext, true);
      wnext += 32;
      if (lane < 16) cp_async4(&sg.s[warp][lane], srow + gi, true);
      else if (HAS_Z)
        cp_async4(&sg.z[warp][lane - 16],
                  reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(zrow + gi) & ~uintptr_t(3)), true);
    }
    cp_async_commit();  // an empty group keeps the wait counts uniform
  };
#pragma unroll
  for (int s = 0; s < S - 2; ++s) stage(cb + s);

  float acc[TOK / 2];
#pragma unroll
  for (int i = 0; i < TOK / 2; ++i) acc[i] = 0.f;
  uint32_t a0[4][4], a1[4][4];  // two banks: one is dequantized while the other's wgmma may still read it

  auto step = [&](int c, uint32_t (&a)[4][4]) {
    cp_async_wait<S - 3>();  // this lane's codes, scale and zero-point word of chunk c
    wg_barrier(wg);          // ... every lane's; and the warpgroup's wgmma of chunk c - 2 has completed,
    stage(c + S - 2);        // so its stage can be refilled
    const Stage& sg = st[rslot];
    uint64_t* bar = &bars[rslot];
    const int phase = rphase;
    rslot = rslot + 1 == S ? 0 : rslot + 1;
    rphase ^= rslot == 0;
    const int gi = c >> cshift;
    Slot<T> sl;
    sl.q = sg.w[warp][lane];
    sl.s0 = sg.s[warp][g], sl.s1 = sg.s[warp][g + 8];
    sl.z0 = HAS_Z ? (sg.z[warp][g] >> (8 * ((zb0 + gi) & 3))) & 0xFFu : 8u;  // symmetric: the constant 8
    sl.z1 = HAS_Z ? (sg.z[warp][g + 8] >> (8 * ((zb1 + gi) & 3))) & 0xFFu : 8u;
    const uint32_t sc0 = Mma<T>::pair(sl.s0, sl.s0), sc1 = Mma<T>::pair(sl.s1, sl.s1);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      sl.codes(s, a[s]);
#pragma unroll
      for (int r = 0; r < 4; ++r) a[s][r] = Mma<T>::mul(a[s][r], (r & 1) ? sc1 : sc0);
    }
    const uint64_t desc = desc_sw128(&sg.x[0]);
    mbar_wait(bar, phase);  // the activation tile of chunk c has landed
    wgmma_fence();
    fence_acc(acc);
#pragma unroll
    for (int s = 0; s < 4; ++s) Wgmma<T, TOK>::mma(acc, a[s], desc + 2 * s);  // k-step s: 32 bytes further
    wgmma_commit();
    fence_acc(acc);
    wgmma_wait<1>();  // chunk c - 1's wgmma is done: its register bank and stage are free
  };
  int c = cb;
  for (; c + 1 < ce; c += 2) {
    step(c, a0);
    step(c + 1, a1);
  }
  if (c < ce) step(c, a0);
  wgmma_wait<0>();
  fence_acc(acc);
  cp_async_wait<0>();

  if constexpr (KS > 1) {  // warpgroups 1.. leave their sums in their own (now idle) rings; warpgroup 0 adds them
    float* red = reinterpret_cast<float*>(st);
    if (wg > 0) {
#pragma unroll
      for (int i = 0; i < TOK / 2; ++i) red[i * 128 + tid] = acc[i];
    }
    __syncthreads();
    if (wg == 0) {
#pragma unroll
      for (int k = 1; k < KS; ++k) {
        const float* other = reinterpret_cast<const float*>(ring0 + k * S);
#pragma unroll
        for (int i = 0; i < TOK / 2; ++i) acc[i] += other[i * 128 + tid];
      }
    }
  }
  if constexpr (CL > 1) {  // rank 1's warpgroup 0 adds its sums into rank 0's ring of warpgroup 0, idle by now
    float* red0 = reinterpret_cast<float*>(ring0);
    cluster_sync();  // every thread of both CTAs is past its main loop (and the reduction above)
    if (rank == 1 && wg == 0) {
#pragma unroll
      for (int i = 0; i < TOK / 2; ++i) st_cluster(red0 + i * 128 + tid, 0, acc[i]);
    }
    cluster_sync();  // ... and rank 1's sums have landed
    if (rank == 1) return;
    if (wg == 0) {
#pragma unroll
      for (int i = 0; i < TOK / 2; ++i) acc[i] += red0[i * 128 + tid];
    }
  }
  if (wg > 0 || want >= tiles) return;
  // acc[4 i + 2 h + e] = D[feature 16 warp + g + 8 h][token 8 i + 2 t + e] of the warpgroup's 64 x TOK tile
  const int row0 = nt * 16 + g, row1 = row0 + 8;
  const float b0 = bias != nullptr && row0 < N ? to_float(bias[row0]) : 0.f;
  const float b1 = bias != nullptr && row1 < N ? to_float(bias[row1]) : 0.f;
#pragma unroll
  for (int i = 0; i < TOK / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e >= 2 ? row1 : row0;
      const int tok = m0 + 8 * i + 2 * t + (e & 1);
      if (row < N && tok < M) out[(int64_t)tok * N + row] = from_float<T>(acc[4 * i + e] + (e >= 2 ? b1 : b0));
    }
#endif
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr, "llmc: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// The activations [M, K] as TMA tiles of `tok` rows x 64 columns in the 128-byte swizzle.
template <typename T>
CUtensorMap activation_map(const T* x, int M, int K, int tok) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(K), cuuint64_t(M)};
  const cuuint64_t strides[1] = {cuuint64_t(K) * sizeof(T)};
  const cuuint32_t box[2] = {64, cuuint32_t(tok)};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
      const_cast<T*>(x), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "llmc::w4a16_mm: cuTensorMapEncodeTiled failed (", int(r), ") for M=", M, ", K=", K);
  return map;
}

}  // namespace

template <typename T>
bool w4a16_sm90(const T* x, const uint4* qw, const float* scales, const uint8_t* zeros, const T* bias, T* out, int M,
                int N, int K, int G, int cshift, int chunks, cudaStream_t stream) {
#if defined(LLMC_SM90A)
  if (cc_major() != 9) return false;
  const int tiles64 = (N + 63) / 64, sms = sm_count();
  auto fits = [&](int tok, int cl) { return (M + tok - 1) / tok * tiles64 * cl <= sms; };  // one wave
  // M = 17 to 512; Knob::W4_SM90_MIN_M / _MAX_M move the range for sweeps (MAX_M=0 turns it off). On H100
  // (e3399bd:scripts/results/h100_wgmma), 8192 x 8192: 27.1 us at M = 32, 39.0 at M = 128, against bf16's 49-51 and,
  // before it, the gemv kernel's 43.8 and the tiled kernel's 89.0. Where N <= 6144 (few 64-feature tiles) the
  // gemv kernel keeps M <= 32, unless K is long enough (>= 8192) for the 2-CTA split-K blocks (variant 11), which
  // must fit one wave (e3399bd:scripts/results/h100_s10_wgmma: 4096 x 4096 M = 32 gemv 10.1 us, wgmma 12.8; 8192 x 4096
  // 18.2 against 17.5; 14336 x 4096 34.2 against 25.2). The dequantize + cuBLAS path takes over past M = 512.
  const int min_m = knob(Knob::W4_SM90_MIN_M, tiles64 > 96 || (K >= 8192 && fits(64, 2)) ? 17 : 33);
  if (M < min_m || M > knob(Knob::W4_SM90_MAX_M, 512)) return false;
  auto go = [&](auto kernel, int tok, int ks, int smem, int cl = 1) {
    launch_attrs_once(kernel, smem);
    launch(kernel, dim3((M + tok - 1) / tok, (N + 63) / 64, cl), dim3(ks * 128), smem, stream, false, cl,
           activation_map(x, M, K, tok), qw, scales, zeros, bias, out, M, N, K, G, cshift, chunks);
  };
  // Tokens per block x warpgroups splitting K (stages per warpgroup), by M and by how many 64-feature tiles
  // there are to spread over the SMs; Knob::W4_WGMMA overrides it for sweeps (e3399bd:scripts/lab/wgmma_sweep.py;
  // e3399bd:scripts/results/h100_wgmma, h100_s10_wgmma). Every variant takes one block per SM (shared memory), except
  // 128 x 1 (two). At 8192 x 8192 on H100: M <= 32: 32 x 4 (28.6 us; 64 x 4: 32.9); M <= 64: 64 x 4 (26.2 with
  // five stages, 27.7 with four); M <= 128: 128 x 2 (36.5; 64 x 4: 54.0, 128 x 1: 51.0). With N = 14336 (224
  // tiles) 128 x 1 blocks fit one wave where 128 x 2 takes two.
  // Few tiles (N <= 6144) leave SMs idle, and a block's time hardly depends on its token count (one dependent
  // chain of wgmma a warpgroup): there the 2-CTA clusters that also split K (variants 10 and 11) where they fit
  // one wave (N = 4096: 14336 x 4096 M = 64 39.8 -> 26.1 us, M = 128 42.9 -> 33.5; 4096 x 4096 M = 64
  // 13.9 -> 11.3, M = 128 15.1 -> 13.5), 128-token ones only where they are at least 3/4 full or K is long
  // (4096 x 4096 M = 96: 64 x 4 15.1 us, 128 x 2 x 2 16.3); else the smallest token tile whose blocks fit one
  // wave (N = 6144, M = 64: 64 x 4 15.0 us against 32 x 4's 26.6; M = 128: 128 x 2 20.3 against 64 x 4's 28.5).
  const bool few = tiles64 <= 96, many = tiles64 > 160;
  int by_shape;
  if (few && M <= 64 && fits(64, 2)) by_shape = 11;
  else if (few && M <= 128 && (M > 96 || K >= 8192) && fits(128, 2)) by_shape = 10;
  else if (few && M <= 128) by_shape = fits(32, 1) && M <= 32 ? 6 : fits(64, 1) ? 5 : 3;
  else by_shape = M <= 32 ? 6 : M <= 64 ? 5 : many ? 1 : 3;
  const int variant = knob(Knob::W4_WGMMA, by_shape);
  auto pick = [&](auto has_z) {
    constexpr bool Z = decltype(has_z)::value;
    switch (variant) {
      case 1: go(w4a16_wgmma<T, 128, 1, 5, Z>, 128, 1, wg_smem<128, 1, 5>()); break;
      case 5: go(w4a16_wgmma<T, 64, 4, 5, Z>, 64, 4, wg_smem<64, 4, 5>()); break;
      case 6: go(w4a16_wgmma<T, 32, 4, 6, Z>, 32, 4, wg_smem<32, 4, 6>()); break;
      case 10: go(w4a16_wgmma<T, 128, 2, 5, Z, 2>, 128, 2, wg_smem<128, 2, 5>(), 2); break;  // 2-CTA clusters
      case 11: go(w4a16_wgmma<T, 64, 4, 4, Z, 2>, 64, 4, wg_smem<64, 4, 4>(), 2); break;
      default: go(w4a16_wgmma<T, 128, 2, 5, Z>, 128, 2, wg_smem<128, 2, 5>());
    }
  };
  if (zeros != nullptr) pick(std::true_type{});
  else pick(std::false_type{});
  return true;
#else
  return false;
#endif
}

template bool w4a16_sm90<__nv_bfloat16>(const __nv_bfloat16*, const uint4*, const float*, const uint8_t*,
                                        const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, int, cudaStream_t);
template bool w4a16_sm90<__half>(const __half*, const uint4*, const float*, const uint8_t*, const __half*, __half*, int,
                                 int, int, int, int, int, cudaStream_t);

}  // namespace llmc::cuda
