"""RTN in the layer loop: every Linear rounded on its own (rtn.quantize_weight), after any transform."""

from __future__ import annotations

from ..rtn import quantize_weight
from .base import Algorithm, Layer


class RTN(Algorithm):
    stage = "weights"
    needs_data = False

    @classmethod
    def wanted(cls, cfg) -> bool:
        return not (cfg.method == "gptq" or (cfg.method == "awq" and cfg.awq.gptq))

    def apply(self, layer: Layer) -> None:
        for rel, lin in layer.linears.items():
            qw = quantize_weight(lin.weight, self.spec, self.new_observer(self.spec))
            layer.quantized[rel] = qw
            lin.weight.copy_(qw.dequantize(lin.weight.dtype))
