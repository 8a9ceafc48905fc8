"""Speed, memory and size: time to first token and prefill throughput per prompt length, decode tokens/s and
per-step latency per batch size, peak memory, weights on disk.

How it times: a fixed random prompt (token ids drawn with a seeded generator: content does not change the work a
dense model does), `warmup` untimed runs, then `repeats` timed runs; the median is reported. On CUDA every timed
region ends with a synchronize. TTFT is one forward pass over the prompt plus the argmax of the last position
(the first generated token). Decode prefills `decode_context` tokens untimed, then times `new_tokens` greedy steps
with the KV cache, the way the model is served on its device (llmcompress.runtime): on CUDA a static cache and a
torch.compile'd step replayed as a CUDA graph (compiled and captured before timing), elsewhere the model's own
forward per token with the dynamic cache. Peak memory is CUDA's max allocated bytes over the measurements, or on CPU the highest
resident set size sampled (every 2 ms) while they run, so it includes the weights already in memory.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import SpeedConfig
from ..progress import Reporter
from ..runtime import StaticDecoder
from .perplexity import keeps_logits, model_context

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def checkpoint_size_bytes(path) -> Optional[int]:
    """Bytes of weight files of a local model directory or file (None for a hub id with no local path)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    files = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    return sum(f.stat().st_size for f in files) if files else None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


try:
    import os as _os

    _PAGE = _os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):  # not Linux
    _PAGE = 4096


class PeakMemory:
    """Peak memory over a `with` block: CUDA max allocated, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                self.peak = _rss_bytes()
            except OSError:  # no /proc: peak unknown
                self.peak = -1
                return self
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.peak >= 0:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def _timed(fn: Callable[[], float], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup`; fn returns its own timed span."""
    for _ in range(warmup):
        fn()
    return statistics.median(fn() for _ in range(repeats))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, cfg: SpeedConfig, *, seed: int = 0, reporter: Optional[Reporter] = None) -> dict:
    """TTFT / prefill tokens/s per prompt length, decode tokens/s and ms per step per batch size, peak memory."""
    reporter = reporter or Reporter()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    context = model_context(model) or max(cfg.prompt_lengths)
    gen = torch.Generator().manual_seed(seed)
    last_only = {"logits_to_keep": 1} if keeps_logits(model) else {}

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), generator=gen).to(device)

    prefill, decode, skipped = {}, {}, []
    jobs = [("prefill", n) for n in cfg.prompt_lengths] + [("decode", b) for b in cfg.batch_sizes]
    with PeakMemory(device) as mem:
        for kind, n in reporter.track(jobs, total=len(jobs), description="speed"):
            if kind == "prefill":
                if n > context:
                    skipped.append(f"prompt length {n} > model context {context}")
                    continue
                ids = prompt(1, n)

                def ttft() -> float:
                    _sync(device)
                    t0 = time.perf_counter()
                    model(ids, use_cache=True, **last_only).logits[:, -1].argmax(-1).tolist()
                    return time.perf_counter() - t0

                t = _timed(ttft, device, cfg.warmup, cfg.repeats)
                prefill[n] = {"ttft_ms": t * 1e3, "prefill_tok_s": n / t}
                reporter.update(**{f"ttft@{n}_ms": t * 1e3})
            else:
                if cfg.decode_context + cfg.new_tokens > context:
                    skipped.append(f"decode_context + new_tokens > model context {context}")
                    continue
                ids = prompt(n, cfg.decode_context)
                if device.type == "cuda":
                    steps = _static_steps(model, ids, cfg.new_tokens)
                    t = _timed(steps, device, cfg.warmup, cfg.repeats)
                    decode[n] = {"decode_tok_s": n * cfg.new_tokens / t, "ms_per_step": t / cfg.new_tokens * 1e3}
                    reporter.update(**{f"decode@b{n}_tok_s": n * cfg.new_tokens / t})
                    continue

                def steps() -> float:
                    out = model(ids, use_cache=True, **last_only)
                    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(cfg.new_tokens):
                        out = model(nxt, past_key_values=past, use_cache=True)
                        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    nxt.tolist()  # waits for the device
                    return time.perf_counter() - t0

                t = _timed(steps, device, cfg.warmup, cfg.repeats)
                decode[n] = {"decode_tok_s": n * cfg.new_tokens / t, "ms_per_step": t / cfg.new_tokens * 1e3}
                reporter.update(**{f"decode@b{n}_tok_s": n * cfg.new_tokens / t})
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "prefill": {str(k): v for k, v in prefill.items()},
        "decode": {str(k): v for k, v in decode.items()},
        "peak_memory_mb": mem.peak / 2**20 if mem.peak >= 0 else None,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss_sampled",
        "weights_in_memory_mb": weights / 2**20,
        "skipped": skipped,
        "protocol": {"warmup": cfg.warmup, "repeats": cfg.repeats, "statistic": "median",
                     "decode_context": cfg.decode_context, "new_tokens": cfg.new_tokens,
                     "prompt": "seeded random token ids",
                     "decode": "greedy; static KV cache, compiled step in a CUDA graph" if device.type == "cuda"
                     else "greedy; dynamic KV cache, eager forward per token"},
    }


def _static_steps(model, ids: torch.Tensor, new_tokens: int) -> Callable[[], float]:
    """A timed run of `new_tokens` steps of the CUDA decoder, compiled and captured here, before any timing."""
    dec = StaticDecoder.for_device(model, ids.shape[0], ids.shape[1] + new_tokens + 2)
    dec.prefill(ids), dec.step()

    def steps() -> float:
        dec.prefill(ids)
        _sync(ids.device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            dec.step()
        dec.tok.tolist()  # waits for the device
        return time.perf_counter() - t0

    return steps
