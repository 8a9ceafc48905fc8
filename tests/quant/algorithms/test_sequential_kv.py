"""Layer-by-layer GPTQ / AWQ / SmoothQuant / KV cache through `quantize_model`, on a tiny random Llama (fast) and
the KV-cache perplexity cost on the real embedded default."""

import copy
import json
import math

import pytest
import torch

from llmcompress.config import QuantizeConfig, load_config
from llmcompress.quant.checkpoint import load_quantized, save_quantized
from llmcompress.quant.kvcache import KVObserver, apply_kv_quant, attention_modules, kv_config
from llmcompress.quant.quantize import quantize_model

CALIB = ["data.num_samples=8", "data.max_length=48", "batch_size=4"]
W4 = ["weights.format=int4", "weights.granularity=group", "weights.group_size=64", "activations.format=none"]


@pytest.fixture(scope="module")
def tiny(smollm_path):
    from _shared import tiny_llama
    from llmcompress.models import load_tokenizer

    tok = load_tokenizer(smollm_path)
    model = tiny_llama(vocab_size=len(tok), hidden_size=96, intermediate_size=160, head_dim=24,
                       tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.no_grad():  # loud channels in the norms, as trained LLMs have, so the algorithms have work to do
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 4 * torch.rand(96) ** 8)
    ids = tok("The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.",
              return_tensors="pt")["input_ids"]
    return model, tok, ids


def _quantized(tiny, overrides):
    model, tok, ids = tiny
    m = copy.deepcopy(model)
    cfg = load_config(QuantizeConfig, overrides=CALIB + overrides)
    rows = quantize_model(m, cfg, None, None, tok)
    return m, cfg, rows


@torch.no_grad()
def _err(m, tiny):
    model, _, ids = tiny
    return float((m(ids).logits - model(ids).logits).pow(2).mean())


def test_gptq_and_awq_layer_by_layer_beat_rtn(tiny):
    rtn, _, rows = _quantized(tiny, W4 + ["method=rtn"])
    gptq, _, _ = _quantized(tiny, W4 + ["method=gptq"])
    awq, _, _ = _quantized(tiny, W4 + ["method=awq"])
    assert len(rows) == 2 * 7 and rows[0]["scheme"] == "W4A16"
    e_rtn, e_gptq, e_awq = _err(rtn, tiny), _err(gptq, tiny), _err(awq, tiny)
    assert e_gptq < e_rtn and e_awq <= e_rtn * 1.02, (e_rtn, e_gptq, e_awq)


@pytest.mark.parametrize("extra", [["awq.group_rounds=2", "awq.clip_qk=true"]])
def test_awq_group_rounds_and_clip_qk_run_layer_by_layer(tiny, extra):
    """awq.group_rounds and awq.clip_qk through quantize_model: they change the result and stay within plain
    AWQ's bound against RTN."""
    rtn, _, _ = _quantized(tiny, W4 + ["method=rtn"])
    plain, _, _ = _quantized(tiny, W4 + ["method=awq"])
    new, _, rows = _quantized(tiny, W4 + ["method=awq"] + extra)
    assert len(rows) == 2 * 7
    e_rtn, e_plain, e_new = _err(rtn, tiny), _err(plain, tiny), _err(new, tiny)
    assert e_new <= e_rtn * 1.02, (e_rtn, e_plain, e_new)
    assert e_new != e_plain


def test_smoothquant_static_w8a8_scales_come_from_the_smoothed_model(tiny):
    over = ["weights.format=int8", "weights.granularity=channel", "activations.format=int8",
            "activations.dynamic=false"]
    plain, _, _ = _quantized(tiny, over)
    smooth, _, _ = _quantized(tiny, over + ["smoothquant.enabled=true", "smoothquant.alpha=0.5"])
    base = tiny[0].model.layers[0].input_layernorm.weight
    assert not torch.allclose(smooth.model.layers[0].input_layernorm.weight, base)  # folded into the norm
    q = smooth.model.layers[0].self_attn.q_proj
    assert q.input_scale is not None and float(q.input_scale) > 0
    assert _err(smooth, tiny) < _err(plain, tiny)


