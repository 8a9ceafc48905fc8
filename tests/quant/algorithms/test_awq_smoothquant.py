"""AWQ's scale search and SmoothQuant's folding: never worse than no scaling; the float function unchanged."""

import copy

import pytest
import torch
from torch import nn

from llmcompress.quant.algorithms import smoothquant as sq
from llmcompress.quant.algorithms.awq import awq_search, refit_scales, sample_index, take_rows, weight_mean
from llmcompress.quant.architectures import ARCHITECTURES
from llmcompress.quant.refit import unit_rows
from llmcompress.quant.formats import QuantSpec, fake_quantize
from llmcompress.quant.observers import make_observer, weight_qparams


def _fq(spec):
    return lambda w: fake_quantize(w, *weight_qparams(w, spec, make_observer("minmax", spec)), spec)


def _activations(t, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:6]] *= 30.0  # salient channels
    return x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("duo", [True, False, "both"])
def test_awq_search_never_worse_than_scale_one(seed, duo):
    k = 200  # ragged: 3 groups of 64 and one of 8
    spec = QuantSpec("int4", seed % 2 == 0, "group", 64)
    x = _activations(256, k, seed)
    g = torch.Generator().manual_seed(100 + seed)
    ws = [torch.randn(48, k, generator=g), torch.randn(16, k, generator=g) * 0.1]
    norm = duo == "both" and seed % 3 == 0  # token-normalized loss: scored on unit-norm rows
    s, rec = awq_search(x, ws, _fq(spec), grid=10, duo_scaling=duo, group_size=64, normalize_tokens=norm)
    assert rec["loss"] <= rec["loss_unscaled"]
    # the returned loss is the real loss of the returned scales
    xl = unit_rows(x) if norm else x
    again = sq.output_error(xl, ws, [_fq(spec)(w * s) / s for w in ws])
    assert again == pytest.approx(rec["loss"], rel=1e-4)
    if rec["alpha"] is None:
        assert torch.equal(s, torch.ones(k))
    # with loud channels the search finds a real improvement over RTN
    if seed < 2:
        assert rec["loss"] < 0.9 * rec["loss_unscaled"]


def test_awq_weight_mean_normalises_per_group_ragged():
    w = torch.zeros(2, 5)
    w[0] = torch.tensor([1.0, -2.0, 4.0, 0.5, 0.25])
    w[1] = torch.tensor([2.0, 2.0, -1.0, 1.0, 0.5])
    # groups of 2: [0,1], [2,3], [4]
    expected = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (1.0 + 1.0) / 2, (0.125 + 1.0) / 2, 1.0])
    torch.testing.assert_close(weight_mean([w], 2), expected)


def test_smoothquant_alpha_search_never_worse_than_no_smoothing():
    spec = QuantSpec("int8", True, "channel")
    act = QuantSpec("int8", True, "tensor")
    fq_act = lambda x: fake_quantize(x, *weight_qparams(x, act, make_observer("minmax", act)), act)  # noqa: E731
    x = _activations(512, 96, 3)
    w = [torch.randn(64, 96)]
    base = sq.output_error(x, w, [_fq(spec)(w[0])], fq_act(x))
    alpha, s, err = sq.search_alpha(x, w, [0.3, 0.5, 0.7], _fq(spec), fq_act)
    assert err <= base and alpha is not None and err < 0.5 * base  # outliers: smoothing must help a lot
    torch.testing.assert_close(sq.smooth_scales(x.abs().amax(0), w, alpha), s)


@torch.no_grad()
def test_smoothquant_folding_leaves_the_real_model_unchanged(smollm):
    model, tok = smollm
    model = copy.deepcopy(model)
    ids = tok("The capital of France is Paris. It is known for", return_tensors="pt")["input_ids"]
    before = model(ids).logits
    layer = model.model.layers[0]
    absmax = {}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(
                 lambda m, a: absmax.__setitem__("attn", a[0].abs().amax(dim=(0, 1)))),
             layer.mlp.gate_proj.register_forward_pre_hook(
                 lambda m, a: absmax.__setitem__("mlp", a[0].abs().amax(dim=(0, 1)))),
             layer.mlp.down_proj.register_forward_pre_hook(
                 lambda m, a: absmax.__setitem__("down", a[0].abs().amax(dim=(0, 1))))]
    model(ids)
    for h in hooks:
        h.remove()
    fold = ARCHITECTURES[0].fold_scales  # llama: x̂ · w norms
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj],
             sq.smooth_scales(absmax["attn"], [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0.5))
        fold(layer.post_attention_layernorm, [m.gate_proj, m.up_proj],
             sq.smooth_scales(absmax["mlp"], [m.gate_proj.weight, m.up_proj.weight], 0.8))
        fold(m.up_proj, [m.down_proj], sq.smooth_scales(absmax["down"], [m.down_proj.weight], 0.5))
    after = model(ids).logits
    assert not torch.equal(model.model.layers[3].input_layernorm.weight,
                           smollm[0].model.layers[3].input_layernorm.weight)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=2e-3)


