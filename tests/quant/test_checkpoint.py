import copy
import hashlib

import pytest
import torch
from torch import nn

from llmcompress.config import ActivationQuantConfig, QuantizeConfig, WeightQuantConfig
from llmcompress.errors import UserError
from llmcompress.quant.checkpoint import load_quantized, save_quantized, weights_file
from llmcompress.quant.formats import QuantSpec
from llmcompress.quant.qlinear import QuantLinear, Scheme, int4_layout_group_size
from llmcompress.quant.quantize import quantize_model
from llmcompress.quant.rtn import quantize_weight


def cfg(fmt="int4", act="none", gran="group", gs=64, sym=True, **kw):
    return QuantizeConfig(weights=WeightQuantConfig(format=fmt, granularity=gran, group_size=gs, symmetric=sym),
                          activations=ActivationQuantConfig(format=act), **kw)


@pytest.mark.parametrize("fmt,act,gran,sym", [("int8", "none", "channel", True), ("int8", "int8", "channel", True),
                                              ("int8", "none", "group", False), ("int4", "none", "group", True),
                                              ("int4", "none", "group", False), ("int4", "none", "channel", True),
                                              ("fp8", "none", "channel", True), ("fp8", "fp8", "channel", True)])
def test_quantlinear_matches_its_dequantized_weight(fmt, act, gran, sym):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(200, 24, bias=True)  # K = 200: ragged last group of 200 % 64 = 8
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 200, generator=g))
    c = cfg(fmt, act, gran, 64, sym).weights
    from llmcompress.quant.quantize import scheme_for, weight_spec
    spec = weight_spec(c)
    qw = quantize_weight(lin.weight, spec)
    q = QuantLinear.from_quantized(qw, lin.bias, scheme_for(cfg(fmt, act, gran, 64, sym), spec, 200))
    assert torch.equal(q.dequantized_weight(), qw.dequantize())
    x = torch.randn(3, 5, 200, generator=g)
    y = q(x)
    ref = nn.functional.linear(x, qw.dequantize(), lin.bias)
    tol = 0.05 if act != "none" else 1e-4  # activation quantization adds its own (bounded) error
    assert y.shape == (3, 5, 24)
    assert (y - ref).abs().max() <= tol * ref.abs().max()


def test_int4_layout_for_odd_k_and_channel_scales():
    spec = QuantSpec("int4", True, "channel")
    assert int4_layout_group_size(spec, 575) == 576
    w = torch.randn(4, 575)
    qw = quantize_weight(w, spec)
    q = QuantLinear.from_quantized(qw, None, Scheme("int4", "channel", 576, True, "float32"))
    assert q.qweight.shape == (4, 288) and q.scales.shape == (4, 1)
    assert torch.equal(q.dequantized_weight(), qw.dequantize())


@pytest.fixture(scope="module")
def w4_checkpoint(smollm, tmp_path_factory):
    model, tok = smollm
    qmodel = copy.deepcopy(model)
    rows = quantize_model(qmodel, cfg("int4", gs=64))
    out = tmp_path_factory.mktemp("w4g64")
    save_quantized(qmodel, out, tok, "rtn", {"weights": "int4 g64"})
    return qmodel, rows, out


def test_save_load_is_bit_exact(w4_checkpoint):
    qmodel, _, out = w4_checkpoint
    loaded = load_quantized(out, dtype=torch.float32)
    a, b = qmodel.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 210  # 30 layers x 7; lm_head stays float
    ids = torch.tensor([[1, 504, 3162, 282, 4771, 314, 2]])
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, loaded(ids).logits)
        gen = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 11)


def test_w4_g64_layers_take_at_most_30_percent_of_bf16(w4_checkpoint):
    _, rows, _ = w4_checkpoint
    ratio = sum(r["stored_bytes"] for r in rows) / sum(r["bf16_bytes"] for r in rows)
    # 4 bits/weight + one fp16 scale per 64 weights = 4.25 bits of 16: 26.6%
    assert ratio <= 0.30, ratio
    assert all(r["sqnr_db"] > 10 for r in rows)


