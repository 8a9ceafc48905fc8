"""Every supported architecture through calibrate -> quantize -> save -> load_quantized -> generate (issue #27).

Each family is a tiny random-weight model built from transformers' config classes (arch_models.py). For each
(family, method) the test checks:
  - counted: every Linear but lm_head and every expert weight is in the report exactly once, nothing else is;
  - nothing silently skipped: no float weight of two or more dimensions is left in the quantized model except
    the embeddings, lm_head and the MoE router;
  - the reloaded checkpoint computes what the in-memory quantized model computes;
  - both match a fake-quant reference: transformers' own float model of the family holding the dequantized
    weights (and the float parameters the algorithm changed, e.g. norms that took smoothing scales), with
    per-token int8 (or static) activation rounding where the scheme has it and the recorded KV-cache rounding;
  - greedy generation from the reloaded checkpoint gives the reference's tokens.
test_scaling_preserves_function: AWQ's and SmoothQuant's scales folded into each family's norms / Linears
(Gemma's 1 + w norms included) leave the float model's output unchanged.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arch_models import EXPERTS, FAMILIES, TOP_K

from llmcompress.config import (ActivationQuantConfig, AWQConfig, CalibrateConfig, DataConfig, KVCacheQuantConfig,
                                ModelConfig, QuantizeConfig, SmoothQuantConfig, WeightQuantConfig)
from llmcompress.errors import UserError

DATA = DataConfig(source="builtin:alpaca_en_demo", num_samples=4, max_length=32)
W4 = WeightQuantConfig(format="int4", granularity="group", group_size=32, symmetric=True)
W8 = WeightQuantConfig(format="int8", granularity="channel", symmetric=True)
A16, A8 = ActivationQuantConfig(format="none"), ActivationQuantConfig(format="int8", dynamic=True)
A8_STATIC = ActivationQuantConfig(format="int8", dynamic=False)

METHODS = {
    "rtn": dict(method="rtn", weights=W4, activations=A16),
    "gptq": dict(method="gptq", weights=W4, activations=A16),
    "awq": dict(method="awq", weights=W4, activations=A16),
    "smoothquant": dict(method="rtn", weights=W8, activations=A8, smoothquant=SmoothQuantConfig(enabled=True)),
    "kv": dict(method="rtn", weights=W8, activations=A16,
               kv_cache=KVCacheQuantConfig(format="int8", granularity="head")),
    "static": dict(method="rtn", weights=W8, activations=A8_STATIC),  # scales from `llmc calibrate`'s artifact
    "static_loop": dict(method="gptq", weights=W8, activations=A8_STATIC),  # scales observed in the layer loop
}
# cells refused before any work, with a one-line reason (asserted: a refusal that stops happening fails the test)
REFUSED = {  # StarCoder2 has no architecture entry: nothing says what produces each input or where K/V are
    ("starcoder2", "awq"): "method: awq needs to know which op produces each Linear's input",
    ("starcoder2", "smoothquant"): "smoothquant.enabled: no architecture mapping",
    ("starcoder2", "kv"): "kv_cache.format: ",
}
SCALED_FAMILIES = [f for f in FAMILIES if f != "starcoder2"]  # those AWQ / SmoothQuant run on
PROMPTS = ["The capital of France is", "Write a short poem about the sea and"]


def _logits(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc).logits
    return out[enc["attention_mask"].bool()]


def _generate(model, tok) -> list[int]:
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)[0].tolist()


def expected_quantized(model: nn.Module) -> set[str]:
    """Every Linear but lm_head, and each expert's two weights (MoE experts stored as 3-D parameters
    `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]: `<experts>.gate_up_proj.<e>`), by name."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    for n, m in model.named_modules():
        for kind in ("gate_up_proj", "down_proj"):
            p = getattr(m, kind, None)
            if isinstance(p, nn.Parameter) and p.dim() == 3:
                names |= {f"{n}.{kind}.{e}" for e in range(p.shape[0])}
    return names


def float_leftovers(model: nn.Module) -> list[str]:
    """Float weights of two or more dimensions other than the embeddings, lm_head and a MoE router."""
    return [n for n, p in model.named_parameters()
            if p.dim() >= 2 and "embed" not in n and not n.startswith("lm_head") and not n.endswith("mlp.gate.weight")]


def _act_fake_quant(x: torch.Tensor, scale) -> torch.Tensor:
    """The int8 rounding W8A8 applies to its input: per token (scale None) or one static scale; s = amax / 127."""
    x2 = x.float()
    if scale is None:
        amax = x2.abs().amax(dim=-1, keepdim=True)
        s = torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, 127.0))
    else:
        s = scale.float()
    return (torch.clamp(torch.round(x2 / s), -127, 127) * s).to(x.dtype)


def fake_quant_reference(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """transformers' float model of the family with qmodel's dequantized weights and float parameters."""
    from llmcompress.quant.kvcache import kv_config, restore_kv_quant
    from llmcompress.quant.qlinear import QuantLinear

    ref = copy.deepcopy(float_model)
    state = {n: p.detach() for n, p in qmodel.named_parameters()}
    experts = {n: m for n, m in qmodel.named_modules() if type(m).__name__ == "QuantExperts"}
    act_scales = {}  # Linear name -> static scale or None (per token), for the W8A8 ones
    for name, m in qmodel.named_modules():
        if name in experts:
            for kind in ("gate_up_proj", "down_proj"):
                state[f"{name}.{kind}"] = torch.stack([lin.dequantized_weight() for lin in getattr(m, kind)])
        elif isinstance(m, QuantLinear) and not any(name.startswith(e + ".") for e in experts):
            state[f"{name}.weight"] = m.dequantized_weight()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach()
            if m.scheme.act_format == "int8":
                act_scales[name] = m.input_scale
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}, result.missing_keys  # tied to the embeddings
    for name, s in act_scales.items():
        ref.get_submodule(name).register_forward_pre_hook(lambda mod, args, s=s: (_act_fake_quant(args[0], s),))
    for name, m in experts.items():
        if m.gate_up_proj[0].scheme.act_format == "int8":  # W8A8 experts: round each expert's inputs too
            from llmcompress.quant.experts import routed_forward

            fm = ref.get_submodule(name)
            gu, dn = fm.gate_up_proj, fm.down_proj
            s_gu = [lin.input_scale for lin in m.gate_up_proj]  # None: per token
            s_dn = [lin.input_scale for lin in m.down_proj]
            fm.forward = lambda x, idx, w, gu=gu, dn=dn, fm=fm, s_gu=s_gu, s_dn=s_dn: routed_forward(
                x, idx, w, gu.shape[0], lambda e, h: F.linear(_act_fake_quant(h, s_gu[e]), gu[e]),
                lambda e, h: F.linear(_act_fake_quant(h, s_dn[e]), dn[e]), fm.act_fn)
    restore_kv_quant(ref, kv_config(qmodel))
    return ref


def _calibration_artifact(model, tok, out_dir, monkeypatch):
    """`llmc calibrate`'s stage on `model` (handed to the stage in place of loading it again) -> the artifact."""
    import llmcompress.models
    from llmcompress.quant import calibrate as calib

    monkeypatch.setattr(llmcompress.models, "load_model", lambda cfg: (copy.deepcopy(model), tok))
    cfg = CalibrateConfig(model=ModelConfig(name="tiny", device="cpu", dtype="float32"), data=DATA,
                          batch_size=2, histogram_bins=256)
    out_dir.mkdir(parents=True)
    calib.run(cfg, out_dir, SimpleNamespace(model=cfg.model))
    return calib.CalibrationStats.open(out_dir)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_load_generate(family, method, arch_model, arch_tokenizer, tmp_path, monkeypatch):
    from llmcompress.quant.checkpoint import load_quantized, save_quantized
    from llmcompress.quant.quantize import quantize_model

    _, float_model = arch_model(family)
    model, tok = copy.deepcopy(float_model), arch_tokenizer
    cfg = QuantizeConfig(data=DATA, batch_size=2, **METHODS[method])
    stats = _calibration_artifact(model, tok, tmp_path / "calib", monkeypatch) if method == "static" else None
    expected = expected_quantized(model)
    if (family, method) in REFUSED:
        before = {n: p.clone() for n, p in model.state_dict().items()}
        with pytest.raises(UserError, match=REFUSED[family, method]):
            quantize_model(model, cfg, stats, tokenizer=tok)
        assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items()), "changed the model first"
        return
    if stats is not None:  # `llmc calibrate` saw each calibration token at top_k experts of every MoE layer
        for name in {n.rsplit(".", 2)[0] for n in expected if ".experts." in n}:
            counts = [stats.activation(f"{name}.gate_up_proj.{e}", "input") for e in range(EXPERTS)]
            assert sum(c.count for c in counts if c is not None) == TOP_K * stats.summary["tokens"]
    rows = quantize_model(model, cfg, stats, tokenizer=tok)

    names = [r["layer"] for r in rows]
    assert len(names) == len(set(names)), "a weight quantized twice"
    assert set(names) == expected
    assert float_leftovers(model) == []

    save_quantized(model, tmp_path / "q", tok, cfg.method, {"kv_cache": getattr(model, "llmc_kv_cache", None)})
    loaded = load_quantized(tmp_path / "q")
    assert float_leftovers(loaded) == []
    ref = fake_quant_reference(loaded, float_model)
    got, mem, want = _logits(loaded, tok), _logits(model, tok), _logits(ref, tok)
    torch.testing.assert_close(got, mem, rtol=0, atol=0)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * scale)
    assert _generate(loaded, tok) == _generate(ref, tok)


SCALINGS = {  # the algorithms' settings that leave only their (function-preserving) scales folded into the model
    "awq": dict(method="awq", weights=W4, activations=A16, awq=AWQConfig(clip=False, refit_scales=False, grid=4)),
    "smoothquant": dict(method="rtn", weights=W8, activations=A8, smoothquant=SmoothQuantConfig(enabled=True)),
}


@pytest.mark.parametrize("algorithm", list(SCALINGS))
@pytest.mark.parametrize("family", SCALED_FAMILIES)
def test_scaling_preserves_function(family, algorithm, arch_model, arch_tokenizer):
    """AWQ (no clip, no refit) and SmoothQuant only fold per-channel scales into a producer (norm or Linear) and
    its consumers: the float model's output after the layer-by-layer run must equal the original's (catches a
    scale folded into the wrong norm, e.g. Gemma's post-attention norm, or into Gemma's (1 + w) norm as if w)."""
    from llmcompress.quant.quantize import observer_factory, select_linears, weight_spec
    from llmcompress.quant.sequential import run_on_calibration_data

    model, tok = arch_model(family)[1], arch_tokenizer
    before = _logits(model, tok)
    cfg = QuantizeConfig(data=DATA, batch_size=2, **SCALINGS[algorithm])
    scaled = copy.deepcopy(model)
    linears = select_linears(scaled, cfg.include, cfg.exclude)
    seq = run_on_calibration_data(scaled, tok, linears, weight_spec(cfg.weights), observer_factory(cfg.weights), cfg)
    key = "awq_alpha" if algorithm == "awq" else "smoothquant_alpha"
    assert any(a for layer in seq.layers for a in layer.get(key, {}).values()), \
        "no scale was folded: the test would not test the folding"
    torch.testing.assert_close(_logits(scaled, tok), before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
