"""W4A16 decode-kernel lab (H100; nvcc only, no extension build): standalone CUDA-graph timings of the register gemv
kernel of llmcompress/kernels/csrc/cuda/w4a16.cu, taken from that file as it is now, 8192 x 8192 and the issue's
other shapes, bf16, g128 symmetric, 10 rotating weight copies (> 2x L2), median of 7 replays of 40 launches.

    python scripts/lab/gemv_lab.py --ablate     # the kernel with its activation copies / scale loads / arithmetic cut
    python scripts/lab/gemv_lab.py --ring       # against the shared-memory ring kernel of gemv_ring_kernel.cuh
    python scripts/lab/gemv_lab.py --interleave # a bank's chunks as one block of independent mma chains (session 8)
    python scripts/lab/gemv_lab.py --head       # w4a16_gemv as in the working tree against as committed (session 9)
    nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/rf scripts/lab/read_floor.cu && /tmp/rf

The ablated kernels compute nothing useful; they only show where the time goes (scripts/results/h100_s6_gemv).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA = ROOT / "llmcompress" / "kernels" / "csrc" / "cuda"
GEMV_START = "template <typename T, int MT, int U, bool HAS_Z, int W = 4, int MINB = 4, bool BANK = false>"
GEMV_END = "// Mid-size M (prefill of short prompts"
HALF_LOAD = r"""
__device__ __forceinline__ float ldg_if_h(const __half* p, bool in) {
  unsigned short v;
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b16 %0, 0;\n @p ld.global.nc.b16 %0, [%1];\n}"
      : "=&h"(v) : "l"(p), "r"(int(in)));
  return __half2float(__ushort_as_half(v));
}
"""

PAIR_LOAD = r"""
__device__ __forceinline__ float2 ldg2_if(const float2* p, bool in) {
  float2 v;
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %3, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
      " @p ld.global.nc.v2.f32 {%0, %1}, [%2];\n}" : "=&f"(v.x), "=&f"(v.y) : "l"(p), "r"(int(in)));
  return v;
}
__device__ __forceinline__ float2 ldh2_if(const __half2* p, bool in) {
  uint32_t v;
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, 0;\n @p ld.global.nc.b32 %0, [%1];\n}"
      : "=&r"(v) : "l"(p), "r"(int(in)));
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}
"""

HEAD = """#include "graph_timer.cuh"
#include "common.cuh"
namespace llmc::cuda {
"""

HARNESS = """
}  // namespace llmc::cuda
using namespace llmc::cuda;
typedef __nv_bfloat16 B;
typedef void (*Gemv)(const B*, const uint4*, const float*, const uint8_t*, const B*, B*, int, int, int, int, int, int);
typedef void (*Ring)(const B*, const uint4*, const float*, const uint8_t*, const B*, B*, int, int, int, int, int, int, int);
int main() {
  const int NB = 10;
  int shapes[4][2] = {{8192, 8192}, {4096, 4096}, {4096, 14336}, {14336, 4096}};
  for (auto& sh : shapes) {
    const int K = sh[0], N = sh[1], G = K / 128, chunks = K / 64;
    std::vector<uint4*> wq(NB); std::vector<float*> sc(NB);
    for (int i = 0; i < NB; ++i) {
      CK(cudaMalloc(&wq[i], (size_t)N * K / 2)); CK(cudaMemset(wq[i], 0x11 * (i + 1), (size_t)N * K / 2));
      CK(cudaMalloc(&sc[i], (size_t)N * G * 4)); CK(cudaMemset(sc[i], 0, (size_t)N * G * 4));
    }
    B *x, *out; CK(cudaMalloc(&x, 16 * K * 2)); CK(cudaMemset(x, 0, 16 * K * 2)); CK(cudaMalloc(&out, 16 * N * 2));
    cudaStream_t st; CK(cudaStreamCreate(&st));
    auto run = [&](const char* name, int M, const void* kernel, int threads, int smem, int mt, bool ring, int tiles = 1) {
      CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      CK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
      const int xrows = std::min(M, 8 * mt);
      const float us = graph_time_us(st, NB, [&](int i) {
        if (ring) ((Ring)kernel)<<<dim3(N / 16, 1), threads, smem, st>>>(x, wq[i], sc[i], nullptr, nullptr, out, M, N, K, G, 1, chunks, xrows);
        else ((Gemv)kernel)<<<dim3(N / 16 / tiles, 1), threads, smem, st>>>(x, wq[i], sc[i], nullptr, nullptr, out, M, N, K, G, 1, chunks);
      });
      printf("%5dx%-5d M=%2d %-28s %7.2f us\\n", K, N, M, name, us);
    };
    for (int M : {@MS@}) {
      const int mt = M <= 8 ? 1 : 2, xr = std::min(M, 8 * mt);
      auto rs = [&](int S, int W) { return W * S * (40 + xr * 8) * 16 + 16; };
      (void)rs;
@RUNS@
    }
    for (int i = 0; i < NB; ++i) { cudaFree(wq[i]); cudaFree(sc[i]); }
    if (@ONE@) break;  // the ablation runs 8192 x 8192 only
  }
  return 0;
}
"""

ABLATE_RUNS = """      if (M != 1 && M != 16) continue;
#define G1(ABL, name) run(name, M, (const void*)w4a16_gemv<B, 1, 4, false, 4, 4, ABL>, 128, 4 * 2 * 4 * 64 * 16, 1, false)
#define G2(ABL, name) run(name, M, (const void*)w4a16_gemv<B, 2, 3, false, 4, 4, ABL>, 128, 4 * 2 * 3 * 2 * 64 * 16, 2, false)
      if (M == 1) {
        G1(0, "full (U4 W4)"); G1(1, "no activation copies"); G1(2, "no scale loads"); G1(3, "no act. copies, no scales");
        G1(4, "no arithmetic"); G1(7, "none of the three");
      } else {
        G2(0, "full (MT2 U3 W4)"); G2(1, "no activation copies"); G2(2, "no scale loads"); G2(4, "no arithmetic");
      }"""

INTERLEAVE_RUNS = """      auto gsm = [&](int W, int U, int MT) { return W * 2 * U * MT * 64 * 16; };
      if (M == 1) continue;
      if (M <= 8) {
        run("gemv U4 W4", M, (const void*)w4a16_gemv<B, 1, 4, false, 4, 4, false>, 128, gsm(4, 4, 1), 1, false);
        run("gemv U4 W4 interleaved", M, (const void*)w4a16_gemv<B, 1, 4, false, 4, 4, true>, 128, gsm(4, 4, 1), 1, false);
        run("gemv U2 W8", M, (const void*)w4a16_gemv<B, 1, 2, false, 8, 4, false>, 256, gsm(8, 2, 1), 1, false);
        run("gemv U2 W8 interleaved", M, (const void*)w4a16_gemv<B, 1, 2, false, 8, 4, true>, 256, gsm(8, 2, 1), 1, false);
      } else {
        run("gemv MT2 U3 W4", M, (const void*)w4a16_gemv<B, 2, 3, false, 4, 4, false>, 128, gsm(4, 3, 2), 2, false);
        run("gemv MT2 U3 W4 interleaved", M, (const void*)w4a16_gemv<B, 2, 3, false, 4, 4, true>, 128, gsm(4, 3, 2), 2, false);
        run("gemv MT2 U2 W4 interleaved", M, (const void*)w4a16_gemv<B, 2, 2, false, 4, 4, true>, 128, gsm(4, 2, 2), 2, false);
        run("gemv MT2 U4 W4 interleaved", M, (const void*)w4a16_gemv<B, 2, 4, false, 4, 4, true>, 128, gsm(4, 4, 2), 2, false);
        run("gemv MT2 U2 W8 MINB2 interleaved", M, (const void*)w4a16_gemv<B, 2, 2, false, 8, 2, true>, 256, gsm(8, 2, 2), 2, false);
      }"""

HEAD_RUNS = """      auto gsm = [&](int W, int U, int MT) { return W * 2 * U * MT * 64 * 16; };
#define HD(name, mt, U, W, MINB, BANK, thr) run(name " (HEAD)", M, (const void*)w4a16_gemv_head<B, mt, U, false, W, MINB, BANK>, thr, gsm(W, U, mt), mt, false)
#define NW(name, mt, U, W, MINB, BANK, thr) run(name, M, (const void*)w4a16_gemv<B, mt, U, false, W, MINB, BANK>, thr, gsm(W, U, mt), mt, false)
      if (M <= 8) {
        HD("U4 W4 bank", 1, 4, 4, 4, true, 128);
        NW("U4 W4 bank", 1, 4, 4, 4, true, 128);
        NW("U2 W4 bank", 1, 2, 4, 4, true, 128);
        HD("U2 W8 MINB2 bank (wide)", 1, 2, 8, 2, true, 256);
        NW("U2 W8 MINB2 bank (wide)", 1, 2, 8, 2, true, 256);
      } else {
        HD("MT2 U3 W4", 2, 3, 4, 4, false, 128);
        NW("MT2 U3 W4", 2, 3, 4, 4, false, 128);
        HD("MT2 U2 W4 bank", 2, 2, 4, 4, true, 128);
        NW("MT2 U2 W4 bank", 2, 2, 4, 4, true, 128);
        HD("MT2 U2 W8 MINB2 bank (wide)", 2, 2, 8, 2, true, 256);
        NW("MT2 U2 W8 MINB2 bank (wide)", 2, 2, 8, 2, true, 256);
      }"""

BANK_RUNS = """      auto gsm = [&](int W, int U, int MT) { return W * 2 * U * MT * 64 * 16; };
#define NB(name, mt, U, W, MINB, thr) run(name, M, (const void*)w4a16_gemv<B, mt, U, false, W, MINB, true>, thr, gsm(W, U, mt), mt, false)
      if (M == 1) {
        NB("U2 W4 bank", 1, 2, 4, 4, 128); NB("U3 W4 bank", 1, 3, 4, 4, 128); NB("U4 W4 bank", 1, 4, 4, 4, 128);
        NB("U5 W4 bank", 1, 5, 4, 4, 128); NB("U6 W4 bank MINB3", 1, 6, 4, 3, 128);
        NB("U2 W8 MINB2 bank", 1, 2, 8, 2, 256); NB("U3 W8 MINB2 bank", 1, 3, 8, 2, 256); NB("U4 W8 MINB2 bank", 1, 4, 8, 2, 256);
        NB("U4 W2 MINB8 bank", 1, 4, 2, 8, 64); NB("U4 W16 MINB1 bank", 1, 4, 16, 1, 512);
      } else if (M == 16) {
        NB("MT2 U1 W4 bank", 2, 1, 4, 4, 128); NB("MT2 U2 W4 bank", 2, 2, 4, 4, 128);
        NB("MT2 U2 W2 MINB8 bank", 2, 2, 2, 8, 64); NB("MT2 U1 W8 MINB2 bank", 2, 1, 8, 2, 256);
        NB("MT2 U2 W8 MINB2 bank", 2, 2, 8, 2, 256);
      }"""

PREBANK_RUNS = """      auto gsm = [&](int W, int U, int MT) { return W * 2 * U * MT * 64 * 16; };
      if (M != 1) continue;
