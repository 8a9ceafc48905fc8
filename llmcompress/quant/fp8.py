"""FP8 E4M3 W8A8 linear: y = (s_x ⊙ q_x) · (s_w ⊙ q_w)ᵀ + b, with q_x, q_w in float8_e4m3fn.

Two paths compute the same function of the same fp8 operands (`plan` picks one per device, shape and dtype):

  scaled_mm  torch._scaled_mm with row-wise float32 scales: scale_a [M, 1] (one per token), scale_b [1, N] (one
             per output channel); the tensor cores multiply the fp8 codes, the epilogue applies both scales
             (and the bias where torch allows it) and writes x's dtype. CUDA GPUs with fp8 tensor cores only
             (compute capability >= 8.9: Ada, Hopper and later).
  reference  both operands dequantized to x's dtype, then F.linear: everywhere else (CPU, older GPUs, ROCm,
             shapes or dtypes torch._scaled_mm refuses). Bit for bit what QuantLinear computed before the fast
             path existed, so the FP8 perplexities in benchmarks/results stay those of this path.

Activations: dynamic per token (s = amax of the row / 448; an all-zero row gets s = 1) or one static per-tensor
scale from calibration (the checkpoint's `input_scale`). x / s is clamped to ±448 before the cast: the cast
itself saturates on some backends and not on others (out of range becomes NaN in c10's scalar conversion).

torch._scaled_mm's requirements (aten/src/ATen/native/cuda/ScaledBlas.cpp), and how they are met:
  - mat1 row-major, mat2 column-major: x codes are a fresh contiguous [M, K]; the stored weight w_q [N, K] is
    row-major, so w_q.t() is [K, N] column-major with no copy.
  - K and N multiples of 16 (M is free): other shapes take the reference path, with the reason.
  - row-wise scales float32, contiguous, exactly [M, 1] and [1, N]: a static scale is expanded and materialised.
  - a fused bias needs a bf16/fp16 output of the bias's own dtype (none for fp32): otherwise it is added after.
  - which output dtypes row-wise scaling serves, and on which GPUs, changed between torch releases; instead of
    a version table, the first call per (device, dtype) runs a tiny _scaled_mm and takes the reference path,
    with torch's message as the reason, if torch refuses.

Accumulation: use_fast_accum (FAST_ACCUM, on; benchmarks pass fast_accum=False to time the other side) lets Hopper's fp8 tensor
cores accumulate without periodic promotion to full fp32. Its error (~2^-14 relative per partial sum) is far
below what the E4M3 activations already cost (3 mantissa bits), and it is what inference stacks ship;
benchmarks/bench_fp8.py times both. LLMC_KERNELS=reference forces the reference path here as for the int kernels.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .formats import FP8_MAX

FP8_DTYPE = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # first NVIDIA architecture (Ada) with fp8 tensor cores
ALIGN = 16  # _scaled_mm: K and N multiples of 16
# dtypes torch._scaled_mm may write; which of them a given torch/GPU serves with row-wise scales is probed
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# use_fast_accum on Hopper (see above): what fp8_linear uses; tests monkeypatch it to run the other side.
FAST_ACCUM = True


@dataclass(frozen=True)
class Fp8Plan:
    """How one fp8 W8A8 linear runs on one device: the path, why not the fast one, and its options."""

    path: str  # "scaled_mm" | "reference"
    reason: str = ""  # why the reference path (empty for scaled_mm)
    fuse_bias: bool = False  # hand the bias to _scaled_mm's epilogue (bf16/fp16 output of the bias's dtype)
    fast_accum: bool = True

    def describe(self) -> str:
        return self.path if self.path == "scaled_mm" else f"reference ({self.reason})"


def plan(device: torch.device, k: int, n: int, dtype: torch.dtype, bias_dtype: Optional[torch.dtype] = None, *,
         fast_accum: Optional[bool] = None, obey_llmc_kernels: bool = True) -> Fp8Plan:
    """The path for an [*, K] x [N, K]ᵀ fp8 linear whose input is `dtype` on `device` (cached per argument set).
    fast_accum None takes FAST_ACCUM; obey_llmc_kernels=False ignores LLMC_KERNELS
    (benchmarks that time both paths in one run)."""
    forced = obey_llmc_kernels and os.environ.get("LLMC_KERNELS") == "reference"
    return _plan(torch.device(device), k, n, dtype, bias_dtype, forced, FAST_ACCUM if fast_accum is None else fast_accum)


@functools.lru_cache(maxsize=None)
def _plan(device: torch.device, k: int, n: int, dtype: torch.dtype, bias_dtype: Optional[torch.dtype],
          forced_reference: bool, fast_accum: bool) -> Fp8Plan:
    if forced_reference:
        return Fp8Plan("reference", "LLMC_KERNELS=reference")
    why_not = _device_problem(device)
    if why_not:
        return Fp8Plan("reference", why_not)
    if k % ALIGN or n % ALIGN:
        return _refuse(f"K={k}, N={n}: torch._scaled_mm needs K and N multiples of {ALIGN}")
    if dtype == torch.float32:
        # GPU inference runs bf16/fp16; _scaled_mm's float32 output is left unverified (an early H100 run
        # failed float32 cases, log lost), so float32 keeps the exact reference path.
        return Fp8Plan("reference", "float32 activations: the fp8 tensor-core path serves bf16/fp16")
    if dtype not in OUT_DTYPES:
        return _refuse(f"input dtype {dtype}: torch._scaled_mm writes only {', '.join(map(str, OUT_DTYPES))}")
    fuse_bias = bias_dtype is not None and bias_dtype == dtype and dtype != torch.float32
    refused = _probe(device, dtype, fuse_bias, fast_accum)
    if refused:
        return _refuse(refused)
    return Fp8Plan("scaled_mm", fuse_bias=fuse_bias, fast_accum=fast_accum)


def _device_problem(device: torch.device) -> str:
    """Why this device cannot run fp8 _scaled_mm at all, or ''."""
    if device.type != "cuda":
        return f"{device.type}: fp8 tensor cores need a CUDA GPU of compute capability >= 8.9"
    if torch.version.cuda is None:  # ROCm builds: MI300 wants float8_e4m3fnuz codes, not the stored e4m3fn
        return "not a CUDA build of torch (ROCm fp8 is not served)"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return f"compute capability {cap[0]}.{cap[1]} < 8.9 (no fp8 tensor cores)"
    return ""


def _refuse(reason: str) -> Fp8Plan:
    # only reached on an fp8-capable GPU, where the slow path is a surprise worth one line per distinct reason
    warnings.warn(f"llmcompress fp8: reference path instead of torch._scaled_mm: {reason}", RuntimeWarning,
                  stacklevel=4)
    return Fp8Plan("reference", reason)


@torch.compiler.disable
def _probe(device: torch.device, dtype: torch.dtype, fuse_bias: bool, fast_accum: bool) -> str:
    """'' if torch._scaled_mm accepts our exact call on this device (M = 1 and a ragged M = 17), else torch's
    refusal. Argument checks fail on the host, before any kernel runs, so nothing here synchronises."""
    for m in (1, 17):
        q = torch.zeros(m, ALIGN, dtype=FP8_DTYPE, device=device)
        s = torch.ones(m, 1, dtype=torch.float32, device=device)
        w = torch.zeros(ALIGN, ALIGN, dtype=FP8_DTYPE, device=device)
        ws = torch.ones(ALIGN, dtype=torch.float32, device=device)
        bias = torch.zeros(ALIGN, dtype=dtype, device=device) if fuse_bias else None
        try:
            out = _scaled_mm(q, s, w, ws, bias, dtype, fast_accum)
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"torch._scaled_mm refused out_dtype={dtype} (M={m}): {first}"
        if not isinstance(out, torch.Tensor):  # torch < 2.5 returned (out, amax)
            return f"torch {torch.__version__}: _scaled_mm returns a tuple; torch >= 2.5 needed"
    return ""


# ------------------------------------------------------------------------------------------ the math

def quantize_activations(x2: torch.Tensor, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes float8_e4m3fn [M, K], scales float32 [M, 1]): per token (scale None) or one static
    per-tensor scale; saturating (clamped to ±448 before the cast). On CUDA one fused kernel
    (llmc::quantize_fp8) computes the same bits as the torch ops below."""
    if x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16, torch.float32) and _fused_quantizer(x2.device):
        q, s = torch.ops.llmc.quantize_fp8(x2.contiguous(), scale)
        return q, s.reshape(-1, 1)
    xf = x2.float()
    m = xf.shape[0]
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        # A tensor divisor: torch on CUDA turns division by a Python number into a multiply by its reciprocal,
        # not the IEEE quotient the fused kernel (and torch on CPU) computes.
        s = amax / torch.full_like(amax, FP8_MAX)
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:  # _scaled_mm wants a contiguous [M, 1]: an expanded view (stride 0) is not
        s = scale.float().reshape(1, 1).expand(m, 1).contiguous()
    q = torch.clamp(xf / s, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s


def _fused_quantizer(device: torch.device) -> bool:
    if os.environ.get("LLMC_KERNELS") == "reference":
        return False
    from llmcompress.kernels import ops  # (imported here: loading the extension is not free)

    return ops.has_fused_fp8_quantizer(device)


def reference_mm(q: torch.Tensor, s: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize both operands to out_dtype (the products are formed in that dtype) and F.linear."""
    x = (q.float() * s).to(out_dtype)
    w = (w_q.float() * w_scale.float().reshape(-1, 1)).to(out_dtype)
    return F.linear(x, w, bias)


def _scaled_mm(q, s, w_q, w_scale, bias, out_dtype, fast_accum):
    return torch._scaled_mm(q, w_q.t(), scale_a=s, scale_b=w_scale.reshape(1, -1), bias=bias,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


def scaled_mm(q: torch.Tensor, s: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype, fuse_bias: bool = False,
              fast_accum: bool = True) -> torch.Tensor:
    """q [M, K] fp8 (row-major) x w_q [N, K] fp8 (row-major, i.e. w_q.t() column-major) on the fp8 tensor cores,
    scaled by s [M, 1] and w_scale [N] (float32), + bias, in out_dtype."""
    y = _scaled_mm(q, s, w_q.contiguous(), w_scale.float().contiguous(), bias if fuse_bias else None, out_dtype,
                   fast_accum)
    if bias is not None and not fuse_bias:
        y = y + bias.to(out_dtype)
    return y


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               input_scale: Optional[torch.Tensor] = None, how: Optional[Fp8Plan] = None) -> torch.Tensor:
    """y = fp8(x) fp8(W)ᵀ + b in x's dtype for x [..., K], w_q [N, K] float8_e4m3fn, w_scale [N] float32;
    input_scale None quantizes x per token. `how` overrides the plan (tests, benchmarks)."""
    k, n = x.shape[-1], w_q.shape[0]
    if how is None:
        how = plan(x.device, k, n, x.dtype, None if bias is None else bias.dtype)
    q, s = quantize_activations(x.reshape(-1, k), input_scale)
    if how.path == "scaled_mm":
        y = scaled_mm(q, s, w_q, w_scale, bias, x.dtype, how.fuse_bias, how.fast_accum)
    else:
        y = reference_mm(q, s, w_q, w_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)
