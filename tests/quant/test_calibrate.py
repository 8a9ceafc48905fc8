import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llmcompress.config import (ActivationQuantConfig, CalibrateConfig, DataConfig, ModelConfig, QuantizeConfig,
                                WeightQuantConfig)
from llmcompress.errors import UserError
from llmcompress.quant.calibrate import CalibrationStats
from llmcompress.quant.layerwise import make_batches
from llmcompress.stages import StageInputs, run_stage


@pytest.fixture(scope="module")
def calib_artifact(smollm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calibrate"
    cfg = CalibrateConfig(model=ModelConfig(name=str(smollm_path), dtype="float32"),
                          data=DataConfig(source="builtin:alpaca_en_demo", num_samples=4, max_length=48),
                          batch_size=3, histogram_bins=512)
    art = run_stage("calibrate", cfg, out, StageInputs(model=cfg.model))
    return cfg, art


def test_layerwise_statistics_match_a_plain_forward(smollm, calib_artifact):
    """Stats gathered one decoder layer at a time equal hooks on an ordinary full forward (padding excluded)."""
    model, tok = smollm
    cfg, art = calib_artifact
    from llmcompress.data import sample_texts

    batches = make_batches(tok, sample_texts(cfg.data, cfg.seed), cfg.data.max_length, cfg.batch_size, "cpu")
    assert len(batches) == 2 and batches[1]["input_ids"].shape[0] == 1
    seen = {"model.layers.7.mlp.down_proj": [], "model.layers.29.self_attn.k_proj": []}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen[n].append((a[0], o))) for n in seen]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    stats = CalibrationStats.open(art.path)
    for name, calls in seen.items():
        xs = torch.cat([x[b["attention_mask"].bool()] for (x, _), b in zip(calls, batches)])
        outs = torch.cat([o[b["attention_mask"].bool()] for (_, o), b in zip(calls, batches)])
        s_in, s_out = stats.activation(name, "input"), stats.activation(name, "output")
        assert torch.allclose(s_in.max, xs.amax(0), rtol=1e-4, atol=1e-5)
        assert torch.allclose(s_out.min, outs.amin(0), rtol=1e-4, atol=1e-5)
        assert s_in.count == xs.shape[0] and s_in.hist.counts.sum().item() == xs.numel()


def test_summary_is_readable_and_consistent(smollm, calib_artifact):
    _, art = calib_artifact
    summary = json.loads((art.path / "summary.json").read_text())
    mods = summary["modules"]
    assert len(mods) == 30 * 7 + 1  # every Linear, lm_head included (its input only)
    q, k = mods["model.layers.3.self_attn.q_proj"], mods["model.layers.3.self_attn.k_proj"]
    assert q["input"] == k["input"]  # q/k/v read one tensor, observed once
    for rec in (q["input"], q["output"], q["weight"]):
        p = rec["percentiles"]
        assert p["99"] <= p["99.9"] <= p["99.99"] <= rec["absmax"] * (1 + 1e-6)
    kv = summary["kv_cache"]["model.layers.0.self_attn.v_proj"]
    assert len(kv["per_head_absmax"]) == 3 and max(kv["per_head_absmax"]) == pytest.approx(kv["absmax"])
    tensors = load_file(str(art.path / "stats.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.input.hist"].shape == (512,)


def test_static_w8a8_takes_scales_from_calibration(calib_artifact, tmp_path):
    cfg_c, art = calib_artifact
    qcfg = QuantizeConfig(weights=WeightQuantConfig(format="int8"),
                          activations=ActivationQuantConfig(format="int8", dynamic=False, observer="minmax"),
                          include=["model.layers.0.*"])
    out = tmp_path / "q"
    q = run_stage("quantize", qcfg, out, StageInputs(artifact=art, model=cfg_c.model, calibration=art))
    assert q.manifest["summary"]["layers_quantized"] == 7
    from llmcompress.quant.checkpoint import weights_file

    state = load_file(str(weights_file(out)))
    absmax = CalibrationStats.open(art.path).activation("model.layers.0.mlp.down_proj", "input").absmax()
    assert state["model.layers.0.mlp.down_proj.input_scale"].item() == pytest.approx(absmax / 127, rel=1e-6)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.0.mlp.down_proj"]["act_dynamic"] is False
    assert json.loads((out / "quant_report.json").read_text())["layers"][0]["sqnr_db"] > 30


def test_nan_activations_are_reported_by_layer(smollm, monkeypatch):
    from llmcompress.quant import calibrate as calib

    model, tok = smollm
    batches = make_batches(tok, ["hello world"], 16, 1, "cpu")
    target = model.get_submodule("model.layers.2.mlp.up_proj")
    handle = target.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        stats = calib.calibrate_model(model, batches, CalibrateConfig(histogram_bins=64, weights=False))
    finally:
        handle.remove()
    assert stats["model.layers.2.mlp.up_proj"]["output"].nonfinite > 0
    assert stats["model.layers.2.mlp.up_proj"]["input"].nonfinite == 0
