// Portable scalar kernels (any CPU), and the tiled W4A16 driver shared by every instruction set.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace llmc::cpu {

void quantize_generic(const QuantArgs& a) {
  at::parallel_for(0, a.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(a.K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* x = a.x + m * a.K;
      float s = a.static_scale;
      if (s <= 0.f) {
        float amax = 0.f;
        for (int64_t k = 0; k < a.K; ++k) amax = std::max(amax, std::fabs(x[k]));
        s = amax == 0.f ? 1.f : amax / 127.f;
      }
      a.scale[m] = s;
      for (int64_t k = 0; k < a.K; ++k)  // nearbyint rounds half to even, like torch.round
        a.q[m * a.K + k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / s), -127.f, 127.f));
    }
  });
}

void w8a8_generic(const W8A8Args& a) {
  at::parallel_for(0, a.N, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t n = b; n < e; ++n) {
        const int8_t* x = a.xq + m * a.K;
        const int8_t* w = a.wq + n * a.K;
        int32_t acc = 0;
        for (int64_t k = 0; k < a.K; ++k) acc += int32_t(x[k]) * int32_t(w[k]);
        float y = float(acc) * a.xs[m] * a.ws[n];
        store_out(a.out, a.out_kind, m * a.N + n, a.bias ? y + a.bias[n] : y);
      }
  });
}

static inline float zero_of(const W4Args& a, int64_t n, int64_t g, int64_t G) {
  return a.zeros ? float(a.zeros[n * G + g]) : 8.f;
}

void dequant_tile_generic(const W4Args& a, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* tile) {
  const int64_t G = (a.K + a.group_size - 1) / a.group_size;
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t n = n0 + i;
    for (int64_t k = k0; k < k0 + kc; ++k) {
      const int64_t g = k / a.group_size;
      const uint8_t byte = a.qweight[n * a.ldq + k / 2];
      const float u = float((k & 1) ? byte >> 4 : byte & 0x0F);
      tile[i * kc + (k - k0)] = (u - zero_of(a, n, g, G)) * a.scales[n * G + g];
    }
  }
}

void w4a16_generic(const W4Args& a) {
  at::parallel_for(0, a.N, 16, [&](int64_t b, int64_t e) {
    std::vector<float> w(a.K);
    for (int64_t n = b; n < e; ++n) {
      dequant_tile_generic(a, n, 1, 0, a.K, w.data());
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * a.K;
        float y = 0.f;
        for (int64_t k = 0; k < a.K; ++k) y += x[k] * w[k];
        store_out(a.out, a.out_kind, m * a.N + n, a.bias ? y + a.bias[n] : y);
      }
    }
  });
}

void w4a16_tiled(const W4Args& a, DequantTileFn dequant) {
  // 128 x 512 float32 = 256 KiB: the tile stays in L2 while the GEMM sweeps x over it.
  constexpr int64_t NC = 128, KC = 512;
  const at::Tensor x = at::from_blob(const_cast<float*>(a.x), {a.M, a.K}, at::kFloat);
  const int64_t blocks = (a.N + NC - 1) / NC;
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    at::Tensor tile = at::empty({NC * KC}, at::kFloat);
    at::Tensor acc = at::empty({a.M, NC}, at::kFloat);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n0 = blk * NC, nc = std::min(NC, a.N - n0);
      at::Tensor y = acc.narrow(1, 0, nc);
      y.zero_();
      for (int64_t k0 = 0; k0 < a.K; k0 += KC) {
        const int64_t kc = std::min(KC, a.K - k0);
        dequant(a, n0, nc, k0, kc, tile.data_ptr<float>());
        at::Tensor w = tile.narrow(0, 0, nc * kc).view({nc, kc});
        y.addmm_(x.narrow(1, k0, kc), w.t());
      }
      const float* yp = acc.data_ptr<float>();
      for (int64_t m = 0; m < a.M; ++m)
        for (int64_t i = 0; i < nc; ++i) {
          const float v = yp[m * NC + i];
          store_out(a.out, a.out_kind, m * a.N + n0 + i, a.bias ? v + a.bias[n0 + i] : v);
        }
    }
  });
}

}  // namespace llmc::cpu
