"""Behaviour-kept check for refactors of quant/: a fingerprint of quantize_model on the embedded default cut to its
first LAYERS decoder layers, per configuration: sha256 of every buffer of the quantized model (codes, scales,
input scales), the recorded KV scales and the quantized model's logits on a fixed text; plus the mean SQNR and the
next-token NLL of that text. Run it at two commits and compare the lines (one torch thread: deterministic).

    python benchmarks/quant_fingerprint.py [name ...]
    FP_LAYERS=30 python benchmarks/quant_fingerprint.py gptq_w4 awq_w4      # the whole model
"""
import copy
import hashlib
import json
import os
import sys

import torch

from llmcompress.config import QuantizeConfig, load_config
from llmcompress.models import embedded_model_dir, load_model
from llmcompress.quant.quantize import quantize_model

LAYERS = int(os.environ.get("FP_LAYERS", 3))  # FP_LAYERS=30: the whole embedded default
CALIB = ["data.num_samples=8", "data.max_length=64", "batch_size=4"]
W4 = ["weights.format=int4", "weights.granularity=group", "weights.group_size=128", "activations.format=none"]
RUNS = {
    "rtn_w4g64": ["method=rtn", "weights.format=int4", "weights.granularity=group", "weights.group_size=64",
                  "activations.format=none"],
    "gptq_w4": W4 + ["method=gptq"],
    "gptq_w4_kv": W4 + ["method=gptq", "kv_cache.format=int8", "kv_cache.granularity=head"],
    "gptq_w4_nonseq": W4 + ["method=gptq", "gptq.true_sequential=false", "gptq.act_order=false"],
    "awq_w4": W4 + ["method=awq"],
    "awq_w4_gptq": W4 + ["method=awq", "awq.gptq=true"],
    "awq_w4_rounds_qk": W4 + ["method=awq", "awq.group_rounds=1", "awq.clip_qk=true", "awq.normalize_tokens=true"],
    "sq_w8a8_static": ["method=rtn", "smoothquant.enabled=true", "weights.format=int8",
                       "weights.granularity=channel", "activations.format=int8", "activations.dynamic=false"],
    "sq_grid_gptq_w8a8": ["method=gptq", "smoothquant.enabled=true", "smoothquant.alpha_grid=[0.3,0.6]",
                          "weights.format=int8", "weights.granularity=channel", "activations.format=int8"],
    "kv_int8_rtn": ["method=rtn", "weights.format=int8", "weights.granularity=channel", "activations.format=int8",
                    "kv_cache.format=int8", "kv_cache.granularity=head"],
}

torch.set_num_threads(1)
base, tok = load_model(str(embedded_model_dir()), device="cpu", dtype="float32")
base.model.layers = base.model.layers[:LAYERS]
base.config.num_hidden_layers = LAYERS
if getattr(base.config, "layer_types", None):
    base.config.layer_types = base.config.layer_types[:LAYERS]
ids = tok("The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun. " * 3,
          return_tensors="pt")["input_ids"]
for name in sys.argv[1:] or RUNS:
    m = copy.deepcopy(base)
    cfg = load_config(QuantizeConfig, overrides=CALIB + RUNS[name])
    rows = quantize_model(m, cfg, None, None, tok)
    h = hashlib.sha256()
    for n, b in sorted(m.named_buffers()):
        h.update(n.encode())
        h.update(b.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(getattr(m, "llmc_kv_cache", None), sort_keys=True).encode())
    with torch.no_grad():
        logits = m(ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    h.update(logits.numpy().tobytes())
    sq = [r["sqnr_db"] for r in rows]
    print(f"{name:20s} {h.hexdigest()[:16]} mean_sqnr={sum(sq)/len(sq):.6f} nll={float(nll):.6f}", flush=True)
