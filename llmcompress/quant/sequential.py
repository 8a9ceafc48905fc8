"""The layer loop: quantization with calibration data, one decoder layer at a time, for whatever methods the
config asks (algorithms.METHODS; this file names none of them).

    capture the hidden states entering layer 0 once (layerwise.Layerwise)
    for each decoder layer:
        onload it (to `device`, when the model lives elsewhere); place its Linears in groups (architectures.py)
        float pass: its reference outputs, and each group's inputs for the methods that want them
        transforms (SmoothQuant, AWQ): change the float weights, function kept
        the weights method (RTN, GPTQ): codes and scales of every Linear; Ŵ goes into the Linears
        quantized pass (unless the weights method computed it): the next layer's inputs, seen by the observers
            (static activation scales, KV cache) on what the quantized model will really run
        its relative output error ‖y_q − y‖² / ‖y‖² (on ERROR_BATCHES batches unless the float pass ran over
            all), its float weights back, offload it

Only one decoder layer's weights and activations need be on `device`.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from llmcompress.config import QuantizeConfig
from llmcompress.errors import UserError
from llmcompress.progress import Reporter

from .algorithms import METHODS, Layer
from .algorithms.gptq import GPTQ
from .architectures import architecture, check_outside, place
from .experts import observing_static_scales, quantize_layer_experts
from .formats import QuantizedWeight, QuantSpec
from .layerwise import Layerwise, real_rows
from .observers import Observer

ERROR_BATCHES = 2  # batches (spread over the shorter half of the length-sorted set: about 5% of the tokens, where
# the longest batches would cost a fifth of a forward) the per-layer error is measured on when no method needs
# the float pass over all of them
GPTQ_MAX_PADDING = 0.05  # make_batches' max_padding for GPTQ's calibration batches


@dataclass
class SequentialResult:
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # static per-tensor activation scales
    kv_scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    expert_qweights: dict[str, dict[str, QuantizedWeight]] = field(default_factory=dict)  # experts.py
    expert_fallback: dict[str, list[str]] = field(default_factory=dict)  # expert weights RTN'd: no routed token
    expert_input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # static, per expert weight
    layers: list[dict] = field(default_factory=list)  # per decoder layer: error, seconds, smoothing/awq choices
    seconds: float = 0.0
    peak_device_bytes: Optional[int] = None


def _move(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def plan(cfg: QuantizeConfig, spec: QuantSpec, new_observer: Callable[[QuantSpec], Observer]) -> list:
    """The methods this run uses, in METHODS order (transforms, then the one weights method, then observers)."""
    return [cls(cfg, spec, new_observer) for cls in METHODS.values() if cls.wanted(cfg)]


@torch.no_grad()
def quantize_sequential(model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                        new_observer: Callable[[QuantSpec], Observer], cfg: QuantizeConfig, batches: list[dict],
                        reporter: Optional[Reporter] = None, device: Optional[torch.device] = None,
                        experts: Optional[dict[str, nn.Module]] = None) -> SequentialResult:
    """Run the planned methods over the decoder layers of `model`, and quantize its MoE `experts` (experts.py).
    Changes the float model in place only by function-preserving transforms (smoothing scales); the returned
    QuantizedWeights are what QuantLinear holds."""
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    algos = plan(cfg, spec, new_observer)
    arch = architecture(model)
    for a in algos:
        a.begin(model, arch)
    try:
        lw = Layerwise(model, batches)
    except ValueError as e:
        raise UserError(f"model: {e}; the layer-by-layer methods need a decoder-layer stack") from None
    layer_names = {id(m): n for n, m in model.named_modules()}
    check_outside(linears, [layer_names[id(m)] for m in lw.layers])
    lw.hidden = [_move(h, device) for h in lw.hidden]
    lw.kwargs = [_move(k, device) for k in lw.kwargs]
    masks = [b["attention_mask"].bool().to(device) for b in batches]
    transforms = [a for a in algos if a.stage == "transform"]
    (weights,) = [a for a in algos if a.stage == "weights"]
    observers = [a for a in algos if a.stage == "observe"]
    wants = {a.wants_inputs for a in algos} - {None}
    result = SequentialResult()
    names = " + ".join(type(a).__name__ for a in transforms + [weights])

    for i in reporter.track(range(len(lw)), total=len(lw), description=f"quantize ({names}, layer by layer)"):
        t_layer = time.perf_counter()
        prefix = layer_names[id(lw.layers[i])]
        module = lw.layers[i].to(device)
        groups = place(module, prefix, linears, arch)
        mine = {rel: linears[f"{prefix}.{rel}"] for g in groups for rel in g.consumers}
        layer = Layer(i, prefix, module, mine, groups, arch, lw, masks, observed=bool(observers),
                      record={"layer": i})
        _float_pass(layer, wants)
        for a in transforms:
            a.apply(layer)
        layer.inputs.clear()
        floats = {rel: lin.weight.detach().clone() for rel, lin in mine.items()}
        weights.apply(layer)
        # MoE experts (3-D parameters, experts.py) after the Linears before them: GPTQ on each expert's routed
        # tokens when GPTQ is the weights method, else RTN (transforms do not scale experts)
        moe = {rel: m for rel, m in module.named_modules() if f"{prefix}.{rel}" in (experts or {})}
        moe_floats = {rel: (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone()) for rel, m in moe.items()}
        for rel, m in moe.items():
            qws, fallback = quantize_layer_experts(m, layer, spec, new_observer,
                                                   cfg.gptq if isinstance(weights, GPTQ) else None)
            result.expert_qweights[f"{prefix}.{rel}"] = {n: q.to(home) for n, q in qws.items()}
            result.expert_fallback[f"{prefix}.{rel}"] = fallback
        if moe:
            layer.outputs = None  # outputs a weights method computed predate the quantized experts
        num = den = 0.0
        with ExitStack() as stack:
            for a in observers:
                stack.enter_context(a.watch(layer))
            if moe and cfg.activations.static:
                stack.enter_context(observing_static_scales({f"{prefix}.{rel}": m for rel, m in moe.items()},
                                                            cfg.activations, lw.token_mask,
                                                            result.expert_input_scales))
            try:
                for b in range(len(lw.batches)):
                    lw.current = b
                    if layer.outputs is not None:
                        out = layer.outputs[b]
                    else:
                        out = module(lw.hidden[b], **lw.kwargs[b])
                        out = out[0] if isinstance(out, (tuple, list)) else out
                    if b in layer.ref:
                        m = masks[b]
                        num += float((out - layer.ref[b])[m].float().pow(2).sum())
                        den += float(layer.ref[b][m].float().pow(2).sum())
                    lw.hidden[b] = out
            finally:
                lw.current = None
        # float weights back (the checkpoint gets the codes; the error table compares against these), offload;
        # the layer's codes leave the device with it: kept there, they would add up to the whole quantized model
        for rel, lin in mine.items():
            lin.weight.copy_(floats[rel])
        for rel, (gu, dn) in moe_floats.items():
            moe[rel].gate_up_proj.copy_(gu)
            moe[rel].down_proj.copy_(dn)
        lw.layers[i].to(home)
        missing = [rel for rel in mine if rel not in layer.quantized]
        if missing:
            raise RuntimeError(f"{type(weights).__name__} left {prefix}.{missing[0]} unquantized")
        for rel, qw in layer.quantized.items():
            result.qweights[f"{prefix}.{rel}"] = qw.to(home)
        row = layer.record
        row["rel_error"] = num / max(den, 1e-30)
        row["seconds"] = time.perf_counter() - t_layer
        result.layers.append(row)
        reporter.update(layer=i, rel_err=row["rel_error"])
        reporter.info(f"layer {i:>3}: relative output error {row['rel_error']:.3e} ({row['seconds']:.1f} s)")

    for a in algos:
        a.finish(result)
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    result.seconds = time.perf_counter() - t0
    return result


def _float_pass(layer: Layer, wants: set) -> None:
    """layer.ref: the float outputs (of every batch if some method wants inputs, else of ERROR_BATCHES spread
    ones); layer.absmax / layer.inputs: each group's max |x| per channel / input rows, if wanted."""
    lw, handles = layer.runner, []

    def grab(key: str):
        def hook(module, args):
            x = real_rows(args[0], layer.masks[lw.current])
            a = x.abs().amax(dim=0).float()
            layer.absmax[key] = a if key not in layer.absmax else torch.maximum(layer.absmax[key], a)
            if "rows" in wants:
                layer.inputs.setdefault(key, []).append(x.detach().float())
        return hook

    if wants:
        for g in layer.groups:
            handles.append(layer.linears[g.consumers[0]].register_forward_pre_hook(grab(g.name)))
    n_b = len(lw.batches)
    spread = sorted({max(n_b * (j + 1) // (2 * ERROR_BATCHES) - 1, 0) for j in range(ERROR_BATCHES)})
    try:
        for b in range(n_b) if wants else spread:
            lw.current = b
            out = layer.module(lw.hidden[b], **lw.kwargs[b])
            layer.ref[b] = out[0] if isinstance(out, (tuple, list)) else out
    finally:
        for h in handles:
            h.remove()
        lw.current = None


def needs_calibration_data(cfg: QuantizeConfig, has_stats: bool) -> bool:
    """Whether the quantize stage runs layer by layer on cfg.data: a method that needs calibration inputs, or
    static activation scales without a calibration artifact."""
    return (any(cls.wanted(cfg) and cls.needs_data for cls in METHODS.values())
            or (cfg.activations.static and not has_stats))


def run_on_calibration_data(model: nn.Module, tokenizer, linears: dict[str, nn.Linear], spec: QuantSpec,
                            new_observer: Callable[[QuantSpec], Observer], cfg: QuantizeConfig,
                            reporter: Optional[Reporter] = None, device=None,
                            experts: Optional[dict[str, nn.Module]] = None) -> SequentialResult:
    """Tokenize cfg.data (sorted by length so batches carry little padding) and run `quantize_sequential`."""
    from llmcompress.data import sample_texts

    from .layerwise import make_batches

    texts = sorted(sample_texts(cfg.data, cfg.seed), key=len)
    # GPTQ: batches in token-count order, split early where they would carry > 5% padding (the Hessians see only
    # real tokens either way, so this changes nothing but the wasted compute and float summation order)
    max_padding = GPTQ_MAX_PADDING if cfg.method == "gptq" else None
    batches = make_batches(tokenizer, texts, cfg.data.max_length, cfg.batch_size, next(model.parameters()).device,
                           max_padding=max_padding)
    return quantize_sequential(model, linears, spec, new_observer, cfg, batches, reporter, device, experts)
