"""Observers: how the values of a tensor become a clip range [lo, hi], and so a scale.

Every observer works on rows: a [C, L] tensor whose C rows each get their own range (C = 1 for a per-tensor
scale, N for per-channel, N·G for per-group). Two ways in, one interface:

  range_of(rows)          the whole tensor at once (weights): exact.
  update(rows) … range()  streaming (activations over many batches): memory is C × bins, never the number of
                          values seen; percentile, MSE and KL read a per-row histogram.

  minmax      lo, hi = min(x), max(x)
  percentile  symmetric: T = the p-th percentile of |x|; asymmetric: lo, hi = the (100−p)-th and p-th of x
  clip        a fixed threshold T: lo, hi = max(min(x), −T), min(max(x), T)
  mse         the clip ratio r in a grid that minimises ‖x − Q(x; r·range)‖² (per row)
  kl          TensorRT's entropy calibration: the threshold whose quantized |x| histogram has the smallest
              KL(P‖Q) to the clipped reference histogram (symmetric by nature)

`weight_qparams(w, spec, observer)` turns a weight and a spec into (scale, zero_point), ragged last group included.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch

from .formats import QuantSpec, compute_qparams, fake_quantize


class Histogram:
    """Per-row histograms of signed values over [−R, R) with B bins; R grows by doubling, which merges bins
    pairwise exactly, so streaming never re-reads old data. Memory: C × B counts."""

    CHUNK = 1 << 20  # values binned per step: bounds the temporaries to a few MiB

    def __init__(self, bins: int = 2048):
        if bins % 4:
            raise ValueError("histogram bins must be a multiple of 4")
        self.bins = bins
        self.counts: Optional[torch.Tensor] = None  # [C, B] float64 counts
        self.radius: Optional[torch.Tensor] = None  # [C]

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        lo, hi = torch.aminmax(rows, dim=1)
        amax = torch.maximum(-lo, hi)
        if self.counts is None:
            self.counts = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64, device=rows.device)
            self.radius = torch.where(amax > 0, amax, torch.full_like(amax, 1e-12))
        if self.counts.shape[0] != rows.shape[0]:
            raise ValueError(f"observer saw {rows.shape[0]} rows, then {self.counts.shape[0]}")
        for _ in range(200):
            need = amax > self.radius
            if not need.any():
                break
            merged = self.counts[need].view(-1, self.bins // 2, 2).sum(-1)
            grown = torch.zeros(merged.shape[0], self.bins, dtype=torch.float64, device=merged.device)
            grown[:, self.bins // 4: 3 * self.bins // 4] = merged
            self.counts[need] = grown
            self.radius[need] *= 2
        width = 2 * self.radius / self.bins
        offset = torch.arange(rows.shape[0], device=rows.device)[:, None] * self.bins
        # columns in chunks: the int64 bin indices of a whole activation would be 8 bytes per value
        cols = max(1, self.CHUNK // rows.shape[0])
        for part in rows.split(cols, dim=1):
            idx = torch.floor((part + self.radius[:, None]) / width[:, None]).long().clamp_(0, self.bins - 1)
            idx += offset
            self.counts.view(-1).add_(torch.bincount(idx.view(-1), minlength=self.counts.numel()).double())

    def edges(self) -> torch.Tensor:
        """[C, B + 1] bin edges."""
        steps = torch.linspace(-1, 1, self.bins + 1, dtype=torch.float64, device=self.radius.device)
        return self.radius.double()[:, None] * steps[None, :]

    def centers(self) -> torch.Tensor:
        e = self.edges()
        return (e[:, 1:] + e[:, :-1]) / 2

    def abs_counts(self) -> torch.Tensor:
        """[C, B/2] histogram of |x|: bin j covers [j·w, (j+1)·w)."""
        half = self.bins // 2
        return self.counts[:, half:] + self.counts[:, :half].flip(1)

    def quantile(self, q: float) -> torch.Tensor:
        """q-quantile of x per row, interpolating linearly inside the bin (error < one bin width)."""
        return _hist_quantile(self.counts, self.edges(), q)

    def abs_quantile(self, q: float) -> torch.Tensor:
        half = self.bins // 2
        return _hist_quantile(self.abs_counts(), self.edges()[:, half:], q)


def _hist_quantile(counts: torch.Tensor, edges: torch.Tensor, q: float) -> torch.Tensor:
    cum = counts.cumsum(1)
    target = q * cum[:, -1:]
    j = torch.searchsorted(cum, target).clamp(max=counts.shape[1] - 1)  # first bin with cum >= target
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
    inside = counts.gather(1, j).clamp(min=1e-30)
    frac = ((target - before) / inside).clamp(0, 1)
    left, right = edges.gather(1, j), edges.gather(1, j + 1)
    return (left + frac * (right - left)).squeeze(1).float()


class Observer:
    """Base: a streaming min/max. Subclasses override how the range is chosen."""

    name = "base"
    uses_histogram = False

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        self.spec = spec
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None
        self.hist = Histogram(self.bins) if self.uses_histogram else None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.hist is not None:
            self.hist.update(rows)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise ValueError(f"{self.name} observer has seen no data")
        return self.min, self.max

    def range_of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Range of one whole tensor (fresh state); subclasses compute it exactly where they can."""
        fresh = copy.copy(self)
        fresh.reset()
        fresh.update(rows)
        return fresh.range()

    def qparams(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return compute_qparams(*self.range(), self.spec)


class MinMaxObserver(Observer):
    name = "minmax"


class ClipObserver(Observer):
    """A fixed threshold T: anything beyond ±T is clipped."""

    name = "clip"

    def __init__(self, spec: QuantSpec, threshold: float, bins: int = 2048):
        if not threshold > 0:
            raise ValueError(f"clip threshold must be > 0, got {threshold}")
        super().__init__(spec, bins)
        self.threshold = threshold

    def range(self):
        lo, hi = super().range()
        return lo.clamp(min=-self.threshold), hi.clamp(max=self.threshold)


class PercentileObserver(Observer):
    """Clip at the p-th percentile (p in (0, 100]) instead of the extreme value."""

    name = "percentile"
    uses_histogram = True

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048):
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(spec, bins)
        self.q = percentile / 100

    def range(self):
        lo, hi = super().range()
        if self.spec.symmetric:
            t = self.hist.abs_quantile(self.q)
            return torch.maximum(lo, -t), torch.minimum(hi, t)
        return self.hist.quantile(1 - self.q).clamp(min=lo), self.hist.quantile(self.q).clamp(max=hi)

    def range_of(self, rows):
        rows = rows.detach().float()
        if self.spec.symmetric:
            t = torch.quantile(rows.abs(), self.q, dim=1)
            return torch.maximum(rows.amin(1), -t), torch.minimum(rows.amax(1), t)
        return torch.quantile(rows, 1 - self.q, dim=1), torch.quantile(rows, self.q, dim=1)


