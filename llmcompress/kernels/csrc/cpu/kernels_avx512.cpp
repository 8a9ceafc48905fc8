// AVX-512 (F, BW, VL, VNNI) kernels, compiled through a target pragma like kernels_avx2.cpp and called only
// when cpuid reports all four. W8A8 uses VNNI's vpdpwssd (int16 pairs multiplied and accumulated into int32
// in one instruction): exact for every int8 input, where vpdpbusd's unsigned x signed form would need a
// +128 shift of the activations and a per-call weight column-sum correction.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

namespace llmc::cpu {
namespace {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void quantize_row(const float* x, int64_t K, float s, int8_t* q, float* scale_out) {
  if (s <= 0.f) {
    __m512 mx = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    float amax = _mm512_reduce_max_ps(mx);
    for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
    s = amax == 0.f ? 1.f : amax / 127.f;
  }
  *scale_out = s;
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    // IEEE divide + round-half-even, bit-identical to the torch reference.
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / s), -127.f, 127.f));
}

template <int MR, int NR>
void w8_tile(const int16_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t kv, int32_t* acc, int64_t ldacc) {
  __m512i c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kv; k += 32) {
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw + k)));
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) c[i][j] = _mm512_dpwssd_epi32(c[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * ldacc + j] += _mm512_reduce_add_epi32(c[i][j]);
}

using W8TileFn = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t);
constexpr int W8_MR = 4, W8_NR = 4;
constexpr W8TileFn kW8Tiles[W8_MR][W8_NR] = {
    {w8_tile<1, 1>, w8_tile<1, 2>, w8_tile<1, 3>, w8_tile<1, 4>},
    {w8_tile<2, 1>, w8_tile<2, 2>, w8_tile<2, 3>, w8_tile<2, 4>},
    {w8_tile<3, 1>, w8_tile<3, 2>, w8_tile<3, 3>, w8_tile<3, 4>},
    {w8_tile<4, 1>, w8_tile<4, 2>, w8_tile<4, 3>, w8_tile<4, 4>},
};

// Same scheme as kernels_avx2.cpp: x split into even/odd columns, 16 weight bytes (32 codes) per step.
template <int MR, int NR>
void w4_rows(const W4Args& a, const float* xe, const float* xo, int64_t ldx, const float* xsum, int64_t G,
             int64_t n0, float* y) {
  const __m128i nib = _mm_set1_epi8(0x0F);
  const int64_t kh = (a.K + 1) / 2, gbytes = a.group_size / 2;
  const NextRowsPrefetch<NR> pf(a, n0);
  __m512 yv[NR][MR];
  float ys[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) yv[r][i] = _mm512_setzero_ps(), ys[r][i] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t j0 = g * gbytes, j1 = std::min(kh, j0 + gbytes), jv = j0 + ((j1 - j0) & ~int64_t(15));
    __m512 acc[NR][MR][2];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MR; ++i) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
    for (int64_t j = j0; j < jv; j += 16) {
      pf.at(j);
      for (int r = 0; r < NR; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.qweight + (n0 + r) * a.ldq + j));
        const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, nib)));
        const __m512 h = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), nib)));
        for (int i = 0; i < MR; ++i) {
          acc[r][i][0] = _mm512_fmadd_ps(l, _mm512_loadu_ps(xe + i * ldx + j), acc[r][i][0]);
          acc[r][i][1] = _mm512_fmadd_ps(h, _mm512_loadu_ps(xo + i * ldx + j), acc[r][i][1]);
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
        yv[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_add_ps(acc[r][i][0], acc[r][i][1]), yv[r][i]);
        ys[r][i] += s * (tail - z * xsum[i * G + g]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) y[i * NR + r] = _mm512_reduce_add_ps(yv[r][i]) + ys[r][i];
}

using W4RowsFn = void (*)(const W4Args&, const float*, const float*, int64_t, const float*, int64_t, int64_t, float*);

}  // namespace

void quantize_avx512(const QuantArgs& a) {
  at::parallel_for(0, a.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(a.K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(a.x + m * a.K, a.K, a.static_scale, a.q + m * a.K, a.scale + m);
  });
}

void w8a8_avx512(const W8A8Args& a) {
  const int64_t M = a.M, N = a.N, K = a.K, kp = round_up(K, 32);
  std::vector<int16_t> x16(M * kp, 0);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t k = 0; k < K; ++k) x16[m * kp + k] = a.xq[m * K + k];
  });
  constexpr int64_t MC = 64, NC = 96, KC = 2048;
  const int64_t mblocks = (M + MC - 1) / MC, nblocks = (N + NC - 1) / NC;
  at::parallel_for(0, mblocks * nblocks, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> acc(MC * NC);
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = (t / nblocks) * MC, n0 = (t % nblocks) * NC;
      const int64_t mc = std::min(MC, M - m0), nc = std::min(NC, N - n0);
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0), kv = kc & ~int64_t(31);
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

void dequant_tile_avx512(const W4Args& a, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* tile) {
  const int64_t G = (a.K + a.group_size - 1) / a.group_size, kend = std::min(a.K, k0 + kc);
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* q = a.qweight + n * a.ldq;
    float* out = tile + i * kc - k0;
    for (int64_t k = k0; k < kend;) {
      const int64_t g = k / a.group_size, gend = std::min(kend, (g + 1) * a.group_size);
      const float s = a.scales[n * G + g], z = a.zeros ? float(a.zeros[n * G + g]) : 8.f;
      const __m512 vs = _mm512_set1_ps(s), vzs = _mm512_set1_ps(-z * s);
      for (; k + 32 <= gend; k += 32) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2));
        const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);
        _mm512_storeu_ps(out + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c0)), vs, vzs));
        _mm512_storeu_ps(out + k + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c1)), vs, vzs));
      }
      for (; k < gend; ++k) {
        const uint8_t byte = q[k / 2];
        out[k] = (float((k & 1) ? byte >> 4 : byte & 0x0F) - z) * s;
      }
    }
    for (int64_t k = kend; k < k0 + kc; ++k) out[k] = 0.f;
  }
}

void w4a16_avx512(const W4Args& a) {
  const int64_t M = a.M, N = a.N, K = a.K;
  if (M > 16) return w4a16_tiled(a, dequant_tile_avx512);
  const int64_t G = (K + a.group_size - 1) / a.group_size, kh = (K + 1) / 2, ldx = round_up(kh, 16);
  std::vector<float> xe(M * ldx, 0.f), xo(M * ldx, 0.f), xsum(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      (k & 1 ? xo : xe)[m * ldx + k / 2] = a.x[m * K + k];
      xsum[m * G + k / a.group_size] += a.x[m * K + k];
    }
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    float y[16];  // at most 8 activation rows x 1 weight row, or 1 x 4, or 2 x 2
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mr = std::min<int64_t>(8, M - m0);
      const int64_t nr = mr == 1 ? 4 : mr == 2 ? 2 : 1;
      for (int64_t n = b; n < e;) {
        const int64_t rows = n + nr <= e ? nr : 1;
        constexpr W4RowsFn kSingle[8] = {w4_rows<1, 1>, w4_rows<2, 1>, w4_rows<3, 1>, w4_rows<4, 1>,
                                         w4_rows<5, 1>, w4_rows<6, 1>, w4_rows<7, 1>, w4_rows<8, 1>};
        W4RowsFn fn = mr >= 3 ? kSingle[mr - 1]
                    : mr == 2 ? (rows == 2 ? w4_rows<2, 2> : w4_rows<2, 1>)
                              : (rows == 4 ? w4_rows<1, 4> : w4_rows<1, 1>);
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
