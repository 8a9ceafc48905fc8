import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # CI shares 2 cores between jobs: OpenMP threads spin-waiting on a busy core run far slower than one thread
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
