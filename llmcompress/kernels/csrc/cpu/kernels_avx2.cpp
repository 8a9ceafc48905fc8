// AVX2 + FMA kernels. A target pragma (after every include) compiles only this file's own functions for
// AVX2, so the extension still builds for baseline x86-64; ops.cpp calls them only when cpuid reports AVX2+FMA.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace llmc::cpu {
namespace {

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax_ps(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ------------------------------------------------------------------ per-token int8 quantizer

inline __m256i quantize8(const float* x, __m256 scale) {
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  // An IEEE divide (not a multiply by 1/scale) and round-half-even: bit-identical to the torch reference.
  __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
}

void quantize_row(const float* x, int64_t K, float s, int8_t* q, float* scale_out) {
  if (s <= 0.f) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
    float amax = hmax_ps(mx);
    for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
    s = amax == 0.f ? 1.f : amax / 127.f;
  }
  *scale_out = s;
  const __m256 vs = _mm256_set1_ps(s);
  // packs interleave 128-bit lanes; this permutation puts the 32 bytes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i a = _mm256_packs_epi32(quantize8(x + k, vs), quantize8(x + k + 8, vs));
    __m256i b = _mm256_packs_epi32(quantize8(x + k + 16, vs), quantize8(x + k + 24, vs));
    __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), bytes);
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / s), -127.f, 127.f));
}

// ------------------------------------------------------------------ W8A8

// acc[i][j] += dot(x row i, w row j) over kv (a multiple of 16) int8 products, as int16 pairs: vpmaddwd is
// exact for every int8 input (even -128), unlike vpmaddubsw, whose int16 pair sums can saturate.
template <int MR, int NR>
void w8_tile(const int16_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t kv, int32_t* acc, int64_t ldacc) {
  __m256i c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kv; k += 16) {
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * ldw + k)));
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + k));
      for (int j = 0; j < NR; ++j) c[i][j] = _mm256_add_epi32(c[i][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * ldacc + j] += hsum_epi32(c[i][j]);
}

using W8TileFn = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t);
constexpr int W8_MR = 4, W8_NR = 3;
constexpr W8TileFn kW8Tiles[W8_MR][W8_NR] = {
    {w8_tile<1, 1>, w8_tile<1, 2>, w8_tile<1, 3>},
    {w8_tile<2, 1>, w8_tile<2, 2>, w8_tile<2, 3>},
    {w8_tile<3, 1>, w8_tile<3, 2>, w8_tile<3, 3>},
    {w8_tile<4, 1>, w8_tile<4, 2>, w8_tile<4, 3>},
};

// ------------------------------------------------------------------ W4A16

// A 32-byte load of a nibble row covers columns 64b .. 64b + 63: 32-bit word l holds columns 64b + 8l + t at
// bits 4t .. 4t + 3 (t = 0..7). Masking nibble t in place and converting gives u * 16^t exactly (at most four
// significant bits), so with the activations permuted to x[64b + 8l + t] * 16^-t at lane l of vector t (a power
// of two: exact unless |x| < 2^-102, where the product loses bits below 2^-125) each FMA adds u * x exactly. That is
// one AND and one convert per 8 weights, where zero-extending bytes (vpmovzxbd, about 1.2 cycles each on Zen 3)
// and splitting even/odd columns had made the loop issue bound. t = 7 would land in the sign bit: it is shifted
// down instead and keeps its x unscaled.
constexpr int64_t kW4Block = 64;

// The activations of a tile of mr rows, laid out [block][t][row][lane] so that the kernel reads them from one
// pointer at constant offsets (with a pointer per row, GCC ran out of registers and spilled at MR = 4).
void permute_x(const float* x, int64_t K, int64_t mr, int64_t nb, float* xp) {
  for (int64_t b = 0; b < nb; ++b)
    for (int t = 0; t < 8; ++t) {
      const float f = t < 7 ? std::ldexp(1.f, -4 * t) : 1.f;
      for (int64_t i = 0; i < mr; ++i)
        for (int l = 0; l < 8; ++l) xp[((b * 8 + t) * mr + i) * 8 + l] = x[i * K + b * kW4Block + 8 * l + t] * f;
    }
}

// Per-lane group scales of one 64-column block when groups are narrower than it (group_size a multiple of 8,
// so each 32-bit word's eight columns share a group).
inline __m256 lane_scales(const float* srow, const W4Args& a, int64_t b) {
  if (a.group_size == 32)
    return _mm256_set_m128(_mm_set1_ps(srow[2 * b + 1]), _mm_set1_ps(srow[2 * b]));
  const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(int32_t(b * kW4Block)), _mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56));
  alignas(32) int32_t c[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(c), col);
  alignas(32) float v[8];
  for (int l = 0; l < 8; ++l) v[l] = srow[c[l] / a.group_size];
  return _mm256_load_ps(v);
}

