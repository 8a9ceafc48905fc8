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

// With x split into even (xe) and odd (xo) columns, byte j of a weight row multiplies xe[j] by its low nibble
// and xo[j] by its high nibble, so no weight shuffling is needed. Per group g the zero point leaves the
// dot product:  sum_k (u_k - z) x_k = sum_k u_k x_k - z * xsum[g].
template <int MR, int NR>
void w4_rows(const W4Args& a, const float* xe, const float* xo, int64_t ldx, const float* xsum, int64_t G,
             int64_t n0, float* y /* [MR][NR] */) {
  const __m128i nib = _mm_set1_epi8(0x0F);
  const int64_t kh = (a.K + 1) / 2, gbytes = a.group_size / 2;
  const NextRowsPrefetch<NR> pf(a, n0);
  __m256 yv[NR][MR];
  float ys[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) yv[r][i] = _mm256_setzero_ps(), ys[r][i] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t j0 = g * gbytes, j1 = std::min(kh, j0 + gbytes), jv = j0 + ((j1 - j0) & ~int64_t(15));
    // Two accumulators per row hide FMA latency; past 4 rows x weight-rows one each keeps them in registers.
    constexpr int A = MR * NR <= 4 ? 2 : 1;
    __m256 acc[NR][MR][A];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MR; ++i)
        for (int a = 0; a < A; ++a) acc[r][i][a] = _mm256_setzero_ps();
    for (int64_t j = j0; j < jv; j += 16) {
      pf.at(j);
      for (int r = 0; r < NR; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.qweight + (n0 + r) * a.ldq + j));
        const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        const __m256 l0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 l1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 h0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 h1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int i = 0; i < MR; ++i) {
          const float* pe = xe + i * ldx + j;
          const float* po = xo + i * ldx + j;
          acc[r][i][0] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(pe), acc[r][i][0]);
          acc[r][i][A - 1] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(po), acc[r][i][A - 1]);
          acc[r][i][0] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(pe + 8), acc[r][i][0]);
          acc[r][i][A - 1] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(po + 8), acc[r][i][A - 1]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const int64_t n = n0 + r;
      const float s = a.scales[n * G + g];
      const float z = a.zeros ? float(a.zeros[n * G + g]) : 8.f;
      const uint8_t* q = a.qweight + n * a.ldq;
      for (int i = 0; i < MR; ++i) {
        float tail = 0.f;
        for (int64_t j = jv; j < j1; ++j) tail += float(q[j] & 0x0F) * xe[i * ldx + j] + float(q[j] >> 4) * xo[i * ldx + j];
        const __m256 sum = A == 2 ? _mm256_add_ps(acc[r][i][0], acc[r][i][A - 1]) : acc[r][i][0];
        yv[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(s), sum, yv[r][i]);
        ys[r][i] += s * (tail - z * xsum[i * G + g]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) y[i * NR + r] = hsum_ps(yv[r][i]) + ys[r][i];
}

using W4RowsFn = void (*)(const W4Args&, const float*, const float*, int64_t, const float*, int64_t, int64_t, float*);

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
  const int64_t G = (K + a.group_size - 1) / a.group_size, kh = (K + 1) / 2, ldx = round_up(kh, 16);
  std::vector<float> xe(M * ldx, 0.f), xo(M * ldx, 0.f), xsum(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      (k & 1 ? xo : xe)[m * ldx + k / 2] = a.x[m * K + k];
      xsum[m * G + k / a.group_size] += a.x[m * K + k];
    }
  // Row tiles: MR activation rows share each unpacked weight vector, NR weight rows share each x load.
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    float y[16];  // at most 8 activation rows x 1 weight row, or 1 x 4, or 2 x 2
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mr = std::min<int64_t>(8, M - m0);
      const int64_t nr = mr == 1 ? 8 : mr == 2 ? 2 : 1;
      for (int64_t n = b; n < e;) {
        const int64_t rows = n + nr <= e ? nr : 1;
        constexpr W4RowsFn kSingle[8] = {w4_rows<1, 1>, w4_rows<2, 1>, w4_rows<3, 1>, w4_rows<4, 1>,
                                         w4_rows<5, 1>, w4_rows<6, 1>, w4_rows<7, 1>, w4_rows<8, 1>};
        W4RowsFn fn = mr >= 3 ? kSingle[mr - 1]
                    : mr == 2 ? (rows == 2 ? w4_rows<2, 2> : w4_rows<2, 1>)
                              : (rows == 8 ? w4_rows<1, 8> : w4_rows<1, 1>);
        fn(a, xe.data() + m0 * ldx, xo.data() + m0 * ldx, ldx, xsum.data() + m0 * G, G, n, y);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t r = 0; r < rows; ++r) {
            const float v = y[i * rows + r];
            store_out(a.out, a.out_kind, (m0 + i) * N + n + r, a.bias ? v + a.bias[n + r] : v);
          }
        n += rows;
      }
    }
  });
}

}  // namespace llmc::cpu

#pragma GCC pop_options
#endif
