"""Other tools' quantized checkpoints read as ours: `translate(path, config)` -> (our quantization_config, our
state dict), which `load_quantized` then rebuilds with QuantLinear. One home for the dispatch on quant_method."""

from __future__ import annotations

from pathlib import Path

import torch

from llmcompress.errors import UserError


def translate(path: Path, config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    method = config["quantization_config"].get("quant_method")
    if method == "compressed-tensors":
        from .ct_import import translate as ct

        return ct(path, config)
    if method in ("gptq", "awq"):
        from .gptq_import import translate as gptq

        return gptq(path, config)
    raise UserError(f"{path / 'config.json'}: quantization_config.quant_method: {method!r} is not served")
