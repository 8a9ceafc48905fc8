"""Generated tokens/s of distill-data's batched generation: batch 1 vs the configured batch, same prompts.

Times `generate_batch` (the code distill-data runs: chat template, left padding, KV cache, sampling) on GSM8K
questions with min_new_tokens = max_new_tokens, so every sequence generates exactly --new-tokens tokens and the
two settings do the same work. One untimed warm-up call each; wall time with torch.cuda.synchronize on GPU.
Prints a JSON line; the ratio is batched tokens/s over batch-1 tokens/s measured in the same run.

    python benchmarks/bench_distill_gen.py                      # CPU, embedded default teacher
    python benchmarks/bench_distill_gen.py --device cuda --batch 32 --prompts 64 --new-tokens 128

`--random-weights DIR` builds the teacher from DIR's config.json and tokenizer with random weights instead of
loading it: for a GPU machine the model file cannot reach. Speed does not depend on the weights' values here,
since min_new_tokens = max_new_tokens fixes every sequence's length; the result records that it was used.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llmcompress.config import DistillDataConfig, from_dict
from llmcompress.data import load_rows
from llmcompress.distill.generate import COT, generate_batch, render, stop_token_ids
from llmcompress.models import load_model


def tokens_per_s(model, tok, prompts, cfg, stop_ids, batch: int) -> tuple[float, int, float]:
    generate_batch(model, tok, prompts[:batch], cfg, stop_ids)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        torch.manual_seed(i)
        n += sum(len(o["response_ids"]) for o in generate_batch(model, tok, prompts[i:i + batch], cfg, stop_ids))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return n / dt, n, dt


def random_model(path: Path, device: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dt)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # as llmcompress.models.load_model does
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=8, help="the configured batch (distill-data batch_size)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts timed at each batch size")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                    help="build the model from DIR's config + tokenizer with random weights (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_dict(DistillDataConfig, {"teacher": {"name": args.model, "device": args.device, "dtype": args.dtype},
                                        "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
                                        "do_sample": True, "temperature": 0.7, "top_p": 0.95})
    if args.random_weights:
        model, tok = random_model(args.random_weights, cfg.teacher.device, cfg.teacher.dtype)
        args.model = f"{args.random_weights.name} (random weights)"
    else:
        model, tok = load_model(cfg.teacher)
    tok.padding_side = "left"
    stop_ids = stop_token_ids(model, tok)
    rows = load_rows("builtin:gsm8k_train")[: args.prompts]
    prompts = [render(tok, [{"role": "user", "content": r["question"] + "\n" + COT}]) for r in rows]
    one, n1, t1 = tokens_per_s(model, tok, prompts, cfg, stop_ids, 1)
    many, nb, tb = tokens_per_s(model, tok, prompts, cfg, stop_ids, args.batch)
    result = {"model": args.model, "device": str(model.device), "dtype": str(model.dtype),
              "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda"
              else platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "prompts": len(prompts), "new_tokens": args.new_tokens,
              "batch1_tok_s": round(one, 2), "batch1_tokens": n1, "batch1_s": round(t1, 2),
              f"batch{args.batch}_tok_s": round(many, 2), f"batch{args.batch}_tokens": nb,
              f"batch{args.batch}_s": round(tb, 2), "speedup": round(many / one, 2)}
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
