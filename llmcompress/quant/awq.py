"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", 2024):
protect the weights that meet large activations by scaling their input channels up before quantizing.

    s = x̄^α                        x̄_j = mean |X_j| over calibration tokens
    s = x̄^α / w̄^(1−α)              (duo scaling, llm-compressor's default; w̄_j = mean over rows of |W_j| / the
                                    max |W| of its group, so w̄ sees the weights as the quantizer does)
    s ← s / sqrt(max s · min s)     (keeps the scales centred on 1)
    loss(α) = ‖X Wᵀ − (X / s) Q(W · s)ᵀ‖²     over a grid α = 0, 1/grid, …, (grid−1)/grid
                                    (normalize_tokens: over unit-norm rows x / ‖x‖, so the attention sink's
                                    small-norm input counts as much as any other token's)

The best s is folded into the op producing X (smoothquant.fold_scales), then W·s is quantized group-wise as
usual. s = 1 (no scaling) is always a candidate, so the search never returns a worse loss than plain RTN.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional, Sequence, Union

import torch

from .formats import QuantSpec, fake_quantize
from .gptq import _few_threads, dampen_, refit_row_scales, unit_rows
from .observers import weight_qparams


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """w̄ [K]: mean over all rows of |W| normalised by its group's max |W| (ragged last group included)."""
    W = torch.cat([w.detach().float() for w in weights])
    n, k = W.shape
    normed = torch.empty_like(W)
    for g0 in range(0, k, group_size):
        block = W[:, g0:g0 + group_size].abs()
        normed[:, g0:g0 + group_size] = block / block.amax(dim=1, keepdim=True).clamp(min=1e-8)
    return normed.mean(dim=0)


def tied_mean(v: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """v [K] averaged over the channels sharing a tie[j], broadcast back to [K]."""
    tie = tie.to(v.device)
    n = int(tie.max()) + 1
    tot = torch.zeros(n, device=v.device, dtype=v.dtype).index_add_(0, tie, v)
    cnt = torch.zeros(n, device=v.device, dtype=v.dtype).index_add_(0, tie, torch.ones_like(v))
    return (tot / cnt.clamp(min=1))[tie]


def gqa_tie(attn: torch.nn.Module, k: int) -> Optional[torch.Tensor]:
    """For o_proj [*, k] under grouped-query attention: the v_proj output channel behind each o_proj input
    channel (query head q, dim d reads kv head q // groups, dim d), or None if the module does not say."""
    hd, groups = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
    if not hd or not groups or k % hd:
        return None
    j = torch.arange(k)
    return (j // hd // groups) * hd + j % hd


def sample_index(rows: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], limit: Optional[int], seed: int = 0,
                 keep_first: bool = True) -> Optional[torch.Tensor]:
    """rows[b]: the [n_b, K] real-token inputs of batch b (masks[b] [B, T] picked them, row-major). Returns the
    indices into torch.cat(rows) of at most `limit` of them sampled evenly at random (None: all of them);
    keep_first always keeps each sequence's first token (the attention sink: a few of them in a random sample
    otherwise, though every later token attends to it). take_rows applies them, to the rows or to per-row values."""
    total = sum(r.shape[0] for r in rows)
    if not limit or total <= limit:
        return None
    first = torch.zeros(total, dtype=torch.bool)
    if keep_first:
        off = 0
        for r, m in zip(rows, masks):
            lens = m.sum(dim=1).cpu()
            starts = torch.cumsum(lens, 0) - lens
            first[off + starts[lens > 0]] = True
            off += r.shape[0]
    g = torch.Generator().manual_seed(seed)
    rest = torch.nonzero(~first).squeeze(1)
    rest = rest[torch.randperm(rest.numel(), generator=g)[: max(limit - int(first.sum()), 0)]]
    return torch.cat([torch.nonzero(first).squeeze(1)[:limit], rest]).sort().values


def take_rows(rows: Sequence[torch.Tensor], keep: Optional[torch.Tensor]) -> torch.Tensor:
    """torch.cat(rows), restricted to the indices `keep` (sample_index's; None: all)."""
    x = torch.cat(list(rows))
    return x if keep is None else x[keep.to(x.device)]


def awq_search(x: torch.Tensor, weights: Sequence[torch.Tensor], fq_weight: Callable[[torch.Tensor], torch.Tensor],
               grid: int = 20, duo_scaling: Union[bool, str] = True, group_size: int = 128,
               normalize_tokens: bool = False,
               score: Optional[Callable[[list[torch.Tensor]], float]] = None,
               fq_for: Optional[Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = None,
               tie: Optional[torch.Tensor] = None, token_weight: Optional[torch.Tensor] = None,
               row_weight: Optional[torch.Tensor] = None, group_rounds: int = 0) -> tuple[torch.Tensor, dict]:
    """Best per-channel scale s [K] for the Linears `weights` ([N_i, K]) reading calibration rows x [T, K].

    fq_weight(W) is the weight quantizer (quantize-dequantize) the model will use. duo_scaling: True (x̄^α / w̄^(1−α)),
    False (x̄^α) or "both" (every α of each family). normalize_tokens: the loss is taken over unit-norm rows
    x / ‖x‖ (x̄ is still the plain mean |x|). score(Ŵ), given the dequantized Ŵ_i = Q(W_i·s)/s of each Linear
    (in the unscaled coordinates), replaces that loss when given: e.g. the decoder layer's output error.
    fq_for(s), when given, is the weight quantizer to score the candidate s with (instead of fq_weight), e.g. RTN
    plus the scale refit on the inputs x / s. tie [K] (long): input channel j takes the producer channel
    tie[j]'s scale, so channels that share a producer channel get one s (x̄ and w̄ averaged over them; o_proj under
    GQA, where each v channel feeds one o column per query head of its group). token_weight [T] and row_weight
    [ΣN_i] (guidance.Guidance: the end loss's a_t and b_n) weigh the loss's tokens and output rows:
    Σ_n b_n d_n Xᵀ diag(a) X d_nᵀ (the rows of x as they are, not unit-norm). group_rounds > 0 (Gram loss, no
    tie): after the grid, refine_groups lets each quantization group of input channels take its own α. Returns s
    and a record {"alpha": best α or None for s = 1, "duo": whether the best s was a duo one, "loss": its loss, "loss_unscaled": the loss at s = 1}."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)
    xl = unit_rows(x) if normalize_tokens and token_weight is None else x
    families = [True, False] if duo_scaling == "both" else [bool(duo_scaling)]
    w_mean = weight_mean(weights, group_size) if True in families else None
    if tie is not None:
        x_mean, w_mean = (None if v is None else tied_mean(v, tie) for v in (x_mean, w_mean))
    ws = [w.detach().float() for w in weights]
    W = torch.cat(ws)
    # ‖X Wᵀ − X Ŵᵀ‖² = Σ_rows d XᵀX dᵀ (d = W − Ŵ): one K × K Gram instead of a T × N product per candidate
    xw = xl if token_weight is None else xl * token_weight.to(xl.device, torch.float32).unsqueeze(1)
    gram = (xw.t() @ xl).double() if score is None else None
    rw = None if row_weight is None else row_weight.to(W.device, torch.float64)
    numel = x.shape[0] * W.shape[0]

    def loss(s: torch.Tensor) -> float:
        fq = fq_weight if fq_for is None else fq_for(s)
        with _few_threads(W.device):  # small ops (see refit_scales); the big products below keep the threads
            w_hat = [fq(w * s) / s for w in ws]
            d = None if score is not None else (W - torch.cat(w_hat)).double()
        if score is not None:
            return float(score(w_hat))
        per_row = torch.mm(d, gram).mul_(d).sum(1)
        return float((per_row if rw is None else per_row * rw).sum() / numel)

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
    if group_rounds and gram is not None and fq_for is None and tie is None:
        with _few_threads(W.device):
            best_s, rec["groups_changed"] = refine_groups(W, ws, best_s, cands, gram, rw, fq_weight, group_size,
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


def layer_score(layer: torch.nn.Module, lw, masks: Sequence[torch.Tensor], ref: dict,
                lins: Sequence[torch.nn.Linear], n_batches: int) -> Callable[[list[torch.Tensor]], float]:
    """A `score` for awq_search: the decoder layer's output error, mean squared over the real tokens of
    `n_batches` calibration batches (spread over the length-sorted set; lw: the Layerwise runner holding their
    inputs, ref: batch -> float output), with the Linears `lins` holding the candidate Ŵ and all else as it is."""
    n_b = len(lw.batches)
    k = min(n_batches, n_b)
    picks = sorted({n_b * (j + 1) // k - 1 for j in range(k)})

    @torch.no_grad()
    def score(w_hat: list[torch.Tensor]) -> float:
        err, n = 0.0, 0
        with weights_swapped(lins, w_hat):
            for b in picks:
                lw.current = b
                out = layer(lw.hidden[b], **lw.kwargs[b])
                out = out[0] if isinstance(out, (tuple, list)) else out
                d = (out.float() - ref[b].float())[masks[b].to(out.device)]
                err += float(d.pow(2).sum())
                n += d.numel()
        return err / max(n, 1)
    return score


def block_score(run: Callable[[int], torch.Tensor], items: Sequence[int],
                lins: Sequence[torch.nn.Linear]) -> Callable[[list[torch.Tensor]], float]:
    """A `score` for awq_search on the output of the block the Linears `lins` feed (AutoAWQ's module2inspect:
    q/k/v scored on the attention block's output, o_proj included; gate/up on the MLP's output, down_proj
    included): run(i) is the block's output [n_i, D] on calibration item i (a batch, or a chunk of rows), the
    reference taken now with the Linears as they are; the score is mean ‖run(i) − ref_i‖² with the candidate
    Ŵ in `lins` (all else as it is)."""
    with torch.no_grad():
        ref = {i: run(i).detach().double() for i in items}

    @torch.no_grad()
    def score(w_hat: list[torch.Tensor]) -> float:
        err, n = 0.0, 0
        with weights_swapped(lins, w_hat):
            for i in items:
                d = run(i).double() - ref[i]
                err += float(d.pow(2).sum())
                n += d.numel()
        return err / max(n, 1)
    return score


@contextmanager
def weights_swapped(lins: Sequence[torch.nn.Linear], w_hat: Sequence[torch.Tensor]):
    """The Linears hold the candidate weights inside the block, their own again after it (even on error)."""
    saved = [lin.weight.detach().clone() for lin in lins]
    try:
        for lin, w in zip(lins, w_hat):
            lin.weight.copy_(w.to(lin.weight.dtype))
        yield
    finally:
        for lin, w in zip(lins, saved):
            lin.weight.copy_(w)


def spread_batches(n_tokens: Sequence[int], target: int) -> list[int]:
    """Indices of the fewest batches, spread evenly over the (length-sorted) list, that hold ≥ target tokens
    (all of them if they hold fewer)."""
    n_b = len(n_tokens)
    for k in range(1, n_b + 1):
        picks = sorted({n_b * (j + 1) // k - 1 for j in range(k)})
        if sum(n_tokens[b] for b in picks) >= target:
            return picks
    return list(range(n_b))


@torch.no_grad()
def clip_search(x: torch.Tensor, w: torch.Tensor, fq_weight: Callable[[torch.Tensor], torch.Tensor],
                group_size: int, grid: int = 20, max_shrink: float = 0.5, rows: int = 512,
                normalize_tokens: bool = False,
                refit_H: Optional[torch.Tensor] = None,
                step: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    # (group-wise weight quantization only: each group's clip range is its own scale's range)
    """AWQ's weight clipping: per output row and group, the max |w| (shrunk by 1, 1 − 1/grid, …, 1 − max_shrink)
    that minimises the group's own output error ‖X_g W_gᵀ − X_g Q(clip(W_g))ᵀ‖² on `rows` calibration rows
    (normalize_tokens: rows of unit norm, as in awq_search). Returns the clipped weight (quantize it with the same
    quantizer; min-max then lands on the chosen range).

    refit_H [K, K] (with step(W_g) -> the quantizer's scale [N, 1] of a group): score each candidate as the scale
    refit that follows will see it: the candidate only picks the RTN codes c = Q(clip(W_g)) / step, and the group
    scale t is then the least-squares one on H's diagonal block H_g, so the error is
    min_t (w − t c) H_g (w − t c)ᵀ = w H_g wᵀ − (c H_g wᵀ)² / (c H_g cᵀ) (x and rows unused)."""
    with _few_threads(w.device):  # hundreds of small ops: see refit_scales
        if refit_H is not None:
            return _clip_groups(None, w.float(), fq_weight, group_size, grid, max_shrink, refit_H.float(), step)
        x = x.float()
        if x.shape[0] > rows:
            x = x[torch.linspace(0, x.shape[0] - 1, rows).long()]
        if normalize_tokens:
            x = unit_rows(x)
        return _clip_groups(x, w.float(), fq_weight, group_size, grid, max_shrink)


def refit_clip_error(wg: torch.Tensor, q: torch.Tensor, step: torch.Tensor, Hg: torch.Tensor) -> torch.Tensor:
    """Per row of one group: (w − t c) H_g (w − t c)ᵀ at the least-squares t for the codes c = round(q / step)
    (q = the RTN Ŵ_g, step [N, 1] its scale); rows where that t is not positive keep the RTN error of q."""
    c = torch.round(q / step.clamp(min=1e-30))
    cH = c @ Hg
    num, den = (cH * wg).sum(1), (cH * c).sum(1)
    whw = ((wg @ Hg) * wg).sum(1)
    d = wg - q
    rtn = ((d @ Hg) * d).sum(1)
    ok = (den > 0) & (num > 0)
    opt = whw - num.pow(2) / den.clamp(min=1e-30)
    return torch.where(ok, torch.minimum(opt, rtn), rtn)


def _clip_groups(x, w, fq_weight, group_size, grid, max_shrink, refit_H=None, step=None) -> torch.Tensor:
    out = w.clone()
    n, k = w.shape
    for g0 in range(0, k, group_size):
        wg = w[:, g0:g0 + group_size]
        if refit_H is None:
            xg = x[:, g0:g0 + group_size]
            gram = xg.t() @ xg  # each row's error ‖X_g (w − q)ᵀ‖² = (w − q) X_gᵀX_g (w − q)ᵀ
        else:
            gram = refit_H[g0:g0 + group_size, g0:g0 + group_size]
        amax = wg.abs().amax(dim=1, keepdim=True)
        best_err = torch.full((n,), float("inf"), device=w.device)
        best = wg.clone()
        for i in range(int(max_shrink * grid) + 1):
            m = amax * (1 - i / grid)
            cand = wg.clamp(-m, m)
            q = fq_weight(cand)  # one group of the spec's group size: quantized exactly as inside W
            if refit_H is None:
                d = wg - q
                err = ((d @ gram) * d).sum(dim=1) / xg.shape[0]
            else:
                err = refit_clip_error(wg, q, step(cand), gram)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[better] = cand[better]
        out[:, g0:g0 + group_size] = best
    return out


def refit_gram(x: torch.Tensor, damp: float = 0.01, unit: bool = True) -> torch.Tensor:
    """H = 2 XᵀX / n of the unit-norm rows x / ‖x‖ (of the rows as they are with unit=False: rows already
    weighted, e.g. by guidance), plus damp · mean(diag H) on its diagonal (as GPTQ's)."""
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


def refit_quantizer(x: torch.Tensor, spec: QuantSpec, new_observer, damp: float = 0.01, unit: bool = True):
    """fq_for for awq_search when the scale refit follows: s -> RTN + refit under the inputs x / s."""
    def for_scale(s: torch.Tensor):
        H = refit_gram(x / s.to(x.device), damp, unit)
        return lambda w: refit_hat(w, H.to(w.device), spec, new_observer)[0]
    return for_scale


@torch.no_grad()
def refit_scales(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec, new_observer, rounds: int = 1,
                 damp: float = 0.01, unit: bool = True) -> torch.Tensor:
    """Keep each row's RTN codes (the observer's scales) and re-solve its group scales by least squares on
    H = XᵀX of the unit-norm rows x / ‖x‖ (of x as it is with unit=False; gptq.refit_row_scales; damped like
    GPTQ's H); `rounds` > 1 re-rounds
    W to the new scales and refits again. Returns Ŵ = s'·codes, which the min-max observer reproduces exactly
    (the extreme codes stay at the ends of the grid); a group for which it would not keeps its input weights."""
    if spec.granularity not in ("channel", "group") or spec.is_float:
        return w
    # On CPU this runs on one thread (gptq._few_threads, as GPTQ's column loop): it is mostly small per-group ops,
    # and with two threads each one waits for both cores, which on a shared 2-core machine made AWQ 5-10x slower.
    with _few_threads(w.device):
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
