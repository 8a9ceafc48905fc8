"""The CUDA paths of perplexity and speed, on a small randomly initialised Llama (no download): the same numbers
as the model's own loss in bf16, CUDA timing with synchronisation, and CUDA's peak-allocation memory."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_llama():
    from _shared import tiny_llama

    return tiny_llama(vocab_size=512, hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)


class _ByteTokenizer:
    """A byte-level tokenizer: 1 token per UTF-8 byte, with offsets, enough for the perplexity protocol."""

    def __call__(self, text, return_offsets_mapping=False, verbose=False):
        data = text.encode("utf-8")
        assert len(data) == len(text)  # the test text is ASCII, so byte offsets are character offsets
        out = {"input_ids": list(data)}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(data))]
        return out


def test_perplexity_on_cuda_matches_the_models_own_loss(tiny_llama):
    from llmcompress.eval.perplexity import perplexity

    text = "the quick brown fox jumps over the lazy dog. " * 12
    r = perplexity(tiny_llama, _ByteTokenizer(), text, seq_len=64, batch_size=4)
    ids = torch.tensor(list(text.encode()), device="cuda")
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), 64):
            x = ids[begin:begin + 64][None]
            if x.shape[1] < 2:
                continue
            nll += tiny_llama(x, labels=x).loss.float().item() * (x.shape[1] - 1)
            count += x.shape[1] - 1
    assert r["tokens_scored"] == count
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-3)  # bf16 forward, fp32 reductions
    assert r["bytes"] == len(text) and r["protocol"]["seq_len"] == 64


def test_speed_on_cuda_reports_cuda_peak_memory(tiny_llama):
    from llmcompress.config import SpeedConfig
    from llmcompress.eval.speed import measure_speed

    cfg = SpeedConfig(enabled=True, prompt_lengths=[32, 128, 1024], batch_sizes=[1, 4], decode_context=16,
                      new_tokens=8, warmup=1, repeats=3)
    s = measure_speed(tiny_llama, cfg)
    assert s["device"].startswith("cuda") and s["peak_memory_kind"] == "cuda_max_allocated"
    assert s["skipped"] == ["prompt length 1024 > model context 256"]
    assert set(s["prefill"]) == {"32", "128"} and set(s["decode"]) == {"1", "4"}
    assert s["peak_memory_mb"] >= s["weights_in_memory_mb"] > 0
    assert all(v["decode_tok_s"] > 0 and v["ms_per_step"] > 0 for v in s["decode"].values())
