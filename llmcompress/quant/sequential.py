"""Layer-by-layer quantization with calibration data: SmoothQuant, AWQ, GPTQ (or RTN), static activation scales
and KV-cache scales, one decoder layer at a time.

    capture the hidden states entering layer 0 once (layerwise.Layerwise)
    for each decoder layer:
        onload it (to `device`, when the model lives elsewhere)
        run it once in float: its reference outputs, and the inputs of its Linears (for SmoothQuant / AWQ)
        SmoothQuant and/or AWQ: choose per-channel scales, fold them into the producing norm / Linear
        quantize its Linears: GPTQ on the Hessians of their inputs (true-sequential: q/k/v, then o_proj on the
            outputs of the quantized q/k/v, then gate/up, then down), or RTN
        run it again with the quantized weights: these outputs feed the next layer; static activation and KV
            scales are observed here, on the inputs the quantized model will really see
        report its reconstruction error ‖y_q − y‖² / ‖y‖² (on ERROR_BATCHES batches unless the float pass
            ran over all), put its float weights back, offload it

GPTQ on a Llama-shaped layer (checked once, on the first layer, by computing one batch both ways) fuses steps 3
and 4: q/k/v's input, then the attention output with the quantized q/k/v, then h = x + o_proj(that), then the
MLP's down_proj input are each computed once and kept, so the quantized layer's output is h + down_proj(x_d)
with no second pass (one forward's worth of compute per layer instead of about 2.5; memory: those per-batch
activations, the largest [tokens, intermediate] for down_proj). Static activation scales and KV-cache
observation need the quantized pass and take the generic path.

Only one decoder layer's weights and activations need be on `device`. The groups of Linears reading one input
and the op producing that input follow the Llama naming (Llama, Mistral, Qwen2 and SmolLM share it).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from llmcompress.config import QuantizeConfig
from llmcompress.progress import Reporter

from . import awq as awq_
from . import guidance as guidance_
from . import smoothquant as sq
from .formats import FP8_MAX, QuantSpec, compute_qparams, fake_quantize, quantize
from .experts import expert_weights, gptq_experts, rtn_experts
from .gptq import Hessian, gptq_quantize
from .kvcache import KVObserver
from .layerwise import Layerwise
from .qlinear import INT8_ACT_MAX
from .observers import Observer, make_observer, weight_qparams
from .rtn import QuantizedWeight, quantize_weight

# (producer of the shared input, consumers): the order is the order GPTQ's true-sequential mode follows
GROUPS = [
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
]


ERROR_BATCHES = 2  # batches (spread over the shorter half of the length-sorted set: about 5% of the tokens, where
# the longest batches would cost a fifth of a forward) the per-layer error is measured on when no algorithm needs
# the float pass over all of them
GPTQ_MAX_PADDING = 0.05  # make_batches' max_padding for GPTQ's calibration batches


class _Stop(Exception):
    """Raised by a hook once it has what it needs, so the rest of the layer is not computed."""


@dataclass
class SequentialResult:
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # static per-tensor activation scales
    kv_scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    expert_qweights: dict[str, dict[str, QuantizedWeight]] = field(default_factory=dict)  # experts.py
    expert_fallback: dict[str, list[str]] = field(default_factory=dict)  # expert weights RTN'd: no routed token
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


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, K] activations -> [n, K] rows of real (non-padding) tokens (a view when there is no padding; else
    index_select on the flat rows, several times faster on CPU than boolean-mask indexing)."""
    if x.dim() != 3:
        return x.reshape(-1, x.shape[-1])
    if x.shape[:2] != mask.shape:
        return x[mask.to(x.device)]
    flat = x.reshape(-1, x.shape[-1])
    if bool(mask.all()):
        return flat
    return flat.index_select(0, mask.reshape(-1).nonzero().squeeze(1).to(x.device))


def _act_spec(cfg: QuantizeConfig) -> QuantSpec:
    return QuantSpec("int8" if cfg.activations.format == "int8" else "fp8_e4m3", True, "tensor")


