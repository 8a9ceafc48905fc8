"""The `llmc quantize` stage: a float model (and, for static activation scales, a calibration artifact) in,
a quantized checkpoint out, with a per-layer error table and the size before/after.

Library use, without artifacts:   rows = quantize_model(model, load_config(QuantizeConfig, overrides=[...]))
The config is validated where it is loaded (QuantizeConfig.check). Without calibration data every Linear is
rounded on its own (RTN); the methods that need calibration inputs run in the layer loop (sequential.py,
algorithms/). Everything after that (QuantLinear swap, checkpoint, report) is shared.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from llmcompress.config import QuantizeConfig, WeightQuantConfig
from llmcompress.errors import UserError
from llmcompress.progress import Reporter

from . import calibrate as calib
from .checkpoint import WEIGHTS_FILE, save_quantized, swap_in
from .formats import QuantSpec
from .kvcache import apply_kv_quant, kv_config
from .observers import Observer, make_observer
from .qlinear import INT8_ACT_MAX, QuantLinear, Scheme, int4_layout_group_size
from .rtn import error_stats, quantize_weight
from .sequential import needs_calibration_data, run_on_calibration_data

FP8_ACT_MAX = 448.0


# ------------------------------------------------------------------------------------------ config -> specs

def weight_spec(w: WeightQuantConfig) -> QuantSpec:
    """The QuantSpec a weights config asks for (int4 asymmetric uses unsigned codes 0..15 with a zero point)."""
    dtype = {"int8": "int8", "int4": "int4" if w.symmetric else "uint4", "fp8": "fp8_e4m3"}[w.format]
    return QuantSpec(dtype, w.symmetric, w.granularity, w.group_size, w.scale_dtype)


def observer_factory(w: WeightQuantConfig) -> Callable[[QuantSpec], Observer]:
    kwargs = {"percentile": {"percentile": w.percentile}, "clip": {"threshold": w.clip_threshold},
              "mse": {}, "minmax": {}, "kl": {}}[w.observer]
    return lambda spec: make_observer(w.observer, spec, **kwargs)


def scheme_for(cfg: QuantizeConfig, spec: QuantSpec, in_features: int) -> Scheme:
    w, a = cfg.weights, cfg.activations
    group = int4_layout_group_size(spec, in_features) if w.format == "int4" else (
        w.group_size if w.granularity == "group" else in_features)
    return Scheme(w.format, w.granularity, group, w.symmetric, w.scale_dtype,
                  None if a.format == "none" else a.format, a.dynamic)


def select_linears(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Linear]:
    """Linear modules whose dotted name matches an include pattern and no exclude pattern (fnmatch)."""
    match = lambda name, pats: any(fnmatch.fnmatchcase(name, p) for p in pats)  # noqa: E731
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and match(name, include) and not match(name, exclude)}


def check_finite(linears: dict[str, nn.Linear]) -> None:
    bad = [f"{name} ({int((~torch.isfinite(m.weight)).sum())} values)" for name, m in linears.items()
           if not torch.isfinite(m.weight).all()]
    if bad:
        raise UserError(f"NaN/Inf in the weights of {len(bad)} layer(s): {', '.join(bad[:10])}; nothing written")


# ------------------------------------------------------------------------------------------ the work

def static_input_scales(cfg: QuantizeConfig, names: list[str], stats) -> dict[str, torch.Tensor]:
    """Per-tensor input scales from the calibration statistics: T / 127 (int8) or T / 448 (fp8)."""
    a = cfg.activations
    qmax = INT8_ACT_MAX if a.format == "int8" else FP8_ACT_MAX
    spec = QuantSpec("int8" if a.format == "int8" else "fp8_e4m3", True, "tensor")
    kwargs = {"percentile": a.percentile} if a.observer == "percentile" else {}
    scales, bad = {}, []
    for name in names:
        obs = make_observer(a.observer, spec, **kwargs)
        entry = stats.activation(name, "input")
        if entry is None:
            raise UserError(f"calibration artifact has no statistics for {name}.input; re-run `llmc calibrate` "
                            f"on the same model")
        if entry.nonfinite:
            bad.append(f"{name} ({entry.nonfinite} values)")
            continue
        entry.load_into(obs)
        lo, hi = obs.range()
        t = torch.maximum(lo.abs(), hi.abs()).max()
        scales[name] = torch.where(t > 0, t / qmax, torch.ones_like(t)).float()
    if bad:
        raise UserError(f"NaN/Inf in calibration activations of {len(bad)} layer(s): {', '.join(bad[:10])}")
    return scales


def quantize_model(model: nn.Module, cfg: QuantizeConfig, stats=None,
                   reporter: Optional[Reporter] = None, tokenizer=None) -> list[dict]:
    """Swap the selected Linears of `model` (in place) for QuantLinear; returns the per-layer error table."""
    reporter = reporter or Reporter()
    linears = select_linears(model, cfg.include, cfg.exclude)
    if not linears:
        raise UserError(f"include/exclude: no Linear module matches include={cfg.include} exclude={cfg.exclude}")
    longest = max(lin.in_features for lin in linears.values())
    if cfg.weights.granularity == "group" and cfg.weights.group_size > longest:
        raise UserError(f"weights.group_size: {cfg.weights.group_size} is longer than every selected layer's rows "
                        f"(at most {longest} columns); a group of at most {longest} (or granularity: channel)")
    check_finite(linears)
    torch.manual_seed(cfg.seed)
    spec = weight_spec(cfg.weights)
    new_observer = observer_factory(cfg.weights)
    seq = None
    if needs_calibration_data(cfg, stats is not None):
        if tokenizer is None:
            raise UserError(f"method {cfg.method!r} (or smoothquant / kv_cache / static scales without a "
                            f"calibration artifact) needs calibration data: pass the tokenizer")
        seq = run_on_calibration_data(model, tokenizer, linears, spec, new_observer, cfg, reporter)
        qweights = seq.qweights
    else:
        qweights = {name: quantize_weight(lin.weight, spec, new_observer(spec))
                    for name, lin in reporter.track(list(linears.items()), description="quantize (rtn)")}
    if cfg.activations.static:  # scales seen by the layer loop are those of the (smoothed, quantized) model run
        input_scales = seq.input_scales if seq is not None else static_input_scales(cfg, list(linears), stats)
    else:
        input_scales = {}
    rows = []
    for name, lin in linears.items():
        qw = qweights[name]
        scheme = scheme_for(cfg, spec, lin.in_features)
        q = QuantLinear.from_quantized(qw, lin.bias, scheme, input_scales.get(name))
        w_hat = q.dequantized_weight()
        if not torch.isfinite(w_hat).all():
            raise UserError(f"{name}: quantization produced NaN/Inf (scale underflow?); nothing written")
        stored = sum(b.numel() * b.element_size() for b in q.buffers() if b is not q.bias)
        rows.append({"layer": name, "scheme": scheme.name, **error_stats(lin.weight, w_hat),
                     "bf16_bytes": lin.weight.numel() * 2, "stored_bytes": stored})
        swap_in(model, name, q.to(lin.weight.device))
    if seq is not None and seq.kv_scales:
        apply_kv_quant(model, cfg.kv_cache.format, cfg.kv_cache.granularity, seq.kv_scales)
    return rows


def _bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def run(cfg: QuantizeConfig, out_dir: Path, inputs, reporter: Optional[Reporter] = None) -> dict:
    """Stage entry: writes the checkpoint (config.json, model.safetensors, tokenizer) and quant_report.json."""
    from llmcompress.models import load_model

    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    stats = calib.CalibrationStats.open(inputs.calibration.path) if inputs.calibration is not None else None
    model_cfg = inputs.model or cfg.model
    model, tok = load_model(model_cfg)
    dense_bytes = _bytes(model)
    rows = quantize_model(model, cfg, stats, reporter, tok)
    config = {"weights": asdict(cfg.weights), "activations": asdict(cfg.activations),
              "kv_cache": kv_config(model) or asdict(cfg.kv_cache), "include": cfg.include, "exclude": cfg.exclude}
    if cfg.method in ("gptq", "awq"):
        config[cfg.method] = asdict(getattr(cfg, cfg.method))
    if cfg.method == "awq" and cfg.awq.gptq:
        config["gptq"] = asdict(cfg.gptq)
    if cfg.smoothquant.enabled:
        config["smoothquant"] = asdict(cfg.smoothquant)
    save_quantized(model, out_dir, tok, cfg.method, config)
    bf16 = sum(r["bf16_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    finite = [r["sqnr_db"] for r in rows if r["sqnr_db"] != float("inf")]
    report = {"layers": rows, "quantized_bf16_bytes": bf16, "quantized_stored_bytes": stored}
    (out_dir / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
    worst = sorted(rows, key=lambda r: r["sqnr_db"])[:10]
    return {
        "method": cfg.method,
        "scheme": rows[0]["scheme"],
        "layers_quantized": len(rows),
        "min_sqnr_db": min(finite) if finite else float("inf"),
        "mean_sqnr_db": sum(finite) / len(finite) if finite else float("inf"),
        "max_abs_err": max(r["max_abs_err"] for r in rows),
        "quantized_layers_bf16_bytes": bf16,
        "quantized_layers_bytes": stored,
        "quantized_layers_ratio": stored / bf16,
        "model_bytes_before": dense_bytes,
        "checkpoint_bytes": (out_dir / WEIGHTS_FILE).stat().st_size,
        "tables": {"per-layer error (10 worst by SQNR; all in quant_report.json)": [
            {"layer": r["layer"], "scheme": r["scheme"], "sqnr_db": r["sqnr_db"], "max_abs_err": r["max_abs_err"]}
            for r in worst]},
    }
