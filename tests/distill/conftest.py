"""Fixtures of tests/distill: one torch thread (generation on a shared 2-core CPU is many small ops, which two
threads fighting other jobs slow down badly) and a tiny random Llama teacher for mechanics-only tests."""

import pytest

from _shared import one_thread, save_tiny_llama  # noqa: F401  (autouse: every test here runs on one torch thread)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, smollm_path):
    """A random 4-layer Llama of width 32 with the real SmolLM2 tokenizer and chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), smollm_path, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                           pad_token_id=2)