// y[i][r] = sum over the whole 64-column blocks of u[n0 + r, k] * s * x[i, k], for MR activation rows and NR
// weight rows (zero points and the columns past the last whole block: w4_fixup). UNIFORM: group_size is a
// multiple of 64, so whole blocks share a scale and are summed before it is applied.
template <int MR, int NR, bool UNIFORM>
void w4_rows(const W4Args& a, const float* xp, int64_t G, int64_t n0, float* y /* [MR][NR] */) {
  const int64_t nb = a.K / kW4Block;
  const NextRowsPrefetch<NR> pf(a, n0);
  const uint8_t* q[NR];
  const float* srow[NR];
  for (int r = 0; r < NR; ++r) q[r] = a.qweight + (n0 + r) * a.ldq, srow[r] = a.scales + (n0 + r) * G;
  // Two accumulators per pair of rows hide FMA latency; past 4 pairs one each keeps them in registers.
  constexpr int A = MR * NR <= 4 ? 2 : 1;
  __m256 yv[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) yv[r][i] = _mm256_setzero_ps();
  const int64_t span = UNIFORM ? a.group_size / kW4Block : 1;  // blocks summed before scaling
  for (int64_t b0 = 0; b0 < nb; b0 += span) {
    const int64_t b1 = std::min(nb, b0 + span);
    __m256 acc[NR][MR][A];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MR; ++i)
        for (int c = 0; c < A; ++c) acc[r][i][c] = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      pf.at(b * 32);
      const float* xb = xp + b * kW4Block * MR;
      for (int r = 0; r < NR; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + b * 32));
        // Fully unrolled, or the accumulators become a stack array indexed at run time (M = 4 ran 3.6x M = 1).
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          const __m256 w = _mm256_cvtepi32_ps(t < 7 ? _mm256_and_si256(v, _mm256_set1_epi32(0xF << (4 * t)))
                                                    : _mm256_srli_epi32(v, 28));
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i)
            acc[r][i][t % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + (t * MR + i) * 8), acc[r][i][t % A]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 s = UNIFORM ? _mm256_set1_ps(srow[r][b0 / span]) : lane_scales(srow[r], a, b0);
      for (int i = 0; i < MR; ++i)
        yv[r][i] = _mm256_fmadd_ps(s, A == 2 ? _mm256_add_ps(acc[r][i][0], acc[r][i][A - 1]) : acc[r][i][0], yv[r][i]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) y[i * NR + r] = hsum_ps(yv[r][i]);
}

// The columns past the last whole block of weight row n for activation row x, then every group's zero point:
// sum_k (u - z) x = sum_k u x - z * xsum[g].
float w4_fixup(const W4Args& a, const float* x, const float* xsum, int64_t G, int64_t n) {
  const uint8_t* q = a.qweight + n * a.ldq;
  const float* s = a.scales + n * G;
  float y = 0.f;
  for (int64_t k = a.K / kW4Block * kW4Block; k < a.K; ++k)
    y += s[k / a.group_size] * float(k & 1 ? q[k / 2] >> 4 : q[k / 2] & 0x0F) * x[k];
  for (int64_t g = 0; g < G; ++g) y -= s[g] * (a.zeros ? float(a.zeros[n * G + g]) : 8.f) * xsum[g];
  return y;
}

using W4RowsFn = void (*)(const W4Args&, const float*, int64_t, int64_t, float*);

template <bool U>
constexpr W4RowsFn kW4Single[4] = {w4_rows<1, 1, U>, w4_rows<2, 1, U>, w4_rows<3, 1, U>, w4_rows<4, 1, U>};
template <bool U>
constexpr W4RowsFn kW4Pair[4] = {w4_rows<1, 2, U>, w4_rows<2, 2, U>, w4_rows<3, 2, U>, w4_rows<4, 2, U>};

}  // namespace

void quantize_avx2(const QuantArgs& a) {
  at::parallel_for(0, a.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(a.K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(a.x + m * a.K, a.K, a.static_scale, a.q + m * a.K, a.scale + m);
  });
}