def test_same_config_gives_byte_identical_checkpoint(smollm, tmp_path):
    model, tok = smollm
    c = cfg("int8", act="int8", gran="channel", include=["model.layers.0.*", "model.layers.29.mlp.*"])
    digests = []
    for run in ("a", "b"):
        qmodel = copy.deepcopy(model)
        quantize_model(qmodel, c)
        save_quantized(qmodel, tmp_path / run, tok, "rtn", {"weights": "int8"})
        digests.append([hashlib.sha256((tmp_path / run / f).read_bytes()).hexdigest()
                        for f in ("llmcompress.safetensors", "config.json")])
    assert digests[0] == digests[1]


def test_nan_weights_are_reported_by_layer_and_nothing_quantized():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(8, 8))
    model.add_module("b", nn.Linear(8, 8))
    with torch.no_grad():
        model.b.weight[1, 2] = float("nan")
    with pytest.raises(UserError, match=r"NaN/Inf in the weights of 1 layer\(s\): b \(1 values\)"):
        quantize_model(model, cfg("int8", gran="channel"))
    assert isinstance(model.a, nn.Linear)


@pytest.mark.parametrize("over,msg", [
    (["weights.format=int4", "activations.format=int8"], "need weights.format int8"),
    (["weights.format=int4", "weights.granularity=group", "weights.group_size=63", "activations.format=none"],
     "even group size"),
    (["weights.format=fp8", "weights.symmetric=false", "activations.format=none"], "symmetric only"),
    (["weights.granularity=group", "activations.format=int8"], "W8A8 needs symmetric per-channel"),
    (["weights.format=none"], "leaves nothing to quantize"),
])
def test_what_cannot_work_is_refused_where_the_config_is_loaded(over, msg):
    from llmcompress.config import load_config

    with pytest.raises(UserError, match=msg):
        load_config(QuantizeConfig, overrides=over)


def test_static_scales_without_calibration_data_are_refused_before_any_work():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(UserError, match="calibration data"):
        quantize_model(model, QuantizeConfig(activations=ActivationQuantConfig(format="int8", dynamic=False)))
    assert isinstance(model[0], nn.Linear)


def test_ragged_group_is_served():
    model = nn.Sequential(nn.Linear(576, 16))
    rows = quantize_model(model, cfg("int4", gs=128))
    assert isinstance(model[0], QuantLinear) and model[0].scales.shape == (16, 5)
    assert rows[0]["sqnr_db"] > 15


@pytest.mark.parametrize("save_dtype,stored", [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_checkpoint_keeps_the_source_dtype_unless_asked(tmp_path, smollm_path, save_dtype, stored):
    """A bf16 model quantized in float32 (as on CPU) is stored bf16 outside its codes and scales; save_dtype
    overrides that. The stored tensors are the model's own, rounded to that dtype."""
    from safetensors import safe_open

    from _shared import save_tiny_llama
    from llmcompress.config import load_config
    from llmcompress.models import EMBEDDED_DTYPE, load_model, source_dtype
    from llmcompress.stages import STAGES, resolve_inputs, run_stage

    src = save_tiny_llama(tmp_path / "tiny", smollm_path, dtype=torch.bfloat16)
    assert source_dtype(load_config(QuantizeConfig, overrides=[f"model.name={src}"]).model) == torch.bfloat16
    assert source_dtype(QuantizeConfig().model) == EMBEDDED_DTYPE == torch.bfloat16
    c = load_config(QuantizeConfig, overrides=[f"model.name={src}", "model.device=cpu", "model.dtype=float32",
                                               "weights.format=int4", "weights.granularity=group",
                                               "weights.group_size=32", "activations.format=none",
                                               f"save_dtype={save_dtype}"])
    art = run_stage("quantize", c, tmp_path / "q", resolve_inputs(STAGES["quantize"], c, None, print))
    with safe_open(str(weights_file(art.path)), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        assert embed.dtype == stored and f.get_tensor("model.norm.weight").dtype == stored
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.uint8
    model, _ = load_model(str(src), device="cpu", dtype="float32")
    assert torch.equal(embed, model.model.embed_tokens.weight.to(stored))
    assert load_quantized(art.path).dtype == stored  # config.json records what the tensors are