class MSEObserver(Observer):
    """Search clip ratios r = 1, 1 − 1/grid, …, min_ratio; keep per row the one minimising ‖x − Q(x)‖²."""

    name = "mse"
    uses_histogram = True

    def __init__(self, spec: QuantSpec, grid: int = 100, min_ratio: float = 0.5, bins: int = 2048):
        if not 0 < min_ratio <= 1:
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
        super().__init__(spec, bins)
        self.ratios = [1 - i / grid for i in range(int(round((1 - min_ratio) * grid)) + 1)]

    def _search(self, lo, hi, values, weights=None):
        """values [C, L] (weights [C, L] = counts, or None = each value once) -> best (lo, hi) per row."""
        best_err = torch.full_like(lo, math.inf, dtype=torch.float64)
        best_lo, best_hi = lo.clone(), hi.clone()
        spec = _row_spec(self.spec)
        for r in self.ratios:
            cand_lo, cand_hi = lo * r, hi * r
            scale, zero = compute_qparams(cand_lo, cand_hi, spec)
            err = (fake_quantize(values, scale, zero, spec) - values).double().pow(2)
            err = (err * weights if weights is not None else err).sum(1)
            better = err < best_err  # strict: ties keep the larger (earlier) ratio
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, cand_lo, best_lo), torch.where(better, cand_hi, best_hi)
        return best_lo, best_hi

    def range(self):
        lo, hi = super().range()
        return self._search(lo, hi, self.hist.centers().float(), self.hist.counts)

    def range_of(self, rows):
        rows = rows.detach().float()
        return self._search(rows.amin(1), rows.amax(1), rows)


