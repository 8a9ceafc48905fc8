"""End-to-end speed of one model x scheme on a CUDA machine: prefill / time to first token, decode tokens/s
through llmcompress.runtime.StaticDecoder (what `llmc eval --speed` runs on CUDA), peak memory, bytes read per
token and the fraction of the copy bandwidth (measured in the same process) that decode reaches.

Weights are random (speed does not depend on their values); shapes follow Llama-3.2-1B and Llama-3.1-8B.
Decode modes: `graph` (static KV cache, the eager step captured in a CUDA graph: the previous sessions'
"CUDA graph" column) and `compiled` (the same with the step torch.compile'd first: the default on CUDA).
--profile breaks the batch-1 step of both down by kernel (torch.profiler, the steps run without their graph).
Schemes: bf16, w4a16_g128, w8a8_dynamic, fp8_dynamic (torch._scaled_mm), and the peer torch_int4_g128 (the
W4A16 model's int4 weights served by aten._weight_int4pack_mm through a gpt-fast style module swap).
Medians of --repeats after --warmup. One process per row: the driver (scripts/results/e2e_h100/*/run.sh) loops.

    python benchmarks/e2e_speed.py --model 8b --scheme w4a16_g128 --profile --pdl-ab --out DIR   # one row
    python benchmarks/e2e_speed.py --table DIR                                                    # DIR/e2e_speed.md
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=512),  # a smoke test of this script
}
W4 = {"weights.format": "int4", "weights.granularity": "group", "weights.group_size": 128,
      "activations.format": "none"}
SCHEMES = {
    "bf16": None,
    "w4a16_g128": W4,
    "w8a8_dynamic": {"weights.format": "int8", "weights.granularity": "channel", "activations.format": "int8",
                     "activations.dynamic": True},
    "fp8_dynamic": {"weights.format": "fp8", "weights.granularity": "channel", "activations.format": "fp8",
                    "activations.dynamic": True},
    "torch_int4_g128": W4,
}


def build(name: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def quantize(model, overrides: dict):
    from llmcompress.config import QuantizeConfig, load_config
    from llmcompress.quant.quantize import quantize_model

    quantize_model(model, load_config(QuantizeConfig, None, [f"{k}={v}" for k, v in overrides.items()]))


class TorchInt4Linear(torch.nn.Module):
    """The peer: torch's tinygemm int4 kernel, w = (q - 8) * scale + zero per group of 128 (gpt-fast's
    WeightOnlyInt4Linear), built from a QuantLinear's stored codes so both serve the same weights."""

    def __init__(self, q):
        super().__init__()
        self.out_features, self.group_size = q.out_features, q.scheme.group_size
        w = q.qweight  # even k in the low nibble; torch's packer wants it in the high nibble
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(((w & 15) << 4) | (w >> 4), 8))
        s = q.scales.float()
        z = torch.zeros_like(s) if q.zeros is None else (8 - q.zeros.float()) * s
        self.register_buffer("scales_and_zeros", torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous())

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.group_size,
                                               self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def swap_torch_int4(model) -> float:
    """Swap every int4 QuantLinear for TorchInt4Linear; returns the largest relative output difference seen on
    one layer (a check that the peer computes the same product, not a speed number)."""
    from llmcompress.quant.qlinear import QuantLinear

    err = None
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            new = TorchInt4Linear(mod)
            if err is None:
                x = torch.randn(4, mod.in_features, device=mod.qweight.device, dtype=torch.bfloat16)
                a, b = mod(x).float(), new(x).float()
                err = ((a - b).norm() / a.norm()).item()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return err


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(fn() for _ in range(repeats))


def copy_bandwidth(device) -> float:
    """Bytes/s of a 2 GiB device copy (read + write), the decode roofline's denominator."""
    src = torch.empty(2**30 if device.type == "cuda" else 2**26, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)

    def run():
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        sync()
        return (time.perf_counter() - t0) / 5

    t = median(run, 1, 5)
    return 2 * src.numel() * src.element_size() / t


