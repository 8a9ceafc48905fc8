"""Perplexity against an independent computation: the model's own loss (labels=input_ids), window by window."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _shared import one_thread  # noqa: F401  (autouse: every test here runs on one torch thread)
from llmcompress.data import load_text
from llmcompress.eval.perplexity import perplexity, windows


@pytest.fixture(scope="module")
def wikitext_ids(smollm):
    _, tok = smollm
    text = load_text("builtin:wikitext2_test")
    return text, tok(text[:20000])["input_ids"]


@given(n=st.integers(2, 400), seq_len=st.integers(2, 64), stride=st.one_of(st.none(), st.integers(1, 80)))
@settings(max_examples=200, deadline=None)
def test_windows_score_every_token_but_the_first_exactly_once(n, seq_len, stride):
    scored = []
    for begin, end, first in windows(n, seq_len, stride):
        assert end - begin <= seq_len and begin < first < end + 1
        scored += range(first, end)
    if stride is None or stride >= seq_len:
        # non-overlapping: the first token of every window is context only
        assert scored == [t for t in range(n) if t % seq_len != 0]
    else:
        assert scored == list(range(1, n))


def test_ppl_equals_exp_mean_nll_of_the_models_own_loss(smollm, wikitext_ids):
    model, tok = smollm
    text, ids = wikitext_ids
    seq_len, max_tokens = 64, 300  # 4 full windows and a ragged last one; batch 2 pads nothing (equal shapes)
    r = perplexity(model, tok, text, seq_len=seq_len, max_tokens=max_tokens, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, max_tokens, seq_len):
            x = torch.tensor([ids[begin:min(begin + seq_len, max_tokens)]])
            loss = model(x, labels=x).loss.item()  # mean over the window's len-1 predicted tokens
            nll += loss * (x.shape[1] - 1)
            count += x.shape[1] - 1
    assert r["tokens_scored"] == count == max_tokens - 5
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert r["protocol"]["windows"] == "non-overlapping" and r["protocol"]["num_windows"] == 5
    assert r["bits_per_byte"] * math.log(2) * r["bytes"] == pytest.approx(nll, rel=1e-5)


def test_sliding_window_scores_only_new_tokens(smollm, wikitext_ids):
    model, tok = smollm
    text, ids = wikitext_ids
    seq_len, stride, n = 48, 16, 120
    r = perplexity(model, tok, text, seq_len=seq_len, stride=stride, max_tokens=n, batch_size=3)
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + seq_len, n)
            x = torch.tensor([ids[begin:end]])
            labels = x.clone()
            labels[0, :max(prev_end - begin, 0)] = -100  # already scored by an earlier window
            k = int((labels[0, 1:] != -100).sum())
            nll += model(x, labels=labels).loss.item() * k
            count += k
            prev_end = end
            if end == n:
                break
    assert r["tokens_scored"] == count == n - 1
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert r["protocol"]["windows"] == "sliding" and r["protocol"]["stride"] == stride


def test_word_and_byte_counts_cover_the_scored_text(smollm, tmp_path):
    model, tok = smollm
    text = "The cat sat on the mat .\n\n Then it sat on the hat , and the hat was flat ."
    path = tmp_path / "small.txt"
    path.write_text(text)
    r = perplexity(model, tok, load_text(str(path)), seq_len=2048)
    assert r["words"] == len(text.split()) and r["bytes"] == len(text.encode())
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll_mean"] * r["tokens_scored"] / r["words"]))
    assert r["protocol"]["tokens_in_split"] == r["tokens_scored"] + 1
    assert r["protocol"]["seq_len"] == 2048 and r["protocol"]["model_context"] == 8192


def test_seq_len_is_capped_at_the_model_context(smollm, wikitext_ids):
    model, tok = smollm
    r = perplexity(model, tok, wikitext_ids[0], seq_len=100000, max_tokens=64)
    assert r["protocol"]["seq_len"] == 8192 and r["protocol"]["seq_len_requested"] == 100000
