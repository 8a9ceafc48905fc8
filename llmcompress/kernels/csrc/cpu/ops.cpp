// Schemas of the llmc ops (TORCH_LIBRARY) and their CPU implementations: argument checks, then the kernel
// for the best instruction set this CPU has, chosen at run time (LLMC_CPU_ISA=generic|avx2|avx512 forces one).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../checks.h"
#include "kernels.h"

namespace llmc {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "llmc: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// ------------------------------------------------------------------ shared argument checks (CPU and CUDA)

void check_quantize_args(const at::Tensor& x, const std::optional<at::Tensor>& scale, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  check_float(x, "x");
  if (scale) TORCH_CHECK(scale->numel() == 1, op, ": a static scale must be one number, got ", scale->sizes());
}

void check_w8a8_args(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale) {
  TORCH_CHECK(x_q.dim() == 2 && x_q.scalar_type() == at::kChar, "llmc::w8a8_mm: x_q must be int8 [M, K], got ",
              x_q.scalar_type(), " ", x_q.sizes());
  TORCH_CHECK(w_q.dim() == 2 && w_q.scalar_type() == at::kChar, "llmc::w8a8_mm: w_q must be int8 [N, K], got ",
              w_q.scalar_type(), " ", w_q.sizes());
  TORCH_CHECK(x_q.size(1) == w_q.size(1), "llmc::w8a8_mm: K differs: x_q ", x_q.sizes(), " vs w_q ", w_q.sizes());
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.numel() == x_q.size(0),
              "llmc::w8a8_mm: x_scale must be float32 [M]=[", x_q.size(0), "], got ", x_scale.scalar_type(), " ", x_scale.sizes());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == w_q.size(0),
              "llmc::w8a8_mm: w_scale must be float32 [N]=[", w_q.size(0), "], got ", w_scale.scalar_type(), " ", w_scale.sizes());
  TORCH_CHECK(x_q.is_contiguous() && w_q.is_contiguous() && x_scale.is_contiguous() && w_scale.is_contiguous(),
              "llmc::w8a8_mm: inputs must be contiguous");
}

void check_w4a16_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "llmc::w4a16_mm: x must be contiguous 2-D [M, K], got ", x.sizes());
  check_float(x, "x");
  check_float(scales, "scales");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0, "llmc::w4a16_mm: group_size must be positive and even, got ", group_size);
  const int64_t K = x.size(1), G = (K + group_size - 1) / group_size;
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "llmc::w4a16_mm: qweight must be contiguous uint8 [N, ceil(K/2)], got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(qweight.size(1) >= (K + 1) / 2, "llmc::w4a16_mm: qweight rows hold ", 2 * qweight.size(1),
              " codes but x has K=", K);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == qweight.size(0) && scales.size(1) == G && scales.is_contiguous(),
              "llmc::w4a16_mm: scales must be contiguous [N, ceil(K/group_size)]=[", qweight.size(0), ", ", G, "], got ", scales.sizes());
  if (zeros)
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->sizes() == scales.sizes() && zeros->is_contiguous(),
                "llmc::w4a16_mm: zeros must be contiguous uint8 like scales ", scales.sizes(), ", got ",
                zeros->scalar_type(), " ", zeros->sizes());
}


}  // namespace llmc

namespace llmc::cpu {

enum class Isa { Generic, Avx2, Avx512 };

static Isa detect_isa() {
  Isa best = Isa::Generic;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    best = Isa::Avx512;
#endif
  const char* forced = std::getenv("LLMC_CPU_ISA");
  if (forced == nullptr) return best;
  const std::string f(forced);
  const Isa want = f == "avx512" ? Isa::Avx512 : f == "avx2" ? Isa::Avx2 : Isa::Generic;
  TORCH_CHECK(f == "generic" || f == "avx2" || f == "avx512", "LLMC_CPU_ISA must be generic, avx2 or avx512, got ", f);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "LLMC_CPU_ISA=", f, " but this CPU lacks it");
  return want;
}

static Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

std::string cpu_isa() {
  switch (isa()) {
    case Isa::Avx512: return "cpu-avx512vnni";
    case Isa::Avx2: return "cpu-avx2";
    default: return "cpu-generic";
  }
}

