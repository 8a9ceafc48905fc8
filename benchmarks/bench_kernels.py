"""Benchmark the llmc int8/int4 GEMMs against the peers a user would otherwise pick, in the same run.

Peers: torch bf16 matmul; torch._int_mm + the scale epilogue (torch ops); torch's int4 weight-only kernel
(aten._weight_int4pack_mm on CUDA, _weight_int4pack_mm_for_cpu on CPU); fp32 matmul on CPU.
Timing: CUDA: one CUDA graph replays the op over R rotating weight copies (together > 2x L2, so L2 never
holds the weights), timed with events, median of several replays. CPU: perf_counter around back-to-back
calls over rotating copies (about 20 ms a sample, as a decode loop runs them), the ops' samples taken in turn
(time_interleaved), median of 7. Bandwidth roofline: a large device copy measured in this run.
Outputs JSON + markdown + PNG under --out.

  python benchmarks/bench_kernels.py --device cuda --out benchmarks/results/h100
  python benchmarks/bench_kernels.py --device cpu --quick --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from llmcompress.kernels import ops, reference

FULL_M = [1, 4, 16, 32, 128, 1024, 4096]
FULL_KN = [(8192, 8192), (4096, 4096), (4096, 14336), (14336, 4096)]
GROUP = 128


def measure_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = timer(device, lambda: dst.copy_(src), reps=1)
        times.append(t)
    return 2 * n / min(times)


def timer(device: str, fn, reps: int = 1, inner: int = 1) -> float:
    """Seconds per op, where fn runs `reps` ops; median over 7 samples of `inner` calls of fn each."""
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(7):
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps / inner)
        return statistics.median(samples)
    fn()
    samples, budget = [], time.perf_counter() + 3.0
    for i in range(9):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) / reps)
        if time.perf_counter() > budget and i >= 1:
            break
    return statistics.median(samples)


def time_op(device: str, make_call, copies: int) -> float:
    """CUDA: make_call(i) -> a zero-argument callable using weight copy i; one graph replays them all."""
    calls = [make_call(i) for i in range(copies)]
    for c in calls:  # warm-up (and lazy init) outside the graph
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    once = timer(device, graph.replay, reps=copies)
    inner = max(1, min(50, int(2e-3 / max(once * copies, 1e-7))))  # ~2 ms per sample
    return timer(device, graph.replay, reps=copies, inner=inner)


def time_interleaved(make_calls: list, copies: int, samples: int = 7) -> list[float]:
    """CPU: seconds per call of each op, its samples taken in turn with the others' (op 1, op 2, ..., op 1, ...),
    so that a slow or fast stretch of a shared machine falls on every op alike and their ratios hold; each sample
    is about 20 ms of back-to-back calls on rotating copies; median of `samples`."""
    runners = []
    for make_call in make_calls:
        calls = [make_call(i) for i in range(copies)]
        for c in calls:  # warm-up
            c()
        t0 = time.perf_counter()
        for c in calls:
            c()
        once = (time.perf_counter() - t0) / copies
        runners.append((calls, max(1, min(200, int(0.02 / max(once, 1e-7))))))
    times = [[] for _ in runners]
    for _ in range(samples):
        for j, (calls, inner) in enumerate(runners):
            t0 = time.perf_counter()
            for r in range(inner):
                calls[r % copies]()
            times[j].append((time.perf_counter() - t0) / inner)
    return [statistics.median(t) for t in times]


def bench_shape(device: str, m: int, k: int, n: int, bw: float, cache_bytes: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    bf16_bytes = n * k * 2
    copies = max(2, min(8, math.ceil(2 * cache_bytes / (n * k // 2))))  # int4 weights must exceed the cache too
    rows = []

    def record(name, seconds, weight_bytes):
        moved = weight_bytes + m * k * 2 + m * n * 2
        rows.append(dict(op=name, M=m, K=k, N=n, us=seconds * 1e6, tflops=2 * m * n * k / seconds / 1e12,
                         gbps=moved / seconds / 1e9, roofline=(moved / bw) / seconds))

    # Every op of the shape with its weight copies: (name, make_call(i) -> callable on copy i, weight bytes)
    todo = []
    w_bf16 = [torch.randn(n, k, device=device, generator=gen).to(torch.bfloat16) for _ in range(copies)]
    todo.append(("torch_bf16", lambda i: (lambda: x @ w_bf16[i].t()), bf16_bytes))
    if device == "cpu":
        w32 = [w.float() for w in w_bf16]
        x32 = x.float()
        todo.append(("torch_fp32", lambda i: (lambda: x32 @ w32[i].t()), n * k * 4))

    # W8A8
    w_q = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=gen) for _ in range(copies)]
    w_scale = torch.rand(n, device=device, generator=gen) * 0.01
    x_q, x_scale = ops.quantize_per_token(x)
    slow_cpu_int_mm = device == "cpu" and m * n * k > 2**31  # aten's CPU _int_mm is a plain loop: minutes
    if m > 16 and not slow_cpu_int_mm:
        def int_mm(i):
            return lambda: (torch._int_mm(x_q, w_q[i].t()).float() * x_scale[:, None] * w_scale).to(torch.bfloat16)
        todo.append(("torch_int_mm", int_mm, n * k))
    todo.append(("llmc_w8a8_mm", lambda i: (lambda: ops.w8a8_mm(x_q, x_scale, w_q[i], w_scale)), n * k))
    todo.append(("llmc_w8a8_linear", lambda i: (lambda: ops.w8a8_linear(x, w_q[i], w_scale)), n * k))

    # W4A16, group 128
    g = -(-k // GROUP)
    codes = [torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device, generator=gen) for _ in range(copies)]
    scales = torch.rand(n, g, device=device, generator=gen).to(torch.bfloat16) * 0.01
    packed = [ops.pack_w4a16(reference.pack_int4(c), scales, None, GROUP) for c in codes]
    todo.append(("llmc_w4a16", lambda i: (lambda: ops.w4a16_linear(x, packed[i])), n * k // 2))
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).contiguous()  # [G, N, 2]
    try:
        if device == "cuda":
            tw = [torch.ops.aten._convert_weight_to_int4pack(reference.pack_int4(c), 8) for c in codes]
            fn = lambda i: (lambda: torch.ops.aten._weight_int4pack_mm(x, tw[i], GROUP, sz))  # noqa: E731
        else:
            tw = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.int(), 1) for c in codes]
            fn = lambda i: (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tw[i], GROUP, sz))  # noqa: E731
        fn(0)()
        todo.append(("torch_int4", fn, n * k // 2))
    except RuntimeError as e:  # an unsupported shape or build of torch: say so, keep going
        print(f"torch int4 kernel unavailable for {m}x{k}x{n}: {str(e).splitlines()[0]}", file=sys.stderr)

    if device == "cuda":
        for name, make_call, wbytes in todo:
            record(name, time_op(device, make_call, copies), wbytes)
    else:
        for (name, _, wbytes), seconds in zip(todo, time_interleaved([t[1] for t in todo], copies)):
            record(name, seconds, wbytes)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["M"], r["K"], r["N"]), {})[r["op"]] = r["us"]
    for (m, k, n), t in sorted(by.items()):
        row = dict(M=m, K=k, N=n)
        for ours, peers in (("llmc_w4a16", ("torch_bf16", "torch_int4")),
                            ("llmc_w8a8_linear", ("torch_bf16", "torch_int_mm")),
                            ("llmc_w8a8_mm", ("torch_bf16", "torch_int_mm"))):
            for peer in peers:
                if ours in t and peer in t:
                    row[f"{ours}_vs_{peer}"] = t[peer] / t[ours]
        out.append(row)
    return out


def markdown(meta: dict, rows: list[dict], speedups: list[dict]) -> str:
    command = " ".join([f"{k}={v}" for k, v in meta.get("settings", {}).items()] + [meta["command"]])
    lines = [f"# Kernel benchmark: {meta['device_name']}", "", f"Command: `{command}`", "",
             f"torch {meta['torch']}, backend {meta['backend']}, measured copy bandwidth "
             f"{meta['bandwidth_gbps']:.0f} GB/s (read + write). {meta['timing']}", "",
             "## Speedups (peer time / llmc time; > 1 means llmc is faster)", ""]
    cols = sorted({c for s in speedups for c in s if "_vs_" in c})
    lines.append("| M | K | N | " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * (3 + len(cols)))
    for s in speedups:
        lines.append(f"| {s['M']} | {s['K']} | {s['N']} | " +
                     " | ".join(f"{s[c]:.2f}" if c in s else "" for c in cols) + " |")
    lines += ["", "## All timings", "", "| op | M | K | N | µs | TFLOP/s | GB/s | roofline |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['us']:.1f} | {r['tflops']:.2f} | "
                     f"{r['gbps']:.0f} | {r['roofline']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kns = sorted({(r["K"], r["N"]) for r in rows})
    fig, axes = plt.subplots(1, len(kns), figsize=(5 * len(kns), 4), squeeze=False)
    for ax, (k, n) in zip(axes[0], kns):
        for op in sorted({r["op"] for r in rows}):
            pts = sorted((r["M"], r["us"]) for r in rows if r["op"] == op and (r["K"], r["N"]) == (k, n))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=op)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="µs", title=f"K={k}, N={n}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="CPU-sized set: M in 1,4,16,128 at K=N=4096")
    ap.add_argument("--m", default=None, help="comma-separated M values (default: the issue's set)")
    ap.add_argument("--shapes", default=None, help="K,N pairs as 'K:N,K:N' (default: the issue's set)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    ms = [int(v) for v in args.m.split(",")] if args.m else ([1, 4, 16, 128] if args.quick else FULL_M)
    kns = ([tuple(int(v) for v in p.split(":")) for p in args.shapes.split(",")] if args.shapes
           else [(4096, 4096)] if args.quick else FULL_KN)
    torch.manual_seed(0)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, cache = props.name, props.L2_cache_size
    else:
        name, cache = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", 32 << 20
    bw = measure_bandwidth(device)
    meta = dict(device=device, device_name=name, torch=torch.__version__, backend=ops.backend(device),
                bandwidth_gbps=bw / 1e9, command="python " + " ".join(sys.argv), group_size=GROUP,
                settings={k: v for k, v in sorted(os.environ.items())
                          if k.startswith("LLMC_") and k != "LLMC_CACHE"},  # kernel choices, for the command line
                timing=("CUDA graph over rotating weight copies (> 2x L2), event-timed, median of 7 replays"
                        if device == "cuda" else "perf_counter over back-to-back calls on rotating weight copies "
                        "(~20 ms a sample), the ops' samples interleaved, median of 7"))
    print(f"{name}: copy bandwidth {bw / 1e9:.0f} GB/s, backend {meta['backend']}", flush=True)
    rows = []
    for k, n in kns:
        for m in ms:
            new = bench_shape(device, m, k, n, bw, cache)
            rows += new
            print("  ".join(f"{r['op']}={r['us']:.1f}us" for r in new), f"[M={m} K={k} N={n}]", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            md = write(args.out, meta, rows)  # after every shape, so a run cut short still leaves results
    print(md.split("## All timings")[0])


def save(out: Path, stem: str, meta: dict, rows: list[dict], speedups: list[dict], md: str) -> None:
    """out/<stem>.json (meta, rows, speedups) and out/<stem>.md; shared with bench_fp8.py."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows, speedups=speedups), indent=1))
    (out / f"{stem}.md").write_text(md)


def write(out: Path, meta: dict, rows: list[dict]) -> str:
    speedups = ratios(rows)
    md = markdown(meta, rows, speedups)
    save(out, "bench", meta, rows, speedups, md)
    plot(rows, out / "bench.png", meta["device_name"])
    return md


if __name__ == "__main__":
    main()
