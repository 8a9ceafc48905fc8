"""GPTQ wall time and peak memory: ours (`quantize_model`, the code `llmc quantize` runs) against llm-compressor 0.14
(`oneshot` + `GPTQModifier`), side by side on the same machine, the same calibration rows and the same threads.

Protocol (issue 8): the embedded default (SmolLM2-135M-Instruct, float32, CPU), 128 rows of builtin:alpaca_en_demo
truncated to 512 tokens (QuantizeConfig.data defaults, seed 0: the exact same texts go to both tools, tokenized by
the same tokenizer), GPTQ W8A8 (int8 per-channel symmetric weights, int8 dynamic per-token activations). Each run is
a fresh subprocess, one after another (never two at once), so its peak RSS is its own:

    python benchmarks/bench_gptq.py                                   # W8A8: ours vs llm-compressor
    python benchmarks/bench_gptq.py --schemes w8a8,w4_g64_sym,w4_g64_asym --ppl   # also W4A16 g64, with perplexity

llm-compressor lives in its own virtual environment (never the dev venv):

    python3 -m venv /tmp/llmcomp-venv && /tmp/llmcomp-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

Timed: the quantization call only (`quantize_model` / `oneshot`: calibration forward passes, Hessians, GPTQ),
from after the model is loaded to its return; the model load and the perplexity are timed apart. Peak RSS is the
process's ru_maxrss (model load included: both load the same float32 weights). With --ppl the quantized model is
scored on the first 16 windows of 2,048 WikiText-2 test tokens (llmcompress.eval.perplexity, for both tools).
Results: benchmarks/results/bench_gptq.json (merged per tool and scheme) and bench_gptq.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
LLMCOMP_PYTHON = "/tmp/llmcomp-venv/bin/python"

# scheme -> our QuantizeConfig overrides (GPTQ with the config's defaults otherwise)
OURS = {
    "w8a8": ["weights.format=int8", "weights.granularity=channel", "weights.symmetric=true",
             "activations.format=int8", "activations.dynamic=true"],
    "w4_g64_sym": ["weights.format=int4", "weights.granularity=group", "weights.group_size=64",
                   "weights.symmetric=true", "activations.format=none"],
    "w4_g64_asym": ["weights.format=int4", "weights.granularity=group", "weights.group_size=64",
                    "weights.symmetric=false", "activations.format=none"],
}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _ppl(model, tok, windows: int) -> float:
    sys.path.insert(0, str(ROOT))
    from llmcompress.data import load_text
    from llmcompress.eval.perplexity import perplexity

    return perplexity(model, tok, load_text("builtin:wikitext2_test"), seq_len=2048,
                      max_tokens=windows * 2048 + 1)["ppl"]


def worker_ours(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from llmcompress.config import QuantizeConfig, load_config
    from llmcompress.models import load_model
    from llmcompress.quant.quantize import quantize_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    load_s = time.perf_counter() - t0
    cfg = load_config(QuantizeConfig, overrides=["method=gptq", *OURS[args.scheme], *args.set])
    t0 = time.perf_counter()
    quantize_model(model, cfg, None, None, tok)
    seconds = time.perf_counter() - t0
    rec = {"quantize_seconds": seconds, "load_seconds": load_s, "peak_rss_bytes": peak_rss_bytes(),
           "overrides": ["method=gptq", *OURS[args.scheme], *args.set]}
    if args.ppl:
        rec["ppl"] = _ppl(model, tok, args.windows)
    return rec


def worker_llmcompressor(args) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.rows).read_text())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    load_s = time.perf_counter() - t0
    enc = [tok(t, truncation=True, max_length=512) for t in texts]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in enc],
                            "attention_mask": [e["attention_mask"] for e in enc]})
    if args.scheme == "w8a8":
        recipe = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    else:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        w = QuantizationArgs(num_bits=4, type="int", symmetric=args.scheme.endswith("_sym"), strategy="group",
                             group_size=64)
        recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=w)},
                              ignore=["lm_head"])
    t0 = time.perf_counter()
    model = oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=512, num_calibration_samples=len(texts))
    seconds = time.perf_counter() - t0
    rec = {"quantize_seconds": seconds, "load_seconds": load_s, "peak_rss_bytes": peak_rss_bytes(),
           "recipe": repr(recipe)[:400]}
    if args.ppl:
        rec["ppl"] = _ppl(model, tok, args.windows)
    return rec


def run_worker(tool: str, scheme: str, args, rows_file: str, model_dir: str) -> dict:
    python = sys.executable if tool == "ours" else args.llmcomp_python
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [python, str(Path(__file__).resolve()), "--worker", tool, "--scheme", scheme, "--rows", rows_file,
           "--model-dir", model_dir, "--threads", str(args.threads), "--windows", str(args.windows),
           "--result", out] + (["--ppl"] if args.ppl else []) + [a for s in args.set for a in ("--set", s)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"{tool} {scheme}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return {"error": tail[-800:], "exit": proc.returncode}
    rec = json.loads(Path(out).read_text())
    os.unlink(out)
    rec["process_wall_seconds"] = wall
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="w8a8", help=f"comma-separated: {', '.join(OURS)}")
    ap.add_argument("--tools", default="ours,llmcompressor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl", action="store_true", help="also score each quantized model (16 windows of 2,048)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], help="extra override for our config (repeatable)")
    ap.add_argument("--llmcomp-python", default=LLMCOMP_PYTHON)
    ap.add_argument("--out", default=str(OUT))
    # worker mode (internal)
    ap.add_argument("--worker", choices=["ours", "llmcompressor"])
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--rows")
    ap.add_argument("--model-dir")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        rec = (worker_ours if args.worker == "ours" else worker_llmcompressor)(args)
        Path(args.result).write_text(json.dumps(rec))
        return

    sys.path.insert(0, str(ROOT))
    from llmcompress.config import QuantizeConfig
    from llmcompress.data import sample_texts
    from llmcompress.models import resolve_model

    cfg = QuantizeConfig()
    texts = sample_texts(cfg.data, cfg.seed)  # the rows our quantize stage uses; llm-compressor gets the same
    model_dir = str(resolve_model("smollm2-135m"))
    rows = Path(tempfile.mkdtemp()) / "rows.json"
    rows.write_text(json.dumps(texts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "bench_gptq.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    host = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
            "load_avg_before": os.getloadavg()}
    for scheme in args.schemes.split(","):
        for tool in args.tools.split(","):
            print(f"running {tool} {scheme} ...", flush=True)
            rec = run_worker(tool, scheme, args, str(rows), model_dir)
            rec.update(host=host, rows=len(texts), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       command="python benchmarks/bench_gptq.py " + " ".join(sys.argv[1:]))
            results.setdefault(scheme, {})[tool] = rec
            print(f"{tool} {scheme}: " + json.dumps({k: v for k, v in rec.items() if k != "recipe"}), flush=True)
            store.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "bench_gptq.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| scheme | tool | quantize wall time | peak RSS | ppl (16 × 2,048 WikiText-2) | threads | command |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for scheme, by_tool in results.items():
        for tool, r in by_tool.items():
            if "quantize_seconds" not in r:
                lines.append(f"| {scheme} | {tool} | failed | | | | `{r.get('command', '')}` |")
                continue
            ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
            lines.append(f"| {scheme} | {tool} | {r['quantize_seconds']:.1f} s | "
                         f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {ppl} | {r['host']['threads']} | "
                         f"`{r['command']}` |")
        if "ours" in by_tool and "llmcompressor" in by_tool and "quantize_seconds" in by_tool["ours"] \
                and "quantize_seconds" in by_tool["llmcompressor"]:
            ratio = by_tool["ours"]["quantize_seconds"] / by_tool["llmcompressor"]["quantize_seconds"]
            lines.append(f"| {scheme} | ours / llm-compressor | {ratio:.2f}× | | | | |")
    return ("# GPTQ: ours vs llm-compressor 0.14 (CPU)\n\nSame machine, same 128 alpaca rows ≤ 512 tokens, same "
            "threads, one process at a time (`benchmarks/bench_gptq.py`; its docstring has the protocol).\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
