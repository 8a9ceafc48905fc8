"""Helpers tests import by name (`from _shared import shared_data`); conftest.py files are not importable by
name reliably once several folders have one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the data folder the tests read (and pass explicitly to what they test): $LLMC_DATA_DIR, else ../shared/data
# beside the checkout, as in the project's own layout
SHARED_DATA = Path(os.environ.get("LLMC_DATA_DIR") or REPO.parent / "shared" / "data").expanduser()

# The one tiny random Llama of the suite, for mechanics-only tests (no download, seconds to build). Callers
# override any LlamaConfig field; these defaults give a 2-layer, width-64 model with SmolLM2's vocabulary and
# grouped-query attention (4 heads, 2 KV heads), as the embedded default has.
TINY_LLAMA = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_llama(seed: int = 0, **config):
    """A randomly initialised LlamaForCausalLM (eval mode, float32, CPU) from TINY_LLAMA updated by `config`;
    the same seed and config always give the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config})).eval()


def save_tiny_llama(path: Path, tokenizer_from: Path | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **config) -> Path:
    """tiny_llama(seed, **config) saved in `dtype` as a Hugging Face model directory, with the tokenizer of
    `tokenizer_from` (the embedded default's, for its chat template) where given."""
    from transformers import AutoTokenizer

    tiny_llama(seed, **config).to(dtype).save_pretrained(path)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return Path(path)


def shared_data(rel: str) -> Path:
    """A file of SHARED_DATA; tests that need one skip visibly where a user's clone has none."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"{p} not present (tests read real data from $LLMC_DATA_DIR, else ../shared/data)")
    return p


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported (`from _shared import one_thread`) by the conftest.py or test module whose tests should run on
    one torch thread: CI shares 2 cores between jobs, and OpenMP threads that spin-wait on a busy core run far
    slower than one thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torchrun(*args: str, cwd, nproc: int = 2):
    """`llmc ARGS` under torchrun with `nproc` CPU processes (gloo, one thread each); returns the CompletedProcess
    and the JSON summary each rank printed (--json)."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmcompress.cli", *args, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, [json.loads(line)["summary"] for line in p.stdout.splitlines() if line.startswith("{")]
