"""Benchmark FP8 E4M3 W8A8 (torch._scaled_mm, row-wise scales) against the bf16 matmul it replaces, same run.

Ops per shape (x [M, K] bf16, weight [N, K]):
  torch_bf16          x @ w.t() in bf16: the baseline
  fp8_mm              torch._scaled_mm on pre-quantized fp8 codes, scales [M, 1] x [1, N], bf16 out, fast accum
  fp8_mm_exact        the same with use_fast_accum=False (full fp32 accumulation)
  fp8_mm_tensorwise   torch._scaled_mm with one scale per operand: the cheapest scaling, as a peer
  fp8_linear          what QuantLinear runs: dynamic per-token quantization of x + fp8_mm (llmcompress.quant.fp8)
On CPU, fp8_mm* use torch's CPU _scaled_mm where this torch has one and fp8_linear takes the reference path
(dequantize + bf16 matmul); the `path` column says which ran.
Timing (shared with benchmarks/bench_kernels.py): CUDA: a CUDA graph replays the op over rotating weight copies
(together > 2x L2), timed with CUDA events after a warm-up, median of 7; CPU: perf_counter, median.
Outputs bench_fp8.json and bench_fp8.md under --out.

  python benchmarks/bench_fp8.py --out benchmarks/results/h100_fp8                        # GPU: M 1..4096, 4 shapes
  python benchmarks/bench_fp8.py --device cpu --quick --out /tmp/fp8_quick            # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import torch

from bench_kernels import FULL_KN, save, time_op  # same timing protocol as the int8/int4 kernel benchmark

from llmcompress.quant import fp8

FULL_M = [1, 16, 128, 1024, 4096]
QUICK_M, QUICK_KN = [1, 16], [(1024, 1024)]


def bench_shape(device: str, m: int, k: int, n: int, cache_bytes: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    copies = max(2, min(8, math.ceil(2 * cache_bytes / (n * k))))  # the fp8 weights alone must exceed the cache
    rows = []

    def record(op, seconds, weight_bytes, path):
        rows.append(dict(op=op, M=m, K=k, N=n, us=seconds * 1e6, tflops=2 * m * n * k / seconds / 1e12,
                         gbps=(weight_bytes + m * k * 2 + m * n * 2) / seconds / 1e9, path=path))

    w = [torch.randn(n, k, device=device, generator=gen).to(torch.bfloat16) * 0.05 for _ in range(copies)]
    record("torch_bf16", time_op(device, lambda i: (lambda: x @ w[i].t()), copies), n * k * 2, "torch")
    w_scale = [wi.float().abs().amax(dim=1) / fp8.FP8_MAX for wi in w]
    w_q = [(wi.float() / s[:, None]).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE) for wi, s in zip(w, w_scale)]
    del w
    q, s = fp8.quantize_activations(x)
    one = torch.ones((), device=device)
    mm_ops = {
        "fp8_mm": lambda i: (lambda: fp8.scaled_mm(q, s, w_q[i], w_scale[i], None, torch.bfloat16, fast_accum=True)),
        "fp8_mm_exact": lambda i: (lambda: fp8.scaled_mm(q, s, w_q[i], w_scale[i], None, torch.bfloat16,
                                                         fast_accum=False)),
        "fp8_mm_tensorwise": lambda i: (lambda: torch._scaled_mm(q, w_q[i].t(), scale_a=one, scale_b=one,
                                                                 out_dtype=torch.bfloat16, use_fast_accum=True)),
    }
    for op, make in mm_ops.items():
        try:
            record(op, time_op(device, make, copies), n * k, "scaled_mm")
        except (RuntimeError, NotImplementedError) as e:  # e.g. a torch without (CPU) row-wise _scaled_mm
            print(f"{op} unavailable for {m}x{k}x{n}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    how = fp8.plan(torch.device(device), k, n, torch.bfloat16, fast_accum=True, obey_llmc_kernels=False)
    record("fp8_linear", time_op(device, lambda i: (lambda: fp8.fp8_linear(x, w_q[i], w_scale[i], how=how)), copies),
           n * k, how.describe())
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """bf16 time / fp8 time per shape (> 1: fp8 is faster)."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["M"], r["K"], r["N"]), {})[r["op"]] = r["us"]
    out = []
    for (m, k, n), t in sorted(by.items()):
        row = dict(M=m, K=k, N=n)
        for op in ("fp8_mm", "fp8_mm_exact", "fp8_mm_tensorwise", "fp8_linear"):
            if op in t and "torch_bf16" in t:
                row[f"{op}_vs_bf16"] = t["torch_bf16"] / t[op]
        out.append(row)
    return out


def markdown(meta: dict, rows: list[dict], ratios: list[dict]) -> str:
    lines = [f"# FP8 W8A8 benchmark: {meta['device_name']}", "", f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}. {meta['timing']}", "",
             "## Speedups over the bf16 matmul (bf16 time / fp8 time; > 1 means fp8 is faster)", ""]
    cols = sorted({c for r in ratios for c in r if c.endswith("_vs_bf16")})
    lines.append("| M | K | N | " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * (3 + len(cols)))
    for r in ratios:
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | " + " | ".join(f"{r[c]:.2f}" if c in r else "" for c in cols)
                     + " |")
    lines += ["", "## All timings", "", "| op | M | K | N | µs | TFLOP/s | GB/s | path |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['us']:.1f} | {r['tflops']:.2f} | "
                     f"{r['gbps']:.0f} | {r['path']} |")
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, rows: list[dict]) -> str:
    ratios = speedups(rows)
    md = markdown(meta, rows, ratios)
    save(out, "bench_fp8", meta, rows, ratios, md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny smoke set: M in 1,16 at K=N=1024")
    ap.add_argument("--m", default=None, help="comma-separated M values (default 1,16,128,1024,4096)")
    ap.add_argument("--shapes", default=None, help="K:N pairs, comma-separated (default: 8192:8192 and the other "
                                                   "shapes of bench_kernels.py)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = args.device
    ms = [int(v) for v in args.m.split(",")] if args.m else (QUICK_M if args.quick else FULL_M)
    kns = ([tuple(int(v) for v in p.split(":")) for p in args.shapes.split(",")] if args.shapes
           else QUICK_KN if args.quick else FULL_KN)
    torch.manual_seed(0)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, cache = f"{props.name} (sm{props.major}{props.minor})", props.L2_cache_size
    else:
        name, cache = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", 32 << 20
    meta = dict(device=device, device_name=name, torch=torch.__version__, command="python " + " ".join(sys.argv),
                timing=("CUDA graph over rotating weight copies (> 2x L2), CUDA-event timed after warm-up, median "
                        "of 7 replays" if device == "cuda" else "perf_counter per call over rotating weight copies, "
                        "after warm-up, median"))
    print(name, flush=True)
    rows: list[dict] = []
    md = ""
    for k, n in kns:
        for m in ms:
            new = bench_shape(device, m, k, n, cache)
            rows += new
            print("  ".join(f"{r['op']}={r['us']:.1f}us" for r in new), f"[M={m} K={k} N={n}]", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            md = write(args.out, meta, rows)  # after every shape, so a run cut short still leaves results
    print(md.split("## All timings")[0])


if __name__ == "__main__":
    main()
