"""Run in a subprocess that never imports llmcompress: load a model directory with plain transformers (and, for a
compressed-tensors one, the compressed-tensors library's own decompression), then save what the tests compare.

    python plain_transformers.py MODEL_DIR OUT.pt TOKENS.pt [WEIGHT_NAME ...]

OUT.pt holds {"logits": float32 [B, T, V] of TOKENS, "nll": summed next-token NLL, "count": tokens scored,
"weights": {name: the Linear weight transformers computes with}, "modules": sorted llmcompress modules seen}.
"""

import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, out, tokens_file, *names = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.load(tokens_file)
    with torch.no_grad():
        logits = model(tokens).logits.float()
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).sum().item()
    weights = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    torch.save({"logits": logits, "nll": nll, "count": tokens[:, 1:].numel(), "weights": weights,
                "modules": sorted(m for m in sys.modules if m.startswith("llmcompress"))}, out)


if __name__ == "__main__":
    main()
