"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", 2024):
protect the weights that meet large activations by scaling their input channels up before quantizing.

    s = x̄^α                        x̄_j = mean |X_j| over calibration tokens
    s = x̄^α / w̄^(1−α)              (duo scaling, llm-compressor's default; w̄_j = mean over rows of |W_j| / the
                                    max |W| of its group, so w̄ sees the weights as the quantizer does)
    s ← s / sqrt(max s · min s)     (keeps the scales centred on 1)
    loss(α) = ‖X Wᵀ − (X / s) Q(W · s)ᵀ‖²     over a grid α = 0, 1/grid, …, (grid−1)/grid
                                    (normalize_tokens: over unit-norm rows x / ‖x‖, so the attention sink's
                                    small-norm input counts as much as any other token's)

The best s is folded into the op producing X (architectures.fold_scales), then W·s is quantized group-wise as
usual. s = 1 (no scaling) is always a candidate, so the search never returns a worse loss than plain RTN.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from llmcompress.errors import UserError

from ..formats import QuantSpec, fake_quantize
from ..observers import weight_qparams
from ..refit import dampen_, few_threads, refit_row_scales, unit_rows
from .base import Algorithm, Layer


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """w̄ [K]: mean over all rows of |W| normalised by its group's max |W| (ragged last group included)."""
    W = torch.cat([w.detach().float() for w in weights])
    n, k = W.shape
    normed = torch.empty_like(W)
    for g0 in range(0, k, group_size):
        block = W[:, g0:g0 + group_size].abs()
        normed[:, g0:g0 + group_size] = block / block.amax(dim=1, keepdim=True).clamp(min=1e-8)
    return normed.mean(dim=0)


def sample_index(total: int, limit: Optional[int], seed: int = 0) -> Optional[torch.Tensor]:
    """Indices (sorted) of at most `limit` of `total` calibration rows, sampled evenly at random (None: all)."""
    if not limit or total <= limit:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:limit].sort().values


def take_rows(rows: Sequence[torch.Tensor], keep: Optional[torch.Tensor]) -> torch.Tensor:
    """torch.cat(rows), restricted to the indices `keep` (sample_index's; None: all)."""
    x = torch.cat(list(rows))
    return x if keep is None else x[keep.to(x.device)]


