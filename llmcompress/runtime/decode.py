"""Greedy decoding with a static KV cache: the gpt-fast recipe on a Hugging Face causal LM.

A decode step at batch 1 reads every weight once and does little arithmetic, so besides the GEMMs its time goes
to the dozens of small kernels around them (norms, rotary, residual adds, cache writes, attention) and to
launching them. Three things remove most of that:
  1. a static KV cache (preallocated [batch, heads, max_len, head_dim] per layer, written in place), so every
     step has the same shapes and the same addresses;
  2. torch.compile of the step, so inductor fuses the elementwise work into a few kernels (our torch.ops.llmc
     GEMMs stay opaque calls, traced through their fake kernels in kernels/ops.py);
  3. a CUDA graph of the compiled step, so a whole step is one launch.
Prefill runs eagerly over the prompt (its length varies; its kernels are large). `eager_greedy` is the
reference: the model's own forward per token with the dynamic cache, on any device.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..eval.perplexity import keeps_logits


@torch.no_grad()
def eager_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference: [B, new_tokens] greedy tokens from the model's forward per token, dynamic KV cache."""
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    return torch.cat(tokens, dim=1)


class StaticDecoder:
    """Greedy decoding of `batch_size` sequences of at most `max_len` tokens (prompt included).

    compile: torch.compile the decode step. cuda_graph: capture the step once (after a warm-up that also
    compiles it) and replay it; CUDA only. `StaticDecoder.for_device` picks both for a device.
    """

    def __init__(self, model, batch_size: int, max_len: int, *, compile: bool = False, cuda_graph: bool = False):
        from transformers import StaticCache

        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        self.device = next(model.parameters()).device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA model, this one is on {self.device}")
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # the step's input and output
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # its position (cache_position)
        self.length = 0  # tokens in the cache, host side
        self._step = torch.compile(self._forward_step, dynamic=False) if compile else self._forward_step
        self.cuda_graph = cuda_graph
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._last_only = {"logits_to_keep": 1} if keeps_logits(model) else {}

    @classmethod
    def for_device(cls, model, batch_size: int, max_len: int) -> "StaticDecoder":
        """The default path: compiled and graph-captured on CUDA; on other devices the static cache alone
        (eager decoding stays the CPU default: compiling costs more than short generations gain there)."""
        cuda = next(model.parameters()).device.type == "cuda"
        return cls(model, batch_size, max_len, compile=cuda, cuda_graph=cuda)

    def _forward_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tok, past_key_values=self.cache, cache_position=pos, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    def _set_length(self, n: int) -> None:
        # Each static layer writes at its own counter (transformers 5.x), cache_position only places rotary
        # and the mask: the two must agree.
        self.pos.fill_(n)
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(n)
        self.length = n

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache, run the prompt [batch_size, L], return the first new token [batch_size, 1]."""
        b, n = ids.shape
        if b != self.batch_size or n >= self.max_len:
            raise ValueError(f"prompt {tuple(ids.shape)} does not fit a decoder of batch {self.batch_size} and "
                             f"max_len {self.max_len}")
        self._set_length(0)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                         cache_position=torch.arange(n, device=self.device), **self._last_only)
        self.tok.copy_(out.logits[:, -1:].argmax(-1))
        self._set_length(n)
        return self.tok.clone()

    def _advance(self) -> None:
        self.tok.copy_(self._step(self.tok, self.pos))
        self.pos.add_(1)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed the last token, return the next [batch_size, 1] (a view of a buffer the next step overwrites)."""
        if self.length >= self.max_len:
            raise ValueError(f"the static cache is full ({self.max_len} tokens)")
        if self.cuda_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        else:
            self._advance()
        self.length += 1
        return self.tok

    def _capture(self) -> None:
        # Warm-up on a side stream (compiles, autotunes, creates handles), then put the state back: the warm-up
        # steps wrote cache rows past `length`, which the causal mask hides until real steps overwrite them.
        n, tok = self.length, self.tok.clone()
        if n + 2 > self.max_len:
            raise ValueError(f"capturing the step needs 2 free cache rows, {self.max_len - n} left")
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._advance()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._set_length(n)
        self.tok.copy_(tok)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._advance()
        self._graph = graph

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """[batch_size, new_tokens] greedy tokens after the prompt `ids`."""
        tokens = [self.prefill(ids)]
        for _ in range(new_tokens - 1):
            tokens.append(self.step().clone())
        return torch.cat(tokens, dim=1)


def use_static_generate(model) -> None:
    """Make `model.generate` decode with a static cache. On CUDA, transformers then compiles the decode forward
    and replays it as CUDA graphs (its `compile_config`, mode reduce-overhead); elsewhere it stays eager."""
    model.generation_config.cache_implementation = "static"
