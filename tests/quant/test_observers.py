import math

import pytest
import torch

from llmcompress.quant.formats import QuantSpec, compute_qparams, fake_quantize
from llmcompress.quant.observers import (ClipObserver, Histogram, KLObserver, MinMaxObserver, MSEObserver,
                                         PercentileObserver, weight_qparams)

SPEC = QuantSpec("int8", True, "tensor")


def test_minmax_streams_and_matches_whole_tensor():
    x = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    obs = MinMaxObserver(SPEC)
    for chunk in x.split(1000, dim=1):
        obs.update(chunk)
    assert obs.range() == (x.min(1).values, x.max(1).values)


def test_clip_observer_clamps_to_threshold():
    obs = ClipObserver(SPEC, threshold=2.0)
    obs.update(torch.tensor([[-5.0, 0.5, 1.5]]))
    lo, hi = obs.range()
    assert lo.item() == -2.0 and hi.item() == 1.5
    scale, _ = obs.qparams()
    assert scale.item() == pytest.approx(2.0 / 127.5)


def test_percentile_matches_hand_computation():
    # x = ±1..±100, so sorted |x| = 1,1,2,2,…,100,100: the 99th percentile sits at position 0.99·199 = 197.01,
    # between the values 99 (index 197) and 100 (index 198): 99.01 by linear interpolation
    a = torch.arange(1, 101, dtype=torch.float32)
    x = torch.cat([a, -a])[None]
    lo, hi = PercentileObserver(SPEC, percentile=99).range_of(x)
    assert hi.item() == pytest.approx(99.01) and lo.item() == pytest.approx(-99.01)
    asym = PercentileObserver(QuantSpec("uint8", False, "tensor"), percentile=90)
    lo, hi = asym.range_of(torch.arange(0, 11, dtype=torch.float32)[None])  # 0..10: 10th pct 1, 90th 9
    assert lo.item() == pytest.approx(1.0) and hi.item() == pytest.approx(9.0)


def test_streaming_percentile_is_within_a_bin_of_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20000, generator=g) * torch.tensor([[1.0], [10.0], [0.1]])
    x[1, 5] = 400.0  # an outlier forces the histogram to grow several times
    obs = PercentileObserver(SPEC, percentile=99.9, bins=2048)
    for chunk in x.split(3000, dim=1):
        obs.update(chunk)
    # the estimate interpolates inside one bin; in a sparse tail the exact quantile interpolates between
    # neighbouring order statistics that may sit bins apart, so bracket it by the neighbours' quantiles
    n = x.shape[1]
    below, above = (torch.quantile(x.abs(), q, dim=1) for q in (0.999 - 1 / n, 0.999 + 1 / n))
    width = obs.hist.radius / 1024  # |x| histogram bin width
    est = obs.range()[1]
    assert torch.all(est >= below - width) and torch.all(est <= above + width)
    assert obs.hist.counts.shape == (3, 2048)  # bounded by rows x bins, not by values seen
    assert obs.hist.counts.sum().item() == x.numel()


def test_histogram_growth_merges_exactly():
    h = Histogram(bins=8)
    h.update(torch.tensor([[-1.0, -0.1, 0.1, 0.9]]))
    h.update(torch.tensor([[3.5]]))  # radius 1 -> 2 -> 4
    assert h.radius.item() == 4.0
    assert h.counts.sum().item() == 5
    ref = torch.histc(torch.tensor([-1.0, -0.1, 0.1, 0.9, 3.5]), bins=8, min=-4, max=4)
    assert torch.equal(h.counts[0].float(), ref)


def test_mse_matches_direct_grid_search():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 128, generator=g)
    w[0, 0] = 12.0  # an outlier: clipping it pays off
    spec = QuantSpec("int4", True, "channel")
    obs = MSEObserver(spec, grid=20, min_ratio=0.5)
    lo, hi = obs.range_of(w)
    for row in range(6):
        amax = w[row].abs().max()
        errs = []
        for i in range(11):
            r = 1 - i / 20
            s = amax * r / 7.5
            q = torch.clamp(torch.round(w[row] / s), -8, 7)
            errs.append(((q * s - w[row]) ** 2).sum().item())
        best = 1 - errs.index(min(errs)) / 20
        assert hi[row].item() == pytest.approx(max(w[row].max().item() * best, 0), rel=1e-5)
    assert hi[0].item() < 12.0 * 0.9
    # and never worse than no clipping
    s_mse, _ = compute_qparams(lo, hi, spec)
    s_mm, _ = compute_qparams(w.amin(1), w.amax(1), spec)
    err = lambda s: ((fake_quantize(w, s, None, spec) - w) ** 2).sum(1)
    assert torch.all(err(s_mse) <= err(s_mm) + 1e-6)


def test_streaming_mse_close_to_exact():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 50000, generator=g) ** 3
    spec = QuantSpec("int4", True, "tensor")
    obs = MSEObserver(spec, grid=50)
    for chunk in x.split(10000, dim=1):
        obs.update(chunk)
    exact = MSEObserver(spec, grid=50).range_of(x)
    assert obs.range()[1].item() == pytest.approx(exact[1].item(), rel=0.05)


def test_kl_clips_a_heavy_tail_but_not_a_uniform():
    g = torch.Generator().manual_seed(5)
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((1, 200000))
    obs = KLObserver(SPEC)
    obs.update(heavy)
    t = obs.range()[1].item()
    assert t < heavy.abs().max().item() * 0.9
    uniform = torch.rand(1, 200000, generator=g) * 2 - 1
    obs = KLObserver(SPEC)
    obs.update(uniform)
    assert obs.range()[1].item() > 0.95


def test_ragged_group_qparams_shape_and_values():
    w = torch.randn(3, 576, generator=torch.Generator().manual_seed(6))
    spec = QuantSpec("int4", True, "group", group_size=128)
    scale, zero = weight_qparams(w, spec, MinMaxObserver(spec))
    assert scale.shape == (3, 5) and zero is None
    assert scale[1, 4].item() == pytest.approx(w[1, 512:].abs().max().item() / 7.5, rel=1e-6)
    assert scale[2, 0].item() == pytest.approx(w[2, :128].abs().max().item() / 7.5, rel=1e-6)