@pytest.mark.parametrize("fmt,gran", [("int8", "head"), ("fp8", "tensor")])
def test_kv_cache_scales_recorded_and_restored_bit_exactly(tiny, tmp_path, fmt, gran):
    model, tok, ids = tiny
    m, cfg, _ = _quantized(tiny, ["weights.format=int8", "activations.format=none", f"kv_cache.format={fmt}",
                                  f"kv_cache.granularity={gran}"])
    rec = kv_config(m)
    assert rec["format"] == fmt and set(rec["scales"]) == set(attention_modules(m))
    n_scales = 2 if gran == "head" else 1  # num_key_value_heads = 2
    assert all(len(kv["k"]) == n_scales for kv in rec["scales"].values())
    # the hooks really quantize: k_proj outputs now sit on the grid of the recorded scale
    k_out = {}
    h = m.model.layers[1].self_attn.k_proj.register_forward_hook(lambda mod, a, o: k_out.setdefault("k", o))
    with torch.no_grad():
        expected = m(ids).logits
    h.remove()
    if fmt == "int8":
        s = torch.tensor(rec["scales"]["model.layers.1.self_attn"]["k"])
        codes = k_out["k"].reshape(-1, 2, 24) / s[None, :, None]
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 128
    save_quantized(m, tmp_path, tok, "rtn", {"kv_cache": rec})
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config"]["kv_cache"] == rec
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
        # generation runs through the same hooks, with the cache
        out = loaded.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 12


@torch.no_grad()
def test_kv_int8_costs_little_perplexity_on_the_real_model(smollm):
    from llmcompress.config import DataConfig
    from llmcompress.data import load_text, sample_texts

    model, tok = smollm
    model = copy.deepcopy(model)
    ids = tok(load_text("builtin:wikitext2_test")[:3000], return_tensors="pt")["input_ids"][:, :256]
    base = model(ids, labels=ids).loss.item()
    obs = KVObserver(model)
    with obs.watching():
        for text in sample_texts(DataConfig(num_samples=4, max_length=96), 0):
            model(tok(text, return_tensors="pt", truncation=True, max_length=96)["input_ids"])
    apply_kv_quant(model, "int8", "head", obs.scales("int8", "head"))
    quant = model(ids, labels=ids).loss.item()
    assert quant != base
    assert math.exp(quant - base) - 1 < 0.01  # ≤ +1% perplexity


def test_llmc_quantize_cli_gptq_with_kv_cache_writes_a_loadable_checkpoint(tiny, tmp_path, llmc):
    model, tok, ids = tiny
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "q"
    r = llmc("quantize", "-i", str(src), "-o", str(out), "-q", "--json", "-s", "method=gptq",
             "-s", "gptq.act_order=true", "-s", "kv_cache.format=int8", "-s", "kv_cache.granularity=head",
             *[a for o in W4 + CALIB for a in ("-s", o)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq" and qc["config"]["gptq"]["act_order"] is True
    assert qc["config"]["kv_cache"]["format"] == "int8" and len(qc["config"]["kv_cache"]["scales"]) == 2
    loaded = load_quantized(out)
    assert kv_config(loaded) == qc["config"]["kv_cache"]
    with torch.no_grad():
        logits, ref = loaded(ids).logits, model(ids).logits
    assert torch.isfinite(logits).all()
    assert float((logits - ref).pow(2).mean()) < 0.1 * float(ref.pow(2).mean())


def test_fused_gptq_matches_the_generic_layer_by_layer_path(tiny, monkeypatch):
    # the fused true-sequential pass (one forward per layer) computes the same Hessians as running the layer once
    # per stage and again with the quantized weights: same codes, same quantized outputs
    from llmcompress.quant.algorithms import gptq

    calls = []
    real = gptq._decomposes
    monkeypatch.setattr(gptq, "_decomposes", lambda *a: calls.append(real(*a)) or calls[-1])
    fused, _, _ = _quantized(tiny, W4 + ["method=gptq"])
    assert calls == [True]  # checked once, on the first layer: the tiny Llama decomposes
    monkeypatch.setattr(gptq, "_decomposes", lambda *a: False)
    generic, _, _ = _quantized(tiny, W4 + ["method=gptq"])
    model, _, ids = tiny
    for (name, a), (_, b) in zip(fused.named_buffers(), generic.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, generic(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_onloading_leaves_nothing_of_finished_layers_on_the_gpu(tiny):
    """Model on the CPU, layers quantized one at a time on the GPU: the codes and scales of each finished layer
    come back with it, so device memory never holds more than the current layer's."""
    from llmcompress.quant.quantize import observer_factory, select_linears, weight_spec
    from llmcompress.quant.sequential import run_on_calibration_data

    model, tok, _ = tiny
    m = copy.deepcopy(model)
    cfg = load_config(QuantizeConfig, overrides=CALIB + W4 + ["method=gptq"])
    before = torch.cuda.memory_allocated()
    res = run_on_calibration_data(m, tok, select_linears(m, cfg.include, cfg.exclude), weight_spec(cfg.weights),
                                  observer_factory(cfg.weights), cfg, None, device=torch.device("cuda"))
    assert len(res.qweights) == 2 * 7
    assert all(p.device.type == "cpu" for p in m.parameters())
    for name, q in res.qweights.items():
        assert q.codes.device.type == "cpu" and q.scale.device.type == "cpu", name
    layer_bytes = sum(p.numel() * p.element_size() for p in m.model.layers[0].parameters())
    assert torch.cuda.memory_allocated() - before < layer_bytes
