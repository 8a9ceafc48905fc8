"""Python entry points of the int8/int4 GEMM kernels (namespace ``torch.ops.llmc``).

Each function dispatches to the compiled op when the extension serves the tensor's device, else to the
pure-torch semantics in ``reference.py`` (``backend(device)`` says which). Fake kernels registered here
let ``torch.compile`` trace the compiled ops.

Compiled ops (schemas in csrc/cpu/ops.cpp):
  llmc::quantize_int8(Tensor x, Tensor? scale) -> (Tensor q, Tensor scale)
  llmc::w8a8_mm(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor
  llmc::w4a16_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, Tensor? bias) -> Tensor
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcompress.kernels import build, reference

_SERVED = build.load_extension()  # device types with compiled kernels, e.g. {"cpu", "cuda"}


def _has_kernel(op: str, device: torch.device) -> bool:
    # Every op is compiled for every served device, so the device type decides (and dynamo can trace this).
    return device.type in _SERVED


def backend(device: torch.device | str) -> str:
    """Which implementation serves calls on ``device``: e.g. "cpu-avx2", "cuda-sm90" or "reference"."""
    device = torch.device(device)
    if not _has_kernel("w8a8_mm", device):
        return "reference"
    if device.type == "cpu":
        return torch.ops.llmc.cpu_isa()
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm{major}{minor}"


# ---------------------------------------------------------------- W8A8


def quantize_per_token(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (int8 [M, K], float32 [M]); dynamic per-token scales, or one static ``scale``."""
    x2 = x.reshape(-1, x.shape[-1])
    if _has_kernel("quantize_int8", x.device):
        return torch.ops.llmc.quantize_int8(x2.contiguous(), scale)
    return reference.quantize_per_token(x2, scale)


def w8a8_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(x_q [M, K] int8 @ w_q [N, K]^T int8) * x_scale[m] * w_scale[n] + bias[n], in ``out_dtype``."""
    if _has_kernel("w8a8_mm", x_q.device):
        return torch.ops.llmc.w8a8_mm(
            x_q.contiguous(), x_scale.float().contiguous(), w_q.contiguous(), w_scale.float().contiguous(), bias,
            out_dtype)
    return reference.w8a8_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def w8a8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (q_x @ w_q^T) * x_scale * w_scale + bias in x.dtype; x_scale None quantizes per token."""
    q, s = quantize_per_token(x, x_scale)
    y = w8a8_mm(q, s, w_q, w_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


# ---------------------------------------------------------------- W4A16


@dataclass(frozen=True)
class PackedW4:
    """An int4 weight in the layout the kernel of ``qweight.device`` reads.

    ``layout`` "nibble-rows" is the checkpoint layout itself (CPU and reference); "cuda-k32" pads each row
    to a multiple of 32 codes so the CUDA kernel can use 16-byte loads.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    in_features: int
    out_features: int
    layout: str = "nibble-rows"


def pack_w4a16(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> PackedW4:
    """One-time layout conversion of a checkpoint int4 weight for the kernel serving its device."""
    n, g = scales.shape
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[0] != n:
        raise ValueError(f"qweight must be uint8 [N, ceil(K/2)] with N = scales.shape[0] = {n}, "
                         f"got {tuple(qweight.shape)} {qweight.dtype}")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != torch.uint8):
        raise ValueError(f"zeros must be uint8 {tuple(scales.shape)}, got {tuple(zeros.shape)} {zeros.dtype}")
    # K is only known up to the odd/even ambiguity of the last byte; the number of groups pins it down
    # to a range, and the activations give it exactly at call time.
    k_max = 2 * qweight.shape[1]
    if not ((g - 1) * group_size < k_max and k_max - 1 <= g * group_size):
        raise ValueError(f"scales has {g} groups of {group_size} but qweight holds {k_max} codes per row")
    k = min(k_max, g * group_size)
    packed = PackedW4(qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(),
                      group_size, k, n)
    if _has_kernel("w4a16_mm", qweight.device) and qweight.device.type == "cuda":
        return _pack_cuda(packed)
    return packed


def _pack_cuda(p: PackedW4) -> PackedW4:
    # Pad each row to a multiple of 32 codes (16 bytes): the kernel reads 16-byte vectors and masks x past K.
    kb = p.qweight.shape[1]
    kb_pad = -(-kb // 16) * 16
    q = p.qweight if kb_pad == kb else torch.nn.functional.pad(p.qweight, (0, kb_pad - kb))
    return PackedW4(q.contiguous(), p.scales, p.zeros, p.group_size, p.in_features, p.out_features, "cuda-k32")


def w4a16_linear(x: torch.Tensor, packed: PackedW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W the int4 weight, dequantized group-wise inside the kernel; y.dtype = x.dtype."""
    k = x.shape[-1]
    if not (packed.in_features - 1 <= k <= packed.in_features) or -(-k // 2) > packed.qweight.shape[1]:
        raise ValueError(f"x has {k} features but the int4 weight holds {packed.in_features}")
    x2 = x.reshape(-1, k)
    if _has_kernel("w4a16_mm", x.device):
        y = torch.ops.llmc.w4a16_mm(x2.contiguous(), packed.qweight, packed.scales, packed.zeros,
                                    packed.group_size, bias)
    else:
        y = reference.w4a16_linear(x2, packed.qweight[:, : -(-k // 2)], packed.scales, packed.zeros,
                                   packed.group_size, bias)
    return y.reshape(*x.shape[:-1], packed.out_features)


# ---------------------------------------------------------------- fake kernels for torch.compile

if _SERVED:

    @torch.library.register_fake("llmc::quantize_int8")
    def _(x, scale):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)

    @torch.library.register_fake("llmc::w8a8_mm")
    def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
        torch._check(x_q.shape[1] == w_q.shape[1], lambda: "x_q and w_q disagree on K")
        return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("llmc::w4a16_mm")
    def _(x, qweight, scales, zeros, group_size, bias):
        return x.new_empty((x.shape[0], scales.shape[0]))
