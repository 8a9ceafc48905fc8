"""Serving a (quantized) model: greedy decoding with a static KV cache, compiled and graph-captured on CUDA."""

from .decode import StaticDecoder, eager_greedy, use_static_generate

__all__ = ["StaticDecoder", "eager_greedy", "use_static_generate"]
