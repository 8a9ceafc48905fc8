"""Every test of tests/quant runs on one torch thread (see _shared.one_thread). arch_tokenizer / arch_model:
the tiny models of each architecture family (arch_models.py), built once per session."""

import pytest
import torch

from _shared import one_thread  # noqa: F401  (autouse: every test here runs on one torch thread)


@pytest.fixture(scope="session")
def arch_tokenizer():
    from llmcompress.models import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())


@pytest.fixture(scope="session")
def arch_model(tmp_path_factory, arch_tokenizer):
    """family -> (the saved tiny model's directory, the float model loaded from it): built once per session;
    tests deep-copy the model (loading a tokenizer costs seconds, so the session's one is shared)."""
    from transformers import AutoModelForCausalLM

    import arch_models

    root, built = tmp_path_factory.mktemp("arch"), {}

    def get(family: str):
        if family not in built:
            path = arch_models.build(family, root, arch_tokenizer)
            built[family] = path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return built[family]
    return get
