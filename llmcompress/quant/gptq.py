"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
2022): quantize a Linear's weight W [N, K] column by column, spreading each column's rounding error over the
columns not yet quantized so that ‖W X − Ŵ X‖² stays small on the calibration inputs X.

    H = 2 X Xᵀ / n                    (the Hessian of the layer-wise squared error, [K, K])
    H += damp · mean(diag H) · I       (percdamp; keeps H invertible for dead or collinear inputs)
    Hinv = chol(H⁻¹)ᵀ                  (upper Cholesky factor of the inverse: row i holds the OBS update for
                                        column i given that columns < i are already fixed)
    for each column i:  q = Q(w_i);  err = (w_i − q) / Hinv[i, i];  W[:, i:] −= err · Hinv[i, i:]

Columns are processed in blocks of `block_size` (lazy batch updates): inside a block the update touches only the
block, and the block's accumulated error reaches the remaining columns in one matrix product.

Scales: per tensor or per channel are fixed from W up front; per group they are chosen when the group's first
column is reached, from the weights as updated so far (the ragged last group of K mod group_size columns too),
or all up front from the original W with `static_groups`. With `act_order` the columns go in order of decreasing
diag(H) and groups are always static: group g still covers columns [g·gs, (g+1)·gs) in the stored order, so the
checkpoint needs no g_idx and the kernels serve it like any group-quantized weight.

