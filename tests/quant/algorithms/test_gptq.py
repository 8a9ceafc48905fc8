"""GPTQ on a single Linear: lower output error than round-to-nearest on correlated inputs, every layout."""

import pytest
import torch

from llmcompress.quant.formats import QuantSpec, fake_quantize, quantize
from llmcompress.quant.algorithms.gptq import Hessian, gptq_quantize, layer_error
from llmcompress.quant.observers import make_observer, weight_qparams


def _correlated_inputs(n_rows: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    outliers = torch.ones(k)
    outliers[torch.randperm(k, generator=g)[:4]] = 20.0  # a few loud channels, as LLM activations have
    return (torch.randn(n_rows, k, generator=g) @ mix) * outliers


def _rtn(W, spec):
    return fake_quantize(W, *weight_qparams(W, spec, make_observer("minmax", spec)), spec)


@pytest.mark.parametrize("spec,act_order", [
    (QuantSpec("int4", True, "group", 64), False),
    (QuantSpec("int4", False, "group", 64), False),
    (QuantSpec("int4", True, "group", 128), False),  # K = 576: a ragged last group of 64
    (QuantSpec("int4", True, "group", 128), True),
    (QuantSpec("int4", False, "channel"), True),
    (QuantSpec("int8", True, "channel"), False),
])
def test_gptq_beats_rtn_on_output_error(spec, act_order):
    k, n = 576, 96
    X = _correlated_inputs(2048, k)
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    hess = Hessian(k)
    for chunk in X.split(500):
        hess.add(chunk)
    H = hess.value()
    torch.testing.assert_close(H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-3)

    res = gptq_quantize(W, H, spec, make_observer("minmax", spec), damp=0.01, block_size=64, act_order=act_order)
    err_gptq = (X @ (W - res.weight).t()).pow(2).sum()
    err_rtn = (X @ (W - _rtn(W, spec)).t()).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))
    assert res.error == pytest.approx(float(err_gptq) / X.shape[0], rel=1e-3)
    assert res.error == pytest.approx(layer_error(W, res.weight, H), rel=1e-6)

    # Ŵ lies exactly on the stored grid: re-quantizing with the returned scales reproduces it (so the
    # checkpoint's codes, scales and zero points serve Ŵ with no g_idx, act_order included)
    codes = quantize(res.weight, res.scale, res.zero_point, spec)
    assert codes.dtype == spec.code_dtype
    torch.testing.assert_close(fake_quantize(res.weight, res.scale, res.zero_point, spec), res.weight,
                               rtol=0, atol=0)
    if spec.granularity == "group":
        assert res.scale.shape == (n, spec.num_groups(k))


def test_gptq_static_groups_match_rtn_scales_and_dead_inputs_are_zeroed():
    k, n = 256, 32
    spec = QuantSpec("int4", True, "group", 64)
    X = _correlated_inputs(1024, k)
    X[:, 5] = 0  # a dead input
    W = torch.randn(n, k)
    H = 2 * X.t() @ X / X.shape[0]
    obs = make_observer("minmax", spec)
    res = gptq_quantize(W, H, spec, obs, act_order=True)
    scale, _ = weight_qparams(W.masked_fill(torch.arange(k) == 5, 0), spec, obs)
    torch.testing.assert_close(res.scale, scale)
    assert torch.all(res.weight[:, 5] == 0)


def test_gptq_block_size_does_not_change_the_result():
    # lazy batch updates are an exact reordering of the same arithmetic
    k, n = 192, 16
    spec = QuantSpec("int4", True, "group", 64)
    X = _correlated_inputs(512, k)
    W = torch.randn(n, k)
    H = 2 * X.t() @ X / X.shape[0]
    a = gptq_quantize(W, H, spec, make_observer("minmax", spec), block_size=192).weight
    b = gptq_quantize(W, H, spec, make_observer("minmax", spec), block_size=32).weight
    # float reassociation moves scales by ~1e-6 and may flip a rare rounding tie, never more
    assert ((a - b).abs() > 1e-4).float().mean() < 0.01
    assert not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("spec", [QuantSpec("int4", True, "group", 64, "float16"),
                                  QuantSpec("uint4", False, "group", 128, "float16"),  # ragged last group
                                  QuantSpec("int8", True, "channel", 128, "float16")])
def test_refit_scales_never_raises_the_error_and_stays_on_the_stored_grid(spec):
    k, n = 576, 64
    X = _correlated_inputs(2048, k)
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    H = 2 * X.t() @ X / X.shape[0]
    for act_order in (False, True):
        a = gptq_quantize(W, H, spec, make_observer("minmax", spec), act_order=act_order)
        b = gptq_quantize(W, H, spec, make_observer("minmax", spec), act_order=act_order, refit_scales=True)
        assert b.error <= a.error * (1 + 1e-6)
        assert b.error < 0.99 * a.error  # and it does find better scales for GPTQ's codes
        torch.testing.assert_close(fake_quantize(b.weight, b.scale, b.zero_point, spec), b.weight, rtol=0, atol=0)
        assert torch.equal(b.scale, b.scale.half().float())  # representable in the stored scale dtype


def test_unit_rows_and_dampen_are_the_hessian_s():
    """gptq.unit_rows / gptq.dampen_ are what Hessian(normalize_tokens) and gptq_quantize use (AWQ shares them)."""
    from llmcompress.quant.refit import dampen_, unit_rows

    X = _correlated_inputs(300, 64) * torch.rand(300, 1, generator=torch.Generator().manual_seed(2))
    X[5] = 0  # a zero row stays zero
    xn = unit_rows(X)
    torch.testing.assert_close(xn.norm(dim=1)[torch.arange(300) != 5], torch.ones(299))
    assert torch.equal(xn[5], torch.zeros(64))
    hess = Hessian(64, normalize_tokens=True)
    hess.add(X)
    torch.testing.assert_close(hess.value(), 2 * xn.t() @ xn / 300, rtol=1e-5, atol=1e-6)
    H = hess.value()
    D = H.clone()
    lam = dampen_(D, 0.01)
    assert float(lam) == pytest.approx(0.01 * float(torch.diag(H).mean()))
    assert torch.equal(D, H + lam * torch.eye(64))
