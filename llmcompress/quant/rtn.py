"""Round-to-nearest weight quantization: the floor every other algorithm is measured against.

An observer picks each row's (or group's) clip range, the range gives (scale, zero_point), and every weight is
rounded on its own: W_q = clamp(round(W / s) + z, qmin, qmax). Algorithms that choose codes more cleverly
(GPTQ, AWQ) produce the same `QuantizedWeight`, so QuantLinear and the checkpoint serve them unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .formats import QuantizedWeight, QuantSpec, quantize
from .observers import MinMaxObserver, Observer, weight_qparams


def quantize_weight(w: torch.Tensor, spec: QuantSpec, observer: Optional[Observer] = None) -> QuantizedWeight:
    """RTN: qparams from `observer` (min-max by default) at the spec's granularity, then round every weight."""
    if w.dim() != 2:
        raise ValueError(f"expected a [N, K] weight, got shape {tuple(w.shape)}")
    if spec.granularity == "token":
        raise ValueError("per-token granularity is for activations, not weights")
    w = w.detach().float()
    scale, zero = weight_qparams(w, spec, observer or MinMaxObserver(spec))
    return QuantizedWeight(quantize(w, scale, zero, spec), scale, zero, spec)


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict:
    """SQNR in dB (10·log10 ‖W‖² / ‖W − Ŵ‖²) and the largest absolute error."""
    w, diff = w.detach().float(), (w.detach().float() - w_hat.detach().float())
    noise = diff.pow(2).sum(dtype=torch.float64).item()
    signal = w.pow(2).sum(dtype=torch.float64).item()
    sqnr = float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")
    return {"sqnr_db": sqnr, "max_abs_err": diff.abs().max().item()}
