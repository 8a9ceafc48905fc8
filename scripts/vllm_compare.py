"""Greedy generations and prompt log-probs of compressed-tensors model directories, under llmcompress or vLLM.

    python scripts/vllm_compare.py ours OUT.json DIR [DIR ...]          # our load_quantized (import path)
    VLLM_PYTHON scripts/vllm_compare.py vllm OUT.json DIR [DIR ...]     # vLLM (run with vLLM's own interpreter)
    python scripts/vllm_compare.py diff OURS.json VLLM.json             # prints the comparison, one line per dir

The vLLM side never imports llmcompress. Greedy decoding of NEW tokens after each prompt; prompt log-probs are
log p(token_t | tokens_<t) of every prompt token after the first, which is what separates two implementations
of one model far more finely than generations do. vLLM runs in bfloat16: its CPU int8 kernel
(int8_scaled_mm_with_quant) refuses float32 activations; ours run in float32.
"""

import json
import sys

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "Once upon a time, in a small village,"]
NEW = 16


def ours(dirs):
    import torch

    from llmcompress.models import load_tokenizer
    from llmcompress.quant.checkpoint import load_quantized

    out = {}
    for d in dirs:
        model, tok = load_quantized(d, dtype=torch.float32), load_tokenizer(d)
        rows = []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                gen = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:]
            rows.append({"prompt_ids": ids[0].tolist(), "generated": gen.tolist(),
                         "prompt_logprobs": logp.gather(-1, ids[0, 1:, None])[:, 0].tolist()})
        out[d] = rows
    return out


def vllm(dirs):
    from vllm import LLM, SamplingParams

    out = {}
    for d in dirs:
        llm = LLM(model=d, dtype="bfloat16", gpu_memory_utilization=0.15, max_model_len=512, enforce_eager=True)
        params = SamplingParams(temperature=0.0, max_tokens=NEW, prompt_logprobs=0)
        rows = []
        for p, res in zip(PROMPTS, llm.generate(PROMPTS, params)):
            ids = res.prompt_token_ids
            lps = [entry[tok].logprob for entry, tok in zip(res.prompt_logprobs[1:], ids[1:])]
            rows.append({"prompt_ids": list(ids), "generated": list(res.outputs[0].token_ids),
                         "prompt_logprobs": lps})
        out[d] = rows
        del llm
    return out


def diff(a_file, b_file):
    a, b = json.load(open(a_file)), json.load(open(b_file))
    for d in a:
        same_ids = all(x["prompt_ids"] == y["prompt_ids"] for x, y in zip(a[d], b[d]))
        gens = sum(x["generated"] == y["generated"] for x, y in zip(a[d], b[d]))
        first_diff = [next((i for i, (s, t) in enumerate(zip(x["generated"], y["generated"])) if s != t), NEW)
                      for x, y in zip(a[d], b[d])]
        dl = max(abs(s - t) for x, y in zip(a[d], b[d]) for s, t in zip(x["prompt_logprobs"], y["prompt_logprobs"]))
        print(f"{d}: prompts tokenized alike {same_ids}; greedy generations identical {gens}/{len(a[d])} "
              f"(first differing token {first_diff}); max |prompt log-prob difference| {dl:.4f}")


if __name__ == "__main__":  # vLLM's engine spawns processes: nothing may run at import
    mode, out, *rest = sys.argv[1:]
    if mode == "diff":
        diff(out, rest[0])
    else:
        result = {"ours": ours, "vllm": vllm}[mode](rest)
        json.dump(result, open(out, "w"))