def bytes_per_token(model, ctx: int) -> int:
    """What one batch-1 decode step must read: every weight except the embedding table (one row of it), plus
    the KV cache up to `ctx`. Quantized Linears count their stored codes and scales (the kernels read a packed
    copy of the same size)."""
    emb = model.get_input_embeddings().weight
    total = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                if t.data_ptr() != emb.data_ptr() and not n.endswith("rotary_emb.inv_freq"))
    total += emb.shape[1] * emb.element_size()
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    total += 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * ctx * 2
    return total


def make_decoder(model, mode: str, batch: int, max_len: int):
    from llmcompress.runtime import StaticDecoder

    graph = mode in ("graph", "compiled") and next(model.parameters()).device.type == "cuda"
    return StaticDecoder(model, batch, max_len, compile=mode == "compiled", cuda_graph=graph)


def decode_tok_s(dec, ids, steps: int, warmup: int, repeats: int) -> float:
    def run():
        dec.prefill(ids)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step()
        sync()
        return time.perf_counter() - t0

    return ids.shape[0] * steps / median(run, warmup, repeats)


def classify(kernel: str) -> str:
    k = kernel.lower()
    if any(s in k for s in ("llmc", "w4a16", "w8a8", "int4pack", "quantize", "scaled_mm", "f8")):
        return "quantized GEMM + activation quant"
    if any(s in k for s in ("flash", "fmha", "attention", "sdpa", "softmax")):
        return "attention"
    if any(s in k for s in ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "splitk")):
        return "bf16 GEMM"
    if "triton" in k:
        return "inductor-fused (norms, rotary, residual, cache write)"
    return "other elementwise / norm / copy / argmax"


