"""MoE experts stored as 3-D parameters (quant/experts.py): each expert's calibration rows are exactly the tokens
routed to it, GPTQ runs on each expert's own Hessian, an expert no token reaches falls back to RTN and is
reported, and QuantExperts computes what transformers' experts module computes (the end-to-end check, against
transformers' own forward, is tests/quant/test_families.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from arch_models import EXPERTS, HIDDEN, TOP_K

from llmcompress.config import DataConfig, GPTQConfig, QuantizeConfig, WeightQuantConfig


def _mixtral_experts(seed: int = 0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=32, num_local_experts=EXPERTS,
                        num_experts_per_tok=TOP_K)
    m = MixtralExperts(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn(m.gate_up_proj.shape, generator=g) / HIDDEN ** 0.5)
        m.down_proj.copy_(torch.randn(m.down_proj.shape, generator=g) / 32 ** 0.5)
    return m


def _routing(tokens: int, never: int = -1, seed: int = 1):
    """Random top-k routing over EXPERTS (expert `never` gets no token) with normalized weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, generator=g)
    if never >= 0:
        logits[:, never] = -1e9
    w, idx = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def test_routed_inputs_are_each_experts_tokens_and_forward_is_unchanged():
    from llmcompress.quant.experts import routed_inputs

    m = _mixtral_experts()
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(2))
    idx, w = _routing(40)
    want = m(x, idx, w)
    seen = {}
    with routed_inputs(m, lambda kind, e, rows, tok: seen.setdefault((kind, e), (rows.clone(), tok.clone()))):
        got = m(x, idx, w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for e in range(EXPERTS):
        rows, tok = seen[("gate_up_proj", e)]
        routed = (idx == e).any(-1).nonzero().squeeze(1)
        assert sorted(tok.tolist()) == routed.tolist()
        torch.testing.assert_close(rows, x[tok], rtol=0, atol=0)
        gate, up = (x[tok] @ m.gate_up_proj[e].T).chunk(2, -1)
        torch.testing.assert_close(seen[("down_proj", e)][0], m.act_fn(gate) * up)
    assert "forward" not in vars(m)  # the patch is gone


def test_gptq_experts_each_on_its_own_routed_hessian_and_rtn_without_tokens():
    """Every expert's codes are GPTQ's on the Hessian of its routed real tokens (gate_up: the expert's inputs;
    down: act(gate) * up from the already quantized gate_up); expert 3, which no token reaches, gets RTN."""
    from llmcompress.quant.experts import gptq_experts, rtn_experts
    from llmcompress.quant.formats import QuantSpec, quantize
    from llmcompress.quant.algorithms.gptq import Hessian, gptq_quantize
    from llmcompress.quant.observers import make_observer

    m = _mixtral_experts()
    float_m = copy.deepcopy(m)
    spec = QuantSpec("int4", True, "group", 16)
    new_obs = lambda sp: make_observer("minmax", sp)  # noqa: E731
    gcfg = GPTQConfig(act_order=False, refit_scales=False, normalize_tokens=False, block_size=16)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 12, HIDDEN, generator=g) for _ in range(2)]
    routes = [_routing(24, never=3, seed=10 + b) for b in range(2)]
    masks = [torch.ones(2, 12, dtype=torch.bool) for _ in range(2)]
    masks[1][1, 7:] = False  # padding: never in a Hessian
    current = {}

    def run_layer():
        for b, x in enumerate(batches):
            current["b"] = b
            m(x.reshape(-1, HIDDEN), *routes[b])

    qws, fallback = gptq_experts(m, run_layer, lambda: masks[current["b"]], spec, new_obs, gcfg)
    assert sorted(fallback) == ["down_proj.3", "gate_up_proj.3"]
    assert set(qws) == {f"{k}.{e}" for k in ("gate_up_proj", "down_proj") for e in range(EXPERTS)}

    rtn = rtn_experts(float_m, spec, new_obs)
    for e in range(EXPERTS):
        if e == 3:
            for k in ("gate_up_proj", "down_proj"):
                assert torch.equal(qws[f"{k}.{e}"].codes, rtn[f"{k}.{e}"].codes)
            continue
        # per batch, the routed real tokens in the experts loop's order (by top-k slot, then token): the same
        # float summation as the run, so the codes must agree exactly
        per_batch = []
        for b, x in enumerate(batches):
            slot, tok = torch.where(routes[b][0].T == e)
            tok = tok[masks[b].reshape(-1)[tok]]
            per_batch.append(x.reshape(-1, HIDDEN)[tok])
        assert sum(r.shape[0] for r in per_batch) > 0
        for kind, w_float in (("gate_up_proj", float_m.gate_up_proj[e]), ("down_proj", float_m.down_proj[e])):
            h = Hessian(w_float.shape[1])
            for rows in per_batch:
                if kind == "down_proj":  # its inputs come from the quantized gate_up
                    gate, up = nn.functional.linear(rows, qws[f"gate_up_proj.{e}"].dequantize()).chunk(2, -1)
                    rows = m.act_fn(gate) * up
                h.add(rows)
            res = gptq_quantize(w_float.detach(), h.value(), spec, new_obs(spec), gcfg.damp, gcfg.block_size)
            torch.testing.assert_close(qws[f"{kind}.{e}"].codes, quantize(res.weight, res.scale, res.zero_point, spec))
    # the module now holds the quantized weights (the caller restores the float ones)
    torch.testing.assert_close(m.down_proj[0], qws["down_proj.0"].dequantize())


