"""Run in a subprocess that never imports llmcompress: load model directories with plain transformers (for a
compressed-tensors one, transformers calls the compressed-tensors library's own decompression), then save what
the tests compare.

    python plain_transformers.py TOKENS.pt OUT.pt MODEL_DIR [MODEL_DIR ...]

OUT.pt: {"modules": llmcompress modules imported (must be none), MODEL_DIR: {"logits": float32 logits of the
first window's first 32 positions, "nll": summed next-token NLL over every window (float64), "count": tokens
scored, "weights": {Linear name: the weight transformers computes with}}}; TOKENS.pt: {"tokens": [B, T] int64,
"weights": [Linear names]}.
"""

import sys

import torch
from transformers import AutoModelForCausalLM


def measure(model_dir: str, tokens: torch.Tensor, names: list) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, first = 0.0, None
    with torch.no_grad():
        for row in tokens:
            logits = model(row[None]).logits.float()
            first = logits[0, :32].clone() if first is None else first
            logp = torch.log_softmax(logits[0, :-1].double(), -1)
            nll -= logp.gather(-1, row[1:, None]).sum().item()
    weights = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    return {"logits": first, "nll": nll, "count": tokens[:, 1:].numel(), "weights": weights}


def main():
    tokens_file, out, *dirs = sys.argv[1:]
    spec = torch.load(tokens_file)
    result = {d: measure(d, spec["tokens"], spec["weights"]) for d in dirs}
    result["modules"] = sorted(m for m in sys.modules if m.startswith("llmcompress"))
    torch.save(result, out)


if __name__ == "__main__":
    main()
