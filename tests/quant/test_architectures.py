"""architectures.py: every family's groups place each Linear of a decoder layer exactly once, with producers whose
output really is the consumers' input; unknown architectures take the generic per-Linear path or are refused in
one line, never skipped."""

import copy

import pytest
import torch
from torch import nn

from llmcompress.config import QuantizeConfig, load_config
from llmcompress.errors import UserError
from llmcompress.quant.architectures import GENERIC, architecture, place
from llmcompress.quant.qlinear import QuantLinear
from llmcompress.quant.quantize import quantize_model

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)


def _family(name):
    import transformers as t

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2",
           "phi3": "Phi3", "olmo2": "Olmo2"}[name]
    extra = {"pad_token_id": 0} if name == "phi3" else {}
    torch.manual_seed(0)
    return getattr(t, f"{cls}ForCausalLM")(getattr(t, f"{cls}Config")(**SMALL, **extra)).eval()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2"])
@torch.no_grad()
def test_each_family_places_every_linear_once_behind_its_real_producer(name):
    model = _family(name)
    arch = architecture(model)
    assert arch is not GENERIC
    layer = model.model.layers[0]
    linears = {f"model.layers.0.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups = place(layer, "model.layers.0", linears, arch)
    placed = [c for g in groups for c in g.consumers]
    assert sorted(placed) == sorted(n[len("model.layers.0."):] for n in linears)  # each exactly once
    assert all(g.producer is not None or g.name in ("o", "down", "qkv", "gate_up") for g in groups)
    # the producer's output is the consumers' input: hook both on one forward of the whole model
    seen = {}
    hooks = [layer.get_submodule(g.producer).register_forward_hook(
                 lambda m, a, out, k=g.name: seen.__setitem__(("p", k), out))
             for g in groups if g.producer is not None]
    hooks += [layer.get_submodule(g.consumers[0]).register_forward_pre_hook(
                  lambda m, a, k=g.name: seen.__setitem__(("c", k), a[0]))
              for g in groups if g.producer is not None]
    model(torch.arange(12)[None])
    for h in hooks:
        h.remove()
    for g in groups:
        if g.producer is None:
            continue
        p, c = seen[("p", g.name)], seen[("c", g.name)]
        if g.name == "down":  # act(gate) ⊙ up: the scale folded into up's rows reaches down's input column-wise
            continue
        if g.name == "o":  # attention output: v's channels, mixed over tokens and repeated over query heads
            continue
        torch.testing.assert_close(p, c)


def test_unknown_architecture_takes_the_generic_path_or_is_refused(smollm_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmcompress.models import load_tokenizer

    tok = load_tokenizer(smollm_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": len(tok)})).eval()
    model.config.model_type = "mystery"
    calib = ["data.num_samples=4", "data.max_length=24", "batch_size=4", "weights.format=int4",
             "weights.granularity=group", "weights.group_size=16", "activations.format=none"]
    m = copy.deepcopy(model)
    rows = quantize_model(m, load_config(QuantizeConfig, overrides=calib + ["method=gptq"]), None, None, tok)
    assert len(rows) == 7 and sum(isinstance(x, QuantLinear) for x in m.modules()) == 7
    for bad, msg in ((["method=awq"], "method: awq .* no architecture mapping for model_type 'mystery'"),
                     (["method=rtn", "smoothquant.enabled=true"], "smoothquant.enabled: no architecture mapping"),
                     (["method=rtn", "kv_cache.format=int8"], "kv_cache.format: no architecture mapping"),
                     (["method=gptq", "include=[model.layers.*,lm_head]", "exclude=[]"], "lm_head lies outside")):
        with pytest.raises(UserError, match=msg):
            quantize_model(copy.deepcopy(model), load_config(QuantizeConfig, overrides=calib + bad), None, None, tok)
