"""Shared fixtures. The embedded default model is converted once per cache (LLMC_CACHE, default
~/.cache/llmcompress) and loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from _shared import REPO, SHARED_DATA, shared_data  # noqa: F401  (re-exported for older imports)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The dense safetensors directory of SmolLM2-135M-Instruct (converted from its GGUF on first use)."""
    from llmcompress.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """(model, tokenizer) of the embedded default, float32 on CPU, eval mode. Do not modify it in place:
    tests that change weights must deep-copy it or load their own."""
    from llmcompress.models import load_model

    model, tok = load_model(str(smollm_path), device="cpu", dtype="float32")
    return model, tok


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """Run inside a temporary directory so default outputs (runs/...) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def llmc():
    """`llmc(*args, cwd=..., env=...)` runs the real CLI in a subprocess and returns the CompletedProcess."""
    import subprocess
    import sys

    def run(*args: str, cwd=None, env=None, timeout=900):
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "llmcompress.cli", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
