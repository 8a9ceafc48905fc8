"""Pure-torch semantics of the llmc kernels.

Every compiled op in ``csrc/`` computes exactly these functions (up to float rounding in the
accumulation order); tests compare the two on random shapes with ``compute_dtype=torch.float64``.
These functions are also the fallback when no compiled kernel serves a device.

Layouts (what a quantized checkpoint stores):
  * INT8 weight: ``w_q`` int8 [N, K], ``w_scale`` float32 [N] (per output channel).
  * INT4 weight: ``qweight`` uint8 [N, ceil(K/2)]; element k of row n is in byte k // 2, low nibble
    for even k, high nibble for odd k; codes u in 0..15; w = scale * (u - z) with ``scales`` [N, G],
    ``zeros`` uint8 [N, G] (codes 0..15) or None for symmetric (z = 8), G = ceil(K / group_size).
    The last group may be ragged (K % group_size != 0); with odd K the final high nibble is padding.
  * Activations: symmetric per-token int8, scale[m] = max_k |x[m, k]| / 127 and
    q = clamp(round_half_even(x / scale), -127, 127). An all-zero row gets scale = 1 (so q = 0 and
    the dequantized row is exactly zero, and no division by zero happens).
"""

from __future__ import annotations

import torch

QMAX = 127
SYM_ZERO = 8  # implied zero point of symmetric int4 codes 0..15


def quantize_per_token(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (q int8 [M, K], scale float32 [M]).

    ``scale`` None: dynamic per-token scales; a float32 scalar tensor: one static scale for every row.
    The division is an IEEE float32 divide (not a multiply by 1/scale) so kernels can match bit-exactly.
    """
    x2 = x.reshape(-1, x.shape[-1]).float()
    if scale is None:
        amax = x2.abs().amax(dim=-1)
        # A tensor divisor: torch on CUDA turns division by a Python number into a multiply by its
        # reciprocal, which is not the IEEE quotient the kernels (and torch on CPU) compute.
        s = amax / torch.full_like(amax, QMAX)
        s = torch.where(amax == 0, torch.ones_like(s), s)
    else:
        s = scale.float().reshape(()).expand(x2.shape[0])
    q = torch.clamp(torch.round(x2 / s[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, s.contiguous()


def w8a8_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n].

    The integer dot product is exact in float64; in float32 it is exact while |acc| < 2**24.
    """
    acc = x_q.to(compute_dtype) @ w_q.to(compute_dtype).t()
    y = acc * x_scale.to(compute_dtype)[:, None] * w_scale.to(compute_dtype)[None, :]
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(out_dtype)


def w8a8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    q, s = quantize_per_token(x, x_scale)
    y = w8a8_mm(q, s, w_q, w_scale, bias, x.dtype, compute_dtype)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def unpack_int4(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> uint8 codes [N, K] (even k low nibble, odd k high nibble)."""
    lo = qweight & 0x0F
    hi = qweight >> 4
    return torch.stack([lo, hi], dim=-1).reshape(qweight.shape[0], -1)[:, :k]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> uint8 [N, ceil(K/2)]; inverse of ``unpack_int4``."""
    n, k = codes.shape
    if k % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    c = codes.to(torch.uint8).reshape(n, -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w[n, k] = scales[n, k // group_size] * (u[n, k] - zeros[n, k // group_size])."""
    u = unpack_int4(qweight, k).to(dtype)
    z = torch.full_like(scales, SYM_ZERO, dtype=dtype) if zeros is None else zeros.to(dtype)
    s = scales.to(dtype).repeat_interleave(group_size, dim=1)[:, :k]
    z = z.repeat_interleave(group_size, dim=1)[:, :k]
    return (u - z) * s


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = x @ dequantize_int4(...)^T + bias, computed in ``compute_dtype``, returned in x.dtype.

    This reference materialises the dequantized weight; the compiled kernels never do.
    """
    k = x.shape[-1]
    w = dequantize_int4(qweight, scales, zeros, group_size, k, compute_dtype)
    y = x.reshape(-1, k).to(compute_dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
