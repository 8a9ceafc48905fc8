"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", 2024):
protect the weights that meet large activations by scaling their input channels up before quantizing.

    s = x̄^α                        x̄_j = mean |X_j| over calibration tokens
    s = x̄^α / w̄^(1−α)              (duo scaling, llm-compressor's default; w̄_j = mean over rows of |W_j| / the
                                    max |W| of its group, so w̄ sees the weights as the quantizer does)
    s ← s / sqrt(max s · min s)     (keeps the scales centred on 1)
    loss(α) = ‖X Wᵀ − (X / s) Q(W · s)ᵀ‖²     over a grid α = 0, 1/grid, …, (grid−1)/grid

The best s is folded into the op producing X (smoothquant.fold_scales), then W·s is quantized group-wise as
usual. s = 1 (no scaling) is always a candidate, so the search never returns a worse loss than plain RTN.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .smoothquant import output_error


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """w̄ [K]: mean over all rows of |W| normalised by its group's max |W| (ragged last group included)."""
    W = torch.cat([w.detach().float() for w in weights])
    n, k = W.shape
    normed = torch.empty_like(W)
    for g0 in range(0, k, group_size):
        block = W[:, g0:g0 + group_size].abs()
        normed[:, g0:g0 + group_size] = block / block.amax(dim=1, keepdim=True).clamp(min=1e-8)
    return normed.mean(dim=0)


def awq_search(x: torch.Tensor, weights: Sequence[torch.Tensor], fq_weight: Callable[[torch.Tensor], torch.Tensor],
               grid: int = 20, duo_scaling: bool = True, group_size: int = 128) -> tuple[torch.Tensor, dict]:
    """Best per-channel scale s [K] for the Linears `weights` ([N_i, K]) reading calibration rows x [T, K].

    fq_weight(W) is the weight quantizer (quantize-dequantize) the model will use. Returns s and a record
    {"alpha": best α or None for s = 1, "loss": its loss, "loss_unscaled": the loss at s = 1}."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)
    w_mean = weight_mean(weights, group_size) if duo_scaling else None

    def loss(s: torch.Tensor) -> float:
        return output_error(x, weights, [fq_weight(w.float() * s) / s for w in weights])

    ones = torch.ones_like(x_mean)
    best_s, best_alpha, best_loss = ones, None, loss(ones)
    unscaled = best_loss
    for i in range(grid):
        alpha = i / grid
        if duo_scaling:
            s = x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4)
        else:
            s = x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = loss(s)
        if err < best_loss:
            best_s, best_alpha, best_loss = s, alpha, err
    return best_s, {"alpha": best_alpha, "loss": best_loss, "loss_unscaled": unscaled}


@torch.no_grad()
def clip_search(x: torch.Tensor, w: torch.Tensor, fq_weight: Callable[[torch.Tensor], torch.Tensor],
                group_size: int, grid: int = 20, max_shrink: float = 0.5, rows: int = 512) -> torch.Tensor:
    # (group-wise weight quantization only: each group's clip range is its own scale's range)
    """AWQ's weight clipping: per output row and group, the max |w| (shrunk by 1, 1 − 1/grid, …, 1 − max_shrink)
    that minimises the group's own output error ‖X_g W_gᵀ − X_g Q(clip(W_g))ᵀ‖² on `rows` calibration rows.
    Returns the clipped weight (quantize it with the same quantizer; min-max then lands on the chosen range)."""
    x = x.float()
    if x.shape[0] > rows:
        x = x[torch.linspace(0, x.shape[0] - 1, rows).long()]
    w = w.float()
    out = w.clone()
    n, k = w.shape
    for g0 in range(0, k, group_size):
        wg, xg = w[:, g0:g0 + group_size], x[:, g0:g0 + group_size]
        y = xg @ wg.t()
        amax = wg.abs().amax(dim=1, keepdim=True)
        best_err = torch.full((n,), float("inf"), device=w.device)
        best = wg.clone()
        for i in range(int(max_shrink * grid) + 1):
            m = amax * (1 - i / grid)
            cand = wg.clamp(-m, m)
            q = fq_weight(cand)  # one group of the spec's group size: quantized exactly as inside W
            err = (y - xg @ q.t()).pow(2).mean(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[better] = cand[better]
        out[:, g0:g0 + group_size] = best
    return out
