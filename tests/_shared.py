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