def _act_fake_quant(cfg: QuantizeConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation quantizer W8A8 will apply, for scoring SmoothQuant's α: per-token dynamic or per-tensor."""
    spec = _act_spec(cfg)
    if cfg.activations.dynamic:
        tok = QuantSpec(spec.dtype, True, "token")
        return lambda x: fake_quantize(x, *_token_qparams(x, tok), tok)
    return lambda x: fake_quantize(x, *weight_qparams(x, spec, make_observer("minmax", spec)), spec)


def _token_qparams(x, spec):
    return compute_qparams(x.amin(dim=1), x.amax(dim=1), spec)


class _Inputs:
    """Collects, per consumer group, the input rows of real tokens (capped at `limit` rows, sampled evenly)."""

    def __init__(self, limit: Optional[int]):
        self.limit = limit
        self.rows: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        self.rows.setdefault(key, []).append(x.detach().float())

    def get(self, key: str, seed: int = 0) -> torch.Tensor:
        x = torch.cat(self.rows[key])
        if self.limit and x.shape[0] > self.limit:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[: self.limit].sort().values.to(x.device)]
        return x


@torch.no_grad()
def quantize_sequential(model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                        new_observer: Callable[[QuantSpec], Observer], cfg: QuantizeConfig, batches: list[dict],
                        reporter: Optional[Reporter] = None, device: Optional[torch.device] = None,
                        experts: Optional[dict[str, nn.Module]] = None) -> SequentialResult:
    """Run cfg.method (rtn / gptq / awq), cfg.smoothquant and the static activation / KV scales over the decoder
    layers of `model`. Changes the float model in place only by the (function-preserving) smoothing scales;
    the returned QuantizedWeights are what QuantLinear should hold."""
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # awq.guided: the end loss's gradients at every Linear's output, from the float model (one backward pass)
    guide = (guidance_.loss_gradients(model, linears, batches)
             if cfg.method == "awq" and cfg.awq.guided else None)
    lw = Layerwise(model, batches)
    lw.hidden = [_move(h, device) for h in lw.hidden]
    lw.kwargs = [_move(k, device) for k in lw.kwargs]
    masks = [b["attention_mask"].bool().to(device) for b in batches]
    layer_names = {id(m): n for n, m in model.named_modules()}
    result = SequentialResult()
    static_acts = cfg.activations.format != "none" and not cfg.activations.dynamic
    kv = KVObserver(model) if cfg.kv_cache.format != "none" else None
    smooth, method = cfg.smoothquant, cfg.method
    # the fused GPTQ pass (see _gptq_fused) replaces the quantized pass, so nothing may need to watch that pass
    can_fuse = cfg.gptq.true_sequential and kv is None and not static_acts
    fusable: Optional[bool] = None  # decided on the first layer: does the decoder layer decompose Llama-style?

    for i in reporter.track(range(len(lw)), total=len(lw), description=f"quantize ({method}, layer by layer)"):
        t_layer = time.perf_counter()
        layer = lw.layers[i].to(device)
        prefix = layer_names[id(lw.layers[i])]
        mine = {rel: linears[f"{prefix}.{rel}"] for _, cons in GROUPS for rel in cons if f"{prefix}.{rel}" in linears}
        groups = [(p, c) for p, c in GROUPS if all(rel in mine for rel in c)]
        row: dict = {"layer": i}

        # 1. float pass: reference outputs and (for SmoothQuant / AWQ) the inputs of each group
        need_x = smooth.enabled or method == "awq"
        inputs = _Inputs(cfg.awq.search_tokens if method == "awq" or smooth.alpha_grid else None)
        absmax: dict[str, torch.Tensor] = {}
        handles = []
        if need_x:
            for prod, cons in groups:
                handles.append(mine[cons[0]].register_forward_pre_hook(_grab(inputs, absmax, prod, masks, lw)))
        ref = {}
        try:  # the reference outputs cost a full pass; without SmoothQuant / AWQ, a few batches estimate the error
            n_b = len(lw.batches)
            spread = sorted({max(n_b * (j + 1) // (2 * ERROR_BATCHES) - 1, 0) for j in range(ERROR_BATCHES)})
            for b in range(n_b) if need_x else spread:
                lw.current = b
                out = layer(lw.hidden[b], **lw.kwargs[b])
                ref[b] = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            for h in handles:
                h.remove()

        # 2. SmoothQuant (for W8A8) and AWQ (for weight-only): per-channel scales folded into the producer
        if smooth.enabled:
            row["smoothquant_alpha"] = {}
            for prod, cons in groups:
                if prod == "self_attn.v_proj" or (prod == "mlp.up_proj" and not smooth.mlp_down):
                    continue  # o_proj: under GQA one v channel feeds several heads' o columns; not foldable
                ws = [mine[c].weight for c in cons]
                if smooth.alpha_grid:
                    alpha, s, _ = sq.search_alpha(inputs.get(prod), ws, smooth.alpha_grid,
                                                  _weight_fake_quant(spec, new_observer), _act_fake_quant(cfg))
                else:
                    alpha, s = smooth.alpha, sq.smooth_scales(absmax[prod], ws, smooth.alpha)
                sq.fold_scales(layer.get_submodule(prod), [mine[c] for c in cons], s)
                row["smoothquant_alpha"][prod] = alpha
        if method == "awq":
            row["awq_alpha"] = {}
            done: list[str] = []  # consumers already scaled / clipped / refit in this layer
            for prod, cons in groups:
                if cfg.awq.sequential_inputs and done:
                    inputs.rows[prod] = _awq_recapture(layer, lw, masks, mine, done, cons[0], spec, new_observer)
                done += list(cons)
                producer = layer.get_submodule(prod)
                foldable = not (isinstance(producer, nn.Linear)
                                and producer.out_features != mine[cons[0]].in_features)
                tie = None
                if not foldable and cfg.awq.gqa_scales and prod.endswith("v_proj"):
                    # o_proj under GQA: one v channel feeds one o column per query head of its group
                    tie = awq_.gqa_tie(layer.get_submodule(prod.rsplit(".", 1)[0]), mine[cons[0]].in_features)
                    foldable = tie is not None and int(tie.max()) + 1 == producer.out_features
                if not foldable and not cfg.awq.unscaled_groups:
                    continue  # o_proj under GQA: one v channel feeds several heads' o columns
                ws = [mine[c].weight for c in cons]
                keep = awq_.sample_index(inputs.rows[prod], masks, inputs.limit, keep_first=cfg.awq.keep_first_tokens)
                x = awq_.take_rows(inputs.rows[prod], keep)
                tw = rw = None  # guided: the end loss's token and output-channel weights (guidance.py)
                if guide is not None:
                    names = [f"{prefix}.{c}" for c in cons]
                    tw = awq_.take_rows(guide.token_rows(names, masks), keep).to(x.device)
                    tw = tw.clamp(min=0).pow(cfg.awq.guided_tokens)
                    tw = tw / tw.mean().clamp(min=1e-30)
                    rw = guide.channels(names)
                    rw = rw / rw.mean().clamp(min=1e-30)
                # the rows every later error is taken on: weighted by √a_t under guidance (Xᵀ diag(a) X)
                unit = cfg.awq.normalize_tokens and tw is None
                xw = x if tw is None else x * tw.sqrt().unsqueeze(1)
                if foldable:
                    s, rec = awq_.awq_search(x, ws, _weight_fake_quant(spec, new_observer), cfg.awq.grid,
                                             "both" if cfg.awq.both_scalings else cfg.awq.duo_scaling,
                                             spec.group_size, cfg.awq.normalize_tokens,
                                             score=_awq_score(cfg, layer, lw, masks, ref, mine, prod, cons, x),
                                             fq_for=awq_.refit_quantizer(xw, spec, new_observer, cfg.awq.refit_damp,
                                                                         unit=tw is None)
                                             if cfg.awq.refit_scales and cfg.awq.refit_in_search else
                                             _clip_quantizer(cfg, spec, new_observer, xw, cons, unit),
                                             tie=tie, token_weight=tw, row_weight=rw,
                                             group_rounds=cfg.awq.group_rounds)
                    # under a tie, v_proj's rows take the s of the o columns they feed (function unchanged)
                    s_v = None if tie is None else torch.ones(producer.out_features, device=s.device).index_copy_(
                        0, tie.to(s.device), s)
                    sq.fold_scales(producer, [mine[c] for c in cons], s, prev_s=s_v)
                    row["awq_alpha"][prod] = rec["alpha"]
                    xw = xw / s.to(xw.device)  # the consumers now read X / s
                # clip_refit: score the clip candidates by the least-squares group scale the refit will give them
                refit_H = (awq_.refit_gram(xw, cfg.awq.refit_damp, unit=tw is None)
                           if cfg.awq.clip and cfg.awq.refit_scales and cfg.awq.clip_refit else None)
                for c in cons:
                    w = mine[c].weight
                    if _clipped(cfg, spec, c):
                        w.copy_(awq_.clip_search(xw, w, _weight_fake_quant(spec, new_observer), spec.group_size,
                                                 rows=cfg.awq.clip_tokens, normalize_tokens=unit,
                                                 refit_H=refit_H,
                                                 step=_weight_step(spec, new_observer)).to(w.dtype))
                    if cfg.awq.refit_scales:
                        w.copy_(awq_.refit_scales(xw, w, spec, new_observer, cfg.awq.refit_rounds,
                                                  cfg.awq.refit_damp, unit=tw is None).to(w.dtype))
        del inputs

        # 3. weights: GPTQ (stacked per group: rows are independent given H) or RTN; Ŵ goes in for the final pass
        floats = {rel: lin.weight.detach().clone() for rel, lin in mine.items()}
        fused_out = None
        if method == "gptq" or (method == "awq" and cfg.awq.gptq):
            if fusable is None and can_fuse and len(groups) == len(GROUPS):
                fusable = _decomposes(layer, lw, masks, mine, ref)
            if fusable and len(groups) == len(GROUPS):
                fused_out = _gptq_fused(layer, lw, masks, mine, groups, spec, new_observer, cfg, result, prefix)
            else:
                stages = [[g] for g in groups] if cfg.gptq.true_sequential else [groups]
                for stage in stages:
                    hess = _hessians(layer, lw, masks, mine, stage, cfg.gptq.normalize_tokens)
                    for prod, cons in stage:
                        _gptq_group(mine, cons, hess[prod].value(), spec, new_observer, cfg, result, prefix)
        else:
            for rel, lin in mine.items():
                qw = quantize_weight(lin.weight, spec, new_observer(spec))
                result.qweights[f"{prefix}.{rel}"] = qw
                lin.weight.copy_(qw.dequantize(lin.weight.dtype))

        # 3b. MoE experts (experts.py): GPTQ on each expert's routed tokens, after the attention is quantized;
        # RTN under rtn / awq (AWQ's scales are not searched for experts) and for experts no token reached
        mine_experts = {n[len(prefix) + 1:]: m for n, m in (experts or {}).items() if n.startswith(prefix + ".")}
        expert_floats = {rel: (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone())
                         for rel, m in mine_experts.items()}
        for rel, m in mine_experts.items():
            if method == "gptq" or (method == "awq" and cfg.awq.gptq):
                qws, fallback = gptq_experts(m, lambda: _run_until_stop(layer, lw), lw.token_mask, spec,
                                             new_observer, cfg.gptq)
                result.expert_fallback[f"{prefix}.{rel}"] = fallback
            else:
                qws = rtn_experts(m, spec, new_observer)
                for name, w in expert_weights(m).items():
                    w.copy_(qws[name].dequantize(w.dtype))
            result.expert_qweights[f"{prefix}.{rel}"] = {n: q.to(home) for n, q in qws.items()}

        # 4. quantized pass: next layer's inputs; static activation and KV scales observed on them
        act_obs = {rel: make_observer(cfg.activations.observer, _act_spec(cfg),
                                      **({"percentile": cfg.activations.percentile}
                                         if cfg.activations.observer == "percentile" else {}))
                   for rel in mine} if static_acts else {}
        handles = [mine[rel].register_forward_pre_hook(_observe(obs, masks, lw)) for rel, obs in act_obs.items()]
        num = den = 0.0
        try:
            with (kv.watching([f"{prefix}.self_attn"]) if kv else nullcontext()):
                for b in range(len(lw.batches)):
                    lw.current = b
                    if kv:
                        kv.mask = masks[b]
                    if fused_out is not None:  # the fused GPTQ pass already computed the quantized layer's output
                        out = fused_out[b]
                    else:
                        out = layer(lw.hidden[b], **lw.kwargs[b])
                        out = out[0] if isinstance(out, (tuple, list)) else out
                    if b in ref:
                        m = masks[b]
                        num += float((out - ref[b])[m].float().pow(2).sum())
                        den += float(ref[b][m].float().pow(2).sum())
                    lw.hidden[b] = out
        finally:
            for h in handles:
                h.remove()
            lw.current = None
        for rel, obs in act_obs.items():
            lo, hi = obs.range()
            t = torch.maximum(lo.abs(), hi.abs()).max()
            qmax = INT8_ACT_MAX if cfg.activations.format == "int8" else FP8_MAX  # QuantLinear's x range
            result.input_scales[f"{prefix}.{rel}"] = torch.where(t > 0, t / qmax, torch.ones_like(t)).float().cpu()

        # 5. float weights back (the checkpoint gets the codes; the error table compares against these), offload
        for rel, lin in mine.items():
            lin.weight.copy_(floats[rel])
        for rel, (gu, dn) in expert_floats.items():
            mine_experts[rel].gate_up_proj.copy_(gu)
            mine_experts[rel].down_proj.copy_(dn)
        lw.layers[i].to(home)
        # the layer's codes and scales leave the device with it: kept there, they would add up to the whole
        # quantized model, where onloading promises one layer
        for rel in mine:
            if f"{prefix}.{rel}" in result.qweights:
                result.qweights[f"{prefix}.{rel}"] = result.qweights[f"{prefix}.{rel}"].to(home)
        row["rel_error"] = num / max(den, 1e-30)
        row["seconds"] = time.perf_counter() - t_layer
        result.layers.append(row)
        reporter.update(layer=i, rel_err=row["rel_error"])
        reporter.info(f"layer {i:>3}: relative output error {row['rel_error']:.3e} ({row['seconds']:.1f} s)")

    if kv:
        result.kv_scales = kv.scales(cfg.kv_cache.format, cfg.kv_cache.granularity)
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    result.seconds = time.perf_counter() - t0
    return result


def _awq_recapture(layer, lw, masks, mine, done, consumer, spec, new_observer) -> list[torch.Tensor]:
    """The real-token input rows of `consumer`, per batch, with the Linears `done` at their final RTN weights
    (then put back): AWQ's later groups searched on the inputs the quantized earlier sublayers produce."""
    fq = _weight_fake_quant(spec, new_observer)
    lins = [mine[rel] for rel in done]
    got: list[torch.Tensor] = []

    def hook(module, args):
        got.append(_rows(args[0], masks[lw.current]).detach().float())
        raise _Stop

    h = mine[consumer].register_forward_pre_hook(hook)
    try:
        with awq_.weights_swapped(lins, [fq(lin.weight.detach().float()) for lin in lins]):
            _run_until_stop(layer, lw)
    finally:
        h.remove()
        lw.current = None
    return got


def _clipped(cfg: QuantizeConfig, spec, name: str) -> bool:
    """Whether AWQ's clip search runs on the Linear `name` (group-wise weights only; AutoAWQ leaves q/k unclipped:
    attention logits amplify their error; awq.clip_qk clips them too)."""
    return (cfg.awq.clip and spec.granularity == "group"
            and (cfg.awq.clip_qk or not name.endswith(("q_proj", "k_proj"))))


def _clip_quantizer(cfg: QuantizeConfig, spec, new_observer, x, cons, unit: Optional[bool] = None):
    """awq_search's fq_for for awq.clip_in_search: each candidate s scored with the clip search it will get (on
    the inputs x / s, unit-norm rows if `unit`, by default cfg.awq.normalize_tokens); None where it does not apply
    (a group holding q/k, which are never clipped, or no clip)."""
    unit = cfg.awq.normalize_tokens if unit is None else unit
    if not (cfg.awq.clip_in_search and all(_clipped(cfg, spec, c) for c in cons)):
        return None
    fq = _weight_fake_quant(spec, new_observer)

    def for_scale(s: torch.Tensor):
        xs = x / s.to(x.device)
        return lambda w: fq(awq_.clip_search(xs, w, fq, spec.group_size, rows=cfg.awq.clip_tokens,
                                             normalize_tokens=unit))
    return for_scale


def _awq_score(cfg: QuantizeConfig, layer, lw, masks, ref, mine, prod, cons, x):
    """awq_search's `score` for cfg.awq.loss (None: the group's own Linear outputs)."""
    lins = [mine[c] for c in cons]
    if cfg.awq.loss == "layer":
        return awq_.layer_score(layer, lw, masks, ref, lins, cfg.awq.loss_batches)
    if cfg.awq.loss != "block":
        return None
    if prod == "post_attention_layernorm" and hasattr(layer, "mlp") and "mlp.down_proj" in mine:
        rows = x[torch.linspace(0, x.shape[0] - 1, min(cfg.awq.block_tokens, x.shape[0])).long().to(x.device)]
        return awq_.block_score(lambda i: layer.mlp(rows), [0], lins)
    if prod == "input_layernorm" and "self_attn.o_proj" in mine:
        o = mine["self_attn.o_proj"]
        picks = awq_.spread_batches([int(m.sum()) for m in masks], cfg.awq.block_tokens)

        def attn_out(b):
            lw.current = b
            try:
                return o(_rows(_upto(layer, o, lw.hidden[b], **lw.kwargs[b]), masks[b]))
            finally:
                lw.current = None
        return awq_.block_score(attn_out, picks, lins)
    return None  # o_proj, down_proj: their block is the Linear itself


def _run_until_stop(layer: nn.Module, lw) -> None:
    """Every calibration batch through `layer`, each cut short where a hook raises _Stop."""
    for b in range(len(lw.batches)):
        lw.current = b
        try:
            layer(lw.hidden[b], **lw.kwargs[b])
        except _Stop:
            pass


def _grab(inputs: _Inputs, absmax: dict, key: str, masks, lw):
    def hook(module, args):
        x = _rows(args[0], masks[lw.current])
        a = x.abs().amax(dim=0).float()
        absmax[key] = a if key not in absmax else torch.maximum(absmax[key], a)
        if inputs.limit is not None:
            inputs.add(key, x)
    return hook


def _observe(obs: Observer, masks, lw):
    def hook(module, args):
        obs.update(_rows(args[0], masks[lw.current]).reshape(1, -1))
    return hook


def _weight_fake_quant(spec: QuantSpec, new_observer) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: fake_quantize(w, *weight_qparams(w, spec, new_observer(spec)), spec)


def _weight_step(spec: QuantSpec, new_observer) -> Callable[[torch.Tensor], torch.Tensor]:
    """W [N, k ≤ group_size] (one group) -> the quantizer's scale [N, 1] for it."""
    return lambda w: weight_qparams(w, spec, new_observer(spec))[0].reshape(w.shape[0], -1)[:, :1]


def _upto(module: nn.Module, stop_at: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Run `module` until `stop_at` is called; return the input `stop_at` would have read."""
    got = []

    def hook(m, a):
        got.append(a[0])
        raise _Stop

    h = stop_at.register_forward_pre_hook(hook)
    try:
        module(*args, **kwargs)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError(f"{type(module).__name__} never called {type(stop_at).__name__}")
    return got[0]


def _decomposed(layer, mine, hidden, kwargs) -> torch.Tensor:
    """The Llama decoder layer written out: h = x + o_proj(attention(...)); out = h + down_proj(mlp input)."""
    o, down = mine["self_attn.o_proj"], mine["mlp.down_proj"]
    h = hidden + o(_upto(layer, o, hidden, **kwargs))
    x_d = _upto(layer.mlp, down, layer.post_attention_layernorm(h))
    return h + down(x_d)


def _decomposes(layer, lw, masks, mine, ref) -> bool:
    """Whether this decoder layer is Llama-shaped (pre-norm residual attention then MLP, o_proj and down_proj
    last), checked by computing one reference batch both ways; otherwise GPTQ takes the generic path."""
    if not all(hasattr(layer, a) for a in ("mlp", "post_attention_layernorm")) or not ref:
        return False
    b = min(ref)
    try:
        lw.current = b
        out = _decomposed(layer, mine, lw.hidden[b], lw.kwargs[b])
    except Exception:
        return False
    finally:
        lw.current = None
    m = masks[b]
    err = float((out - ref[b])[m].float().pow(2).sum()) / max(float(ref[b][m].float().pow(2).sum()), 1e-30)
    return err < 1e-8


def _gptq_fused(layer, lw, masks, mine, groups, spec, new_observer, cfg, result, prefix) -> list[torch.Tensor]:
    """True-sequential GPTQ for a Llama-shaped layer in one forward's worth of compute: each sublayer's input is
    computed once, from the already-quantized sublayers before it, and kept for the next stage, so the layer's
    quantized output falls out at the end (no second pass). Same Hessians and result as the generic path."""
    (p_qkv, c_qkv), (p_o, c_o), (p_gu, c_gu), (p_d, c_d) = groups
    o, down = mine[c_o[0]], mine[c_d[0]]
    n_b = len(lw.batches)

    def stage(prod, cons, inputs) -> None:
        hess = Hessian(mine[cons[0]].in_features, mine[cons[0]].weight.device, cfg.gptq.normalize_tokens)
        for b, x in enumerate(inputs):
            hess.add(_rows(x, masks[b]))
        _gptq_group(mine, cons, hess.value(), spec, new_observer, cfg, result, prefix)

    def qkv_input(b):
        lw.current = b
        return _upto(layer, mine[c_qkv[0]], lw.hidden[b], **lw.kwargs[b])

    stage(p_qkv, c_qkv, (qkv_input(b) for b in range(n_b)))
    x_o = []
    for b in range(n_b):
        lw.current = b
        x_o.append(_upto(layer, o, lw.hidden[b], **lw.kwargs[b]))  # attention with the quantized q/k/v
    lw.current = None
    stage(p_o, c_o, x_o)
    h = [lw.hidden[b] + o(x_o[b]) for b in range(n_b)]
    del x_o
    stage(p_gu, c_gu, (layer.post_attention_layernorm(h[b]) for b in range(n_b)))
    x_d = [_upto(layer.mlp, down, layer.post_attention_layernorm(h[b])) for b in range(n_b)]
    stage(p_d, c_d, x_d)
    return [h[b] + down(x_d[b]) for b in range(n_b)]


def _hessians(layer, lw, masks, mine, stage, normalize: bool = False) -> dict[str, Hessian]:
    """H of each group's shared input, from one pass of the layer that stops at the stage's last consumer."""
    hess = {prod: Hessian(mine[cons[0]].in_features, mine[cons[0]].weight.device, normalize)
            for prod, cons in stage}
    last = stage[-1][1][0]

    def make(prod, stop):
        def hook(module, args):
            hess[prod].add(_rows(args[0], masks[lw.current]))
            if stop:
                raise _Stop
        return hook

    handles = [mine[cons[0]].register_forward_pre_hook(make(prod, cons[0] == last)) for prod, cons in stage]
    try:
        _run_until_stop(layer, lw)
    finally:
        for h in handles:
            h.remove()
        lw.current = None
    return hess


def _gptq_group(mine, cons, H, spec, new_observer, cfg, result, prefix) -> None:
    """GPTQ on the group's Linears stacked row-wise (one Cholesky for all: rows are independent given H), then
    split back per Linear. A per-tensor scale spans one Linear, so those go one by one."""
    g = cfg.gptq
    for chunk in ([[c] for c in cons] if spec.granularity == "tensor" else [list(cons)]):
        W = torch.cat([mine[c].weight for c in chunk])
        res = gptq_quantize(W, H, spec, new_observer(spec), g.damp, g.block_size, g.act_order, g.static_groups,
                            g.refit_scales)
        r0 = 0
        for c in chunk:
            n = mine[c].out_features
            w_hat = res.weight[r0:r0 + n]
            scale = res.scale if spec.granularity == "tensor" else res.scale[r0:r0 + n]
            zero = res.zero_point
            if zero is not None and spec.granularity != "tensor":
                zero = zero[r0:r0 + n]
            result.qweights[f"{prefix}.{c}"] = QuantizedWeight(quantize(w_hat, scale, zero, spec), scale, zero,
                                                               spec)
            mine[c].weight.copy_(w_hat.to(mine[c].weight.dtype))
            r0 += n


def needs_calibration_data(cfg: QuantizeConfig, has_stats: bool) -> bool:
    """Whether the quantize stage runs layer by layer on cfg.data: GPTQ, AWQ, SmoothQuant, KV-cache scales, or
    static activation scales without a calibration artifact."""
    static = cfg.activations.format != "none" and not cfg.activations.dynamic
    return (cfg.method in ("gptq", "awq") or cfg.smoothquant.enabled or cfg.kv_cache.format != "none"
            or (static and not has_stats))


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
