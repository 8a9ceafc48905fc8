"""Least-squares helpers GPTQ and AWQ share: unit-norm rows, Hessian dampening, and the refit of a row's scales
for fixed integer codes under a Hessian H (the layer-wise error (w − Ŵ) H (w − Ŵ)ᵀ)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .formats import QuantSpec


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row x / ‖x‖ (x [T, K]): every calibration token weighs the same in H, or in any output-error loss,
    whatever its norm (`Hessian(normalize_tokens=True)`, AWQ's `normalize_tokens` and its scale refit)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def dampen_(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H += damp · mean(diag H) · I in place (percdamp); returns the λ = damp · mean(diag H) it added."""
    lam = damp * torch.diag(H).mean()
    H.diagonal().add_(lam)
    return lam


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
def few_threads(device: torch.device):
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