static OutKind out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return OutKind::F32;
    case at::kBFloat16: return OutKind::BF16;
    case at::kHalf: return OutKind::F16;
    default: TORCH_CHECK(false, "llmc: output dtype must be float32, bfloat16 or float16, got ", t);
  }
}

static at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "llmc: bias must be [", n, "], got ", bias->sizes());
  check_float(*bias, "bias");
  return bias->to(at::kFloat).contiguous();
}

// ------------------------------------------------------------------ CPU implementations

// FP8 E4M3 per-token quantizer: s = amax / 448 (1 where that is not > 0), q = e4m3(clamp(x / s, +-448)), the
// function quant.fp8.quantize_activations computes. On CPU it is these ATen calls (the CUDA op fuses them into
// one pass; GPU inference is what needs it).
static std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu(const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  check_quantize_args(x, scale, "llmc::quantize_fp8");
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor s;
  if (scale) {
    s = scale->to(at::kFloat).reshape({1}).expand({x.size(0)}).contiguous();
  } else {
    s = xf.abs().amax({1}) / at::full({x.size(0)}, 448.f, xf.options());
    s = at::where(s > 0, s, at::ones_like(s));
  }
  const at::Tensor q = at::clamp(xf / s.unsqueeze(1), -448.f, 448.f).to(at::kFloat8_e4m3fn);
  return {q, s};
}

static std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  check_quantize_args(x, scale);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor s = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  const float st = scale ? scale->item<float>() : 0.f;
  TORCH_CHECK(!scale || st > 0.f, "llmc::quantize_int8: a static scale must be > 0, got ", st);
  const QuantArgs a{xf.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), st, x.size(0), x.size(1)};
  switch (isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::Avx512: quantize_avx512(a); break;
    case Isa::Avx2: quantize_avx2(a); break;
#endif
    default: quantize_generic(a);
  }
  return {q, s};
}

static at::Tensor w8a8_mm_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_w8a8_args(x_q, x_scale, w_q, w_scale);
  const int64_t M = x_q.size(0), N = w_q.size(0), K = x_q.size(1);
  at::Tensor b = float_bias(bias, N);
  at::Tensor out = at::empty({M, N}, x_q.options().dtype(out_dtype));
  const W8A8Args a{x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), w_q.data_ptr<int8_t>(), w_scale.data_ptr<float>(),
                   b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr(), out_kind(out_dtype), M, N, K};
  if (M == 0 || N == 0) return out;
  switch (isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::Avx512: w8a8_avx512(a); break;
    case Isa::Avx2: w8a8_avx2(a); break;
#endif
    default: w8a8_generic(a);
  }
  return out;
}

static at::Tensor w4a16_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& zeros, int64_t group_size,
                               const std::optional<at::Tensor>& bias) {
  check_w4a16_args(x, qweight, scales, zeros, group_size);
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();  // a no-op for weights packed by pack_w4a16
  at::Tensor b = float_bias(bias, N);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const W4Args a{xf.data_ptr<float>(), qweight.data_ptr<uint8_t>(), sf.data_ptr<float>(),
                 zeros ? zeros->data_ptr<uint8_t>() : nullptr, b.defined() ? b.data_ptr<float>() : nullptr,
                 out.data_ptr(), out_kind(x.scalar_type()), M, N, K, qweight.size(1), group_size};
  switch (isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::Avx512: w4a16_avx512(a); break;
    case Isa::Avx2: w4a16_avx2(a); break;
#endif
    default: w4a16_generic(a);
  }
  return out;
}

}  // namespace llmc::cpu

TORCH_LIBRARY(llmc, m) {
  m.def("quantize_int8(Tensor x, Tensor? scale) -> (Tensor, Tensor)");
  m.def("quantize_fp8(Tensor x, Tensor? scale) -> (Tensor, Tensor)");
  m.def("w8a8_mm(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("w4a16_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("cpu_isa() -> str", &llmc::cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(llmc, CPU, m) {
  m.impl("quantize_int8", &llmc::cpu::quantize_int8_cpu);
  m.impl("quantize_fp8", &llmc::cpu::quantize_fp8_cpu);
  m.impl("w8a8_mm", &llmc::cpu::w8a8_mm_cpu);
  m.impl("w4a16_mm", &llmc::cpu::w4a16_mm_cpu);
}

// Importing llmcompress.kernels._C (the ahead-of-time build) runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
