"""Python entry points of the int8/int4 GEMM kernels (namespace ``torch.ops.llmc``).

Each function dispatches to the compiled op when the extension serves the tensor's device, else to the
pure-torch semantics in ``reference.py`` (``backend(device)`` says which). Fake kernels registered here
let ``torch.compile`` trace the compiled ops.

Compiled ops (schemas in csrc/cpu/ops.cpp):
  llmc::quantize_int8(Tensor x, Tensor? scale) -> (Tensor q, Tensor scale)
  llmc::quantize_fp8(Tensor x, Tensor? scale) -> (Tensor q, Tensor scale)   (float8_e4m3fn codes)
  llmc::w8a8_mm(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor
  llmc::w4a16_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, Tensor? bias) -> Tensor
  llmc::_force_cuda_variant(str name, int? value) -> ()   (CUDA builds; tests and sweeps: see force_cuda_variant)
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def force_cuda_variant(**knobs: int):
    """Tests and sweeps only: force CUDA dispatch choices inside the block, e.g. ``force_cuda_variant(W4_TILED=2,
    W4_SM90_MAX_M=0)``; on exit every named knob returns to the choice by shape. The knobs and their defaults are
    the constants in csrc/cuda/common.cuh (enum Knob); a launch reads them on the host, so a CUDA graph captured
    inside the block replays the forced kernel. Raises where the CUDA kernels are not compiled."""
    if "cuda" not in _SERVED:
        raise RuntimeError("force_cuda_variant: the CUDA kernels of the llmc extension are not loaded")
    try:
        for name, value in knobs.items():
            torch.ops.llmc._force_cuda_variant(name, int(value))
        yield
    finally:
        for name in knobs:
            torch.ops.llmc._force_cuda_variant(name, None)


# ---------------------------------------------------------------- W8A8


def quantize_per_token(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (int8 [M, K], float32 [M]); dynamic per-token scales, or one static ``scale``."""
    x2 = x.reshape(-1, x.shape[-1])
    if _has_kernel("quantize_int8", x.device):
        return torch.ops.llmc.quantize_int8(x2.contiguous(), scale)
    return reference.quantize_per_token(x2, scale)


def has_fused_fp8_quantizer(device: torch.device) -> bool:
    """Whether llmc::quantize_fp8 is compiled for ``device`` (quant.fp8 uses it on CUDA, where the unfused
    torch ops cost more than the fp8 GEMM they feed)."""
    return _has_kernel("quantize_fp8", device)


def w8a8_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(x_q [M, K] int8 @ w_q [N, K]^T int8) * x_scale[m] * w_scale[n] + bias[n], in ``out_dtype``."""
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"w8a8_mm: K differs or not 2-D: x_q {tuple(x_q.shape)} vs w_q {tuple(w_q.shape)}")
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise ValueError(f"w8a8_mm: x_q and w_q must be int8, got {x_q.dtype} and {w_q.dtype}")
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

    ``layout`` "nibble-rows" is the checkpoint layout itself (CPU and reference, scales made float32 once);
    "cuda-mma" is the tensor-core fragment order of the CUDA kernel (see ``_pack_cuda``).
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
    packed = PackedW4(qweight.contiguous(), scales.float().contiguous(),
                      None if zeros is None else zeros.contiguous(), group_size, k, n)
    if _has_kernel("w4a16_mm", qweight.device) and qweight.device.type == "cuda" and group_size % 16 == 0:
        return _pack_cuda(packed)
    return packed


def _pack_cuda(p: PackedW4) -> PackedW4:
    """The "cuda-mma" layout of csrc/cuda/w4a16.cu: int32 words [ceil(N/16), Kp/64, 32 lanes, 4 k-steps].

    Word (tile, chunk, lane, s) holds the 8 codes of lane's mma.m16n8k16 A fragment at k-step 4 * chunk + s;
    nibble j is fragment register r = j % 4, element h = j // 4, at row g + 8 * (r % 2) of the 16-row tile
    and column 2t + 8 * (r // 2) + h of the 16-column step (g = lane // 4, t = lane % 4).
    """
    n, k = p.out_features, p.in_features
    tiles, kp = -(-n // 16), -(-k // 64) * 64
    codes = reference.unpack_int4(p.qweight, k).to(torch.int32)
    codes = torch.nn.functional.pad(codes, (0, kp - k, 0, tiles * 16 - n))
    steps = codes.view(tiles, 16, kp // 16, 16).permute(0, 2, 1, 3)  # [tile, step, row, col]
    lane = torch.arange(32, device=codes.device)[:, None]
    j = torch.arange(8, device=codes.device)[None, :]
    r, h = j % 4, j // 4
    rows = lane // 4 + 8 * (r % 2)
    cols = 2 * (lane % 4) + 8 * (r // 2) + h
    nibbles = steps[:, :, rows, cols]  # [tile, step, lane, 8]
    words = torch.zeros(nibbles.shape[:3], dtype=torch.int32, device=codes.device)
    for i in range(8):
        words |= nibbles[..., i] << (4 * i)  # int32 wraps for the top nibble, as intended
    words = words.view(tiles, kp // 64, 4, 32).transpose(2, 3).contiguous()
    return PackedW4(words, p.scales.float().contiguous(), p.zeros, p.group_size, k, n, "cuda-mma")


def w4a16_linear(x: torch.Tensor, packed: PackedW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W the int4 weight, dequantized group-wise inside the kernel; y.dtype = x.dtype."""
    k = x.shape[-1]
    if not (packed.in_features - 1 <= k <= packed.in_features):
        raise ValueError(f"x has {k} features but the int4 weight holds {packed.in_features}")
    x2 = x.reshape(-1, k)
    if packed.layout == "cuda-mma" or (packed.layout == "nibble-rows" and x.device.type == "cpu"
                                       and _has_kernel("w4a16_mm", x.device)):
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

    @torch.library.register_fake("llmc::quantize_fp8")
    def _(x, scale):
        return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:1], dtype=torch.float32)

    @torch.library.register_fake("llmc::w8a8_mm")
    def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
        torch._check(x_q.shape[1] == w_q.shape[1], lambda: "x_q and w_q disagree on K")
        return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("llmc::w4a16_mm")
    def _(x, qweight, scales, zeros, group_size, bias):
        return x.new_empty((x.shape[0], scales.shape[0]))
