"""Round-to-nearest weight quantization: the floor every other algorithm is measured against.

An observer picks each row's (or group's) clip range, the range gives (scale, zero_point), and every weight is
rounded on its own: W_q = clamp(round(W / s) + z, qmin, qmax). Algorithms that choose codes more cleverly
(GPTQ, AWQ) produce the same `QuantizedWeight`, so QuantLinear and the checkpoint serve them unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .formats import SCALE_DTYPES, QuantizedWeight, QuantSpec, quantize
from .observers import MinMaxObserver, Observer, weight_qparams, weight_rows


def quantize_weight(w: torch.Tensor, spec: QuantSpec, observer: Optional[Observer] = None) -> QuantizedWeight:
    """RTN: qparams from `observer` (min-max by default) at the spec's granularity, then round every weight."""
    if w.dim() != 2:
        raise ValueError(f"expected a [N, K] weight, got shape {tuple(w.shape)}")
    if spec.granularity == "token":
        raise ValueError("per-token granularity is for activations, not weights")
    w = w.detach().float()
    observer = observer or MinMaxObserver(spec)
    if spec.float_zero and spec.granularity != "tensor" and type(observer) is MinMaxObserver:
        return ggml_offset_rtn(w, spec)
    scale, zero = weight_qparams(w, spec, observer)
    return QuantizedWeight(quantize(w, scale, zero, spec), scale, zero, spec)


def ggml_offset_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """llama.cpp's own rounding for a float-offset grid (ggml-quants.c, quantize_row_q4_1_ref), so RTN here is
    bit for bit what llama-quantize writes: per group d = (max − min) / (qmax − qmin) and id = 1 / d in float32,
    u = min(qmax, trunc((x − min) · id + 0.5)); d and m = min are stored rounded to the scale dtype afterwards
    (the codes come from the unrounded d and min, as in ggml)."""
    n, k = w.shape
    blocks = weight_rows(w, spec)
    codes, scales, mins = [], [], []
    for rows in blocks:
        mn, mx = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        d = (mx - mn) / (spec.qmax - spec.qmin)
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        u = torch.trunc((rows - mn) * inv + 0.5).clamp(spec.qmin, spec.qmax)
        codes.append(u.reshape(n, -1))
        scales.append(d.reshape(n, -1))
        mins.append(mn.reshape(n, -1))
    dt = SCALE_DTYPES[spec.scale_dtype]
    scale, zero = torch.cat(scales, 1).to(dt).float(), torch.cat(mins, 1).to(dt).float()
    if spec.granularity != "group":
        scale, zero = scale.reshape(-1), zero.reshape(-1)
    return QuantizedWeight(torch.cat(codes, 1).to(spec.code_dtype), scale, zero, spec)


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict:
    """SQNR in dB (10·log10 ‖W‖² / ‖W − Ŵ‖²) and the largest absolute error."""
    w, diff = w.detach().float(), (w.detach().float() - w_hat.detach().float())
    noise = diff.pow(2).sum(dtype=torch.float64).item()
    signal = w.pow(2).sum(dtype=torch.float64).item()
    sqnr = float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")
    return {"sqnr_db": sqnr, "max_abs_err": diff.abs().max().item()}
