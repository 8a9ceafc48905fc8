"""KV-cache scales observed in the layer loop: per-head max |k| and |v| on the quantized pass (kvcache.py holds
the format, the scales and the hooks that apply them at run time)."""

from __future__ import annotations

from contextlib import contextmanager

from llmcompress.errors import UserError

from ..kvcache import KVObserver
from .base import Algorithm, Layer


class KVCache(Algorithm):
    stage = "observe"
    needs_data = True

    @classmethod
    def wanted(cls, cfg) -> bool:
        return cfg.kv_cache.format != "none"

    def begin(self, model, arch) -> None:
        if arch.generic:
            raise UserError(f"kv_cache.format: no architecture mapping for model_type "
                            f"{getattr(model.config, 'model_type', None)!r} says where the keys and values are "
                            f"(see quant/architectures.py; use kv_cache.format: none)")
        if arch.kv is None:
            raise UserError(f"kv_cache.format: {arch.name} computes keys and values in one fused projection; "
                            f"KV-cache quantization needs separate k/v projections (use kv_cache.format: none)")
        self.kv = KVObserver(model)
        if not self.kv.modules:
            raise UserError("kv_cache.format: the model has no attention module with k_proj and v_proj to "
                            "observe (use kv_cache.format: none)")

    @contextmanager
    def watch(self, layer: Layer):
        attn = f"{layer.prefix}.{layer.arch.kv[0].rsplit('.', 1)[0]}"
        lw = layer.runner

        def set_mask(module, args):  # the observer keeps the real tokens of the batch being run
            self.kv.mask = layer.masks[lw.current]

        h = layer.module.register_forward_pre_hook(set_mask)
        try:
            with self.kv.watching([attn]):
                yield
        finally:
            h.remove()

    def finish(self, result) -> None:
        result.kv_scales = self.kv.scales(self.cfg.kv_cache.format, self.cfg.kv_cache.granularity)
