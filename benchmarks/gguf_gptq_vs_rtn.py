"""WikiText-2 perplexity of GGUF files of the embedded default, each measured on the file itself (loaded back
through transformers' GGUF loader): llama.cpp's own round-to-nearest against GPTQ / AWQ run on the GGUF grid
(groups of 32 with fp16 scales: sym int4 = q4_0, int4 with a float zero point = q4_1, sym int8 = q8_0) and copied into the file without re-rounding.

    nice -n 10 python benchmarks/gguf_gptq_vs_rtn.py --out runs/gguf_bench [--max-tokens 8192] [--types q4_0 q4_1] [--methods gptq awq rtn]

Writes <out>/results.json and prints one row per file.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def ppl_of_gguf(path: Path, tok, text: str, max_tokens: int, seq_len: int) -> float:
    from transformers import AutoModelForCausalLM

    from llmcompress.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return perplexity(model, tok, text, seq_len=seq_len, max_tokens=max_tokens)["ppl"]


def main() -> None:
    from llmcompress.config import ActivationQuantConfig, QuantizeConfig, WeightQuantConfig
    from llmcompress.data import load_text
    from llmcompress.eval.perplexity import perplexity
    from llmcompress.export.gguf import write_gguf
    from llmcompress.models import embedded_model_dir, load_model
    from llmcompress.quant.checkpoint import save_quantized
    from llmcompress.quant.quantize import quantize_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/gguf_bench"))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--types", nargs="+", default=["q4_0"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dense_dir = embedded_model_dir()
    model, tok = load_model(str(dense_dir), device="cpu", dtype="float32")
    text = load_text("builtin:wikitext2_test")
    rows = [{"file": "dense (float32)", "ppl": perplexity(model, tok, text, seq_len=args.seq_len,
                                                          max_tokens=args.max_tokens)["ppl"]}]
    print(rows[-1], flush=True)
    # the artifact layout each type holds exactly (llmcompress/export/gguf.py copies it without re-rounding)
    layout = {"q4_0": dict(format="int4", symmetric=True), "q8_0": dict(format="int8", symmetric=True),
              "q4_1": dict(format="int4", symmetric=False, zero_point="float")}
    for qtype in args.types:
        f = args.out / f"llamacpp_rtn.{qtype}.gguf"
        write_gguf(dense_dir, f, qtype)
        rows.append({"file": f.name, "type": qtype, "weights": "llama.cpp RTN (gguf.quants)",
                     "ppl": ppl_of_gguf(f, tok, text, args.max_tokens, args.seq_len)})
        print(rows[-1], flush=True)
        for method in args.methods:
            if method == "awq" and qtype == "q4_1":
                continue  # AWQ runs with integer zero points only (quantize.check_config)
            t0 = time.time()
            cfg = QuantizeConfig(method=method, weights=WeightQuantConfig(
                **layout[qtype], granularity="group", group_size=32, scale_dtype="float16"),
                activations=ActivationQuantConfig(format="none"))
            q = copy.deepcopy(model)
            quantize_model(q, cfg, tokenizer=tok)
            art = args.out / f"artifact_{method}_{qtype}"
            save_quantized(q, art, tok, method, {"kv_cache": {"format": "none"}})
            f = args.out / f"{method}.{qtype}.gguf"
            write_gguf(art, f, qtype)
            rows.append({"file": f.name, "type": qtype, "weights": f"llmc {method} on the {qtype} grid, copied",
                         "ppl": ppl_of_gguf(f, tok, text, args.max_tokens, args.seq_len),
                         "quantize_s": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
            del q
    (args.out / "results.json").write_text(json.dumps({"max_tokens": args.max_tokens, "seq_len": args.seq_len,
                                                       "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
