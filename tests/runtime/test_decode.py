"""Static-cache decoding gives the reference's greedy tokens: on the embedded default on CPU (static cache,
eager step; and `generate` with the static cache), and on CUDA with the compiled, graph-captured step of a
W4A16 model (the path `llmc eval --speed` takes there)."""

from __future__ import annotations

import pytest
import torch

from llmcompress.runtime import StaticDecoder, eager_greedy, use_static_generate

PROMPT = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    _, tok = smollm
    ids = [tok(t)["input_ids"][:5] for t in PROMPT]  # same length: no padding to reason about
    return torch.tensor(ids)


def test_static_cache_decoding_matches_the_reference_on_the_embedded_default(smollm, prompt_ids):
    model, _ = smollm
    ref = eager_greedy(model, prompt_ids, 8)
    hf = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)[:, prompt_ids.shape[1]:]
    assert torch.equal(ref, hf)
    dec = StaticDecoder(model, batch_size=2, max_len=16)
    assert torch.equal(dec.generate(prompt_ids, 8), ref)
    # a second generation on the same decoder resets the cache: a shorter prompt decodes from its own start
    assert torch.equal(dec.generate(prompt_ids[:, :3], 8), eager_greedy(model, prompt_ids[:, :3], 8))


def test_static_decoder_refuses_what_its_cache_cannot_hold(smollm, prompt_ids):
    model, _ = smollm
    dec = StaticDecoder(model, batch_size=2, max_len=7)
    with pytest.raises(ValueError, match="batch 2"):
        dec.prefill(prompt_ids[:1])
    dec.prefill(prompt_ids)
    dec.step(), dec.step()
    with pytest.raises(ValueError, match="full"):
        dec.step()
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, 1, 8, cuda_graph=True)


def test_generate_with_the_static_cache_matches_the_reference(smollm, prompt_ids):
    import copy

    model = copy.copy(smollm[0])  # shallow: shares the weights, not the generation config
    model.generation_config = copy.deepcopy(model.generation_config)
    use_static_generate(model)
    out = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)[:, prompt_ids.shape[1]:]
    assert torch.equal(out, eager_greedy(smollm[0], prompt_ids, 8))


def _near_argmax(model, ids: torch.Tensor, tokens: torch.Tensor, rel_tol: float) -> bool:
    """Whether every decoded token is an argmax of the reference's logits up to rounding: the prompt plus the
    decoded tokens go through one eager forward, and each chosen logit must lie within rel_tol (of the largest
    logit magnitude) of that position's maximum. A wrong cache or position gives tokens far from the argmax."""
    seq = torch.cat([ids, tokens], dim=1)
    logits = model(seq).logits[:, ids.shape[1] - 1:-1].float()
    gap = logits.max(-1).values - logits.gather(-1, tokens[..., None])[..., 0]
    return bool((gap <= rel_tol * logits.abs().max()).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["fp32", "bf16", "w4a16"])
def test_compiled_graph_decoding_matches_eager_on_cuda(scheme):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmcompress.config import QuantizeConfig, load_config
    from llmcompress.quant.quantize import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2)
    dtype = torch.float32 if scheme == "fp32" else torch.bfloat16
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    if scheme == "w4a16":
        quantize_model(model, load_config(QuantizeConfig, None, [
            "weights.format=int4", "weights.granularity=group", "weights.group_size=128",
            "activations.format=none"]))
    ids = torch.randint(0, 512, (2, 9), device="cuda")
    dec = StaticDecoder.for_device(model, batch_size=2, max_len=32)
    assert dec.cuda_graph
    out = dec.generate(ids, 16)
    again = dec.generate(ids[:, :4], 16)  # the graph replayed after a new prefill
    use_static_generate(model)  # what load_quantized sets on CUDA: transformers compiles the decode forward
    hf = model.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:]
    with torch.no_grad():
        if scheme == "fp32":  # fused and unfused fp32 kernels differ by far less than any logit gap here
            assert torch.equal(out, eager_greedy(model, ids, 16))
            assert torch.equal(again, eager_greedy(model, ids[:, :4], 16))
            assert torch.equal(hf, out)
        # in bf16 a fused kernel may round a near-tie the other way, after which the sequences part
        for prompt, toks in ((ids, out), (ids[:, :4], again), (ids, hf)):
            assert _near_argmax(model, prompt, toks, rel_tol=0.02)
