// Raw-pointer CPU kernels behind the llmc ops; one set per instruction set, chosen at run time (ops.cpp).
// Semantics: llmcompress/kernels/reference.py. Every pointer is to contiguous row-major data.
#pragma once

#include <algorithm>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace llmc::cpu {

enum class OutKind { F32, BF16, F16 };

inline void store_out(void* out, OutKind kind, int64_t idx, float v) {
  switch (kind) {
    case OutKind::F32: static_cast<float*>(out)[idx] = v; break;
    case OutKind::BF16: static_cast<c10::BFloat16*>(out)[idx] = c10::BFloat16(v); break;  // round to nearest even
    case OutKind::F16: static_cast<c10::Half*>(out)[idx] = c10::Half(v); break;
  }
}

// q[m, :] = clamp(round_half_even(x[m, :] / scale[m]), -127, 127); scale[m] = max|x[m, :]| / 127 (1 for an
// all-zero row) when static_scale <= 0, else static_scale for every row.
struct QuantArgs {
  const float* x;
  int8_t* q;
  float* scale;
  float static_scale;
  int64_t M, K;
};

// out[m, n] = float(sum_k xq[m, k] * wq[n, k]) * xs[m] * ws[n] + bias[n]   (bias may be null)
struct W8A8Args {
  const int8_t* xq;
  const float* xs;
  const int8_t* wq;
  const float* ws;
  const float* bias;
  void* out;
  OutKind out_kind;
  int64_t M, N, K;
};

// out[m, n] = sum_g scale[n, g] * sum_{k in g} (u[n, k] - zero[n, g]) * x[m, k] + bias[n]
// u: nibbles of qweight rows (row stride ldq bytes, element k in byte k/2, low nibble for even k);
// zeros null means symmetric (zero = 8). x is float32 [M, K]; G = ceil(K / group_size).
struct W4Args {
  const float* x;
  const uint8_t* qweight;
  const float* scales;
  const uint8_t* zeros;
  const float* bias;
  void* out;
  OutKind out_kind;
  int64_t M, N, K, ldq, group_size;
};

// A W4 weight tile [nc, kc] (rows n0.., columns k0.., k0 even) dequantized to float32, row-major.
using DequantTileFn = void (*)(const W4Args& a, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* tile);

// Prefill-sized W4A16: dequantize one L2-sized weight tile at a time and multiply it with torch's float32 GEMM,
// so the full-precision weight never exists in memory.
void w4a16_tiled(const W4Args& a, DequantTileFn dequant);

void quantize_generic(const QuantArgs& a);
void w8a8_generic(const W8A8Args& a);
void w4a16_generic(const W4Args& a);
void dequant_tile_generic(const W4Args& a, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* tile);

#if defined(__x86_64__) || defined(_M_X64)
// For the M = 1 W4 row loops (AVX2 and AVX-512): a core streaming only NR rows has too few misses in flight to
// draw its share of DRAM bandwidth (measured: about 3 GB/s per core); prefetching the next NR rows at the same
// offset, one row block ahead, keeps twice as many lines coming and made the M = 1 loop about 1.6x faster out
// of DRAM.
template <int NR>
struct NextRowsPrefetch {
  const uint8_t* row[NR];
  NextRowsPrefetch(const W4Args& a, int64_t n0) {
    for (int r = 0; r < NR; ++r) row[r] = a.qweight + std::min(n0 + NR + r, a.N - 1) * a.ldq;
  }
  // Called at each byte offset j of the current rows: one cache line of each next row per 64 bytes.
  void at(int64_t j) const {
    if ((j & 63) == 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(row[r] + j), _MM_HINT_T0);
  }
};

void quantize_avx2(const QuantArgs& a);
void w8a8_avx2(const W8A8Args& a);
void w4a16_avx2(const W4Args& a);
void dequant_tile_avx2(const W4Args& a, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* tile);
void quantize_avx512(const QuantArgs& a);
void w8a8_avx512(const W8A8Args& a);
void w4a16_avx512(const W4Args& a);
void dequant_tile_avx512(const W4Args& a, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* tile);
#endif

}  // namespace llmc::cpu