Rows are independent given H, so Linears that read the same input (q/k/v, gate/up) can be stacked into one W.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from .formats import QuantSpec, fake_quantize
from .observers import Observer, weight_qparams


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row x / ‖x‖ (x [T, K]): every calibration token weighs the same in H, or in any output-error loss,
    whatever its norm (`Hessian(normalize_tokens=True)`, AWQ's `normalize_tokens` and its scale refit)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def dampen_(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H += damp · mean(diag H) · I in place (percdamp); returns the λ = damp · mean(diag H) it added."""
    lam = damp * torch.diag(H).mean()
    H.diagonal().add_(lam)
    return lam


class Hessian:
    """Streaming H = 2 X Xᵀ / n over inputs x [..., K] (float64 sum, so hundreds of batches add exactly enough).

    H is symmetric: for K ≥ 256 only the blocks on and above the diagonal of a 3 × 3 block grid (4 × 4 from
    K = 2048) are multiplied, each straight from column slices of x (BLAS reads the transposed operand in place;
    no transposed copy), and the rest mirrored at the end: on CPU 25% less time than one full XᵀX at K = 576 and
    35% less at K = 1536.

    normalize_tokens: each row x enters as x / ‖x‖, so every calibration token weighs the same in H whatever its
    norm. The plain H is dominated by the few tokens whose inputs are huge (attention sinks, massive
    activations), and GPTQ then trades everyone else's error for theirs; H's overall scale does not change
    GPTQ's result (the dampening is relative to mean diag H)."""

    BLOCKED_FROM = 256

    def __init__(self, k: int, device: torch.device | str = "cpu", normalize_tokens: bool = False):
        self.xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.n = 0
        self.normalize_tokens = normalize_tokens
        nb = 1 if k < self.BLOCKED_FROM else 3 if k < 2048 else 4
        self.blocks = [(i * k // nb, (i + 1) * k // nb) for i in range(nb)]

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.normalize_tokens:
            x = unit_rows(x)
        if len(self.blocks) == 1:
            self.xtx += (x.t() @ x).double()
        else:
            for i, (a0, a1) in enumerate(self.blocks):
                for b0, b1 in self.blocks[i:]:
                    self.xtx[a0:a1, b0:b1] += (x[:, a0:a1].t() @ x[:, b0:b1]).double()
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("GPTQ Hessian has seen no calibration inputs")
        xtx = self.xtx
        if len(self.blocks) > 1:
            xtx = xtx.clone()
            for i, (a0, a1) in enumerate(self.blocks):
                for b0, b1 in self.blocks[i + 1:]:
                    xtx[b0:b1, a0:a1] = xtx[a0:a1, b0:b1].t()
        return (2.0 * xtx / self.n).float()


@dataclass
class GPTQResult:
    weight: torch.Tensor  # Ŵ [N, K], dequantized (exactly s·(q − z) of the returned scales)
    scale: torch.Tensor  # [] / [N] / [N, G], as `weight_qparams` returns for the spec
    zero_point: Optional[torch.Tensor]
    error: float  # tr((W − Ŵ) H (W − Ŵ)ᵀ) / 2: the layer-wise squared error GPTQ minimises, per calibration row


def _column_spec(spec: QuantSpec) -> QuantSpec:
    # one column of W seen as [N, 1]: scales of shape [N] (channel/group) or [] (tensor) broadcast over its rows
    return dataclasses.replace(spec, granularity="channel")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, observer: Observer, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  refit_scales: bool = False) -> GPTQResult:
    """Quantize W [N, K] given the Hessian H [K, K] of its inputs. Works in float32 on W's device.
    refit_scales: afterwards, re-solve each row's scales for the codes GPTQ chose (`refit_scales`)."""
    if spec.granularity == "token":
        raise ValueError("GPTQ quantizes weights: granularity must be tensor, channel or group")
    W = W.detach().clone().float()
    W0 = W.clone()
    H = H.detach().clone().float().to(W.device)
    n, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"Hessian is {tuple(H.shape)} but W has {k} input columns")
    H_orig = H.clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights cannot matter, quantize them as 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = spec.granularity == "group"
    # static: every scale fixed from the original W; dynamic groups are chosen as GPTQ reaches them
    static = not grouped or static_groups or act_order
    if static:
        scale, zero = weight_qparams(W, spec, observer)
    else:
        g = spec.num_groups(k)
        scale = torch.empty(n, g, device=W.device)
        zero = None if spec.symmetric else torch.empty(n, g, dtype=spec.zero_dtype, device=W.device)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    dampen_(H, damp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    with _few_threads(W.device):
        Q = _quantize_columns(W, Hinv, perm, scale, zero, spec, observer, block_size, static)
    Q = Q[:, torch.argsort(perm)]
    # the refit solves for scales over integer codes q − z; a float offset (float_zero) has no such codes
    if refit_scales and spec.granularity in ("channel", "group") and not spec.is_float and not spec.float_zero:
        H_damped = H_orig.clone()
        H_damped[dead, dead] = 1
        lam = dampen_(H_damped, damp)
        W0m = W0.masked_fill(dead, 0)
        Q, scale, row_err = refit_row_scales(W0m, Q, scale, H_damped, spec, row_errors=True)
        # the refit already has each row's (W − Ŵ) H_damped (W − Ŵ)ᵀ; H_damped = H + λI off the dead inputs,
        # where W0m − Ŵ is 0 (and H's rows are 0): take λ‖W − Ŵ‖² off rather than multiply by H once more
        error = float((row_err.sum() - lam * (W0m - Q).pow(2).sum()) / 2)
        return GPTQResult(Q, scale, zero, error)
    return GPTQResult(Q, scale, zero, layer_error(W0, Q, H_orig))


def refit_row_scales(W: torch.Tensor, W_hat: torch.Tensor, scale: torch.Tensor, H: torch.Tensor,
                     spec: QuantSpec, row_errors: bool = False) -> tuple[torch.Tensor, ...]:
    """Keep the integer codes c = Ŵ / s − … (Ŵ = s·c per group, c = q − z) and choose each row's G scales anew
    by least squares on the layer-wise error: min_s (w − A s) H (w − A s)ᵀ with A[:, g] = c masked to group g,
    i.e. the G × G system (AᵀHA) s = AᵀH w per row. GPTQ fixed the scales before it chose the codes (from W,
    by the observer); once the codes are known, the best scales for them are this closed form. A row keeps its
    old scales unless the new ones (rounded to the stored scale dtype) lower its error. row_errors: also return
    each row's (W − Ŵ) H (W − Ŵ)ᵀ for the returned Ŵ."""
    n, k = W.shape
    grouped = spec.granularity == "group"
    s2 = scale.reshape(n, -1)  # [N, G] (G = 1 per channel)
    gs = spec.group_size if grouped else k
    bounds = [(g0, min(g0 + gs, k)) for g0 in range(0, k, gs)]
    s_full = torch.cat([s2[:, g:g + 1].expand(n, b1 - b0) for g, (b0, b1) in enumerate(bounds)], dim=1)
    C = torch.round(W_hat / s_full)  # the integer codes minus the zero point
    G = len(bounds)
    M = torch.empty(n, G, G, device=W.device)
    rhs = torch.empty(n, G, device=W.device)
    for g2, (c0, c1) in enumerate(bounds):
        HC = C[:, c0:c1] @ H[c0:c1, :]  # [N, K]: Σ_{j in g2} c_rj H_ji
        for g1, (a0, a1) in enumerate(bounds):
            M[:, g1, g2] = (C[:, a0:a1] * HC[:, a0:a1]).sum(1)
        rhs[:, g2] = (W * HC).sum(1)  # (A_g2ᵀ H w)_r = Σ_i w_ri (C_g2 H)_ri: H symmetric, no W H product needed
    ridge = 1e-6 * M.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)
    M = M + ridge[:, None, None] * torch.eye(G, device=W.device)
    new = torch.linalg.solve(M.double(), rhs.double()).float()
    ok = torch.isfinite(new) & (new > 0)
    new = torch.where(ok, new, s2)
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[spec.scale_dtype]
    new = new.clamp(min=torch.finfo(dt).tiny, max=torch.finfo(dt).max).to(dt).float()
    new_full = torch.cat([new[:, g:g + 1].expand(n, b1 - b0) for g, (b0, b1) in enumerate(bounds)], dim=1)
    W_new = C * new_full

    def row_err(Wq):
        d = W - Wq
        return ((d @ H) * d).sum(1)

    e_new, e_hat = row_err(W_new), row_err(W_hat)
    better = e_new < e_hat
    W_out = torch.where(better[:, None], W_new, W_hat)
    s_out = torch.where(better[:, None], new, s2).reshape(scale.shape)
    if row_errors:
        return W_out, s_out, torch.where(better, e_new, e_hat)
    return W_out, s_out


@contextmanager
def _few_threads(device: torch.device):
    # The column loop is thousands of tiny ops: on CPU, fork/join across threads costs more than it saves
    # (and a contended core stalls every op), so it runs on one thread.
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize_columns(W, Hinv, perm, scale, zero, spec, observer, block_size, static) -> torch.Tensor:
    """The GPTQ loop over (permuted) columns with lazy block updates; fills dynamic group scales as it goes.
    Tens of thousands of iterations per layer: it works on Wᵀ (each column of W a contiguous row, so the rank-1
    update touches contiguous memory: twice as fast on CPU as the strided [N, block] view) and does the fewest
    small ops it can, in place, since on CPU the per-op overhead rather than the arithmetic is what costs."""
    n, k = W.shape
    grouped = spec.granularity == "group"
    gs = spec.group_size
    col_spec = _column_spec(spec)
    cols_order = perm.tolist()
    Wt = W.t().contiguous()  # [K, N]
    Qt = torch.empty_like(Wt)
    Err = torch.empty(block_size, n, dtype=W.dtype, device=W.device)
    s, z = scale, zero
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diagonal(Hinv1).tolist()
        for i in range(i1, i2):
            col = cols_order[i]
            if grouped:
                g = col // gs
                if not static and col % gs == 0:
                    # dynamic group: its scale from the weights as updated so far (the columns past this block
                    # have not had this block's error yet, as in the reference implementation)
                    s_g, z_g = weight_qparams(Wt[i:min(i + gs, k)].t(), col_spec, observer)
                    scale[:, g] = s_g
                    if zero is not None:
                        zero[:, g] = z_g
                s, z = scale[:, g], None if zero is None else zero[:, g]
            w = Wt[i]
            q = _fake_quantize_column(w, s, z, spec, col_spec, Qt[i])
            err = Err[i - i1]
            torch.sub(w, q, out=err).div_(diag[i - i1])
            if i + 1 < i2:
                Wt[i + 1:i2].addr_(Hinv1[i - i1, i - i1 + 1:], err, alpha=-1)
        if i2 < k:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err[:i2 - i1], alpha=-1)
    return Qt.t()


