// Shared device helpers of the llmc CUDA kernels: tensor-core mma.sync wrappers, streaming loads, dtype glue.
//
// Decode kernels put the WEIGHT tile in the mma's A operand (16 output features) and the tokens in B
// (8 per mma), so M = 1..16 wastes no weight bandwidth. Fragment ownership (PTX ISA, mma.m16n8k16 / k32),
// lane = 4 * g + t:
//   A (16 x K16 or K32, row-major): a0 = A[g][k..], a1 = A[g + 8][k..], a2 = A[g][k + half..], a3 = A[g + 8][k + half..]
//   B (K x 8, column):              b0 = B[k..][g],  b1 = B[k + half..][g]
//   C (16 x 8, fp32 or int32):      c0, c1 = C[g][2t, 2t + 1],  c2, c3 = C[g + 8][2t, 2t + 1]
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdlib>

namespace llmc::cuda {

// Host: the kernel choices the dispatchers make by shape, which tests and sweeps may force so that every variant
// runs against the reference. Each call site passes its own default; knob() returns it unless a variant was
// forced through torch.ops.llmc._force_cuda_variant (kernels/ops.py: force_cuda_variant). Not read from the
// environment: the only user-facing switch is LLMC_KERNELS=reference (Python side).
enum class Knob : int {
  W4_PDL,            // programmatic dependent launch of the W4A16 decode kernel (sm_90+): 1 on, 0 off
  W4_GENERIC,        // 1: the portable W4A16 kernels even where the fast ones apply
  W4_TILED_MAX_M,    // largest M of the W4A16 gemv/tiled kernels
  W4_GEMV_MAX_M,     // largest M of the W4A16 gemv kernel
  W4_GEMV_WIDE,      // W4A16 gemv: 1 eight warps split K, 0 four
  W4_TILED,          // W4A16 tiled kernel's tile shape (0-4)
  W4_DECODE_MAX_M,   // largest M of the generic W4A16 decode kernel
  W4_DEQUANT_ELEMS,  // W4A16 dequantize + cuBLAS: weight elements per piece
  W4_SM90_MIN_M,     // M range of the Hopper wgmma W4A16 kernel
  W4_SM90_MAX_M,
  W4_WGMMA,          // its tile variant
  W8_TILE_N,         // large-tile W8A8 GEMM width: 0 by wave count, 224 or 256
  W8_DECODE_PIPE,    // W8A8 decode: 1 double-banked loop, 0 plain
  W8_DECODE_PAIR,    // W8A8 decode: 1 two feature tiles per block, 0 one
  QUANT_SCALAR,      // 1: the scalar row quantizer instead of the vector one
  kCount
};
inline constexpr const char* kKnobNames[int(Knob::kCount)] = {
    "W4_PDL",        "W4_GENERIC",    "W4_TILED_MAX_M", "W4_GEMV_MAX_M", "W4_GEMV_WIDE",
    "W4_TILED",      "W4_DECODE_MAX_M", "W4_DEQUANT_ELEMS", "W4_SM90_MIN_M", "W4_SM90_MAX_M",
    "W4_WGMMA",      "W8_TILE_N",     "W8_DECODE_PIPE", "W8_DECODE_PAIR", "QUANT_SCALAR"};

struct ForcedKnobs {
  bool set[int(Knob::kCount)];
  int value[int(Knob::kCount)];
};
// One table for the whole extension (an inline function's static is shared by every translation unit).
inline ForcedKnobs& forced_knobs() {
  static ForcedKnobs forced{};
  return forced;
}
inline int knob(Knob k, int fallback) {
  const ForcedKnobs& f = forced_knobs();
  return f.set[int(k)] ? f.value[int(k)] : fallback;
}

// Host: an attribute of the current device, cached per device (at least 1; 1 where it cannot be read).
template <cudaDeviceAttr ATTR>
inline int device_attr() {
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  if (cache[dev] == 0) {
    int v = 0;
    cudaDeviceGetAttribute(&v, ATTR, dev);
    cache[dev] = v > 0 ? v : 1;
  }
  return cache[dev];
}
inline int sm_count() { return device_attr<cudaDevAttrMultiProcessorCount>(); }
inline int cc_major() { return device_attr<cudaDevAttrComputeCapabilityMajor>(); }

constexpr int kWarps = 8;  // warps per block; they split K of one 16-feature tile

__device__ __forceinline__ uint4 ld_stream(const void* p) {
  // Weights are read once: skip L1 so the activations stay there.
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// A weight row read 16 bytes per lane with 64 bytes per row per warp instruction (the W8A8 decode kernels, whose
// row-major int8 rows the block's warps read in consecutive 64-byte pieces): the L2::256B hint has L2 fetch each
// 256-byte block from memory at once. On H100 at 8192 x 8192, M = 1: 26.5 -> 24.3 us (e3399bd:scripts/lab/w8_lab.py).
// The W4A16 kernels, whose warps read 512 contiguous bytes, gain nothing from it.
__device__ __forceinline__ uint4 ld_stream_l2_256(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
  // 0x4300 is bf16 128.0: OR-ing a 4-bit code into its mantissa gives exactly 128 + code.
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kBias = 128.f;
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t mul(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Mma<__half> {
  // 0x6400 is fp16 1024.0: OR-ing a 4-bit code into its mantissa gives exactly 1024 + code.
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kBias = 1024.f;
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t mul(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ void mma_s8(int* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Asynchronous global -> shared copies (sm_80+): 16 bytes, zero-filled when !valid.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
// Four 8x8 b16 matrices from shared memory; lane l addresses row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Block epilogue of the decode kernels, whose W warps each hold partial C fragments acc[MT][4] of the same
// 16 output features (fragment rows) x MT 8-token tiles (fragment columns): sum them through shared memory,
// then call store(row, tok, sum) once for every (feature row, token) inside the N x M output.
template <int W, int MT, typename Acc, typename Store>
__device__ __forceinline__ void reduce_warps_store(const Acc (&acc)[MT][4], int nt, int m0, int M, int N, Store&& store) {
  __shared__ Acc red[W][MT * 4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][mt * 4 + e][lane] = acc[mt][e];
  __syncthreads();
  for (int i = threadIdx.x; i < MT * 4 * 32; i += blockDim.x) {
    const int l = i & 31, e = i >> 5;
    Acc v = 0;
#pragma unroll
    for (int wi = 0; wi < W; ++wi) v += red[wi][e][l];
    const int row = nt * 16 + (l >> 2) + ((e & 3) >= 2 ? 8 : 0);
    const int tok = m0 + (e >> 2) * 8 + 2 * (l & 3) + (e & 1);
    if (row < N && tok < M) store(row, tok, v);
  }
}

}  // namespace llmc::cuda
