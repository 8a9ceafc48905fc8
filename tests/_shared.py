"""Helpers tests import by name (`from _shared import shared_data`); conftest.py files are not importable by
name reliably once several folders have one."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(rel: str) -> Path:
    """A file of ../shared/data; tests that need one skip visibly where a user's clone has none."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"../shared/data/{rel} not present (tests read real data from ../shared beside the repo)")
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
