"""Mixture-of-experts weights stored as 3-D parameters (transformers 5: Mixtral, Qwen3-MoE, ...):

    experts.gate_up_proj  [E, 2·I, H]   row block [:I] is the gate, [I:] the up projection
    experts.down_proj     [E, H, I]
    forward(x [T, H], top_k_index [T, k], top_k_weights [T, k]):
        y[t] = Σ_j w[t, j] · down_e(act(gate_e(x[t])) ⊙ up_e(x[t])),   e = top_k_index[t, j]

These are not nn.Linear, so a Linear-only quantizer leaves them in float without a word. Here every expert's
gate_up [2I, H] and down [H, I] is one weight quantized on its own: RTN, or GPTQ on the Hessian of exactly the
tokens the router sends to that expert (gate_up's from the layer inputs it receives, down's from its
act(gate) ⊙ up computed with its already-quantized gate_up). An expert that receives no calibration token has no
Hessian and gets RTN, reported as such. The router (mlp.gate) stays in float: a routing flip costs a whole
expert's output, and the router is E × H, a rounding error of the model's size.

QuantExperts replaces the experts module: the same loop as transformers' eager forward, each expert's two
weights a QuantLinear (W4A16 / W8A8 / ... through llmcompress.kernels.ops), stored in the checkpoint as
`<experts>.gate_up_proj.<e>.*` and `<experts>.down_proj.<e>.*` like any quantized Linear.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .algorithms.gptq import Hessian, gptq_quantize
from .formats import QuantizedWeight, QuantSpec, quantize
from .layerwise import run_until_stop
from .observers import Observer
from .qlinear import QuantLinear, Scheme
from .rtn import quantize_weight

KINDS = ("gate_up_proj", "down_proj")  # in the order a token meets them (GPTQ quantizes them in this order)


def is_experts(m: nn.Module) -> bool:
    """A float experts module with 3-D gate_up_proj / down_proj parameters."""
    return all(isinstance(getattr(m, k, None), nn.Parameter) and getattr(m, k).dim() == 3 for k in KINDS)


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_experts(m)}


def expert_weights(m: nn.Module) -> dict[str, torch.Tensor]:
    """{"gate_up_proj.<e>": [2I, H], "down_proj.<e>": [H, I]}: views of the 3-D parameters."""
    return {f"{k}.{e}": getattr(m, k)[e] for k in KINDS for e in range(getattr(m, k).shape[0])}


def _activation(m: nn.Module) -> str:
    cfg = getattr(m, "config", None)
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
    if act is None:
        raise ValueError(f"{type(m).__name__}: no hidden_act in its config; cannot rebuild its activation")
    return act


def routed_forward(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
                   gate_up: Callable[[int, torch.Tensor], torch.Tensor],
                   down: Callable[[int, torch.Tensor], torch.Tensor], act: Callable,
                   on_rows: Optional[Callable[[str, int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """transformers' eager experts loop with each expert's matmuls given as functions. on_rows(kind, e, rows,
    token_idx) sees each expert's gate_up input and down input (calibration)."""
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=num_experts).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        pos, tok = torch.where(mask[e])
        h = x[tok]
        if on_rows is not None:
            on_rows("gate_up_proj", e, h, tok)
        g, u = gate_up(e, h).chunk(2, dim=-1)
        h = act(g) * u
        if on_rows is not None:
            on_rows("down_proj", e, h, tok)
        h = down(e, h) * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


