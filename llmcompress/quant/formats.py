"""Number formats and the uniform quantizer.

    x_q = clamp(round(x / s) + z, qmin, qmax)        dequantized  x ≈ s · (x_q − z)

A `QuantSpec` names the format (int8, uint8, int4, uint4, fp8_e4m3), whether it is symmetric (z fixed at the
middle of the range, 0 for signed types) and the granularity a scale covers:

  tensor   one scale for the whole tensor                       scale shape []
  channel  one per output channel (row of a [N, K] weight)      scale shape [N]
  group    one per `group_size` consecutive inputs of a row     scale shape [N, G], G = ceil(K / group_size)
           (the last group may be shorter: K = 576 with group 128 gives 4 groups of 128 and one of 64)
  token    one per row of an activation [M, K], computed on the fly (dynamic)   scale shape [M]

Range → scale (compressed-tensors' convention, so RTN numbers compare with llm-compressor's):
  symmetric   s = max(|lo|, |hi|) / ((qmax − qmin) / 2)   e.g. amax / 7.5 for int4, amax / 127.5 for int8;
              +amax lands on the half-way point 7.5 and clamps to 7, an error of exactly s/2.
  asymmetric  lo, hi widened to include 0 (so 0 is exact), s = (hi − lo) / (qmax − qmin),
              z = clamp(round(qmin − lo / s), qmin, qmax)
  fp8_e4m3    s = amax / 448, codes = saturating cast of x / s to float8_e4m3fn (|code| ≤ 448, never inf/NaN).
  float_zero  (asymmetric, GGUF q4_1's grid) the offset is a float m, not an integer code:
              x ≈ s · q + m,  s = (hi − lo) / (qmax − qmin), m = lo (llama.cpp's rule: the range is not widened
              to include 0), both rounded through scale_dtype; `zero_point` then holds m.
Rounding is round-half-to-even (torch.round), the same as the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

QuantDtype = Literal["int8", "uint8", "int4", "uint4", "fp8_e4m3"]
Granularity = Literal["tensor", "channel", "group", "token"]

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, symmetry, granularity (and the group size for 'group')."""

    dtype: QuantDtype = "int8"
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int = 128
    scale_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    float_zero: bool = False  # asymmetric with a float offset m: x = s·q + m (GGUF q4_1), not s·(q − z)

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> Optional[str]:
        """Why this spec cannot work, or None. Checked before any work is done."""
        if self.dtype not in _INT_RANGES and self.dtype != "fp8_e4m3":
            return f"dtype must be one of {', '.join([*_INT_RANGES, 'fp8_e4m3'])}, got {self.dtype!r}"
        if self.granularity not in ("tensor", "channel", "group", "token"):
            return f"granularity must be tensor, channel, group or token, got {self.granularity!r}"
        if self.granularity == "group" and self.group_size < 2:
            return f"group_size must be >= 2, got {self.group_size}"
        if self.is_float and not self.symmetric:
            return "fp8_e4m3 is symmetric only (it has no zero point)"
        if self.is_float and self.granularity == "group":
            return "fp8_e4m3 supports tensor, channel and token granularity, not group"
        if self.float_zero and (self.symmetric or self.dtype not in ("uint4", "uint8")):
            return "float_zero needs an asymmetric unsigned format (uint4 / uint8)"
        if self.scale_dtype not in SCALE_DTYPES:
            return f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}"
        return None

    @property
    def is_float(self) -> bool:
        return self.dtype == "fp8_e4m3"

    @property
    def bits(self) -> int:
        return 4 if self.dtype in ("int4", "uint4") else 8

    @property
    def qmin(self) -> float:
        return -FP8_MAX if self.is_float else _INT_RANGES[self.dtype][0]

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.is_float else _INT_RANGES[self.dtype][1]

    @property
    def code_dtype(self) -> torch.dtype:
        """Unpacked code storage: int8 for signed ints, uint8 for unsigned ints, float8_e4m3fn for fp8."""
        if self.is_float:
            return torch.float8_e4m3fn
        return torch.int8 if self.qmin < 0 else torch.uint8

    @property
    def zero_dtype(self) -> torch.dtype:
        """Storage of an asymmetric spec's zero point: the code dtype, or float32 for a float offset."""
        return torch.float32 if self.float_zero else self.code_dtype

    @property
    def symmetric_zero(self) -> int:
        """The fixed zero point of a symmetric spec: 0 for signed types, the range's midpoint for unsigned."""
        return 0 if self.qmin < 0 or self.is_float else (int(self.qmin) + int(self.qmax) + 1) // 2

    def num_groups(self, k: int) -> int:
        return -(-k // self.group_size)


def compute_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Clip range [lo, hi] (any shape) -> (scale float32, zero_point in the code dtype or None if symmetric).

    The scale is rounded through `spec.scale_dtype` first, so codes are computed with the very scale that
    is stored and dequantization reproduces them exactly.
    """
    lo, hi = lo.float(), hi.float()
    if spec.float_zero:
        scale = _storable((hi - lo) / (spec.qmax - spec.qmin), spec.scale_dtype)
        return scale, lo.to(SCALE_DTYPES[spec.scale_dtype]).float()
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        half_range = FP8_MAX if spec.is_float else (spec.qmax - spec.qmin) / 2
        scale, zero = amax / half_range, None
    else:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = _storable(scale, spec.scale_dtype)
    if not spec.symmetric:
        zero = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax).to(spec.code_dtype)
    return scale, zero


def _storable(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """An all-zero range gets scale 1 (codes 0, exact zeros); scales are clamped into the storage dtype's range."""
    dt = SCALE_DTYPES[scale_dtype]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=torch.finfo(dt).tiny, max=torch.finfo(dt).max)
    return scale.to(dt).float()


