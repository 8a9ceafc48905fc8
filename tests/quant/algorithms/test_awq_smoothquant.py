"""AWQ's scale search and SmoothQuant's folding: never worse than no scaling; the float function unchanged."""

import copy

import pytest
import torch
from torch import nn

from llmcompress.quant import smoothquant as sq
from llmcompress.quant.awq import awq_search, refit_scales, sample_index, take_rows, unit_rows, weight_mean
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


def test_awq_clip_in_search_scores_each_scale_with_its_clip():
    """awq.clip_in_search: the candidate s is scored by clip_search on the inputs x / s, then the quantizer, on the
    groups that get clipped; groups holding q/k_proj (never clipped) and configs without the clip keep plain RTN."""
    from llmcompress.config import QuantizeConfig, load_config
    from llmcompress.quant.awq import clip_search
    from llmcompress.quant.sequential import _clip_quantizer

    spec = QuantSpec("int4", True, "group", 64)
    cfg = load_config(QuantizeConfig, overrides=["method=awq", "awq.clip_in_search=true", "awq.clip_tokens=64"])
    new_obs = lambda sp: make_observer("minmax", sp)  # noqa: E731
    x = _activations(128, 128, 3)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    s = torch.rand(128, generator=torch.Generator().manual_seed(6)) + 0.5
    fq_for = _clip_quantizer(cfg, spec, new_obs, x, ["mlp.gate_proj", "mlp.up_proj"])
    want = _fq(spec)(clip_search(x / s, w * s, _fq(spec), 64, rows=64))
    assert torch.equal(fq_for(s)(w * s), want)
    assert not torch.equal(want, _fq(spec)(w * s))  # the clip did change something here
    assert _clip_quantizer(cfg, spec, new_obs, x, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]) is None
    off = load_config(QuantizeConfig, overrides=["method=awq", "awq.clip_in_search=true", "awq.clip=false"])
    assert _clip_quantizer(off, spec, new_obs, x, ["mlp.down_proj"]) is None


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
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        sq.fold_scales(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj],
                       sq.smooth_scales(absmax["attn"], [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0.5))
        sq.fold_scales(layer.post_attention_layernorm, [m.gate_proj, m.up_proj],
                       sq.smooth_scales(absmax["mlp"], [m.gate_proj.weight, m.up_proj.weight], 0.8))
        sq.fold_scales(m.up_proj, [m.down_proj], sq.smooth_scales(absmax["down"], [m.down_proj.weight], 0.5))
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
    from llmcompress.quant.awq import clip_search

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


def test_awq_sample_index_keeps_every_sequence_start():
    masks = [torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), torch.tensor([[1, 1, 0, 0, 0]])]
    rows = [torch.arange(9.0)[:, None], 100 + torch.arange(2.0)[:, None]]  # starts: rows 0, 4 and 100
    x = take_rows(rows, sample_index(rows, masks, 4, keep_first=True))
    assert x.shape == (4, 1) and {0.0, 4.0, 100.0} <= set(x[:, 0].tolist())
    assert take_rows(rows, sample_index(rows, masks, 20)).shape == (11, 1)


def test_awq_gqa_tie_maps_o_columns_to_their_v_channel():
    from types import SimpleNamespace

    from llmcompress.quant.awq import gqa_tie, tied_mean
    tie = gqa_tie(SimpleNamespace(head_dim=2, num_key_value_groups=3), 12)  # 6 query heads, 2 kv heads
    assert tie.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    v = torch.arange(12.0)
    assert tied_mean(v, tie).tolist() == [2.0, 3.0] * 3 + [8.0, 9.0] * 3


def test_awq_cpu_steps_give_the_threads_back():
    """clip_search / refit_scales / awq_search run their small ops on one CPU thread and restore the setting."""
    from llmcompress.quant.awq import clip_search

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