def _fake_quantize_column(w: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], spec: QuantSpec,
                          col_spec: QuantSpec, out: torch.Tensor) -> torch.Tensor:
    """formats.fake_quantize of one column [N] with scale/zero [N] or [] into `out`, its arithmetic inlined (same
    division, round-half-even, clamp and order) and in place: the loop runs it K times, and the generic path's
    conversions cost more than the math. The tests check Ŵ is a fixed point of formats.fake_quantize."""
    if spec.is_float or spec.float_zero:
        return out.copy_(fake_quantize(w.unsqueeze(1), s, z, col_spec).squeeze(1))
    if s.dtype != torch.float32:
        s = s.float()
    if z is None and spec.symmetric_zero == 0:  # signed symmetric: no zero point to add and take off again
        torch.div(w, s, out=out).round_().clamp_(spec.qmin, spec.qmax)
        return out.mul_(s)
    zf = float(spec.symmetric_zero) if z is None else z.float()
    torch.div(w, s, out=out).round_().add_(zf).clamp_(spec.qmin, spec.qmax).sub_(zf)
    return out.mul_(s)


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / 2 = mean over calibration rows of ‖(W − Ŵ) x‖² (with H = 2 X Xᵀ / n)."""
    dW = (W - W_hat).float()
    return float(((dW @ H.float()) * dW).sum() / 2)