def broadcast_param(p: Optional[torch.Tensor], x: torch.Tensor, spec: QuantSpec) -> Optional[torch.Tensor]:
    """Expand a scale or zero point of `spec`'s granularity so it broadcasts against x ([N, K] or [M, K])."""
    if p is None or spec.granularity == "tensor":
        return p
    if spec.granularity in ("channel", "token"):
        return p.reshape(-1, *([1] * (x.dim() - 1)))
    k = x.shape[-1]
    return p.repeat_interleave(spec.group_size, dim=-1)[..., :k]


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """x -> codes in `spec.code_dtype` (unpacked). Float math in float32; division, not multiply-by-inverse."""
    s = broadcast_param(scale, x, spec).float()
    if spec.is_float:
        return torch.clamp(x.float() / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if spec.float_zero:
        m = broadcast_param(zero_point, x, spec).float()
        return torch.clamp(torch.round((x.float() - m) / s), spec.qmin, spec.qmax).to(spec.code_dtype)
    z = spec.symmetric_zero if zero_point is None else broadcast_param(zero_point, x, spec).float()
    q = torch.clamp(torch.round(x.float() / s) + z, spec.qmin, spec.qmax)
    return q.to(spec.code_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes -> s · (q − z) in float32, returned in `dtype`."""
    s = broadcast_param(scale, q, spec).float()
    if spec.is_float:
        return (q.float() * s).to(dtype)
    if spec.float_zero:
        return (q.float() * s + broadcast_param(zero_point, q, spec).float()).to(dtype)
    z = spec.symmetric_zero if zero_point is None else broadcast_param(zero_point, q, spec).float()
    return ((q.float() - z) * s).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                  spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what a quantized tensor looks like to the float model."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec, x.dtype)


@dataclass
class QuantizedWeight:
    """A [N, K] weight as unpacked codes (spec.code_dtype) with scale [] / [N] / [N, G] and zero_point: what every
    algorithm produces and QuantLinear and the checkpoint serve."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.spec, dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def to(self, device) -> "QuantizedWeight":
        zero = None if self.zero_point is None else self.zero_point.to(device)
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), zero, self.spec)


def to_uint4(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """4-bit codes of either signedness -> unsigned codes 0..15 (signed int4 q is stored as u = q + 8)."""
    if spec.dtype == "int4":
        return (q.to(torch.int16) + 8).to(torch.uint8)
    return q.to(torch.uint8)


def zero_to_uint4(zero_point: Optional[torch.Tensor], spec: QuantSpec) -> Optional[torch.Tensor]:
    """The stored int4 zero-point code (None = symmetric, implied 8), in the unsigned-code domain."""
    if zero_point is None:
        return None
    return to_uint4(zero_point, spec)
