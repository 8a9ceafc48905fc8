"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", 2023): move activation outliers into the weights with a per-input-channel scale s, so that both X/s and
W·s quantize well to 8 bits.

    Y = X Wᵀ = (X diag(s)⁻¹) (W diag(s))ᵀ          s_j = max|X_j|^α / max|W_j|^(1−α)

max|W_j| is taken over every Linear reading the same input (q/k/v share the input norm). The division by s is
folded into the op that produces X, so the float function is unchanged:
  RMSNorm (γ ⊙ x̂)          γ ← γ / s
  Linear (up_proj → down_proj, since down's input is act(gate) ⊙ up):   rows of the producer ← rows / s
The same equivalent transformation is AWQ's (awq.py), which only chooses s differently.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

EPS = 1e-5


def smooth_scales(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] from the per-channel max |X_j| [K] and the weights [N_i, K] that read X."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = x_absmax.float().clamp(min=EPS).pow(alpha) / w_absmax.clamp(min=EPS).pow(1 - alpha)
    return s.clamp(min=EPS)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor,
                prev_s: Optional[torch.Tensor] = None) -> None:
    """Divide the producer's output channels by s and multiply the consumers' input columns by s.

    `prev` is a norm with a `weight` [K] (RMSNorm/LayerNorm; a LayerNorm bias is divided too) or a Linear whose
    output rows feed the consumers. prev_s: the producer's own per-channel scales where one producer channel
    feeds several consumer columns that share its s (v_proj -> o_proj under grouped-query attention); default s."""
    s = s.to(linears[0].weight.device)
    ps = s if prev_s is None else prev_s.to(s.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(ps.to(prev.weight.dtype).unsqueeze(1))
    else:
        prev.weight.div_(ps.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(ps.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], w_hat: Sequence[torch.Tensor],
                 x_hat: Optional[torch.Tensor] = None) -> float:
    """Mean squared error of the concatenated outputs: ‖X Wᵀ − X̂ Ŵᵀ‖² / numel (X̂ = X unless given)."""
    W = torch.cat([w.float() for w in weights])
    W_hat = torch.cat([w.float() for w in w_hat])
    x_hat = x if x_hat is None else x_hat
    return float((x.float() @ W.t() - x_hat.float() @ W_hat.t()).pow(2).mean())


def search_alpha(x: torch.Tensor, weights: Sequence[torch.Tensor], alphas: Sequence[float],
                 fq_weight: Callable[[torch.Tensor], torch.Tensor],
                 fq_act: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Optional[float], torch.Tensor, float]:
    """Pick α (or no smoothing, returned as α None and s = 1) minimising the quantized output error on the
    calibration rows x [T, K]. Returns (α, s, error)."""
    x = x.float()
    x_absmax = x.abs().amax(dim=0)
    ones = torch.ones(x.shape[1], device=x.device)
    candidates: list[tuple[Optional[float], torch.Tensor]] = [(None, ones)]
    candidates += [(a, smooth_scales(x_absmax, weights, a)) for a in alphas]
    best = (None, ones, float("inf"))
    for alpha, s in candidates:
        scaled = [w.float() * s for w in weights]
        err = output_error(x, weights, [fq_weight(w) for w in scaled], fq_act(x / s))
        if err < best[2]:
            best = (alpha, s, err)
    return best