def test_quant_experts_forward_matches_float_experts_with_dequantized_weights():
    """QuantExperts (W4A16 kernels, looped over experts) against transformers' MixtralExperts holding Ŵ."""
    from llmcompress.quant.experts import build_quant_experts, rtn_experts
    from llmcompress.quant.formats import QuantSpec
    from llmcompress.quant.observers import make_observer
    from llmcompress.quant.qlinear import Scheme

    m = _mixtral_experts()
    spec = QuantSpec("int4", True, "group", 16)
    qws = rtn_experts(m, spec, lambda sp: make_observer("minmax", sp))
    q = build_quant_experts(m, qws, lambda rel, k: Scheme("int4", "group", 16, True, "float16"))
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for e in range(EXPERTS):
            ref.gate_up_proj[e].copy_(q.gate_up_proj[e].dequantized_weight())
            ref.down_proj[e].copy_(q.down_proj[e].dequantized_weight())
    x = torch.randn(30, HIDDEN, generator=torch.Generator().manual_seed(4))
    idx, w = _routing(30, never=2)
    torch.testing.assert_close(q(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-5)
    assert len(q.gate_up_proj) == len(q.down_proj) == EXPERTS


def test_expert_without_calibration_tokens_is_reported(tmp_path, arch_tokenizer):
    """End to end on a tiny Mixtral whose router can never pick expert 3 (a hidden channel held at a constant
    positive value, and the router's weight on it very negative for expert 3): GPTQ quantizes its weights with
    RTN, the report says so, and the checkpoint still holds every expert."""
    from transformers import AutoModelForCausalLM

    from arch_models import _configs, _randomize
    from llmcompress.quant.checkpoint import load_quantized, save_quantized
    from llmcompress.quant.quantize import quantize_model

    tok = arch_tokenizer
    cfg = _configs(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)["mixtral"]()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _randomize(model, 0)
    c = 5
    with torch.no_grad():
        model.model.embed_tokens.weight[:, c] = 10.0
        for layer in model.model.layers:  # nothing writes channel c back: it stays 10 in the residual stream
            layer.self_attn.o_proj.weight[c] = 0
            layer.mlp.experts.down_proj[:, c, :] = 0
            layer.post_attention_layernorm.weight[c] = 1.0
            layer.mlp.gate.weight[3, c] = -1e3
    qcfg = QuantizeConfig(method="gptq", weights=WeightQuantConfig(format="int4", granularity="group", group_size=32),
                          data=DataConfig(source="builtin:alpaca_en_demo", num_samples=4, max_length=32),
                          batch_size=2)
    qcfg.activations.format = "none"
    messages = []
    reporter = type("R", (), {"track": lambda self, items, **k: items, "update": lambda self, **k: None,
                              "info": lambda self, msg: messages.append(msg)})()
    rows = quantize_model(model, qcfg, None, reporter, tok)
    notes = {r["layer"]: r for r in rows if "note" in r}
    want = {f"model.layers.{i}.mlp.experts.{k}.3" for i in range(len(model.model.layers))
            for k in ("gate_up_proj", "down_proj")}
    assert set(notes) == want
    assert all(r["method"] == "rtn" for r in notes.values())
    assert all(r["method"] == "gptq" for r in rows if "experts" in r["layer"] and r["layer"] not in notes)
    assert sum("no routed calibration token" in msg for msg in messages) == len(model.model.layers)
    save_quantized(model, tmp_path, tok, "gptq")
    loaded = load_quantized(tmp_path)
    enc = tok(["Hello there"], return_tensors="pt")
    torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits, rtol=0, atol=0)


def test_static_scales_per_expert_from_its_routed_tokens_and_filled_where_none_came():
    """observing_static_scales: each expert weight's scale is max |its routed real inputs| / 127 (min-max
    observer); expert 2, never routed, has none until fill_missing_scales gives it the module's largest."""
    from llmcompress.config import ActivationQuantConfig
    from llmcompress.errors import UserError
    from llmcompress.quant.experts import fill_missing_scales, observing_static_scales

    m = _mixtral_experts()
    x = torch.randn(2, 15, HIDDEN, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(30, never=2)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 10:] = False
    x[0, 10:] = 1e3  # padding rows: must not reach any scale
    scales = {}
    with observing_static_scales({"moe": m}, ActivationQuantConfig(format="int8", dynamic=False), lambda: mask,
                                 scales):
        m(x.reshape(-1, HIDDEN), idx, w)
    flat, real = x.reshape(-1, HIDDEN), mask.reshape(-1)
    for e in (0, 1, 3):
        tok = (idx == e).any(-1) & real
        torch.testing.assert_close(scales[f"moe.gate_up_proj.{e}"], flat[tok].abs().max() / 127.0)
        gate, up = (flat[tok] @ m.gate_up_proj[e].T).chunk(2, -1)
        torch.testing.assert_close(scales[f"moe.down_proj.{e}"], (m.act_fn(gate) * up).abs().max() / 127.0)
    assert "moe.gate_up_proj.2" not in scales and "moe.down_proj.2" not in scales
    assert sorted(fill_missing_scales(scales, {"moe": m})) == ["moe.down_proj.2", "moe.gate_up_proj.2"]
    for kind in ("gate_up_proj", "down_proj"):
        assert scales[f"moe.{kind}.2"] == max(scales[f"moe.{kind}.{e}"] for e in (0, 1, 3))
    with pytest.raises(UserError, match="no calibration token reached any expert's gate_up_proj"):
        fill_missing_scales({}, {"moe": m})
