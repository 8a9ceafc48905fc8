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
