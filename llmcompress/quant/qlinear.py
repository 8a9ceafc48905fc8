"""QuantLinear: the module swapped in for nn.Linear, holding the checkpoint layout and running y = s·(W_q x).

Buffers (persistent: exactly what the checkpoint stores; see checkpoint.py for the full layout):
  int8   w_q int8 [N, K], w_scale float32 [N] (or [N, G] per group), w_zero int8 like w_scale (asymmetric only)
  int4   qweight uint8 [N, ceil(K/2)] (even k low nibble, odd k high nibble, codes 0..15),
         scales [N, G] in the configured scale dtype, zeros uint8 [N, G] (asymmetric only; symmetric z = 8),
         or with float_zero, zeros [N, G] in the scale dtype holding the float offset m (w = s·u + m)
  fp8    w_q float8_e4m3fn [N, K], w_scale float32 [N]
  input_scale float32 [] for static activation scales; bias if the Linear had one.

Forward, by scheme:
  W8A8 (int8 weights, int8 activations)  ops.w8a8_linear: per-token dynamic or static per-tensor x scale
  W4A16                                  ops.w4a16_linear on a per-device packed weight (packed lazily, cached)
  W8A16, FP8 weight-only, W4 float_zero  dequantize on the fly, then F.linear in x's dtype
  FP8 W8A8                               fp8.fp8_linear: x through the saturating fp8 cast (per-token or static),
                                         then torch._scaled_mm on GPUs with fp8 tensor cores, else dequantize
                                         and F.linear (fp8.py; `fp8_plan` says which path a device takes)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmcompress.kernels import ops
from llmcompress.kernels.reference import pack_int4, unpack_int4

from . import fp8
from .formats import SCALE_DTYPES, QuantSpec, dequantize, to_uint4, zero_to_uint4
from .formats import QuantizedWeight

INT8_ACT_MAX = 127.0  # the kernels' symmetric per-token int8 range is ±127


@dataclass(frozen=True)
class Scheme:
    """What one QuantLinear holds: weight format/layout and activation quantization. Stored per module in
    config.json's quantization_config, so a loader can rebuild the empty module before reading tensors."""

    weight_format: str  # "int8" | "int4" | "fp8"
    granularity: str  # as quantized: "tensor" | "channel" | "group"
    group_size: int  # columns per scale in the stored layout (int4: always grouped; K for channel/tensor)
    symmetric: bool
    scale_dtype: str = "float32"
    act_format: Optional[str] = None  # None | "int8" | "fp8"
    act_dynamic: bool = True
    float_zero: bool = False  # int4 asymmetric with a float offset m per group (x = s·u + m, GGUF q4_1)

    @property
    def name(self) -> str:
        bits = {"int8": "W8", "int4": "W4", "fp8": "FP8"}[self.weight_format]
        act = {None: "A16", "int8": "A8", "fp8": "A8"}[self.act_format]
        return f"{bits}{act}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.float_zero:  # checkpoints without the float offset read as before
            d.pop("float_zero")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        return cls(**d)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n, k = out_features, in_features
        g = -(-k // scheme.group_size)
        empty = lambda *shape, dt: torch.empty(shape, dtype=dt, device=device)  # noqa: E731
        if scheme.weight_format == "int4":
            self.register_buffer("qweight", empty(n, -(-k // 2), dt=torch.uint8))
            self.register_buffer("scales", empty(n, g, dt=SCALE_DTYPES[scheme.scale_dtype]))
            zero_dt = SCALE_DTYPES[scheme.scale_dtype] if scheme.float_zero else torch.uint8
            self.register_buffer("zeros", None if scheme.symmetric else empty(n, g, dt=zero_dt))
        else:
            code_dtype = torch.int8 if scheme.weight_format == "int8" else torch.float8_e4m3fn
            scale_shape = (n, g) if scheme.granularity == "group" else (n,)
            self.register_buffer("w_q", empty(n, k, dt=code_dtype))
            self.register_buffer("w_scale", empty(*scale_shape, dt=torch.float32))
            self.register_buffer("w_zero", None if scheme.symmetric else empty(*scale_shape, dt=torch.int8))
        static = scheme.act_format is not None and not scheme.act_dynamic
        self.register_buffer("input_scale", empty(dt=torch.float32) if static else None)
        self.register_buffer("bias", empty(n, dt=dtype) if bias else None)
        self._packed: Optional[tuple] = None  # (device, data_ptr, PackedW4): not state, rebuilt per device

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor], scheme: Scheme,
                       input_scale: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Build from a QuantizedWeight (RTN, GPTQ, ...) in the canonical stored layout."""
        n, k = qw.shape
        spec = qw.spec
        m = cls(k, n, scheme, bias=bias is not None, dtype=bias.dtype if bias is not None else torch.float32,
                device=qw.codes.device)
        if scheme.weight_format == "int4":
            scale, zero = _as_groups(qw.scale, n), None if qw.zero_point is None else _as_groups(qw.zero_point, n)
            m.qweight = pack_int4(to_uint4(qw.codes, spec))
            m.scales = scale.to(SCALE_DTYPES[scheme.scale_dtype])
            m.zeros = zero.to(m.scales.dtype) if spec.float_zero else zero_to_uint4(zero, spec)
        elif scheme.weight_format == "int8":
            codes, zero = qw.codes, qw.zero_point
            if spec.dtype == "uint8":  # the same grid shifted by 128, stored signed
                codes = (codes.to(torch.int16) - 128).to(torch.int8)
                zero = None if zero is None else (zero.to(torch.int16) - 128).to(torch.int8)
            m.w_q = codes.to(torch.int8)
            m.w_scale = _expand_rows(qw.scale, n).float()
            m.w_zero = None if zero is None else _expand_rows(zero, n).to(torch.int8)
        else:
            m.w_q = qw.codes
            m.w_scale = _expand_rows(qw.scale, n).float()
        if m.input_scale is not None:
            if input_scale is None:
                raise ValueError("static activation scales need an input_scale")
            m.input_scale = input_scale.detach().float().reshape(())
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def weight_spec(self) -> QuantSpec:
        s = self.scheme
        if s.weight_format == "int4":
            return QuantSpec("uint4", s.symmetric, "group", s.group_size, s.scale_dtype, s.float_zero)
        gran = "group" if s.granularity == "group" else "channel"
        return QuantSpec("int8" if s.weight_format == "int8" else "fp8_e4m3", s.symmetric, gran, s.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this module computes with: s · (W_q − z)."""
        spec = self.weight_spec()
        if self.scheme.weight_format == "int4":
            codes = unpack_int4(self.qweight, self.in_features)
            zeros = self.zeros.float() if self.scheme.float_zero else self.zeros
            return dequantize(codes, self.scales.float(), zeros, spec, dtype)
        return dequantize(self.w_q, self.w_scale, self.w_zero, spec, dtype)

    def _packed_w4(self, device: torch.device):
        if torch.compiler.is_compiling() and self._packed is not None:
            return self._packed[2]  # a compiled step reuses the eager pass's packing (data_ptr cannot be traced)
        key = (device, self.qweight.data_ptr())
        if self._packed is None or self._packed[:2] != key:
            packed = ops.pack_w4a16(self.qweight, self.scales, self.zeros, self.scheme.group_size)
            if device.type == "cuda":  # fixed addresses: CUDA graphs of a compiled step read them in place
                for t in (packed.qweight, packed.scales, packed.zeros):
                    if t is not None:
                        torch._dynamo.mark_static_address(t)
            self._packed = (*key, packed)
        return self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        if s.weight_format == "int8" and s.act_format == "int8":
            return ops.w8a8_linear(x, self.w_q, self.w_scale, self.bias, self.input_scale)
        if s.weight_format == "int4" and not s.float_zero:  # the kernel's zero points are integer codes
            return ops.w4a16_linear(x, self._packed_w4(x.device), self.bias)
        if s.act_format == "fp8":
            return fp8.fp8_linear(x, self.w_q, self.w_scale, self.bias, self.input_scale)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def fp8_plan(self, dtype: torch.dtype = torch.bfloat16) -> Optional[fp8.Fp8Plan]:
        """For FP8 W8A8: the path an input of `dtype` takes on this module's device (None for other schemes).
        Not stored in the checkpoint: the same checkpoint takes either path depending on where it is loaded."""
        if self.scheme.act_format != "fp8":
            return None
        return fp8.plan(self.w_q.device, self.in_features, self.out_features, dtype,
                        None if self.bias is None else self.bias.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def _expand_rows(p: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor scalar becomes one value per row, so every stored layout is at least per channel."""
    return p.reshape(1).expand(n).clone() if p.dim() == 0 else p


def _as_groups(p: torch.Tensor, n: int) -> torch.Tensor:
    """int4 always stores [N, G]: per-channel and per-tensor become one group spanning the row."""
    if p.dim() == 0:
        return p.reshape(1, 1).expand(n, 1).clone()
    return p.reshape(n, 1) if p.dim() == 1 else p


def int4_layout_group_size(spec: QuantSpec, k: int) -> int:
    """Columns per stored int4 scale: the spec's group size, or the whole row (rounded up to even, as the
    kernels want) for per-channel and per-tensor scales."""
    if spec.granularity == "group":
        return spec.group_size
    return k + (k % 2)