void w8a8_avx2(const W8A8Args& a) {
  const int64_t M = a.M, N = a.N, K = a.K, kp = round_up(K, 16);
  // Activations widened to int16 once (zero padded to 16); weights are widened on the fly from int8.
  std::vector<int16_t> x16(M * kp, 0);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t k = 0; k < K; ++k) x16[m * kp + k] = a.xq[m * K + k];
  });
  // MC x NC int32 accumulators per task; a KC-long strip of 4 x-rows and 3 w-rows (14 KiB) stays in L1.
  constexpr int64_t MC = 64, NC = 96, KC = 2048;
  const int64_t mblocks = (M + MC - 1) / MC, nblocks = (N + NC - 1) / NC;
  at::parallel_for(0, mblocks * nblocks, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> acc(MC * NC);
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = (t / nblocks) * MC, n0 = (t % nblocks) * NC;
      const int64_t mc = std::min(MC, M - m0), nc = std::min(NC, N - n0);
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0), kv = kc & ~int64_t(15);
        for (int64_t mi = 0; mi < mc; mi += W8_MR) {
          const int64_t mr = std::min<int64_t>(W8_MR, mc - mi);
          const int16_t* x = x16.data() + (m0 + mi) * kp + k0;
          for (int64_t ni = 0; ni < nc; ni += W8_NR) {
            const int64_t nr = std::min<int64_t>(W8_NR, nc - ni);
            const int8_t* w = a.wq + (n0 + ni) * K + k0;
            int32_t* c = acc.data() + mi * NC + ni;
            kW8Tiles[mr - 1][nr - 1](x, kp, w, K, kv, c, NC);
            for (int64_t k = kv; k < kc; ++k)
              for (int64_t i = 0; i < mr; ++i)
                for (int64_t j = 0; j < nr; ++j) c[i * NC + j] += int32_t(x[i * kp + k]) * int32_t(w[j * K + k]);
          }
        }
      }
      for (int64_t i = 0; i < mc; ++i)
        for (int64_t j = 0; j < nc; ++j) {
          const int64_t m = m0 + i, n = n0 + j;
          const float y = float(acc[i * NC + j]) * a.xs[m] * a.ws[n];
          store_out(a.out, a.out_kind, m * N + n, a.bias ? y + a.bias[n] : y);
        }
    }
  });
}

void dequant_tile_avx2(const W4Args& a, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* tile) {
  const int64_t G = (a.K + a.group_size - 1) / a.group_size, kend = std::min(a.K, k0 + kc);
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* q = a.qweight + n * a.ldq;
    float* out = tile + i * kc - k0;
    for (int64_t k = k0; k < kend;) {
      const int64_t g = k / a.group_size, gend = std::min(kend, (g + 1) * a.group_size);
      const float s = a.scales[n * G + g], z = a.zeros ? float(a.zeros[n * G + g]) : 8.f;
      const __m256 vs = _mm256_set1_ps(s), vzs = _mm256_set1_ps(-z * s);
      for (; k + 32 <= gend; k += 32) {  // k is even here: groups and tiles start on even columns
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2));
        const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  // codes in k order
        const __m128i parts[4] = {c0, _mm_srli_si128(c0, 8), c1, _mm_srli_si128(c1, 8)};
        for (int p = 0; p < 4; ++p)
          _mm256_storeu_ps(out + k + 8 * p,
                           _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p])), vs, vzs));
      }
      for (; k < gend; ++k) {
        const uint8_t byte = q[k / 2];
        out[k] = (float((k & 1) ? byte >> 4 : byte & 0x0F) - z) * s;
      }
    }
    for (int64_t k = kend; k < k0 + kc; ++k) out[k] = 0.f;
  }
}

void w4a16_avx2(const W4Args& a) {
  const int64_t M = a.M, N = a.N, K = a.K;
  if (M > 16) return w4a16_tiled(a, dequant_tile_avx2);
  if (a.group_size % 8) return w4a16_generic(a);  // groups must not split a 32-bit word's eight columns
  const int64_t G = (K + a.group_size - 1) / a.group_size, nb = K / kW4Block, ldx = nb * kW4Block;
  std::vector<float> xp(M * ldx), xsum(M * G, 0.f);
  // Tiles of up to 4 activation rows, each sharing every x load between 2 weight rows: at 8 rows x 1 the x tile
  // (128 KiB at K = 4096) was read from L2 for every weight row, and M = 8 ran no faster than torch's int4 kernel;
  // in 4 x 2 tiles, half the x traffic per weight, it ran 1.29x it (the weights are streamed M / 4 times).
  constexpr int64_t TM = 4;
  for (int64_t m0 = 0; m0 < M; m0 += TM) permute_x(a.x + m0 * K, K, std::min<int64_t>(TM, M - m0), nb, xp.data() + m0 * ldx);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * G + k / a.group_size] += a.x[m * K + k];
  const bool uniform = a.group_size % kW4Block == 0;
  // Row tiles: MR activation rows share each converted weight vector, NR weight rows share each x load.
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    float y[8];  // at most 4 activation rows x 2 weight rows
    for (int64_t m0 = 0; m0 < M; m0 += TM) {
      const int64_t mr = std::min<int64_t>(TM, M - m0);
      for (int64_t n = b; n < e;) {
        const int64_t rows = n + 2 <= e ? 2 : 1;
        W4RowsFn fn = uniform ? kW4Single<true>[mr - 1] : kW4Single<false>[mr - 1];
        if (rows == 2) fn = uniform ? kW4Pair<true>[mr - 1] : kW4Pair<false>[mr - 1];
        fn(a, xp.data() + m0 * ldx, G, n, y);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t m = m0 + i;
            const float v = y[i * rows + r] + w4_fixup(a, a.x + m * K, xsum.data() + m * G, G, n + r);
            store_out(a.out, a.out_kind, m * N + n + r, a.bias ? v + a.bias[n + r] : v);
          }
        n += rows;
      }
    }
  });
}

}  // namespace llmc::cpu

#pragma GCC pop_options
#endif
