"""llmcompress: a chainable pipeline that turns a trained LLM into a smaller, faster one, and proves it."""

__version__ = "0.1.0"


def load_quantized(path, device="cpu", dtype=None):
    """Load a quantized checkpoint written by `llmc quantize` (see llmcompress.quant.checkpoint)."""
    from .quant.checkpoint import load_quantized as _load

    return _load(path, device=device, dtype=dtype)
