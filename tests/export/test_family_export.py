"""Each architecture family's export loads back (issue #27's "each family's export loads back").

For every tiny family model of tests/quant/arch_models.py: W4A16 RTN with groups of 32 (dividing every width),
saved as our checkpoint, then
  - compressed-tensors: the export loads back through our load_quantized with logits equal to the quantized
    checkpoint's, and through plain transformers (which decompresses with the compressed-tensors library) with
    logits within 1e-3 of ours, relative to their largest magnitude; or, where the format cannot describe the
    model (MoE experts stored as 3-D parameters), it is refused before any work with one line naming the module,
    and the layout that line proposes (experts left in float) exports and loads back;
  - GGUF: written for Llama-architecture families only; every other family is refused in one line naming
    config.json's model_type.
The llmcompress-free subprocess check of the compressed-tensors export lives in test_compressed_tensors.py
(Llama-shaped default model); here transformers loads in-process.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
import arch_models  # noqa: E402

from llmcompress.config import ActivationQuantConfig, QuantizeConfig, WeightQuantConfig  # noqa: E402
from llmcompress.errors import UserError  # noqa: E402

pytest.importorskip("compressed_tensors")

W4 = WeightQuantConfig(format="int4", granularity="group", group_size=32, symmetric=True)
CT_REFUSED = {f: "experts stored as 3-D parameters" for f in arch_models.MOE}
EXCLUDE_EXPERTS = "*.mlp.experts*"
GGUF_WRITTEN = ("llama", "mistral")  # model_type llama / mistral: the Llama architecture llama.cpp names "llama"
PROMPTS = ["The capital of France is", "Write a short poem about the sea and"]


@pytest.fixture(scope="module")
def tokenizer():
    from llmcompress.models import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())


def _logits(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc).logits.float()
    return out[enc["attention_mask"].bool()]


@pytest.mark.parametrize("family", arch_models.FAMILIES)
def test_family_export_loads_back(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmcompress.export import compressed_tensors as ct
    from llmcompress.export.gguf import gguf_problem, write_gguf
    from llmcompress.quant.checkpoint import load_quantized, save_quantized
    from llmcompress.quant.quantize import quantize_model

    path = arch_models.build(family, tmp_path / "float", tokenizer)

    def quantized(name: str, exclude: list[str]) -> Path:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = QuantizeConfig(method="rtn", weights=W4, activations=ActivationQuantConfig(format="none"),
                             exclude=exclude)
        quantize_model(model, cfg, tokenizer=tokenizer)
        save_quantized(model, tmp_path / name, tokenizer, "rtn", {"kv_cache": None})
        return tmp_path / name

    def loads_back(src: Path) -> None:
        out = src.with_name(src.name + "-ct")
        out.mkdir()
        ct.write(src, out)
        ours = _logits(load_quantized(src), tokenizer)
        assert torch.equal(_logits(load_quantized(out), tokenizer), ours)
        theirs = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), tokenizer)
        assert (theirs - ours).abs().max() <= 1e-3 * ours.abs().max()

    src = quantized("q", ["lm_head", "*embed*"])
    model_type = load_quantized(src).config.model_type  # gemma3's text model is "gemma3_text"
    why = ct.problem(src)
    if family in CT_REFUSED:
        assert why is not None and "\n" not in why and CT_REFUSED[family] in why, why
        assert "'model.layers.0.mlp.experts'" in why, why  # names the module
        out = tmp_path / "refused"
        out.mkdir()
        with pytest.raises(UserError, match=CT_REFUSED[family]):
            ct.write(src, out)
        assert list(out.iterdir()) == []  # nothing written
        # the nearest layout the refusal names: experts left in float, the rest exported
        assert EXCLUDE_EXPERTS in why
        loads_back(quantized("q-dense-experts", ["lm_head", "*embed*", EXCLUDE_EXPERTS]))
    else:
        assert why is None, why
        loads_back(src)

    gguf_why = gguf_problem(src, "q4_0")
    if family in GGUF_WRITTEN:
        assert gguf_why is None, gguf_why
        summary = write_gguf(src, tmp_path / "model-q4_0.gguf", "q4_0")
        assert summary and (tmp_path / "model-q4_0.gguf").stat().st_size > 0
    else:
        assert gguf_why is not None and "\n" not in gguf_why and f"model_type {model_type!r}" in gguf_why, gguf_why
        with pytest.raises(UserError):
            write_gguf(src, tmp_path / "model-q4_0.gguf", "q4_0")
        assert not (tmp_path / "model-q4_0.gguf").exists()