class KLObserver(Observer):
    """Entropy calibration (Migacz, "8-bit Inference with TensorRT", 2017) on the |x| histogram.

    For each candidate threshold bin i: P = hist[:i] with the clipped tail added to its last bin; Q = P merged
    into `levels` bins and spread back uniformly over P's non-empty bins; keep the i minimising KL(P‖Q).
    """

    name = "kl"
    uses_histogram = True

    def __init__(self, spec: QuantSpec, bins: int = 2048, stride: int = 0):
        super().__init__(spec, bins)
        self.stride = stride

    def range(self):
        lo, hi = super().range()
        hist = self.hist.abs_counts()  # [C, B/2]
        half = hist.shape[1]
        width = self.hist.radius.double() / half
        levels = int(self.spec.qmax) + 1 if not self.spec.is_float else 128
        levels = min(levels, half)
        stride = self.stride or max(1, half // 256)
        dev = hist.device
        best_kl = torch.full((hist.shape[0],), math.inf, dtype=torch.float64, device=dev)
        best_i = torch.full((hist.shape[0],), half, dtype=torch.float64, device=dev)
        for i in list(range(levels, half, stride)) + [half]:
            p = hist[:, :i].clone()
            p[:, -1] += hist[:, i:].sum(1)
            nonzero = (hist[:, :i] > 0).double()
            # merge i bins into `levels` chunks (chunk boundaries by integer division, as TensorRT does)
            chunk = torch.arange(i, device=dev) * levels // i
            sums = torch.zeros(hist.shape[0], levels, dtype=torch.float64, device=dev).index_add_(1, chunk, hist[:, :i])
            nz = torch.zeros(hist.shape[0], levels, dtype=torch.float64, device=dev).index_add_(1, chunk, nonzero)
            q = (sums / nz.clamp(min=1))[:, chunk] * nonzero
            p = p / p.sum(1, keepdim=True).clamp(min=1e-30)
            q = q / q.sum(1, keepdim=True).clamp(min=1e-30)
            mask = p > 0
            kl = torch.where(mask, p * (torch.log(p.clamp(min=1e-30)) - torch.log(q.clamp(min=1e-30))),
                             torch.zeros_like(p)).sum(1)
            better = kl < best_kl
            best_kl = torch.where(better, kl, best_kl)
            best_i = torch.where(better, torch.full_like(best_i, i), best_i)
        t = (best_i * width).float()
        return torch.maximum(lo, -t), torch.minimum(hi, t)


def _row_spec(spec: QuantSpec) -> QuantSpec:
    """The spec seen row-wise: qparams of shape [C] broadcast over rows [C, L] (the 'channel' view)."""
    return dataclasses.replace(spec, granularity="channel")


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "clip": ClipObserver,
             "mse": MSEObserver, "kl": KLObserver}


def make_observer(name: str, spec: QuantSpec, **kwargs) -> Observer:
    """Build an observer by name; kwargs are its own (percentile=, threshold=, grid=, min_ratio=, bins=)."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name](spec, **kwargs)


def weight_rows(w: torch.Tensor, spec: QuantSpec) -> list[torch.Tensor]:
    """Split a [N, K] weight into the row blocks whose ranges give its scales: [1, N·K] (tensor), [N, K]
    (channel), or [N·G', group_size] for the full groups plus [N, K mod group_size] for a ragged last group."""
    n, k = w.shape
    if spec.granularity == "tensor":
        return [w.reshape(1, -1)]
    if spec.granularity in ("channel", "token"):
        return [w]
    gs = spec.group_size
    full = (k // gs) * gs
    blocks = [w[:, :full].reshape(-1, gs)] if full else []
    if full < k:
        blocks.append(w[:, full:])
    return blocks


def weight_qparams(w: torch.Tensor, spec: QuantSpec, observer: Observer) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(scale, zero_point) for weight w [N, K]: shapes [] / [N] / [N, G] for tensor / channel / group."""
    n, k = w.shape
    ranges = [observer.range_of(rows) for rows in weight_rows(w, spec)]
    lo = torch.cat([r[0].reshape(n, -1) if spec.granularity == "group" else r[0] for r in ranges], dim=-1)
    hi = torch.cat([r[1].reshape(n, -1) if spec.granularity == "group" else r[1] for r in ranges], dim=-1)
    if spec.granularity == "tensor":
        lo, hi = lo.reshape(()), hi.reshape(())
    return compute_qparams(lo, hi, spec)
