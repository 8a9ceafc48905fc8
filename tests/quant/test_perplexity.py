"""Perplexity of RTN-quantized SmolLM2-135M on the first 4 windows of 2,048 tokens of WikiText-2 test (8,192
tokens), against the unquantized model on the same windows. Reproduce the numbers with
`pytest tests/quant/test_perplexity.py -s` (each test prints its number)."""

import copy

import pytest

from llmcompress.config import ActivationQuantConfig, QuantizeConfig, WeightQuantConfig
from llmcompress.eval.perplexity import perplexity
from llmcompress.quant.quantize import quantize_model
from llmcompress.data import load_text

pytestmark = pytest.mark.slow
TOKENS = 4 * 2048


@pytest.fixture(scope="module")
def text():
    return load_text("builtin:wikitext2_test")  # byte-identical to ../shared/data/wikitext-2-raw/test.txt


@pytest.fixture(scope="module")
def base_ppl(smollm, text):
    model, tok = smollm
    return perplexity(model, tok, text, seq_len=2048, max_tokens=TOKENS)["ppl"]


def quantized_ppl(smollm, text, weights, activations):
    model, tok = smollm
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, QuantizeConfig(weights=weights, activations=activations))
    return perplexity(qmodel, tok, text, seq_len=2048, max_tokens=TOKENS)["ppl"]


def test_w8_per_channel_weight_only_within_half_percent(smollm, text, base_ppl, record_property):
    ppl = quantized_ppl(smollm, text, WeightQuantConfig(format="int8", granularity="channel"),
                        ActivationQuantConfig(format="none"))
    record_property("ppl", {"base": base_ppl, "w8": ppl})
    print(f"W8 per-channel: {ppl:.3f} vs unquantized {base_ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}%)")
    assert ppl <= base_ppl * 1.005, (base_ppl, ppl)


def test_w8a8_dynamic_per_token_within_four_percent(smollm, text, base_ppl, record_property):
    ppl = quantized_ppl(smollm, text, WeightQuantConfig(format="int8", granularity="channel"),
                        ActivationQuantConfig(format="int8", dynamic=True))
    record_property("ppl", {"base": base_ppl, "w8a8": ppl})
    print(f"W8A8 dynamic: {ppl:.3f} vs unquantized {base_ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}%)")
    assert ppl <= base_ppl * 1.04, (base_ppl, ppl)


def test_w4_group64_symmetric_is_reported(smollm, text, base_ppl, record_property):
    ppl = quantized_ppl(smollm, text, WeightQuantConfig(format="int4", granularity="group", group_size=64),
                        ActivationQuantConfig(format="none"))
    record_property("ppl", {"base": base_ppl, "w4g64": ppl})
    print(f"W4 g64 sym RTN: {ppl:.3f} vs unquantized {base_ppl:.3f} ({100 * (ppl / base_ppl - 1):+.1f}%)")
    assert base_ppl < ppl < base_ppl * 2  # RTN at 4 bits costs something, but the model must not break
