"""The methods of the layer loop, one class each behind the interface in base.py, in the order the loop runs
them: transforms (SmoothQuant, AWQ), the weights method (GPTQ or RTN: exactly one is wanted), observers of the
quantized pass (static activation scales, KV cache)."""

from .activations import StaticActivations
from .awq import AWQ
from .base import Algorithm, Layer
from .gptq import GPTQ
from .kv_cache import KVCache
from .rtn import RTN
from .smoothquant import SmoothQuant

METHODS: dict[str, type[Algorithm]] = {
    "smoothquant": SmoothQuant,
    "awq": AWQ,
    "gptq": GPTQ,
    "rtn": RTN,
    "static_activations": StaticActivations,
    "kv_cache": KVCache,
}

__all__ = ["METHODS", "Algorithm", "Layer"]
