"""Static activation scales observed in the layer loop: one per-tensor scale per Linear input, from the inputs
the quantized (and smoothed) model really feeds it in the quantized pass: T / 127 (int8) or T / 448 (fp8)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..formats import FP8_MAX, QuantSpec
from ..layerwise import real_rows
from ..observers import make_observer
from ..qlinear import INT8_ACT_MAX
from .base import Algorithm, Layer


class StaticActivations(Algorithm):
    stage = "observe"
    needs_data = False  # with a calibration artifact the scales come from its statistics instead

    @classmethod
    def wanted(cls, cfg) -> bool:
        return cfg.activations.static

    def __init__(self, cfg, spec, new_observer):
        super().__init__(cfg, spec, new_observer)
        self.scales: dict[str, torch.Tensor] = {}

    @contextmanager
    def watch(self, layer: Layer):
        a = self.cfg.activations
        act_spec = QuantSpec("int8" if a.format == "int8" else "fp8_e4m3", True, "tensor")
        kwargs = {"percentile": a.percentile} if a.observer == "percentile" else {}
        obs = {rel: make_observer(a.observer, act_spec, **kwargs) for rel in layer.linears}
        lw = layer.runner

        def observe(o):
            def hook(module, args):
                o.update(real_rows(args[0], layer.masks[lw.current]).reshape(1, -1))
            return hook

        handles = [layer.linears[rel].register_forward_pre_hook(observe(o)) for rel, o in obs.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        qmax = INT8_ACT_MAX if a.format == "int8" else FP8_MAX  # QuantLinear's x range
        for rel, o in obs.items():
            lo, hi = o.range()
            t = torch.maximum(lo.abs(), hi.abs()).max()
            self.scales[f"{layer.prefix}.{rel}"] = torch.where(t > 0, t / qmax, torch.ones_like(t)).float().cpu()

    def finish(self, result) -> None:
        result.input_scales = self.scales
