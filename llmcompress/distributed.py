"""torchrun's process group, for the stages that split their work across ranks.

Every multi-process path goes through torch.distributed: `torchrun` (python -m torch.distributed.run) starts the
processes and sets RANK / WORLD_SIZE / LOCAL_RANK; this module only joins the group it describes (NCCL on CUDA,
gloo on CPU) and names each rank's device. A single process (no torchrun) is world 1, rank 0, with no group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    world: int
    rank: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Ranks":
        """What torchrun told this process (world 1, rank 0 without it); no group is joined."""
        return cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def device(self) -> Optional[str]:
        """This rank's GPU under torchrun on CUDA; None (the model config decides) otherwise."""
        return f"cuda:{self.local_rank}" if self.world > 1 and torch.cuda.is_available() else None


@contextlib.contextmanager
def process_group():
    """Join torchrun's group for the duration of a stage (left as found if the caller already joined one)."""
    ranks = Ranks.from_env()
    own = ranks.world > 1 and not dist.is_initialized()
    if own:
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)  # object collectives on NCCL use the current device
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield ranks
    finally:
        if own:
            dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_in_order(values: list, n: int) -> list:
    """Items [0, n) computed round-robin (rank r holds items r, r + W, ...; `values` in that order) -> every
    item, in index order, on every rank: the order a single process would have produced them in."""
    w = world_size()
    if w == 1:
        return list(values)
    parts = [None] * w
    dist.all_gather_object(parts, list(values))
    return [parts[i % w][i // w] for i in range(n)]