def test_awq_clip_search_never_worse_per_group():
    spec = QuantSpec("int4", True, "group", 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 200, generator=g)
    w = torch.randn(32, 200, generator=g)
    w[:, 3] *= 6  # an outlier weight column: clipping it trades its error for the rest of its group's
    from llmcompress.quant.algorithms.awq import clip_search

    c = clip_search(x, w, _fq(spec), 64, rows=300)
    assert (c.abs() <= w.abs() + 1e-6).all() and not torch.equal(c, w)
    for g0 in range(0, 200, 64):  # ragged last group of 8 too
        xs, ws, cs = x[:, g0:g0 + 64], w[:, g0:g0 + 64], c[:, g0:g0 + 64]
        err = lambda v: (xs @ ws.t() - xs @ _fq(spec)(v).t()).pow(2).mean(0)  # noqa: E731
        assert (err(cs) <= err(ws) + 1e-5).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_refit_scales_lower_the_error_and_survive_min_max_rtn(symmetric):
    """refit_scales returns weights that the min-max RTN of the final pass turns into the refit Ŵ: its
    unit-norm-row output error is below plain RTN's (asymmetric: r is that Ŵ already, so RTN keeps it)."""
    spec = QuantSpec("int4", symmetric, "group", 64)
    obs = lambda sp: make_observer("minmax", sp)  # noqa: E731
    g = torch.Generator().manual_seed(7)
    x = _activations(512, 200, 7)
    w = torch.randn(48, 200, generator=g)
    r = refit_scales(x, w, spec, obs)
    q = _fq(spec)(r)
    xn = unit_rows(x)
    err = lambda v: float((xn @ (w - v).t()).pow(2).mean())  # noqa: E731
    assert err(q) < 0.95 * err(_fq(spec)(w))
    if not symmetric:
        torch.testing.assert_close(q, r)


def test_awq_sample_index_takes_distinct_rows_in_order():
    rows = [torch.arange(9.0)[:, None], 100 + torch.arange(2.0)[:, None]]
    x = take_rows(rows, sample_index(11, 4))
    got = x[:, 0].tolist()
    assert x.shape == (4, 1) and got == sorted(set(got)) and set(got) <= set(torch.cat(rows)[:, 0].tolist())
    assert sample_index(11, 20) is None and take_rows(rows, None).shape == (11, 1)


def test_awq_cpu_steps_give_the_threads_back():
    """clip_search / refit_scales / awq_search run their small ops on one CPU thread and restore the setting."""
    from llmcompress.quant.algorithms.awq import clip_search

    spec = QuantSpec("int4", True, "group", 64)
    obs = lambda sp: make_observer("minmax", sp)  # noqa: E731
    x = _activations(128, 128, 3)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        clip_search(x, w, _fq(spec), 64)
        refit_scales(x, w, spec, obs)
        awq_search(x, [w], _fq(spec), grid=4, group_size=64)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def test_fold_scales_into_a_one_plus_weight_norm_keeps_the_function():
    """Gemma's norms compute x̂ · (1 + w): folding s must give w' = (1 + w) / s − 1 (checked against that formula
    and against the composed function), not w / s."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from llmcompress.quant.architectures import architecture

    gemma = architecture(type("M", (), {"config": type("C", (), {"model_type": "gemma2"})()})())
    assert gemma.name == "gemma" and gemma.norm_offset == 1.0
    torch.manual_seed(0)
    norm, lin = Gemma2RMSNorm(16), nn.Linear(16, 8)
    norm.weight.copy_(torch.randn(16) * 0.3)
    x = torch.randn(5, 16)
    y0, w0 = lin(norm(x)), norm.weight.clone()
    s = torch.rand(16) + 0.5
    gemma.fold_scales(norm, [lin], s)
    torch.testing.assert_close(norm.weight, (1 + w0) / s - 1)
    torch.testing.assert_close(lin(norm(x)), y0, rtol=1e-5, atol=1e-5)
