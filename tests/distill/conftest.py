"""Fixtures of tests/distill: one torch thread (generation on a shared 2-core CPU is many small ops, which two
threads fighting other jobs slow down badly) and a tiny random Llama teacher for mechanics-only tests."""

import pytest
import torch

from _shared import one_thread  # noqa: F401  (autouse: every test here runs on one torch thread)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, smollm_path):
    """A random 4-layer Llama of width 32 with the real SmolLM2 tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_teacher")
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=2)).save_pretrained(d)
    AutoTokenizer.from_pretrained(smollm_path).save_pretrained(d)
    return d
