"""FP8 E4M3 W8A8 (llmcompress/quant/fp8.py): both paths against a float64 product of the same fp8 operands, the
path each device and shape takes, and an FP8-quantized embedded default that still scores like the original.

The CUDA tests need a GPU of compute capability >= 8.9 (torch._scaled_mm with row-wise scales); elsewhere they
are skipped with the reason shown by `pytest -ra`."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from _shared import one_thread  # noqa: F401  (autouse: this module runs on one torch thread)
from llmcompress.config import ActivationQuantConfig, QuantizeConfig, WeightQuantConfig
from llmcompress.quant import fp8
from llmcompress.quant.fp8 import Fp8Plan, fp8_linear, quantize_activations
from llmcompress.quant.qlinear import QuantLinear

CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY
needs_fp8_gpu = pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU of compute capability >= 8.9 "
                                                        "(torch._scaled_mm fp8); run on an H100")

M_VALUES = [1, 3, 17, 129]
# (K, N): aligned (the fast path's shapes) and ragged ones (K or N not a multiple of 16: the reference path)
ALIGNED = [(64, 48), (576, 192)]
RAGGED = [(17, 40), (48, 50), (100, 36)]
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _operands(m, k, n, dtype, device="cpu", seed=0):
    """x with a few loud channels (as LLM activations have), an fp8 weight with per-channel scales, a bias as
    large as the outputs (so a dropped or doubled bias cannot hide inside the tolerance)."""
    g = torch.Generator().manual_seed(seed + 7 * m + k + n)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: max(1, k // 16)]] *= 30.0
    w = torch.randn(n, k, generator=g) * 0.05
    w_scale = w.abs().amax(dim=1) / fp8.FP8_MAX
    w_q = torch.clamp(w / w_scale[:, None], -fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE)
    bias = torch.randn(n, generator=g) * float(x.abs().mean() * 0.05 * k ** 0.5)
    to = lambda t: t.to(device)  # noqa: E731
    return to(x.to(dtype)), to(w_q), to(w_scale), to(bias.to(dtype))


def _check_against_float64(y, q, s, w_q, w_scale, bias, dtype, accum_bits=None):
    """y must equal (s·q)(w_s·w_q)ᵀ + b computed in float64 from the same codes, up to: rounding each operand and
    the output to `dtype` (errors ~eps each, random signs: they grow with the l2 norm of the products, not the
    sum); fp32 accumulation (~sqrt(K) roundings of partial sums bounded by Σ|products|); and, for reduced-
    precision accumulation (fast accum), accum_bits of mantissa per 32-deep k block, truncated (so linear in K)."""
    xd = q.double() * s.double()
    wd = w_q.double() * w_scale.double().reshape(-1, 1)
    y64 = xd @ wd.t() + (0.0 if bias is None else bias.double())
    l2 = ((xd ** 2) @ (wd ** 2).t()).sqrt()
    abs_sum = xd.abs() @ wd.abs().t()
    k = q.shape[1]
    tol = 4 * EPS[dtype] * (l2 + y64.abs()) + 4 * math.sqrt(k) * 2.0 ** -24 * abs_sum + 1e-30
    if accum_bits is not None:
        tol = tol + math.ceil(k / 32) * 2.0 ** -accum_bits * abs_sum
    err = (y.double() - y64).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds tolerance (worst error/tolerance {worst:.2f})"
    assert y.dtype == dtype and y.shape == y64.shape


# ------------------------------------------------------------------------------------------ activations

def test_dynamic_activations_are_per_token_e4m3():
    x = torch.randn(5, 64, dtype=torch.float64).float() * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0]).reshape(5, 1)
    q, s = quantize_activations(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1) and s.dtype == torch.float32
    amax = x.abs().amax(dim=1)
    torch.testing.assert_close(s[:4, 0], amax[:4] / 448.0)
    assert s[4, 0] == 1.0 and (q[4].float() == 0).all()  # an all-zero row: scale 1, exact zeros
    # the row's largest magnitude lands on the top code, and every value rounds to E4M3 (3 mantissa bits):
    # relative error <= 2^-4 for values in the normal range (>= 2^-6 times the scale)
    assert (q[:4].float().abs().amax(dim=1) == 448.0).all()
    deq = q.float() * s
    normal = (x / s).abs() >= 2.0 ** -6
    rel = ((deq - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert rel.max() <= 2.0 ** -4


def test_static_activations_saturate_instead_of_overflowing():
    x = torch.tensor([[1000.0, -1000.0, 448.0, 1.0, 0.0, 1e6]])
    q, s = quantize_activations(x, torch.tensor(1.0))
    assert q.float().tolist() == [[448.0, -448.0, 448.0, 1.0, 0.0, 448.0]]  # never NaN (e4m3fn has no inf)
    assert s.shape == (1, 1)
    q3, s3 = quantize_activations(x.expand(3, 6), torch.tensor(2.0))
    assert s3.shape == (3, 1) and s3.is_contiguous() and (s3 == 2.0).all()  # _scaled_mm's scale_a layout


# ------------------------------------------------------------------------------------------ the reference path

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kn", ALIGNED + RAGGED)
@pytest.mark.parametrize("m", M_VALUES)
def test_reference_path_matches_float64(m, kn, dtype):
    k, n = kn
    x, w_q, w_scale, bias = _operands(m, k, n, dtype)
    ref = Fp8Plan("reference", "test")
    for input_scale in (None, x.float().abs().amax() / 448.0 * 0.5):  # dynamic; static with half the range
        for b in (None, bias):
            y = fp8_linear(x, w_q, w_scale, b, input_scale, how=ref)
            q, s = quantize_activations(x, input_scale)
            _check_against_float64(y, q, s, w_q, w_scale, b, dtype)


def test_leading_dims_are_kept_and_tokens_quantized_separately():
    x, w_q, w_scale, bias = _operands(6, 64, 48, torch.float32)
    x[3] *= 1e4  # a loud token must not change its neighbours' scales
    y = fp8_linear(x.reshape(2, 3, 64), w_q, w_scale, bias, how=Fp8Plan("reference", "test"))
    assert y.shape == (2, 3, 48)
    q, s = quantize_activations(x)
    for i in range(6):  # the codes and scales of each token are those it gets on its own
        qi, si = quantize_activations(x[i:i + 1])
        assert torch.equal(q[i:i + 1].view(torch.uint8), qi.view(torch.uint8)) and torch.equal(s[i:i + 1], si)
    rows = torch.cat([fp8_linear(x[i:i + 1], w_q, w_scale, bias, how=Fp8Plan("reference", "test"))
                      for i in range(6)])
    # equal up to the BLAS's M-dependent summation order
    torch.testing.assert_close(y.reshape(6, 48), rows, rtol=1e-5, atol=1e-6 * rows.abs().max().item())


def test_cpu_takes_the_reference_path_with_a_reason():
    how = fp8.plan(torch.device("cpu"), 64, 48, torch.bfloat16)
    assert how.path == "reference" and "cpu" in how.reason
    x, w_q, w_scale, bias = _operands(3, 64, 48, torch.float32)
    torch.testing.assert_close(fp8_linear(x, w_q, w_scale, bias),
                               fp8_linear(x, w_q, w_scale, bias, how=Fp8Plan("reference", "test")), rtol=0, atol=0)


def test_llmc_kernels_reference_forces_the_reference_path(monkeypatch):
    monkeypatch.setenv("LLMC_KERNELS", "reference")
    assert fp8.plan(torch.device("cuda"), 64, 48, torch.bfloat16) == Fp8Plan("reference", "LLMC_KERNELS=reference")


# ------------------------------------------------------------------------------------------ the _scaled_mm call

def _cpu_scaled_mm_or_skip():
    # the probe makes the row-wise call under test: torch 2.11's CPU _scaled_mm takes per-tensor scales only
    # (and says so with an internal assert), 2.13's takes row-wise ones
    try:
        a, b = torch.zeros(2, 16, dtype=fp8.FP8_DTYPE), torch.zeros(16, 16, dtype=fp8.FP8_DTYPE)
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU _scaled_mm with row-wise scales ({str(e).splitlines()[0]})")


@pytest.mark.parametrize("dtype,fuse_bias", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.bfloat16, True)])
@pytest.mark.parametrize("m", M_VALUES)
def test_scaled_mm_call_layout_on_cpu(m, dtype, fuse_bias):
    """The exact call the GPU path makes (operand layout, [M, 1] / [1, N] scales, bias fused or added after),
    run through torch's CPU _scaled_mm where this torch has one."""
    _cpu_scaled_mm_or_skip()
    x, w_q, w_scale, bias = _operands(m, 576, 192, dtype)
    for input_scale in (None, torch.tensor(0.05)):
        q, s = quantize_activations(x, input_scale)
        y = fp8.scaled_mm(q, s, w_q, w_scale, bias, dtype, fuse_bias=fuse_bias)
        _check_against_float64(y, q, s, w_q, w_scale, bias, dtype)