#define NB(name, mt, U, W, MINB, thr) run(name, M, (const void*)w4a16_gemv<B, mt, U, false, W, MINB, true>, thr, gsm(W, U, mt), mt, false)
#define PB(name, U, W, MINB) run(name, M, (const void*)w4a16_gemv_pre<B, U, false, W, MINB>, W * 32, W * PreLayout(M, chunks, W, 1, false).bytes, 1, false)
      NB("gemv U4 W4 bank", 1, 4, 4, 4, 128); NB("gemv U2 W4 bank", 1, 2, 4, 4, 128); NB("gemv U2 W8 MINB2 bank", 1, 2, 8, 2, 256);
      PB("pre bank U2 W8", 2, 8, 4); PB("pre bank U4 W8 MINB2", 4, 8, 2); PB("pre bank U4 W4", 4, 4, 4);
      PB("pre bank U2 W4", 2, 4, 4); PB("pre bank U3 W8 MINB3", 3, 8, 3); PB("pre bank U2 W16 MINB2", 2, 16, 2);"""

HALF_RUNS = """      auto gsm = [&](int W, int U, int MT) { return W * 2 * U * MT * 64 * 16; };
      if (M != 1 && M != 16) continue;
#define NW(name, mt, U, W, MINB, BANK, thr) run(name, M, (const void*)w4a16_gemv<B, mt, U, false, W, MINB, BANK>, thr, gsm(W, U, mt), mt, false)
#define NH(name, mt, U, W, MINB, BANK, thr) run(name " fp16 scales", M, (const void*)w4a16_gemv_h<B, mt, U, false, W, MINB, BANK>, thr, gsm(W, U, mt), mt, false)
      if (M == 1) {
        NW("U4 W4 bank", 1, 4, 4, 4, true, 128); NH("U4 W4 bank", 1, 4, 4, 4, true, 128);
        NW("U2 W8 MINB2 bank (wide)", 1, 2, 8, 2, true, 256); NH("U2 W8 MINB2 bank (wide)", 1, 2, 8, 2, true, 256);
      } else {
        NW("MT2 U2 W4 bank", 2, 2, 4, 4, true, 128); NH("MT2 U2 W4 bank", 2, 2, 4, 4, true, 128);
        NW("MT2 U3 W4", 2, 3, 4, 4, false, 128); NH("MT2 U3 W4", 2, 3, 4, 4, false, 128);
        NH("MT2 U2 W4 bank MINB3", 2, 2, 4, 3, true, 128); NH("MT2 U1 W4 bank", 2, 1, 4, 4, true, 128);
        NH("MT2 U4 W4 bank", 2, 4, 4, 4, true, 128); NH("MT2 U3 W4 bank", 2, 3, 4, 4, true, 128);
        NW("MT2 U2 W8 MINB2 bank (wide)", 2, 2, 8, 2, true, 256); NH("MT2 U2 W8 MINB2 bank (wide)", 2, 2, 8, 2, true, 256);
      }"""

PAIRS_RUNS = """      auto gsm = [&](int W, int U, int MT) { return W * 2 * U * MT * 64 * 16; };
      if (M == 4) continue;
