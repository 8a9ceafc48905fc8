"""KV-cache quantization on a fused qkv_proj (Phi-3: [q | k | v] column blocks): the observer sees exactly the k
and v blocks, and the hook rounds exactly those blocks to the cache's grid, leaving q untouched."""

import torch

from llmcompress.quant.formats import QuantSpec, fake_quantize


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    return Phi3ForCausalLM(cfg).eval()


@torch.no_grad()
def test_fused_qkv_observer_and_hook_touch_only_the_k_and_v_blocks():
    from llmcompress.quant.kvcache import KVObserver, apply_kv_quant

    model = _phi3()
    attn = model.model.layers[0].self_attn
    q, kv, hd = 4 * 16, 2 * 16, 16
    captured = {}
    h = attn.qkv_proj.register_forward_hook(lambda m, a, out: captured.setdefault("float", out.clone()))
    ids = torch.arange(10)[None]
    obs = KVObserver(model)
    assert list(obs.modules) == ["model.layers.0.self_attn"]
    with obs.watching():
        model(ids)
    h.remove()
    y = captured["float"][0]
    for kind, block in (("k", y[:, q:q + kv]), ("v", y[:, q + kv:])):
        want = block.reshape(-1, 2, hd).abs().amax(dim=(0, 2))  # per KV head
        torch.testing.assert_close(obs.amax["model.layers.0.self_attn"][kind], want)

    scales = obs.scales("int8", "head")
    apply_kv_quant(model, "int8", "head", scales)
    got = {}
    h = attn.qkv_proj.register_forward_hook(lambda m, a, out: got.setdefault("q", out.clone()))  # after the kv hook
    model(ids)
    h.remove()
    out = got["q"][0]
    spec = QuantSpec("int8", True, "channel")
    torch.testing.assert_close(out[:, :q], y[:, :q], rtol=0, atol=0)
    for kind, sl in (("k", slice(q, q + kv)), ("v", slice(q + kv, None))):
        blk = y[:, sl].reshape(-1, 2, hd).transpose(0, 1)
        want = fake_quantize(blk, scales["model.layers.0.self_attn"][kind], None, spec).transpose(0, 1).reshape(-1, kv)
        torch.testing.assert_close(out[:, sl], want, rtol=0, atol=0)
        assert not torch.equal(out[:, sl], y[:, sl])
