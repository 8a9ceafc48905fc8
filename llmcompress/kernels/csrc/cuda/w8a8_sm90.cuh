// Prefill W8A8 on Hopper: a CUTLASS 3 warp-specialized TMA + wgmma int8 GEMM (the path cuBLASLt's int8 GEMM
// does not take) with the scales and bias fused into the epilogue through an epilogue visitor tree:
//   D[m, n] = (acc[m, n] * x_scale[m]) * w_scale[n] + bias[n]
// Compiled only when the CUTLASS headers are found (build.py: LLMC_CUTLASS_DIR) and for sm_90a.
#pragma once

#include <ATen/ATen.h>

namespace llmc::cuda {

// Returns false (and does nothing) where this build has no CUTLASS kernel for the output dtype or shape.
bool w8a8_sm90_bf16(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                    const float* bias, at::Tensor& out);
bool w8a8_sm90_f16(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                   const float* bias, at::Tensor& out);
bool w8a8_sm90_f32(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                   const float* bias, at::Tensor& out);

}  // namespace llmc::cuda

#if defined(LLMC_WITH_CUTLASS)
#include <c10/cuda/CUDAStream.h>

// The 64 x 224 int8 wgmma atom (the 128 x 224 tiles below) is one of CuTe's "extended" shapes, off by default.
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "common.cuh"

namespace llmc::cuda::sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <typename ElementD, typename TileShape, typename ClusterShape,
          typename Schedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong,
          typename EpiSchedule = cutlass::epilogue::TmaWarpSpecialized>
struct Int8Gemm {
  using LayoutA = cutlass::layout::RowMajor;     // x_q [M, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // w_q [N, K] row-major is B [K, N] column-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using XScale = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using WScale = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using AccTimesX = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
      fusion::Sm90AccFetch, XScale>;
  using Epilogue = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::multiply_add, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>,
      AccTimesX, WScale, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpiSchedule, Epilogue>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, LayoutA, 16, int8_t, LayoutB, 16, int32_t,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static bool run(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                  const float* bias, at::Tensor& out) {
    const int M = x_q.size(0), N = w_q.size(0), K = x_q.size(1);
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    const StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    const StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {x_q.data_ptr<int8_t>(), sa, w_q.data_ptr<int8_t>(), sb},
        {{// visitor tree arguments, children first, then the node's own
          {{}, {x_scale.data_ptr<float>(), 0.f, {_1{}, _0{}, int64_t(0)}}, {}},
          {w_scale.data_ptr<float>(), 0.f, {_0{}, _1{}, int64_t(0)}},
          {bias, 0.f, {_0{}, _1{}, int64_t(0)}},  // a null bias reads as zeros
          {}},
         nullptr, sd, reinterpret_cast<ElementD*>(out.data_ptr()), sd}};
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
    const size_t ws_bytes = Gemm::get_workspace_size(args);
    at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x_q.options().dtype(at::kByte));
    const cutlass::Status st = gemm(args, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(st == cutlass::Status::kSuccess, "llmc::w8a8_mm: CUTLASS sm90 GEMM failed: ",
                cutlass::cutlassGetStatusString(st));
    return true;
  }
};

// Tile by problem size: 64-row ping-pong tiles until M fills 128-row ones, then 128 x 256 cooperative tiles
// (two consumer warp groups) on 2 x 1 clusters. Measured on an H100, M = 1024 / 4096 at 8192 x 8192, bf16 out:
// 1.87x / 1.81x bf16 matmul against 1.05x / 1.10x for 128 x 128 ping-pong (vLLM's choice) and 1.11x / 1.15x
// for 128 x 128 x 256 (e3399bd:scripts/results/h100/README.md has the sweep).
// The large tiles are 224 wide instead where that takes fewer tile-widths of waves: tiles run in waves of one per
// SM, and a tile's time goes with its width, so the cost is waves x width. N = 14336 at M = 1024 is 448 tiles of
// 256 (3.4 waves on 132 SMs, the fourth 39% full: 4 x 256) or 512 of 224 (3.9 waves: 4 x 224). Stream-K, which
// splits the last waves' K loops instead, measured slower there (114.5 against 108.6 us). Knob::W8_TILE_N = 256|224
// forces one (tests, sweeps).
inline int large_tile_n(int M, int N) {
  const int forced = knob(Knob::W8_TILE_N, 0);
  if (forced == 224 || forced == 256) return forced;
  const int64_t sms = sm_count(), row_tiles = ((M + 127) / 128 + 1) / 2 * 2;  // 2 x 1 clusters: an even count
  auto cost = [&](int64_t w) { return (row_tiles * ((N + w - 1) / w) + sms - 1) / sms * w; };
  return cost(224) < cost(256) ? 224 : 256;
}

template <typename ElementD>
bool dispatch(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
              const float* bias, at::Tensor& out) {
  using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
  const int M = x_q.size(0), N = w_q.size(0);
  if (M <= 256)
    return Int8Gemm<ElementD, Shape<_64, _128, _128>, Shape<_1, _2, _1>>::run(x_q, x_scale, w_q, w_scale, bias, out);
  if (large_tile_n(M, N) == 224)
    return Int8Gemm<ElementD, Shape<_128, _224, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>::run(x_q, x_scale, w_q, w_scale,
                                                                                            bias, out);
  return Int8Gemm<ElementD, Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>::run(x_q, x_scale, w_q, w_scale,
                                                                                          bias, out);
}

}  // namespace llmc::cuda::sm90

#define LLMC_W8A8_SM90(NAME, ELEMENT)                                                                     \
  bool llmc::cuda::NAME(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,          \
                        const at::Tensor& w_scale, const float* bias, at::Tensor& out) {                  \
    return llmc::cuda::sm90::dispatch<ELEMENT>(x_q, x_scale, w_q, w_scale, bias, out);                    \
  }
#else
#define LLMC_W8A8_SM90(NAME, ELEMENT)                                                                     \
  bool llmc::cuda::NAME(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,       \
                        const float*, at::Tensor&) {                                                      \
    return false;                                                                                         \
  }
#endif