def awq_search(x: torch.Tensor, weights: Sequence[torch.Tensor], fq_weight: Callable[[torch.Tensor], torch.Tensor],
               grid: int = 20, duo_scaling: Union[bool, str] = True, group_size: int = 128,
               normalize_tokens: bool = False, group_rounds: int = 0) -> tuple[torch.Tensor, dict]:
    """Best per-channel scale s [K] for the Linears `weights` ([N_i, K]) reading calibration rows x [T, K].

    fq_weight(W) is the weight quantizer (quantize-dequantize) the model will use. duo_scaling: True (x̄^α / w̄^(1−α)),
    False (x̄^α) or "both" (every α of each family). normalize_tokens: the loss is taken over unit-norm rows
    x / ‖x‖ (x̄ is still the plain mean |x|). group_rounds > 0: after the grid, refine_groups lets each
    quantization group of input channels take its own α. Returns s and a record {"alpha": best α or None for
    s = 1, "duo": whether the best s was a duo one, "loss": its loss, "loss_unscaled": the loss at s = 1}."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)
    xl = unit_rows(x) if normalize_tokens else x
    families = [True, False] if duo_scaling == "both" else [bool(duo_scaling)]
    w_mean = weight_mean(weights, group_size) if True in families else None
    ws = [w.detach().float() for w in weights]
    W = torch.cat(ws)
    # ‖X Wᵀ − X Ŵᵀ‖² = Σ_rows d XᵀX dᵀ (d = W − Ŵ): one K × K Gram instead of a T × N product per candidate
    gram = (xl.t() @ xl).double()
    numel = x.shape[0] * W.shape[0]

    def loss(s: torch.Tensor) -> float:
        with few_threads(W.device):  # small ops (see refit_scales); the big products below keep the threads
            d = (W - torch.cat([fq_weight(w * s) / s for w in ws])).double()
        return float(torch.mm(d, gram).mul_(d).sum(1).sum() / numel)

    ones = torch.ones_like(x_mean)
    best_s, best, best_loss = ones, (None, None), loss(ones)
    unscaled = best_loss
    cands = [ones]
    for duo in families:
        for i in range(0 if duo else 1, grid):  # x̄^0 is s = 1, already scored
            alpha = i / grid
            if duo:
                s = x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4)
            else:
                s = x_mean.pow(alpha)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            cands.append(s)
            err = loss(s)
            if err < best_loss:
                best_s, best, best_loss = s, (alpha, duo), err
    rec = {"alpha": best[0], "duo": best[1], "loss": best_loss, "loss_unscaled": unscaled}
    if group_rounds:
        with few_threads(W.device):
            best_s, rec["groups_changed"] = refine_groups(W, ws, best_s, cands, gram, None, fq_weight, group_size,
                                                          group_rounds)
        rec["loss"] = loss(best_s)
    return best_s, rec


def refine_groups(W: torch.Tensor, ws: Sequence[torch.Tensor], s: torch.Tensor, cands: Sequence[torch.Tensor],
                  gram: torch.Tensor, rw: Optional[torch.Tensor], fq_weight: Callable[[torch.Tensor], torch.Tensor],
                  group_size: int, rounds: int) -> tuple[torch.Tensor, int]:
    """Coordinate descent over the quantization groups of the input channels: each group g in turn takes, from the
    candidate scale vectors `cands` (AWQ's α grid), the slice s_g that minimises the whole loss
    Σ_n rw_n d_n G d_nᵀ with the other groups' scales fixed (d = W − Q(W·s)/s; G = gram [K, K], float64).

    A group's codes depend only on its own slice of s (the group-wise quantizer is scale-equivariant per group),
    so d changes only in g's columns, and with R = D G[:, g] − D_g G_gg (the other groups' cross terms) the loss
    moves by Σ_n rw_n (2 d_g·R_n + d_g G_gg d_gᵀ) + const. The current slice is a candidate, so the loss never
    rises. Returns (s, number of group changes)."""
    n, k = W.shape
    s = s.clone()

    def d_of(g0: int, g1: int, sg: torch.Tensor) -> torch.Tensor:
        return (W[:, g0:g1] - torch.cat([fq_weight(w[:, g0:g1] * sg) / sg for w in ws])).double()

    D = torch.cat([d_of(g0, min(g0 + group_size, k), s[g0:g0 + group_size]) for g0 in range(0, k, group_size)], 1)
    weight = torch.ones(n, dtype=torch.float64, device=W.device) if rw is None else rw.to(W.device, torch.float64)
    changed = 0
    for _ in range(rounds):
        moved = False
        for g0 in range(0, k, group_size):
            g1 = min(g0 + group_size, k)
            Ggg = gram[g0:g1, g0:g1]
            rest = D @ gram[:, g0:g1] - D[:, g0:g1] @ Ggg

            def delta(dg: torch.Tensor) -> float:
                return float((((2 * rest + dg @ Ggg) * dg).sum(1) * weight).sum())

            best_val, best_d = delta(D[:, g0:g1]), None
            for c in cands:
                sg = c[g0:g1]
                if torch.equal(sg, s[g0:g1]):
                    continue
                dg = d_of(g0, g1, sg)
                val = delta(dg)
                if val < best_val - 1e-12 * abs(best_val):  # beyond float noise
                    best_val, best_d, best_sg = val, dg, sg
            if best_d is not None:
                s[g0:g1] = best_sg
                D[:, g0:g1] = best_d
                changed += 1
                moved = True
        if not moved:
            break
    return s, changed


@torch.no_grad()
def clip_search(x: torch.Tensor, w: torch.Tensor, fq_weight: Callable[[torch.Tensor], torch.Tensor],
                group_size: int, grid: int = 20, max_shrink: float = 0.5, rows: int = 512,
                normalize_tokens: bool = False) -> torch.Tensor:
    """AWQ's weight clipping (group-wise weight quantization only: each group's clip range is its own scale's
    range): per output row and group, the max |w| (shrunk by 1, 1 − 1/grid, …, 1 − max_shrink) that minimises
    the group's own output error ‖X_g W_gᵀ − X_g Q(clip(W_g))ᵀ‖² on `rows` calibration rows (normalize_tokens:
    rows of unit norm, as in awq_search). Returns the clipped weight (quantize it with the same quantizer;
    min-max then lands on the chosen range)."""
    with few_threads(w.device):  # hundreds of small ops: see refit_scales
        x = x.float()
        if x.shape[0] > rows:
            x = x[torch.linspace(0, x.shape[0] - 1, rows).long()]
        if normalize_tokens:
            x = unit_rows(x)
        return _clip_groups(x, w.float(), fq_weight, group_size, grid, max_shrink)


def _clip_groups(x, w, fq_weight, group_size, grid, max_shrink) -> torch.Tensor:
    out = w.clone()
    n, k = w.shape
    for g0 in range(0, k, group_size):
        wg = w[:, g0:g0 + group_size]
        xg = x[:, g0:g0 + group_size]
        gram = xg.t() @ xg  # each row's error ‖X_g (w − q)ᵀ‖² = (w − q) X_gᵀX_g (w − q)ᵀ
        amax = wg.abs().amax(dim=1, keepdim=True)
        best_err = torch.full((n,), float("inf"), device=w.device)
        best = wg.clone()
        for i in range(int(max_shrink * grid) + 1):
            m = amax * (1 - i / grid)
            cand = wg.clamp(-m, m)
            d = wg - fq_weight(cand)  # one group of the spec's group size: quantized exactly as inside W
            err = ((d @ gram) * d).sum(dim=1) / xg.shape[0]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[better] = cand[better]
        out[:, g0:g0 + group_size] = best
    return out


def refit_gram(x: torch.Tensor, damp: float = 0.01, unit: bool = True) -> torch.Tensor:
    """H = 2 XᵀX / n of the unit-norm rows x / ‖x‖ (of the rows as they are with unit=False), plus
    damp · mean(diag H) on its diagonal (as GPTQ's)."""
    xn = unit_rows(x.float()) if unit else x.float()
    H = 2.0 * xn.t() @ xn / xn.shape[0]
    dampen_(H, damp)
    return H


def refit_hat(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, new_observer,
              rounds: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN of W [N, K], then each row's scales re-solved by least squares for its codes under H (refit_scales).
    Returns (Ŵ, scales)."""
    W = W.float()
    scale, zero = weight_qparams(W, spec, new_observer(spec))
    W_hat = fake_quantize(W, scale, zero, spec)
    for r in range(rounds):
        if r:
            W_hat = fake_quantize(W, scale, zero, spec)  # the codes of the refit scales
        W_hat, scale = refit_row_scales(W, W_hat, scale, H, spec)
    return W_hat, scale


@torch.no_grad()
def refit_scales(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec, new_observer, rounds: int = 1,
                 damp: float = 0.01, unit: bool = True) -> torch.Tensor:
    """Keep each row's RTN codes (the observer's scales) and re-solve its group scales by least squares on
    H = XᵀX of the unit-norm rows x / ‖x‖ (of x as it is with unit=False; refit.refit_row_scales; damped like
    GPTQ's H); `rounds` > 1 re-rounds
    W to the new scales and refits again. Returns Ŵ = s'·codes, which the min-max observer reproduces exactly
    (the extreme codes stay at the ends of the grid); a group for which it would not keeps its input weights."""
    if spec.granularity not in ("channel", "group") or spec.is_float:
        return w
    # On CPU this runs on one thread (refit.few_threads, as GPTQ's column loop): it is mostly small per-group ops,
    # and with two threads each one waits for both cores, which on a shared 2-core machine made AWQ 5-10x slower.
    with few_threads(w.device):
        return _refit_scales(x, w, spec, new_observer, rounds, damp, unit)


def _refit_scales(x, w, spec, new_observer, rounds, damp, unit) -> torch.Tensor:
    W = w.detach().float()
    W_hat, scale = refit_hat(W, refit_gram(x, damp, unit).to(W.device), spec, new_observer, rounds)
    W_out = _pin_range(W_hat, scale, spec, new_observer) if spec.symmetric else W_hat
    again = fake_quantize(W_out, *weight_qparams(W_out, spec, new_observer(spec)), spec)
    ok = (again - W_hat).abs() <= 1e-5 * W_hat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    k = W.shape[1]
    gs = spec.group_size if spec.granularity == "group" else k
    for g0 in range(0, k, gs):  # a group min-max would not give back keeps its own weights (plain RTN there)
        bad = ~ok[:, g0:g0 + gs].all(dim=1)
        W_out[bad, g0:g0 + gs] = W[bad, g0:g0 + gs]
    return W_out


def _pin_range(W_hat: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, new_observer) -> torch.Tensor:
    """Symmetric grids: min-max sets scale = max|w| / h, h = (qmax − qmin) / 2 (7.5 for int4), so Ŵ = s'·codes
    would come back with another scale (its max |code| is 8 or 7). Per row and group, the elements of code qmin
    (else qmax, else −qmax) move to ±h·s'·f, f within a few ulps of 1, tried in turn until min-max gives back
    s' and every code of the group (qmin and qmax round outward and clamp back; −qmax relies on the tie)."""
    n, k = W_hat.shape
    s2 = scale.reshape(n, -1)
    gs = spec.group_size if spec.granularity == "group" else k
    h = (spec.qmax - spec.qmin) / 2
    bounds = [(g0, min(g0 + gs, k)) for g0 in range(0, k, gs)]
    s_full = torch.cat([s2[:, g:g + 1].expand(n, b1 - b0) for g, (b0, b1) in enumerate(bounds)], dim=1)
    codes = torch.round(W_hat / s_full)
    top = torch.zeros_like(codes, dtype=torch.bool)
    for b0, b1 in bounds:  # the codes qmin if any, else qmax (both round outward), else −qmax (left to the tie)
        c = codes[:, b0:b1]
        lo, hi = c == spec.qmin, c == spec.qmax
        top[:, b0:b1] = torch.where(lo.any(1, keepdim=True), lo,
                                    torch.where(hi.any(1, keepdim=True), hi, c == -spec.qmax))
    out = W_hat.clone()
    done = torch.zeros(n, len(bounds), dtype=torch.bool, device=W_hat.device)
    for f in (1 + 1e-6, 1 - 1e-6, 1 + 3e-7, 1 - 3e-7, 1 + 1e-7, 1 - 1e-7, 1.0, 1 + 3e-6, 1 - 3e-6):
        cand = torch.where(top, torch.sign(W_hat) * h * s_full * f, W_hat)
        back = fake_quantize(cand, *weight_qparams(cand, spec, new_observer(spec)), spec)
        ok_el = (back - W_hat).abs() <= 1e-6 * s_full
        for g, (b0, b1) in enumerate(bounds):
            ok = ok_el[:, b0:b1].all(dim=1) & ~done[:, g]
            out[ok, b0:b1] = cand[ok, b0:b1]
            done[:, g] |= ok
        if done.all():
            break
    return out


REFIT_DAMP = 0.01  # refit_scales: λ = REFIT_DAMP · mean(diag H), as gptq.damp's default


class AWQ(Algorithm):
    """Per group, in true-sequential order: search s and fold it into the producer (groups with none, or a
    Linear producer whose rows do not match, e.g. v_proj → o_proj under grouped-query attention, stay
    unscaled), then clip and refit each consumer on the inputs it will read (x / s). The weights method (RTN, or
    GPTQ with awq.gptq) quantizes the result."""
    wants_inputs = "rows"
    needs_data = True

    @classmethod
    def wanted(cls, cfg) -> bool:
        return cfg.method == "awq"

    def begin(self, model, arch) -> None:
        if arch.generic:
            raise UserError(f"method: awq needs to know which op produces each Linear's input, and there is no "
                            f"architecture mapping for model_type {getattr(model.config, 'model_type', None)!r} "
                            f"(see quant/architectures.py); use method rtn or gptq")
        self.clip_skip = () if self.cfg.awq.clip_qk else arch.logit_inputs

    def _clipped(self, name: str) -> bool:
        """AutoAWQ leaves the Linears behind the attention logits (q/k) unclipped: the logits amplify their
        error; awq.clip_qk clips them too."""
        return self.cfg.awq.clip and self.spec.granularity == "group" and name not in self.clip_skip

    def apply(self, layer: Layer) -> None:
        c, spec = self.cfg.awq, self.spec
        fq = self.weight_fake_quant()
        layer.record["awq_alpha"] = {}
        for g in layer.groups:
            ws = [layer.linears[n].weight for n in g.consumers]
            rows = layer.inputs[g.name]
            x = take_rows(rows, sample_index(sum(r.shape[0] for r in rows), c.search_tokens))
            producer = layer.producer(g)
            if producer is not None and not (isinstance(producer, torch.nn.Linear)
                                             and producer.out_features != ws[0].shape[1]):
                s, rec = awq_search(x, ws, fq, c.grid, "both", spec.group_size, c.normalize_tokens,
                                    group_rounds=c.group_rounds)
                layer.arch.fold_scales(producer, [layer.linears[n] for n in g.consumers], s)
                layer.record["awq_alpha"][g.producer] = rec["alpha"]
                x = x / s.to(x.device)  # the consumers now read X / s
            for n in g.consumers:
                w = layer.linears[n].weight
                if self._clipped(n):
                    w.copy_(clip_search(x, w, fq, spec.group_size, rows=c.clip_tokens,
                                        normalize_tokens=c.normalize_tokens).to(w.dtype))
                if c.refit_scales:
                    w.copy_(refit_scales(x, w, spec, self.new_observer, 1, REFIT_DAMP, unit=True).to(w.dtype))
