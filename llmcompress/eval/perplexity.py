"""Perplexity by the standard protocol: the whole split joined into one string, tokenized once, cut into windows.

Non-overlapping windows of `seq_len` tokens (the GPTQ / HF-docs protocol): each window's first token has no context
inside the window and is not scored, so a window of L tokens scores L-1. With a `stride` < seq_len the window slides
by `stride` tokens and scores only the tokens it adds (the HF "perplexity of fixed-length models" recipe), so every
scored token sees at least seq_len - stride tokens of context.

    token ppl      = exp(sum NLL / tokens scored)
    word ppl       = exp(sum NLL / words covered)        (lm-eval's word_perplexity)
    bits per byte  = sum NLL / (ln 2 * UTF-8 bytes covered)  (lm-eval's bits_per_byte)

NLL is in nats. Words and bytes are counted over the text the scored windows cover.

Under torchrun the window batches are dealt round-robin to the ranks; every batch's NLL is gathered and summed
in batch order, so N ranks report exactly the numbers one process does.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Optional

import torch
import torch.nn.functional as F

from ..distributed import gather_in_order, rank, world_size
from ..progress import Reporter

DEFAULT_SEQ_LEN = 2048


def model_context(model) -> Optional[int]:
    """The longest sequence the model was trained for, from its config (None if it does not say)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def keeps_logits(model) -> bool:
    """Whether forward takes `logits_to_keep` (HF causal LMs): the LM head then runs only where it is read."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def windows(n_tokens: int, seq_len: int, stride: Optional[int] = None) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window over tokens [0, n_tokens): the model sees ids[begin:end] and
    tokens first_scored..end-1 are scored. Windows that would score nothing are dropped."""
    stride = seq_len if stride is None or stride >= seq_len else stride
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)  # ids[begin] has no context in its own window
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _covered_text(text: str, tokenizer, enc, n_used: int) -> str:
    """The prefix of `text` spanned by the first n_used tokens (the whole text when nothing is cut)."""
    offsets = enc.get("offset_mapping") if hasattr(enc, "get") else None
    if offsets is not None and n_used > 0:
        return text[: offsets[n_used - 1][1]]
    return tokenizer.decode(enc["input_ids"][:n_used])


def _tokenize(tokenizer, text: str):
    try:
        return tokenizer(text, return_offsets_mapping=True, verbose=False)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return tokenizer(text, verbose=False)


def _tokenize_prefix(tokenizer, text: str, max_tokens: Optional[int]):
    """(encoding, whole text?) with at least max_tokens tokens. A quick run tokenizes a prefix of the text
    only: BPE merges never cross whitespace-separated pieces, so the first max_tokens tokens of a prefix that
    runs well past them equal those of the whole text."""
    chars = max_tokens * 8 + 4096 if max_tokens else len(text)
    while True:
        whole = chars >= len(text)
        enc = _tokenize(tokenizer, text if whole else text[:chars])
        if whole or len(enc["input_ids"]) >= max_tokens + 256:
            return enc, whole
        chars *= 2


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, seq_len: int = DEFAULT_SEQ_LEN, stride: Optional[int] = None,
               max_tokens: Optional[int] = None, batch_size: int = 1, reporter: Optional[Reporter] = None,
               dataset: str = "") -> dict:
    """Score `text` with `model`; returns token/word perplexity, bits per byte, counts and the protocol used."""
    reporter = reporter or Reporter()
    context = model_context(model)
    used_len = min(seq_len, context) if context else seq_len
    enc, whole = _tokenize_prefix(tokenizer, text, max_tokens)
    ids_all = enc["input_ids"]
    n_total = len(ids_all) if whole else None
    n_used = min(len(ids_all), max_tokens) if max_tokens else len(ids_all)
    if n_used < 2:
        raise ValueError(f"{dataset or 'text'}: {n_used} token(s); perplexity needs at least 2")
    ids = torch.tensor(ids_all[:n_used], dtype=torch.long)
    wins = windows(n_used, used_len, stride)

    device = next(model.parameters()).device
    # windows of the same shape run in one batch; in both protocols all but the last window share a shape
    groups: list[list[tuple[int, int, int]]] = []
    for w in wins:
        shape = (w[1] - w[0], w[2] - w[0])
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0],
                                                        groups[-1][0][2] - groups[-1][0][0]) == shape:
            groups[-1].append(w)
        else:
            groups.append([w])
    keep_arg = keeps_logits(model)

    mine = groups[rank()::world_size()]
    parts, nll_sum, scored = [], 0.0, 0
    for group in reporter.track(mine, total=len(mine), description="perplexity"):
        length, offset = group[0][1] - group[0][0], group[0][2] - group[0][0]
        batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        # logits at position t predict token t+1, so scoring tokens offset..length-1 needs positions offset-1..
        n_keep = length - offset + 1
        logits = model(batch, logits_to_keep=n_keep).logits if keep_arg else model(batch).logits[:, -n_keep:]
        targets = batch[:, offset:]
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="sum")
        parts.append((nll.item(), targets.numel()))
        nll_sum += parts[-1][0]
        scored += parts[-1][1]
        reporter.update(ppl=math.exp(nll_sum / scored))
    # the one-process sum, in the one-process order (float addition is not associative)
    nll_sum, scored = 0.0, 0
    for nll, n in gather_in_order(parts, len(groups)):
        nll_sum += nll
        scored += n

    covered = _covered_text(text, tokenizer, enc, wins[-1][1])
    n_words = len([w for w in re.split(r"\s+", covered) if w])
    n_bytes = len(covered.encode("utf-8"))
    return {
        "ppl": math.exp(nll_sum / scored),
        "word_ppl": math.exp(nll_sum / max(n_words, 1)),
        "bits_per_byte": nll_sum / (max(n_bytes, 1) * math.log(2)),
        "nll_mean": nll_sum / scored,
        "tokens_scored": scored,
        "words": n_words,
        "bytes": n_bytes,
        "protocol": {
            "dataset": dataset,
            "joined": "whole split as one string, tokenized once",
            "windows": "sliding" if stride and stride < used_len else "non-overlapping",
            "seq_len": used_len,
            "seq_len_requested": seq_len,
            "model_context": context,
            "stride": stride if stride and stride < used_len else used_len,
            "num_windows": len(wins),
            "tokens_in_split": n_total,
            "tokens_used": n_used,
            "max_tokens": max_tokens,
            "first_token_of_window_scored": False,
        },
    }
