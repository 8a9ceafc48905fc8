"""int8/int4 GEMM kernels (torch.ops.llmc) with a pure-torch reference fallback; see ops.py."""

from llmcompress.kernels.ops import (
    PackedW4,
    backend,
    pack_w4a16,
    quantize_per_token,
    w4a16_linear,
    w8a8_linear,
    w8a8_mm,
)

__all__ = ["PackedW4", "backend", "pack_w4a16", "quantize_per_token", "w4a16_linear", "w8a8_linear", "w8a8_mm"]