class QuantExperts(nn.Module):
    """The experts of one MoE block, each weight a QuantLinear; forward as transformers' experts forward."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act: str):
        from transformers.activations import ACT2FN

        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.act = (num_experts, hidden_dim,
                                                                              intermediate_dim, act)
        self.act_fn = ACT2FN[act]
        # placeholders with the shapes (meta: no memory) until each is swapped for its QuantLinear
        self.gate_up_proj = nn.ModuleList(nn.Linear(hidden_dim, 2 * intermediate_dim, bias=False, device="meta")
                                          for _ in range(num_experts))
        self.down_proj = nn.ModuleList(nn.Linear(intermediate_dim, hidden_dim, bias=False, device="meta")
                                       for _ in range(num_experts))

    def config_entry(self) -> dict:
        """What the checkpoint records to rebuild this module (quantization_config["experts"][name])."""
        return {"num_experts": self.num_experts, "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim, "act": self.act}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(hidden_states, top_k_index, top_k_weights, self.num_experts,
                              lambda e, x: self.gate_up_proj[e](x), lambda e, x: self.down_proj[e](x), self.act_fn)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}"


def build_quant_experts(m: nn.Module, qweights: dict[str, QuantizedWeight],
                        scheme_for: Callable[[str, int], Scheme],
                        input_scales: Optional[dict[str, torch.Tensor]] = None) -> QuantExperts:
    """The QuantExperts holding `qweights` ({"gate_up_proj.<e>": ..., "down_proj.<e>": ...}, every one)."""
    e_n, two_i, h = m.gate_up_proj.shape
    q = QuantExperts(e_n, h, two_i // 2, _activation(m))
    missing = sorted(set(expert_weights(m)) - set(qweights))
    if missing:
        raise ValueError(f"experts not quantized: {', '.join(missing[:5])}")
    for rel, qw in qweights.items():
        kind, e = rel.rsplit(".", 1)
        lin = QuantLinear.from_quantized(qw, None, scheme_for(rel, qw.shape[1]),
                                         None if input_scales is None else input_scales.get(rel))
        getattr(q, kind)[int(e)] = lin.to(getattr(m, kind).device)
    return q


def restore_experts(model: nn.Module, entries: dict[str, dict]) -> None:
    """Swap the float experts named in a checkpoint's quantization_config["experts"] for empty QuantExperts
    (their QuantLinears are then rebuilt from quantization_config["modules"] like any other)."""
    from llmcompress.errors import UserError

    from .checkpoint import swap_in

    for name, entry in entries.items():
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if found is None or not is_experts(found):
            raise UserError(f"quantization_config.experts: {name!r} is not an experts module of this model")
        swap_in(model, name, QuantExperts(int(entry["num_experts"]), int(entry["hidden_dim"]),
                                          int(entry["intermediate_dim"]), str(entry["act"])))


def experts_config(model: nn.Module) -> dict[str, dict]:
    return {name: m.config_entry() for name, m in model.named_modules() if isinstance(m, QuantExperts)}


# ------------------------------------------------------------------------------------------ quantization

def rtn_experts(m: nn.Module, spec: QuantSpec, new_observer: Callable[[QuantSpec], Observer]
                ) -> dict[str, QuantizedWeight]:
    return {rel: quantize_weight(w, spec, new_observer(spec)) for rel, w in expert_weights(m).items()}


@contextmanager
def routed_inputs(m: nn.Module, on_rows: Callable[[str, int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """While inside, `m` runs the eager loop on its own (current) weights and shows each expert's inputs to
    on_rows(kind, expert, rows, token_idx); token_idx indexes the flattened [batch · seq] tokens."""
    act = m.act_fn
    gu, dn = m.gate_up_proj, m.down_proj

    def forward(hidden_states, top_k_index, top_k_weights):
        return routed_forward(hidden_states, top_k_index, top_k_weights, gu.shape[0],
                              lambda e, x: nn.functional.linear(x, gu[e]),
                              lambda e, x: nn.functional.linear(x, dn[e]), act, on_rows)

    m.forward = forward  # instance attribute: shadows the class's (possibly grouped-mm) forward
    try:
        yield
    finally:
        del m.forward


@contextmanager
def watching_inputs(experts: dict[str, nn.Module], update: Callable[[str, torch.Tensor], None],
                    token_mask: Callable[[], torch.Tensor]) -> Iterator[None]:
    """While inside, the real-token input rows of every expert weight go to update("<experts>.<kind>.<e>", rows)
    (static activation scales: `llmc calibrate`'s statistics, the layer loop's observers)."""
    with ExitStack() as stack:
        for name, m in experts.items():
            def on_rows(kind, e, rows, tok, name=name):
                real = token_mask().reshape(-1).to(tok.device)[tok]
                if bool(real.any()):
                    update(f"{name}.{kind}.{e}", rows[real])
            stack.enter_context(routed_inputs(m, on_rows))
        yield


@contextmanager
def observing_static_scales(experts: dict[str, nn.Module], activations, token_mask: Callable[[], torch.Tensor],
                            out: dict[str, torch.Tensor]) -> Iterator[None]:
    """The layer loop's static activation scales for experts: while inside, each expert weight's routed real-token
    inputs feed an observer (activations.observer); on exit out["<experts>.<kind>.<e>"] = T / 127 (int8) or
    T / 448 (fp8), as algorithms/activations.py does for Linears."""
    from .formats import FP8_MAX
    from .observers import make_observer
    from .qlinear import INT8_ACT_MAX

    spec = QuantSpec("int8" if activations.format == "int8" else "fp8_e4m3", True, "tensor")
    kwargs = {"percentile": activations.percentile} if activations.observer == "percentile" else {}
    obs: dict[str, Observer] = {}

    def update(key, rows):
        obs.setdefault(key, make_observer(activations.observer, spec, **kwargs)).update(rows.reshape(1, -1))

    with watching_inputs(experts, update, token_mask):
        yield
    qmax = INT8_ACT_MAX if activations.format == "int8" else FP8_MAX
    for key, o in obs.items():
        lo, hi = o.range()
        t = torch.maximum(lo.abs(), hi.abs()).max()
        out[key] = torch.where(t > 0, t / qmax, torch.ones_like(t)).float().cpu()


def fill_missing_scales(scales: dict[str, torch.Tensor], experts: dict[str, nn.Module]) -> list[str]:
    """Give each expert weight that saw no calibration input (no token routed to it) the largest static input scale
    of the same kind in its module; returns those names. Refuses a module none of whose experts saw any."""
    from llmcompress.errors import UserError

    filled = []
    for name, m in experts.items():
        for kind in KINDS:
            keys = [f"{name}.{kind}.{e}" for e in range(getattr(m, kind).shape[0])]
            seen = [scales[k] for k in keys if k in scales]
            if not seen:
                raise UserError(f"{name}: no calibration token reached any expert's {kind}; static activation "
                                f"scales need some (more calibration data, or dynamic scales)")
            for k in keys:
                if k not in scales:
                    scales[k] = torch.stack([s.reshape(()) for s in seen]).max()
                    filled.append(k)
    return filled


@torch.no_grad()
def gptq_experts(m: nn.Module, run_layer: Callable[[], None], token_mask: Callable[[], torch.Tensor],
                 spec: QuantSpec, new_observer: Callable[[QuantSpec], Observer], gptq_cfg
                 ) -> tuple[dict[str, QuantizedWeight], list[str]]:
    """GPTQ on every expert of `m` from its routed calibration tokens: gate_up first (Hessians from one pass of
    the layer), its Ŵ written into m, then down (Hessians from a second pass, which sees the quantized gate_up);
    `run_layer()` runs every calibration batch through the decoder layer holding m, token_mask() is the bool
    [batch, seq] of real tokens of the batch being run. Leaves Ŵ in m's parameters (the caller restores the
    float weights). Returns the QuantizedWeights and the names of the weights that fell back to RTN (no
    routed token)."""
    qweights: dict[str, QuantizedWeight] = {}
    fallback: list[str] = []
    for kind in KINDS:
        w3 = getattr(m, kind)
        hess = [Hessian(w3.shape[2], w3.device, gptq_cfg.normalize_tokens) for _ in range(w3.shape[0])]

        def on_rows(k, e, rows, tok):
            if k == kind:
                real = token_mask().reshape(-1).to(tok.device)[tok]
                if bool(real.any()):
                    hess[e].add(rows[real])

        with routed_inputs(m, on_rows):
            run_layer()
        for e in range(w3.shape[0]):
            rel = f"{kind}.{e}"
            if hess[e].n == 0:
                qw = quantize_weight(w3[e], spec, new_observer(spec))
                fallback.append(rel)
            else:
                res = gptq_quantize(w3[e], hess[e].value(), spec, new_observer(spec), gptq_cfg.damp,
                                    gptq_cfg.block_size, gptq_cfg.act_order, gptq_cfg.static_groups,
                                    gptq_cfg.refit_scales)
                qw = QuantizedWeight(quantize(res.weight, res.scale, res.zero_point, spec), res.scale,
                                     res.zero_point, spec)
            qweights[rel] = qw
            w3[e].copy_(qw.dequantize(w3.dtype))
    return qweights, fallback


def quantize_layer_experts(m: nn.Module, layer, spec: QuantSpec, new_observer: Callable[[QuantSpec], Observer],
                           gptq_cfg=None) -> tuple[dict[str, QuantizedWeight], list[str]]:
    """The layer loop's step for the experts module `m` of decoder layer `layer` (algorithms.base.Layer), after
    its Linears are quantized: GPTQ on each expert's routed tokens if gptq_cfg is given, else RTN. Leaves Ŵ in
    m's parameters for the quantized pass. Returns the QuantizedWeights and the weights that fell back to RTN."""
    if gptq_cfg is not None:
        lw = layer.runner
        return gptq_experts(m, lambda: run_until_stop(layer.module, lw), lw.token_mask, spec, new_observer,
                            gptq_cfg)
    qws = rtn_experts(m, spec, new_observer)
    with torch.no_grad():
        for rel, w in expert_weights(m).items():
            w.copy_(qws[rel].dequantize(w.dtype))
    return qws, []
