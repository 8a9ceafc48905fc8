"""The interface every method of the layer loop implements, and what the loop hands it about one decoder layer.

    class MyMethod(Algorithm):
        stage = "transform" | "weights" | "observe"
        wants_inputs = True            # the float pass records each group's input rows (Layer.inputs)
        @classmethod
        def wanted(cls, cfg) -> bool   # whether this run uses it (read from the QuantizeConfig)
        def apply(self, layer)         # transform: change the layer's float weights, function kept (scale folding,
                                       #   clipping); weights: quantize every Linear of the layer (Layer.quantized)
        def watch(self, layer)         # observe: a context manager whose hooks see the quantized pass
        def finish(self, result)       # after the last layer: put what it gathered into the SequentialResult

Per decoder layer the loop (sequential.py) runs the float pass, then every transform's apply in METHODS order,
then the one weights method's apply, then the quantized pass under every observer's watch. Methods never name
modules: they read Layer.groups (architectures.py) and Layer.linears.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from llmcompress.config import QuantizeConfig

from ..architectures import Architecture, Group
from ..formats import QuantizedWeight, QuantSpec, fake_quantize
from ..observers import Observer, weight_qparams


@dataclass
class Layer:
    """One decoder layer as the loop hands it to the methods."""
    index: int
    prefix: str  # its module name, e.g. "model.layers.3"
    module: nn.Module  # on the working device
    linears: dict[str, nn.Linear]  # relative name -> selected Linear
    groups: list[Group]  # architectures.place: true-sequential order
    arch: Architecture
    runner: "object"  # layerwise.Layerwise: hidden states and kwargs per calibration batch
    masks: list[torch.Tensor]  # bool [B, T] real tokens of each batch
    ref: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> float output of the layer
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # group name -> per-batch input rows
    absmax: dict[str, torch.Tensor] = field(default_factory=dict)  # group name -> max |x| per input channel
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # relative name -> codes and scales
    outputs: Optional[list[torch.Tensor]] = None  # the quantized layer's outputs, if the weights method made them
    observed: bool = False  # an observer watches the quantized pass (the weights method may not skip it)
    record: dict = field(default_factory=dict)  # the layer's row in the report

    def producer(self, group: Group) -> Optional[nn.Module]:
        return None if group.producer is None else self.module.get_submodule(group.producer)


class Algorithm:
    stage: ClassVar[str] = "transform"
    wants_inputs: ClassVar[bool] = False

    def __init__(self, cfg: QuantizeConfig, spec: QuantSpec, new_observer: Callable[[QuantSpec], Observer]):
        self.cfg, self.spec, self.new_observer = cfg, spec, new_observer

    @classmethod
    def wanted(cls, cfg: QuantizeConfig) -> bool:
        raise NotImplementedError

    def begin(self, model: nn.Module, arch: Architecture) -> None:
        """Once, before the first layer: refuse (UserError) what this model cannot get."""

    def apply(self, layer: Layer) -> None:
        pass

    def watch(self, layer: Layer):
        return nullcontext()

    def finish(self, result) -> None:
        pass

    def weight_fake_quant(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """W -> Q(W) dequantized, as the checkpoint will hold it."""
        spec, new = self.spec, self.new_observer
        return lambda w: fake_quantize(w, *weight_qparams(w, spec, new(spec)), spec)