#define NW(name, mt, U, W, MINB, BANK, thr) run(name, M, (const void*)w4a16_gemv<B, mt, U, false, W, MINB, BANK>, thr, gsm(W, U, mt), mt, false)
#define NP(name, mt, U, W, MINB, BANK, thr) run(name " fp32 pairs", M, (const void*)w4a16_gemv_p<B, mt, U, false, W, MINB, BANK>, thr, gsm(W, U, mt), mt, false)
#define NQ(name, mt, U, W, MINB, BANK, thr) run(name " fp16 pairs", M, (const void*)w4a16_gemv_q<B, mt, U, false, W, MINB, BANK>, thr, gsm(W, U, mt), mt, false)
#define ALL(name, mt, U, W, MINB, BANK, thr) NW(name, mt, U, W, MINB, BANK, thr); NP(name, mt, U, W, MINB, BANK, thr); NQ(name, mt, U, W, MINB, BANK, thr)
      if (M <= 8) {
        ALL("U4 W4 bank", 1, 4, 4, 4, true, 128);
        ALL("U2 W8 MINB2 bank (wide)", 1, 2, 8, 2, true, 256);
      } else {
        ALL("MT2 U2 W4 bank", 2, 2, 4, 4, true, 128);
        ALL("MT2 U3 W4", 2, 3, 4, 4, false, 128);
        ALL("MT2 U2 W8 MINB2 bank (wide)", 2, 2, 8, 2, true, 256);
      }"""

RING_RUNS = """      if (mt == 1) {
        run("gemv U4 W4", M, (const void*)w4a16_gemv<B, 1, 4, false, 4, 4>, 128, 4 * 2 * 4 * 64 * 16, 1, false);
        run("gemv U2 W8", M, (const void*)w4a16_gemv<B, 1, 2, false, 8, 4>, 256, 8 * 2 * 2 * 64 * 16, 1, false);
        run("ring S4 W4", M, (const void*)w4a16_gemv_ring<B, 1, 4, false, 4>, 128, rs(4, 4), 1, true);
        run("ring S8 W4", M, (const void*)w4a16_gemv_ring<B, 1, 8, false, 4>, 128, rs(8, 4), 1, true);
        run("ring S8 W8", M, (const void*)w4a16_gemv_ring<B, 1, 8, false, 8>, 256, rs(8, 8), 1, true);
        run("ring S16 W4", M, (const void*)w4a16_gemv_ring<B, 1, 16, false, 4>, 128, rs(16, 4), 1, true);
      } else {
        run("gemv MT2 U3 W4", M, (const void*)w4a16_gemv<B, 2, 3, false, 4, 4>, 128, 4 * 2 * 3 * 2 * 64 * 16, 2, false);
        run("ring S4 W4", M, (const void*)w4a16_gemv_ring<B, 2, 4, false, 4>, 128, rs(4, 4), 2, true);
        run("ring S8 W4", M, (const void*)w4a16_gemv_ring<B, 2, 8, false, 4>, 128, rs(8, 4), 2, true);
        run("ring S8 W8", M, (const void*)w4a16_gemv_ring<B, 2, 8, false, 8>, 256, rs(8, 8), 2, true);
      }"""


def slot_and_copies(ablate: bool) -> str:
    """Slot (and cp_async4) from w4a16.cuh; with ablate, Slot<T, ABL> whose bit 2 skips the scale loads."""
    cuh = (CUDA / "w4a16.cuh").read_text()
    text = cuh[cuh.index("// Loads done only"):cuh.index("// Per kernel and device, once")]
    if ablate:
        text = text.replace("template <typename T>\nstruct Slot", "template <typename T, int ABL>\nstruct Slot")
        old = "      s0 = __ldg(scales + (o0 + gi)), s1 = __ldg(scales + (o1 + gi));"
        assert old in text
        text = text.replace(old, "      if (ABL & 2) { s0 = 1.f, s1 = 2.f; } else { " + old.strip() + " }")
    return text


def gemv_kernel(ablate: bool) -> str:
    """w4a16_gemv from w4a16.cu; with ablate, an ABL template parameter: bit 1 skips the activation copies (the mma
    reads constant registers), bit 2 the scale loads, bit 4 the arithmetic (the codes are XOR-ed into the sum)."""
    src = (CUDA / "w4a16.cu").read_text()
    k = src[src.index(GEMV_START):src.index(GEMV_END)]
    if not ablate:
        return k
    edits = [
        (GEMV_START, "template <typename T, int MT, int U, bool HAS_Z, int W, int MINB, int ABL, bool BANK = false>"),
        ("  auto stage_x = [&](int ring, int c) {\n    if (c < ce) {", "  auto stage_x = [&](int ring, int c) {\n    if (!(ABL & 1) && c < ce) {"),
        ("  auto chunk = [&](const Slot<T>& sl, int c, int ring) {\n    uint32_t b[MT][4][2];",
         "  auto chunk = [&](const Slot<T>& sl, int c, int ring) {\n"
         "    if (ABL & 4) { acc[0][0] += __int_as_float(sl.q.x ^ sl.q.y ^ sl.q.z ^ sl.q.w) * sl.s0; return; }\n"
         "    uint32_t b[MT][4][2];"),
        ("        ldmatrix_x4(r4, xr_s + row * 8 + ((4 * s2 + (lane >> 3)) ^ (lane & 7)));",
         "        if (ABL & 1) { r4[0] = r4[1] = r4[2] = r4[3] = 0x3f803f80u ^ lane; } else\n"
         "        ldmatrix_x4(r4, xr_s + row * 8 + ((4 * s2 + (lane >> 3)) ^ (lane & 7)));"),
    ]
    for old, new in edits:
        assert old in k, f"w4a16.cu changed: cannot find {old[:60]!r}"
        k = k.replace(old, new)
    return k.replace("Slot<T>", "Slot<T, ABL>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ablate", action="store_true")
    mode.add_argument("--ring", action="store_true")
    mode.add_argument("--interleave", action="store_true", help="w4a16_gemv computing a bank's chunks as one "
                      "branch-free block of independent mma chains (BANK), against one chunk at a time; M = 4, 8, 16")
    mode.add_argument("--prebank", action="store_true", help="M = 1: w4a16_gemv against the session-6 kernel that "
                      "copies each warp's activations and scales once, banked (gemv_pre_bank_kernel.cuh)")
    mode.add_argument("--half", action="store_true", help="w4a16_gemv reading 16-bit group scales (timing only: the "
                      "values are not converted), against fp32 scales; M = 1 and 16")
    mode.add_argument("--pairs", action="store_true", help="w4a16_gemv reading each group's scales of rows g and "
                      "g + 8 as one load from a [tile][group][8 pairs] layout, fp32 or fp16 (timing only), against "
                      "the [N][G] fp32 scales; M = 1, 8, 16")
    mode.add_argument("--bank", action="store_true", help="w4a16_gemv with BANK over slots / warps, M = 1 and 16 (session 9)")
    mode.add_argument("--head", action="store_true", help="the w4a16_gemv configurations run() picks for M = 2-16, as in "
                      "the working tree and as committed (git HEAD), in the same run")
    ap.add_argument("--base", type=Path, default=None, help="--head: read the baseline's w4a16.cu, w4a16.cuh and "
                    "common.cuh from this folder instead of git HEAD")
    ap.add_argument("--keep", type=Path, default=None, help="also write the generated .cu here")
    args = ap.parse_args()
    body = slot_and_copies(args.ablate) + gemv_kernel(args.ablate)
    if args.ring:
        body += (Path(__file__).parent / "gemv_ring_kernel.cuh").read_text()
    if args.half:  # a copy of Slot and w4a16_gemv reading __half scales
        sl = slot_and_copies(False)
        text = sl[:sl.index("__device__ __forceinline__ void cp_async4")] + gemv_kernel(False)
        text = text.replace("ldg_if(scales + (o0 + gi), in, 0.f)", "ldg_if_h(scales + (o0 + gi), in)").replace(
            "ldg_if(scales + (o1 + gi), in, 0.f)", "ldg_if_h(scales + (o1 + gi), in)").replace(
            "__ldg(scales + (o0 + gi))", "__half2float(__ldg(scales + (o0 + gi)))").replace(
            "__ldg(scales + (o1 + gi))", "__half2float(__ldg(scales + (o1 + gi)))")
        text = text[text.index("template <typename T>\nstruct Slot"):]
        for name in ["Slot", "w4a16_gemv"]:
            text = re.sub(rf"\b{name}\b", f"{name}_h", text)
        text = text.replace("const float* scales", "const __half* scales").replace(
            "const float* __restrict__ scales", "const __half* __restrict__ scales")
        body += HALF_LOAD + text
    if args.pairs:  # copies of Slot and w4a16_gemv reading a tile's row pairs (g, g + 8) of one group as one load
        sl = slot_and_copies(False)
        base = sl[:sl.index("__device__ __forceinline__ void cp_async4")] + gemv_kernel(False)
        base = base[base.index("template <typename T>\nstruct Slot"):]
        rows = "  const int o0 = min(row0, N - 1) * G, o1 = min(row1, N - 1) * G;"
        assert rows in base
        base = base.replace(rows, "  const int o0 = ntc * G * 8 + g, o1 = 0;  // [tile][group][8 row pairs]")
        for tag, load, cast in [("p", "ldg2_if", "const float2*"), ("q", "ldh2_if", "const __half2*")]:
            text = base.replace("s0 = ldg_if(scales + (o0 + gi), in, 0.f), s1 = ldg_if(scales + (o1 + gi), in, 0.f);",
                                f"{{ const float2 v = {load}(reinterpret_cast<{cast}>(scales) + (o0 + gi * 8), in); "
                                "s0 = v.x, s1 = v.y; }")
            text = text.replace("s0 = __ldg(scales + (o0 + gi)), s1 = __ldg(scales + (o1 + gi));",
                                f"{{ const float2 v = {load}(reinterpret_cast<{cast}>(scales) + (o0 + gi * 8), true); "
                                "s0 = v.x, s1 = v.y; }")
            for name in ["Slot", "w4a16_gemv"]:
                text = re.sub(rf"\b{name}\b", f"{name}_{tag}", text)
            body += text
        body = PAIR_LOAD + body
    if args.prebank:
        body += (Path(__file__).parent / "gemv_pre_bank_kernel.cuh").read_text()
    if args.head:  # the committed w4a16_gemv, its Slot and epilogue (git HEAD), renamed *_head: the same run's baseline
        def show(path: str) -> str:
            if args.base is not None:  # the same files copied out of a commit (a checkout without its history)
                return (args.base / Path(path).name).read_text()
            return subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{path}"], capture_output=True, text=True,
                                  check=True).stdout
        cuh = show("llmcompress/kernels/csrc/cuda/w4a16.cuh")
        slot = cuh[cuh.index("// Loads done only"):cuh.index("__device__ __forceinline__ void cp_async4")]
        head = show("llmcompress/kernels/csrc/cuda/w4a16.cu")
        kernel = head[head.index("template <typename T, int MT, int U, bool HAS_Z"):head.index(GEMV_END)]
        common = show("llmcompress/kernels/csrc/cuda/common.cuh")
        reduce = common[common.index("template <int W, int MT, typename Acc"):common.index("}  // namespace llmc::cuda")]
        text = reduce + slot + kernel
        for name in ["reduce_warps_store", "ld_stream_if", "ldg_if", "Slot", "w4a16_gemv"]:
            text = re.sub(rf"\b{name}\b", f"{name}_head", text)
        body += text
    runs = ABLATE_RUNS if args.ablate else RING_RUNS if args.ring else INTERLEAVE_RUNS if args.interleave else HEAD_RUNS if args.head else PAIRS_RUNS if args.pairs else HALF_RUNS if args.half else PREBANK_RUNS if args.prebank else BANK_RUNS
    harness = HARNESS.replace("@RUNS@", runs).replace("@MS@", "1, 16" if args.bank or args.half else "1, 4, 8, 16")
    src = HEAD + body + harness.replace("@ONE@", "1" if args.ablate else "0")
    with tempfile.TemporaryDirectory() as tmp:
        cu, exe = Path(tmp) / "lab.cu", Path(tmp) / "lab"
        cu.write_text(src)
        if args.keep:
            args.keep.write_text(src)
        subprocess.run(["nvcc", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
                        f"-I{CUDA}", f"-I{Path(__file__).parent}", "-o", str(exe), str(cu)], check=True)
        subprocess.run([str(exe)], check=True)


if __name__ == "__main__":
    main()
