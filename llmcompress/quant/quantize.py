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
from .experts import build_quant_experts, expert_modules, expert_weights, fill_missing_scales, rtn_experts
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
    return QuantSpec(dtype, w.symmetric, w.granularity, w.group_size, w.scale_dtype, w.zero_point == "float")


def observer_factory(w: WeightQuantConfig) -> Callable[[QuantSpec], Observer]:
    kwargs = {"percentile": {"percentile": w.percentile}, "clip": {"threshold": w.clip_threshold},
              "mse": {}, "minmax": {}, "kl": {}}[w.observer]
    return lambda spec: make_observer(w.observer, spec, **kwargs)


def scheme_for(cfg: QuantizeConfig, spec: QuantSpec, in_features: int) -> Scheme:
    w, a = cfg.weights, cfg.activations
    group = int4_layout_group_size(spec, in_features) if w.format == "int4" else (
        w.group_size if w.granularity == "group" else in_features)
    return Scheme(w.format, w.granularity, group, w.symmetric, w.scale_dtype,
                  None if a.format == "none" else a.format, a.dynamic, w.zero_point == "float")


def select_linears(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Linear]:
    """Linear modules whose dotted name matches an include pattern and no exclude pattern (fnmatch)."""
    match = lambda name, pats: any(fnmatch.fnmatchcase(name, p) for p in pats)  # noqa: E731
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and match(name, include) and not match(name, exclude)}


def select_experts(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """MoE experts modules (3-D weights, experts.py) whose every expert weight `<name>.gate_up_proj.<e>` /
    `<name>.down_proj.<e>` is selected; one selected and another not is refused (a module is swapped whole)."""
    match = lambda name, pats: any(fnmatch.fnmatchcase(name, p) for p in pats)  # noqa: E731
    out = {}
    for name, m in expert_modules(model).items():
        picked = [match(f"{name}.{rel}", include) and not match(f"{name}.{rel}", exclude) for rel in expert_weights(m)]
        if all(picked):
            out[name] = m
        elif any(picked):
            raise UserError(f"include/exclude: select all or none of the experts of {name} (they are quantized "
                            f"as one module)")
    return out


def check_finite(linears: dict[str, nn.Module]) -> None:
    weights = {name if rel is None else f"{name}.{rel}": w for name, m in linears.items()
               for rel, w in ({None: m.weight} if isinstance(m, nn.Linear) else expert_weights(m)).items()}
    bad = [f"{name} ({int((~torch.isfinite(w)).sum())} values)" for name, w in weights.items()
           if not torch.isfinite(w).all()]
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
    experts = select_experts(model, cfg.include, cfg.exclude)
    if not linears and not experts:
        raise UserError(f"include/exclude: no Linear module matches include={cfg.include} exclude={cfg.exclude}")
    longest = max([lin.in_features for lin in linears.values()]
                  + [w.shape[1] for m in experts.values() for w in expert_weights(m).values()])
    if cfg.weights.granularity == "group" and cfg.weights.group_size > longest:
        raise UserError(f"weights.group_size: {cfg.weights.group_size} is longer than every selected layer's rows "
                        f"(at most {longest} columns); a group of at most {longest} (or granularity: channel)")
    check_finite({**linears, **experts})
    torch.manual_seed(cfg.seed)
    spec = weight_spec(cfg.weights)
    new_observer = observer_factory(cfg.weights)
    seq = None
    if needs_calibration_data(cfg, stats is not None):
        if tokenizer is None:
            raise UserError(f"method {cfg.method!r} (or smoothquant / kv_cache / static scales without a "
                            f"calibration artifact) needs calibration data: pass the tokenizer")
        seq = run_on_calibration_data(model, tokenizer, linears, spec, new_observer, cfg, reporter,
                                      experts=experts)
        qweights, expert_qweights = seq.qweights, seq.expert_qweights
    else:
        qweights = {name: quantize_weight(lin.weight, spec, new_observer(spec))
                    for name, lin in reporter.track(list(linears.items()), description="quantize (rtn)")}
        expert_qweights = {name: rtn_experts(m, spec, new_observer) for name, m in experts.items()}
    if cfg.activations.static:  # scales seen by the layer loop are those of the (smoothed, quantized) model run
        input_scales = seq.input_scales if seq is not None else static_input_scales(cfg, list(linears), stats)
        # experts: one scale per expert weight, from the tokens routed to it (experts.py); an expert no token
        # reached takes the largest of its module's
        if seq is not None:
            expert_scales = dict(seq.expert_input_scales)
        else:
            observed = [f"{n}.{rel}" for n, m in experts.items() for rel in expert_weights(m)
                        if stats.activation(f"{n}.{rel}", "input") is not None]
            expert_scales = static_input_scales(cfg, observed, stats)
        scale_filled = set(fill_missing_scales(expert_scales, experts))
        input_scales = {**input_scales, **expert_scales}
    else:
        input_scales, scale_filled = {}, set()
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
    for name, m in experts.items():
        floats = expert_weights(m)
        fallback = set(seq.expert_fallback.get(name, ())) if seq is not None else set()
        scales = {rel: input_scales[f"{name}.{rel}"] for rel in floats if f"{name}.{rel}" in input_scales}
        q = build_quant_experts(m, expert_qweights[name], lambda rel, k: scheme_for(cfg, spec, k), scales)
        expert_gptq = seq is not None and (cfg.method == "gptq" or (cfg.method == "awq" and cfg.awq.gptq))
        for rel, w in floats.items():
            lin = q.get_submodule(rel)
            if not torch.isfinite(lin.dequantized_weight()).all():
                raise UserError(f"{name}.{rel}: quantization produced NaN/Inf (scale underflow?); nothing written")
            algo = "gptq" if expert_gptq and rel not in fallback else "rtn"
            note = [*(["no calibration token routed to this expert"] if rel in fallback else []),
                    *(["static input scale: the largest of its module's (no routed token)"]
                      if f"{name}.{rel}" in scale_filled else [])]
            rows.append({"layer": f"{name}.{rel}", "scheme": lin.scheme.name, "method": algo,
                         **({"note": "; ".join(note)} if note else {}),
                         **error_stats(w, lin.dequantized_weight()), "bf16_bytes": w.numel() * 2,
                         "stored_bytes": sum(b.numel() * b.element_size() for b in lin.buffers())})
        if cfg.method == "awq" or cfg.smoothquant.enabled:
            reporter.info(f"{name}: experts quantized with {'GPTQ' if expert_gptq else 'RTN'}, without AWQ / "
                          f"SmoothQuant scales (those are searched for Linears only)")
        filled = sorted(rel for rel in floats if f"{name}.{rel}" in scale_filled)
        if filled:
            reporter.info(f"{name}: {len(filled)} expert weight(s) saw no calibration input; their static input "
                          f"scale is the largest of the module's: {', '.join(filled)}")
        if fallback:
            reporter.info(f"{name}: {len(fallback)} expert weight(s) got no routed calibration token and were "
                          f"quantized with RTN: {', '.join(sorted(fallback))}")
        swap_in(model, name, q)
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
    """Stage entry: writes the checkpoint (config.json, llmcompress.safetensors, tokenizer) and quant_report.json."""
    from llmcompress.models import load_model, source_dtype

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
    save_dtype = source_dtype(model_cfg) if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
    save_quantized(model, out_dir, tok, cfg.method, config, dtype=save_dtype)
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
