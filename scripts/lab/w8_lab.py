"""W8A8 decode-kernel lab (H100; nvcc only): standalone CUDA-graph timings of w8a8_decode (the double-banked
loop of llmcompress/kernels/csrc/cuda/w8a8.cu, taken from that file as it is now) at K = N = 8192, bf16 out,
10 rotating weight copies (> 2x L2), median of 7 replays of 40 launches, with parts cut out to see where the
time goes: bit 1 skips the activation loads (the mma reads constant registers), bit 2 the mma (the loaded words
are XOR-ed into the sum); bit 4 loads the weights without the L2::256B prefetch hint
(as before session 6), bit 8 with L2::128B.

    python scripts/lab/w8_lab.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

CUDA = Path(__file__).resolve().parents[2] / "llmcompress" / "kernels" / "csrc" / "cuda"

HARNESS = r"""
}  // namespace llmc::cuda
using namespace llmc::cuda;
typedef __nv_bfloat16 B;
int main() {
  const int NB = 10, K = 8192, N = 8192;
  std::vector<int8_t*> w(NB);
  for (auto& p : w) { CK(cudaMalloc(&p, (size_t)N * K)); CK(cudaMemset(p, 1, (size_t)N * K)); }
  int8_t* x; float *xs, *ws; B* out;
  CK(cudaMalloc(&x, 16 * K)); CK(cudaMemset(x, 1, 16 * K)); CK(cudaMalloc(&xs, 64)); CK(cudaMalloc(&ws, N * 4));
  CK(cudaMemset(xs, 0, 64)); CK(cudaMemset(ws, 0, N * 4)); CK(cudaMalloc(&out, 16 * N * 2));
  cudaStream_t st; CK(cudaStreamCreate(&st));
  auto run = [&](const char* name, int M, auto kernel, int mt) {
    const float us = graph_time_us(st, NB, [&](int i) {
      kernel<<<dim3(N / 16, (M + 8 * mt - 1) / (8 * mt)), kWarps * 32, 0, st>>>(x, xs, w[i], ws, nullptr, out, M, N, K);
    });
    printf("8192x8192 M=%2d %-26s %7.2f us\n", M, name, us);
  };
  for (int M : {1, 8}) {
    run("full (pipe)", M, w8a8_decode<B, 1, true, true, 0>, 1);
    run("no activation loads", M, w8a8_decode<B, 1, true, true, 1>, 1);
    run("no mma", M, w8a8_decode<B, 1, true, true, 2>, 1);
    run("neither", M, w8a8_decode<B, 1, true, true, 3>, 1);
    run("weights without the hint", M, w8a8_decode<B, 1, true, true, 4>, 1);
    run("weights with L2::128B", M, w8a8_decode<B, 1, true, true, 8>, 1);
  }
  return 0;
}
"""


def main() -> None:
    src = (CUDA / "w8a8.cu").read_text()
    ldw = r"""
template <int ABL>
__device__ __forceinline__ uint4 ldw(const void* p) {
  uint4 v;
  if (ABL & 4) v = ld_stream(p);  // no prefetch hint (w8a8.cu's loads had none before session 6)
  else if (ABL & 8)
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else v = ld_stream_l2_256(p);
  return v;
}
"""
    body = ldw + src[src.index("// 16 bytes of row `row` from column k"):src.index("// Decode with two 16-feature tiles per block")]
    edits = [
        ("template <typename TO, int MT, bool kAligned, bool kPipe = false>",
         "template <typename TO, int MT, bool kAligned, bool kPipe = false, int ABL = 0>"),
        ("        for (int mt = 0; mt < MT; ++mt) bk.xb[u][mt] = in && xv[mt] ? __ldg(xr[mt] + c * 4) : make_uint4(0, 0, 0, 0);",
         "        for (int mt = 0; mt < MT; ++mt) bk.xb[u][mt] = (ABL & 1) ? make_uint4(lane, 1, 2, 3) : "
         "in && xv[mt] ? __ldg(xr[mt] + c * 4) : make_uint4(0, 0, 0, 0);"),
        ("        for (int mt = 0; mt < MT; ++mt) {\n          mma_s8(acc[mt], a_lo, bk.xb[u][mt].x, bk.xb[u][mt].y);",
         "        for (int mt = 0; mt < MT; ++mt) {\n          if (ABL & 2) { acc[mt][0] ^= int(a_lo[0] ^ a_lo[1] ^ a_hi[2] ^ a_hi[3] ^ bk.xb[u][mt].x); continue; }\n"
         "          mma_s8(acc[mt], a_lo, bk.xb[u][mt].x, bk.xb[u][mt].y);"),
        ("        bk.wa[u] = in ? ld_stream_l2_256(w0 + c * 4) : make_uint4(0, 0, 0, 0);\n        bk.wb[u] = in ? ld_stream_l2_256(w1 + c * 4) : make_uint4(0, 0, 0, 0);",
         "        bk.wa[u] = in ? ldw<ABL>(w0 + c * 4) : make_uint4(0, 0, 0, 0);\n        bk.wb[u] = in ? ldw<ABL>(w1 + c * 4) : make_uint4(0, 0, 0, 0);"),
    ]
    for old, new in edits:
        assert old in body, f"w8a8.cu changed: cannot find {old[:60]!r}"
        body = body.replace(old, new)
    head = '#include "graph_timer.cuh"\n#include "common.cuh"\nnamespace llmc::cuda {\n'
    with tempfile.TemporaryDirectory() as tmp:
        cu, exe = Path(tmp) / "lab.cu", Path(tmp) / "lab"
        cu.write_text(head + body + HARNESS)
        subprocess.run(["nvcc", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
                        f"-I{CUDA}", f"-I{Path(__file__).parent}", "-o", str(exe), str(cu)], check=True)
        subprocess.run([str(exe)], check=True)


if __name__ == "__main__":
    main()
