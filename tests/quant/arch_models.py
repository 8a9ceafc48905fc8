"""Tiny random-weight models of each supported family, built from transformers' config classes (no hub), saved
as local directories with the embedded default's tokenizer (its vocabulary sizes the embeddings).

`build(family, root)` -> the model directory; FAMILIES names them. Dimensions are the smallest that keep each
family's distinctive structure: grouped-query attention (4 query heads, 2 KV heads), head_dim 16, two decoder
layers, MoE with 4 experts and top-2 routing (Qwen3-MoE's second layer dense, as `mlp_only_layers` makes it); hidden 64 so int4 groups of 32 split every row in two.
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 128, 4, 2, 16, 2
EXPERTS, TOP_K, EXPERT_INTER = 4, 2, 64

_COMMON = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, max_position_embeddings=256, tie_word_embeddings=True)


def _configs(vocab: int, bos: int, eos: int, pad: int) -> dict:
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    c = {**_COMMON, **ids}
    return {
        "llama": lambda: tf.LlamaConfig(**c, head_dim=HEAD_DIM),
        "mistral": lambda: tf.MistralConfig(**c, head_dim=HEAD_DIM, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**c),  # q/k/v with bias
        "qwen3": lambda: tf.Qwen3Config(**c, head_dim=HEAD_DIM),  # q_norm / k_norm
        "gemma2": lambda: tf.Gemma2Config(**c, head_dim=HEAD_DIM, sliding_window=16, query_pre_attn_scalar=16,
                                          final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
        "gemma3": lambda: tf.Gemma3TextConfig(**c, head_dim=HEAD_DIM, sliding_window=16,
                                              query_pre_attn_scalar=16),
        "phi3": lambda: tf.Phi3Config(**c),  # fused qkv_proj and gate_up_proj
        "olmo2": lambda: tf.Olmo2Config(**c),  # post-norms, q/k norms over all heads
        # no architecture entry: the generic per-Linear path (LayerNorm with bias; MLP c_fc / c_proj)
        "starcoder2": lambda: tf.Starcoder2Config(**c),
        "mixtral": lambda: tf.MixtralConfig(**{**c, "intermediate_size": EXPERT_INTER}, head_dim=HEAD_DIM,
                                            num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**c, head_dim=HEAD_DIM, num_experts=EXPERTS,
                                               num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_INTER,
                                               norm_topk_prob=True, decoder_sparse_step=1,
                                               mlp_only_layers=[1]),  # layer 1: a dense MLP of Linears
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe",
            "starcoder2")
MOE = ("mixtral", "qwen3_moe")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.1²); norm weights around their identity (1, or 0 for Gemma's 1 + w) with a ±0.3 spread, so
    a scale folded into a norm is visible; biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                base = 0.0 if type(model).__name__.startswith("Gemma") else 1.0
                p.copy_(base + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif "embed" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5 * (2.0 if "gate.weight" in name else 1.0))


def build(family: str, root: Path, tokenizer, seed: int = 0) -> Path:
    """Save a tiny random `family` model (float32) and `tokenizer` under root/family; returns that directory."""
    from transformers import AutoModelForCausalLM

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = _configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, pad)[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed)
    out = Path(root) / family
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
