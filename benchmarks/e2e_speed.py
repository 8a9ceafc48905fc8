"""End-to-end tokens/s: a Llama-architecture model in bf16 vs the same model quantized (W4A16 g128, W8A8
dynamic) and served by llmcompress's QuantLinear (torch.ops.llmc kernels where built for the device).

Weights are random (speed does not depend on their values); shapes follow Llama-3.2-1B and Llama-3.1-8B.
Decode runs two ways: `eager` (HF forward per token, the dynamic KV cache: what `llmc eval --speed` measures)
and `graph` (a static KV cache with each decode step captured once in a CUDA graph and replayed: what a serving
user would run). Prefill is one forward of `--prefill` tokens. Medians of `--repeats` after a warm-up.

    python benchmarks/e2e_speed.py --models 1b,8b --out benchmarks/results/e2e_h100      # on a CUDA machine
    python benchmarks/e2e_speed.py --models smollm --device cpu --out benchmarks/results/e2e_cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
}

SCHEMES = {
    "bf16": None,
    "w4a16_g128": {"weights.format": "int4", "weights.granularity": "group", "weights.group_size": 128,
                   "activations.format": "none"},
    "w8a8_dynamic": {"weights.format": "int8", "weights.granularity": "channel", "activations.format": "int8",
                     "activations.dynamic": True},
}


def build(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm":
        from llmcompress.models import load_model

        model, _ = load_model("smollm2-135m", device=str(device), dtype="float32" if dtype == torch.float32
                              else "bfloat16")
        return model
    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def quantize(model, overrides: dict):
    from llmcompress.config import QuantizeConfig, load_config
    from llmcompress.quant.quantize import quantize_model

    cfg = load_config(QuantizeConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    quantize_model(model, cfg)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def prefill_tok_s(model, n: int, device, warmup, repeats) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    t = median_time(lambda: model(ids, use_cache=False, logits_to_keep=1), device, warmup, repeats)
    return n / t


@torch.no_grad()
def decode_eager(model, batch: int, ctx: int, steps: int, device, warmup, repeats) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=device)

    def run():
        out = model(ids, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        run()
    return batch * steps / statistics.median(run() for _ in range(repeats))


@torch.no_grad()
def decode_graph(model, batch: int, ctx: int, steps: int, device, warmup, repeats) -> float:
    """Static KV cache; one decode step captured in a CUDA graph, replayed `steps` times."""
    from transformers import StaticCache

    # The cache's write position advances with every replay, whatever cache_position says (transformers 5.x
    # keeps its own counter), so it must hold every step of the warm-up and timed runs, not just one run.
    cache = StaticCache(config=model.config, max_cache_len=ctx + 4 + steps * (warmup + repeats) + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=device)
    model(ids, past_key_values=cache, cache_position=torch.arange(ctx, device=device), use_cache=True,
          logits_to_keep=1)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.tensor([ctx], device=device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(tok, past_key_values=cache, cache_position=pos, use_cache=True)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

    def run():
        pos.fill_(ctx)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
            tok.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)
        sync(device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        run()
    return batch * steps / statistics.median(run() for _ in range(repeats))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prefill", default="2048")
    ap.add_argument("--ctx", type=int, default=128, help="prompt length before the timed decode steps")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/e2e_speed")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [int(p) for p in args.prefill.split(",")]
    from llmcompress.kernels import ops

    results = []
    for name in args.models.split(","):
        for scheme in args.schemes.split(","):
            row = {"model": name, "scheme": scheme, "device": torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
                   "weights": "random" if name != "smollm" else "SmolLM2-135M-Instruct"}
            try:
                model = build(name, device, dtype)
                if SCHEMES[scheme]:
                    quantize(model, SCHEMES[scheme])
                row["kernel_backend"] = ops.backend(device)
                for n in prefills:
                    row[f"prefill{n}_tok_s"] = prefill_tok_s(model, n, device, args.warmup, args.repeats)
                for b in batches:
                    row[f"decode_b{b}_eager_tok_s"] = decode_eager(model, b, args.ctx, args.steps, device,
                                                                   args.warmup, args.repeats)
                    if device.type == "cuda":
                        try:
                            row[f"decode_b{b}_graph_tok_s"] = decode_graph(model, b, args.ctx, args.steps,
                                                                           device, args.warmup, args.repeats)
                        except Exception as e:  # report, don't hide: the eager number still stands
                            row[f"decode_b{b}_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
            results.append(row)
            write(Path(args.out), args, results, argv)  # after every row: a cut-off run keeps what it measured
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    write(Path(args.out), args, results, argv)


def write(out: Path, args, results: list, argv) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_speed.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    keys = list(dict.fromkeys(k for r in results for k in r if k.endswith("tok_s")))
    lines = [f"command: python benchmarks/e2e_speed.py {' '.join(argv or __import__('sys').argv[1:])}", "",
             "| model | scheme | " + " | ".join(keys) + " | speedup vs bf16 (decode b1) |",
             "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- |"]
    for r in results:
        base = next((x for x in results if x["model"] == r["model"] and x["scheme"] == "bf16"), None)
        k = "decode_b1_graph_tok_s" if "decode_b1_graph_tok_s" in r else "decode_b1_eager_tok_s"
        sp = (r.get(k, 0) / base[k]) if base and base.get(k) else float("nan")
        lines.append(f"| {r['model']} | {r['scheme']} | " +
                     " | ".join(f"{r.get(c, float('nan')):.1f}" for c in keys) + f" | {sp:.2f}x |")
    (out / "e2e_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