def test_fold_scales_tied_producer_leaves_function_unchanged():
    """prev_s: a producer channel feeding several consumer columns (v_proj -> o_proj under GQA, via a tie) takes
    their shared s; the composed function is unchanged."""
    torch.manual_seed(0)
    prev, cons = torch.nn.Linear(8, 6), torch.nn.Linear(12, 5)
    tie = torch.arange(12) % 6  # consumer column j reads producer channel tie[j]
    x = torch.randn(4, 8)
    y0 = cons(prev(x)[:, tie])
    s_v = torch.rand(6) + 0.5
    s = s_v[tie]  # columns sharing a producer channel share its scale
    with torch.no_grad():
        sq.fold_scales(prev, [cons], s, prev_s=torch.ones(6).index_copy_(0, tie, s))
    torch.testing.assert_close(cons(prev(x)[:, tie]), y0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_refit_clip_error_is_the_least_squares_group_scale_error(symmetric):
    """refit_clip_error: the error of the candidate's RTN codes at the best group scale t, checked against
    the closed form of a hand-solved 1-D least squares and against a dense scan over t."""
    from llmcompress.quant.awq import refit_clip_error, refit_gram

    spec = QuantSpec("int4", symmetric, "group", 32)
    obs = make_observer("minmax", spec)
    x = _activations(256, 32, 1)
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1)).double()
    H = refit_gram(x).double()
    scale, _ = weight_qparams(w.float(), spec, obs)
    q = _fq(spec)(w.float()).double()
    err = refit_clip_error(w, q, scale.double(), H)
    for r in range(w.shape[0]):
        c = torch.round(q[r] / scale[r].double())
        t = float(c @ H @ w[r]) / float(c @ H @ c)  # d/dt (w − t c) H (w − t c)ᵀ = 0
        d = w[r] - t * c
        assert float(err[r]) == pytest.approx(float(d @ H @ d), rel=1e-6, abs=1e-12)
        ts = torch.linspace(0.5 * t, 1.5 * t, 2001, dtype=torch.float64)
        scan = min(float((w[r] - tt * c) @ H @ (w[r] - tt * c)) for tt in ts)
        assert float(err[r]) <= scan + 1e-12
        rtn = float((w[r] - q[r]) @ H @ (w[r] - q[r]))
        assert float(err[r]) <= rtn + 1e-12  # the min-max scale is one of the t's


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clip_search_refit_scored_never_worse_per_group(symmetric):
    """clip_search with refit_H: per row and group, the chosen clip's refit-scored error is at most the
    unclipped weights' (shrink 1 is a candidate), and clipping does find something better somewhere."""
    from llmcompress.quant.awq import clip_search, refit_clip_error, refit_gram

    spec = QuantSpec("int4", symmetric, "group", 64)
    obs = make_observer("minmax", spec)
    step = lambda v: weight_qparams(v, spec, obs)[0].reshape(v.shape[0], -1)[:, :1]  # noqa: E731
    g = torch.Generator().manual_seed(4)
    x = _activations(400, 200, 4)
    w = torch.randn(32, 200, generator=g)
    w[:, 3] *= 6
    H = refit_gram(x)
    c = clip_search(x, w, _fq(spec), 64, refit_H=H, step=step)
    assert (c.abs() <= w.abs() + 1e-6).all() and not torch.equal(c, w)
    for g0 in range(0, 200, 64):  # ragged last group of 8 too
        ws, cs, Hg = w[:, g0:g0 + 64], c[:, g0:g0 + 64], H[g0:g0 + 64, g0:g0 + 64]
        e = lambda v: refit_clip_error(ws, _fq(spec)(v), step(v), Hg)  # noqa: E731
        assert (e(cs) <= e(ws) * (1 + 1e-5) + 1e-9).all()


class _MLP(nn.Module):
    def __init__(self, k, m, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(k, m, False), nn.Linear(k, m, False), nn.Linear(m, k, False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def test_awq_block_score_is_the_mlp_output_error_by_hand():
    """loss=block for gate/up: mean squared error of the MLP output (down_proj in float) with the candidate
    gate/up weights, by hand; the module's weights are restored; awq_search on it never loses to s = 1."""
    from llmcompress.quant.awq import block_score

    mlp = _MLP(96, 160, 0)
    x = _activations(128, 96, 5)
    spec = QuantSpec("int4", True, "group", 32)
    lins = [mlp.gate_proj, mlp.up_proj]
    w0 = [lin.weight.clone() for lin in lins]
    score = block_score(lambda i: mlp(x), [0], lins)
    g_hat, u_hat = _fq(spec)(w0[0]), _fq(spec)(w0[1])
    want = mlp.down_proj(nn.functional.silu(x @ g_hat.t()) * (x @ u_hat.t())) - mlp(x)
    got = score([g_hat, u_hat])
    assert got == pytest.approx(float(want.double().pow(2).mean()), rel=1e-5)
    assert all(torch.equal(lin.weight, w) for lin, w in zip(lins, w0))
    assert score(w0) == 0.0
    s, rec = awq_search(x, w0, _fq(spec), grid=8, duo_scaling="both", group_size=32, score=score)
    assert rec["loss"] <= rec["loss_unscaled"]
    assert score([_fq(spec)(w * s) / s for w in w0]) == pytest.approx(rec["loss"], rel=1e-9)


def test_awq_spread_batches_reaches_the_token_target():
    from llmcompress.quant.awq import spread_batches

    toks = [10, 20, 30, 40, 50, 60, 70, 80]
    p = spread_batches(toks, 100)
    assert sum(toks[b] for b in p) >= 100 and p == sorted(set(p)) and p[-1] == 7
    assert spread_batches(toks, 10_000) == list(range(8))
    assert spread_batches(toks, 1) == [7]


def test_awq_weights_swapped_restores_the_weights_even_on_error():
    """The candidate weights are in place inside the block and the Linear's own afterwards, also when the block
    raises (the AWQ scores and the sequential_inputs recapture both rely on it)."""
    from llmcompress.quant.awq import weights_swapped

    lin = torch.nn.Linear(5, 3)
    own = lin.weight.detach().clone()
    with torch.no_grad(), pytest.raises(RuntimeError, match="inside"):
        with weights_swapped([lin], [torch.zeros(3, 5, dtype=torch.float64)]):
            assert torch.equal(lin.weight, torch.zeros(3, 5)) and lin.weight.dtype == torch.float32
            raise RuntimeError("inside")
    assert torch.equal(lin.weight, own)