# ------------------------------------------------------------------------------------------ CUDA (H100)

@needs_fp8_gpu
@pytest.mark.parametrize("fast_accum", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kn", ALIGNED + [(4096, 1024)] + RAGGED)
@pytest.mark.parametrize("m", M_VALUES)
def test_cuda_path_matches_float64(m, kn, dtype, fast_accum, monkeypatch):
    monkeypatch.delenv("LLMC_KERNELS", raising=False)  # the fast path is under test even where it is set
    monkeypatch.setattr(fp8, "FAST_ACCUM", fast_accum)
    k, n = kn
    x, w_q, w_scale, bias = _operands(m, k, n, dtype, device="cuda")
    ragged = k % 16 or n % 16
    for input_scale in (None, (x.float().abs().amax() / 448.0 * 0.5)):
        for b in (None, bias):
            how = fp8.plan(x.device, k, n, dtype, None if b is None else b.dtype)
            if ragged:  # (checked first: it is the reason whatever the dtype)
                assert how.path == "reference" and "multiples of 16" in how.reason, how
            elif dtype == torch.float32:
                assert how.path == "reference" and "float32" in how.reason, how
            else:
                assert how.path == "scaled_mm", how.describe()  # a refusal on an H100 is a failure here
                assert how.fast_accum == fast_accum
                assert how.fuse_bias == (b is not None and dtype != torch.float32)
            y = fp8_linear(x, w_q, w_scale, b, input_scale)
            q, s = quantize_activations(x, input_scale)
            accum = 13 if how.path == "scaled_mm" and fast_accum else None
            _check_against_float64(y.cpu(), q.cpu(), s.cpu(), w_q.cpu(), w_scale.cpu(),
                                   None if b is None else b.cpu(), dtype, accum_bits=accum)


@needs_fp8_gpu
def test_cuda_scaled_mm_agrees_with_the_reference_path(monkeypatch):
    monkeypatch.delenv("LLMC_KERNELS", raising=False)
    x, w_q, w_scale, bias = _operands(129, 576, 1536, torch.bfloat16, device="cuda")
    how = fp8.plan(x.device, 576, 1536, torch.bfloat16, torch.bfloat16)
    assert how.path == "scaled_mm", how.describe()
    fast = fp8_linear(x, w_q, w_scale, bias)
    slow = fp8_linear(x, w_q, w_scale, bias, how=Fp8Plan("reference", "test"))
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2 * slow.abs().mean().item())