def profile_step(dec, ids, steps: int, path: Path) -> dict:
    """GPU time per category over `steps` decode steps of a decoder that does not replay a graph (kernels are
    then attributed one by one), and the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    dec.prefill(ids)
    for _ in range(2):
        dec.step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step()
        sync()
    per = {}
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels:
        per[classify(e.key)] = per.get(classify(e.key), 0.0) + e.self_device_time_total / steps
    path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    dec.prefill(ids)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        dec.step()
    sync()
    return {"gpu_us_per_step": {k: round(v, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
            "gpu_busy_us": round(sum(per.values()), 1), "wall_us": round((time.perf_counter() - t0) / steps * 1e6, 1),
            "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1)}


@torch.no_grad()
def row(args, r: dict) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    r.update({"model": args.model, "scheme": args.scheme, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu"})
    from llmcompress.kernels import ops

    r["kernel_backend"] = ops.backend(device)
    r["copy_bw_gbs"] = copy_bandwidth(device) / 1e9
    model = build(args.model, device)
    if SCHEMES[args.scheme]:
        quantize(model, SCHEMES[args.scheme])
    if args.scheme.startswith("torch_int4"):
        r["peer_rel_err_vs_llmc"] = swap_torch_int4(model)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    r["weights_gb"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
    r["bytes_per_token_b1"] = bytes_per_token(model, args.ctx + args.steps // 2)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for n in args.prefill:
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)

        def ttft():
            sync()
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
            return time.perf_counter() - t0

        t = median(ttft, args.warmup, args.repeats)
        r[f"ttft{n}_ms"], r[f"prefill{n}_tok_s"] = t * 1e3, n / t
    decoders = {}
    for b in args.batches:
        ids = torch.randint(0, vocab, (b, args.ctx), generator=gen).to(device)
        for mode in args.modes:
            if b > 1 and mode not in args.modes_b8:
                continue
            t0 = time.perf_counter()
            try:
                dec = make_decoder(model, mode, b, args.ctx + max(args.steps, 10) + 2)  # 10: profile_step
                dec.prefill(ids), dec.step()  # compiles and captures, outside the timing
                sync()
                r[f"decode_b{b}_{mode}_setup_s"] = time.perf_counter() - t0
                r[f"decode_b{b}_{mode}_tok_s"] = decode_tok_s(dec, ids, args.steps, args.warmup, args.repeats)
                decoders[(b, mode)] = (dec, ids)
            except Exception as e:  # report, don't hide: the other modes' numbers still stand
                r[f"decode_b{b}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps({k: v for k, v in r.items() if k.startswith(f"decode_b{b}_{mode}")}), flush=True)
    best = max((r.get(f"decode_b1_{m}_tok_s", 0) for m in ("compiled", "graph")), default=0)
    r["roofline_tok_s_b1"] = r["copy_bw_gbs"] * 1e9 / r["bytes_per_token_b1"]
    r["roofline_fraction_b1"] = best / r["roofline_tok_s_b1"]
    r["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    if args.pdl_ab:  # the W4A16 decode kernel with and without programmatic dependent launch, same decoders
        r["pdl_ab"] = []
        for mode in ("graph", "compiled"):
            if (1, mode) not in decoders:
                continue
            dec, ids = decoders[(1, mode)]
            for pdl in (1, 0, 1, 0):
                with ops.force_cuda_variant(W4_PDL=pdl):
                    dec._graph = None  # the kernel reads the knob at launch, i.e. at capture
                    r["pdl_ab"].append({"mode": mode, "W4_PDL": pdl, "tok_s": decode_tok_s(
                        dec, ids, args.steps, args.warmup, args.repeats)})
            dec._graph = None
    if args.profile:  # the b1 decoders' steps without their graphs: kernels one by one (nothing recompiles)
        r["profile"] = {}
        for mode in ("graph", "compiled"):
            if (1, mode) not in decoders:
                continue
            dec, ids = decoders[(1, mode)]
            graph, dec.cuda_graph = dec.cuda_graph, False
            name = {"graph": "eager_step", "compiled": "compiled_step"}[mode]
            r["profile"][name] = profile_step(dec, ids, 8, Path(args.out) / f"profile_{args.model}_{args.scheme}_"
                                              f"{name}.txt")
            r["profile"][name]["graph_wall_us"] = round(1e6 / r[f"decode_b1_{mode}_tok_s"], 1)
            dec.cuda_graph = graph
    return r


FMT = [("weights_gb", "weights GB", ".2f"), ("peak_mem_gb", "peak GB", ".1f"), ("ttft2048_ms", "TTFT 2048 ms", ".1f"),
       ("prefill2048_tok_s", "prefill 2048 tok/s", ",.0f"), ("decode_b1_graph_tok_s", "b1 graph", ".1f"),
       ("decode_b1_compiled_tok_s", "b1 compiled", ".1f"), ("decode_b8_graph_tok_s", "b8 graph", ",.0f"),
       ("decode_b8_compiled_tok_s", "b8 compiled", ",.0f"), ("roofline_fraction_b1", "b1 of roofline", ".0%")]


def table(out: Path) -> str:
    merged = {}  # one row per model x scheme: later processes (a second call, a re-run) add to or replace cells
    for line in (out / "rows.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            merged.setdefault((r["model"], r["scheme"]), {}).update(r)
    rows = list(merged.values())
    lines = ["| model | scheme | " + " | ".join(h for _, h, _ in FMT) + " |", "|---|---|" + "---:|" * len(FMT)]
    for r in rows:
        base = next((x for x in rows if x["model"] == r["model"] and x["scheme"] == "bf16"), {})
        cells = []
        for key, _, f in FMT:
            v = r.get(key)
            cell = "—" if v is None else format(v, f)
            if v is not None and base.get(key) and r is not base and key.endswith(("tok_s", "_gb")):
                cell += f" ({v / base[key]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {r['model']} | {r['scheme']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "e2e_speed.md").write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(SHAPES))
    ap.add_argument("--scheme", choices=list(SCHEMES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="graph,compiled", type=lambda s: s.split(","))
    ap.add_argument("--modes-b8", default="compiled", type=lambda s: s.split(","),
                    help="the modes also timed at batch sizes over 1")
    ap.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    ap.add_argument("--prefill", default="2048", type=lambda s: [int(n) for n in s.split(",") if n])
    ap.add_argument("--ctx", type=int, default=128, help="prompt length before the timed decode steps")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of a batch-1 decode step")
    ap.add_argument("--pdl-ab", action="store_true", help="W4A16: batch-1 decode with the W4_PDL knob forced 1/0 alternately")
    ap.add_argument("--table", metavar="DIR", help="only write DIR/e2e_speed.md from DIR/rows.jsonl")
    ap.add_argument("--out", default="runs/e2e_speed")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = {}

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a driver's timeout: keep what was measured
    try:
        row(args, r)
    except KeyboardInterrupt:
        r["partial"] = "stopped by SIGTERM"
    r["command"] = "python benchmarks/e2e_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(r), flush=True)
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
