"""llmcompress: a chainable pipeline that turns a trained LLM into a smaller, faster one, and proves it."""

__version__ = "0.1.0"


def load_quantized(path, device="cpu", dtype=None):
    """Load a quantized checkpoint written by `llmc quantize` (see llmcompress.quant.checkpoint). On CUDA its
    `generate` decodes with a static KV cache, which transformers compiles and replays as CUDA graphs."""
    from .quant.checkpoint import load_quantized as _load
    from .runtime import use_static_generate

    model = _load(path, device=device, dtype=dtype)
    if next(model.parameters()).device.type == "cuda":
        use_static_generate(model)
    return model