# ------------------------------------------------------------------------------------------ the model

FP8_W8A8 = QuantizeConfig(weights=WeightQuantConfig(format="fp8", granularity="channel"),
                          activations=ActivationQuantConfig(format="fp8", dynamic=True))
TOKENS = 512


@pytest.fixture(scope="module")
def text():
    from llmcompress.data import load_text

    return load_text("builtin:wikitext2_test")


def _fp8_model(model):
    from llmcompress.quant.quantize import quantize_model

    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, FP8_W8A8)
    return qmodel


def _ppl_and_agreement(base, qmodel, tok, text):
    """Perplexity of both on the first TOKENS tokens, and how often their next-token argmax agrees."""
    from llmcompress.eval.perplexity import perplexity

    ids = tok(text[:20000], return_tensors="pt")["input_ids"][:, :TOKENS].to(next(base.parameters()).device)
    with torch.no_grad():
        agree = (base(ids).logits.argmax(-1) == qmodel(ids).logits.argmax(-1)).float().mean().item()
    p0 = perplexity(base, tok, text, seq_len=TOKENS, max_tokens=TOKENS)["ppl"]
    p1 = perplexity(qmodel, tok, text, seq_len=TOKENS, max_tokens=TOKENS)["ppl"]
    return p0, p1, agree


def test_fp8_w8a8_model_scores_like_the_original(smollm, text):
    model, tok = smollm
    qmodel = _fp8_model(model)
    qlinears = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 7 * 30 and all(m.scheme.name == "FP8A8" for m in qlinears)
    assert all(m.fp8_plan(torch.float32).path == "reference" for m in qlinears)
    p0, p1, agree = _ppl_and_agreement(model, qmodel, tok, text)
    print(f"FP8 W8A8 dynamic, {TOKENS} tokens: ppl {p1:.3f} vs {p0:.3f} ({100 * (p1 / p0 - 1):+.2f}%), "
          f"top-1 agreement {agree:.3f}")
    # the full protocol measured +3.3% (benchmarks/results/quant_results.md); a 512-token prefix is noisier
    assert p0 * 0.97 < p1 < p0 * 1.06, (p0, p1)
    assert agree >= 0.85, agree


@needs_fp8_gpu
def test_fp8_w8a8_checkpoint_on_the_gpu_runs_scaled_mm(smollm, text, tmp_path, monkeypatch):
    """The user's path: quantize, save, load_quantized in bf16 on the GPU; every fp8 linear then runs
    torch._scaled_mm and the model scores like the unquantized bf16 one."""
    monkeypatch.delenv("LLMC_KERNELS", raising=False)
    from llmcompress.quant.checkpoint import load_quantized, save_quantized

    model, tok = smollm
    save_quantized(_fp8_model(model), tmp_path / "fp8", tok, config={})
    qmodel = load_quantized(tmp_path / "fp8", device="cuda", dtype=torch.bfloat16)
    base = copy.deepcopy(model).to("cuda", torch.bfloat16)
    plans = {m.fp8_plan(torch.bfloat16).describe() for m in qmodel.modules() if isinstance(m, QuantLinear)}
    assert plans == {"scaled_mm"}, plans
    p0, p1, agree = _ppl_and_agreement(base, qmodel, tok, text)
    print(f"GPU bf16 FP8 W8A8 (_scaled_mm): ppl {p1:.3f} vs {p0:.3f} ({100 * (p1 / p0 - 1):+.2f}%), "
          f"top-1 agreement {agree:.3f}")
    assert p0 * 0.97 < p1 < p0 * 1.06, (p0, p1)
    assert agree >= 0.8, agree  # 0.89 on the CPU in float32; bf16 rounding on both sides costs a little more
