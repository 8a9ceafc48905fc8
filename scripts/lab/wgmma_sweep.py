"""Sweep the Hopper W4A16 wgmma kernel's tile variants (the W4_WGMMA knob: tokens x warpgroups x stages, listed in
w4a16_sm90.cu) over shapes and M, in one process, against torch's bf16 matmul timed in the same run; each
variant's output is checked against a float64 product of the dequantized weight first.

The extension reads the knob on the host at every launch (ops.force_cuda_variant), so forcing it before a CUDA
graph is captured selects what the graph replays. Timing is bench_kernels.py's (graph over rotating weight copies, > 2x L2).

  python scripts/lab/wgmma_sweep.py --m 64,128,256 --shapes 4096:4096,8192:8192 --variants default,5,7
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import GROUP, time_op  # noqa: E402

from llmcompress.kernels import ops, reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="64,128")
    ap.add_argument("--shapes", default="4096:4096")
    ap.add_argument("--variants", default="default", help="W4_WGMMA values; 'default': run()'s choice of "
                    "variant; 'gemv': no wgmma kernel (W4_SM90_MAX_M=0)")
    args = ap.parse_args()
    cache = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name(0)}; us (ratio to bf16)")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split(":"))
        copies = max(2, min(8, math.ceil(2 * cache / (n * k // 2))))
        gen = torch.Generator(device="cuda").manual_seed(k + n)
        codes = [torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen) for _ in range(copies)]
        scales = (torch.rand(n, -(-k // GROUP), device="cuda", generator=gen) * 0.01).to(torch.bfloat16)
        packed = [ops.pack_w4a16(reference.pack_int4(c), scales, None, GROUP) for c in codes]
        w_bf16 = [torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(copies)]
        w64 = ((codes[0].double() - 8) * scales.double().repeat_interleave(GROUP, 1)[:, :k])
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.double() @ w64.t()
            bf16 = time_op("cuda", lambda i: (lambda: x @ w_bf16[i].t()), copies)
            cells = []
            for v in args.variants.split(","):
                knobs = {"W4_SM90_MIN_M": 1}  # the wgmma kernel at every M swept
                if v == "gemv":  # not the wgmma kernel: what run() has without it (the gemv or tiled kernel)
                    knobs["W4_SM90_MAX_M"] = 0
                elif v != "default":
                    knobs["W4_WGMMA"] = int(v)
                with ops.force_cuda_variant(**knobs):
                    err = (ops.w4a16_linear(x, packed[0]).double() - ref).abs().max().item() / ref.abs().max().item()
                    assert err < 2e-2, f"variant {v} M={m} K={k} N={n}: relative error {err:.3g}"
                    t = time_op("cuda", lambda i: (lambda: ops.w4a16_linear(x, packed[i])), copies)
                cells.append(f"{v} {t * 1e6:6.1f} ({bf16 / t:.2f})")
            print(f"K={k} N={n} M={m}: bf16 {bf16 * 1e6:6.1f} | " + " | ".join(cells), flush=True)
        del packed, w_bf16, codes
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
