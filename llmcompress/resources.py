"""Memory: estimate what a stage needs before it starts, refuse a run that cannot fit, report the peak.

The estimate is deliberately simple and documented: the model's weights at the load dtype, plus the
activations of one decoder layer for one batch (the stages that matter work layer by layer), plus attention
scores. It errs high by ~20% so a refusal means a real risk of an out-of-memory kill halfway through.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Optional

from .errors import UserError

GiB = 1024 ** 3


def available_bytes() -> int:
    """Memory this process may still use: LLMC_MAX_MEMORY_GB if set, else min(MemAvailable, cgroup room)."""
    env = os.environ.get("LLMC_MAX_MEMORY_GB")
    if env:
        try:
            return int(float(env) * GiB)
        except ValueError:
            raise UserError(f"LLMC_MAX_MEMORY_GB: expected a number of GiB, got {env!r}") from None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - usage
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 1 << 62


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def weights_bytes(model_dir: Path, bytes_per_param: int) -> Optional[int]:
    """Parameter count from safetensors headers (no tensor is read) times the load dtype's width."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise UserError(f"{f}: not a safetensors file (bad header length)")
            try:
                header = json.loads(fh.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{f}: safetensors header is corrupt") from None
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta.get("shape", []):
                count *= d
            n += count
    return n * bytes_per_param


def activation_bytes(model_dir: Path, batch: int, seq_len: int, bytes_per_act: int = 4) -> int:
    """One decoder layer's live activations for one batch: hidden states, the MLP's three intermediates,
    q/k/v, and one head-group of attention scores (eager attention materialises batch·heads·seq² floats)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    hidden = cfg.get("hidden_size", 0)
    inter = cfg.get("intermediate_size", 4 * hidden)
    heads = cfg.get("num_attention_heads", 1)
    vocab = cfg.get("vocab_size", 0)
    tokens = batch * seq_len
    per_layer = tokens * (8 * hidden + 3 * inter) * bytes_per_act
    scores = batch * heads * seq_len * seq_len * bytes_per_act
    logits = tokens * vocab * bytes_per_act  # the LM head's output when a stage needs logits
    return per_layer + scores + logits


def check_fits(need: int, what: str) -> None:
    have = available_bytes()
    if need > have:
        raise UserError(f"{what}: needs about {need / GiB:.2f} GiB but only {have / GiB:.2f} GiB is available "
                        f"(estimate: weights + one layer's activations; set LLMC_MAX_MEMORY_GB to change the limit)")
