"""How concentrated awq.guided's weights are on the embedded default: for a few Linears, the spread of the
per-channel b_n and the effective token count (Σa)² / Σa² of the per-token a_t over the 128 calibration rows
(QuantizeConfig's data defaults), and the first token's mean a_t against all tokens' (about 3 min on 2 CPU cores).

    python scripts/lab/guidance_stats.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llmcompress.config import QuantizeConfig, load_config  # noqa: E402
from llmcompress.data import sample_texts  # noqa: E402
from llmcompress.models import load_model  # noqa: E402
from llmcompress.quant import guidance  # noqa: E402
from llmcompress.quant.layerwise import make_batches  # noqa: E402
from llmcompress.quant.quantize import select_linears  # noqa: E402

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.3.mlp.down_proj",
         "model.layers.29.mlp.down_proj"]


def main() -> None:
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    cfg = load_config(QuantizeConfig, overrides=["method=awq"])
    texts = sorted(sample_texts(cfg.data, cfg.seed), key=len)
    batches = make_batches(tok, texts, cfg.data.max_length, cfg.batch_size, torch.device("cpu"))
    g = guidance.loss_gradients(model, select_linears(model, cfg.include, cfg.exclude), batches)
    masks = [b["attention_mask"].bool() for b in batches]
    for n in NAMES:
        c = g.channel[n]
        a = torch.cat(g.token_rows([n], masks))
        first = torch.cat([g.token[n][b][:, 0] for b in range(len(batches))])
        print(f"{n}: b_n max/mean {float(c.max() / c.mean()):.1f}, min/mean {float(c.min() / c.mean()):.3f}; "
              f"a_t over {a.numel()} tokens: effective count {float(a.sum() ** 2 / a.pow(2).sum()):.0f}, "
              f"max/mean {float(a.max() / a.mean()):.0f}, first token's mean / all tokens' {float(first.mean() / a.mean()):.3g}")


if __name__ == "__main__":
    main()
