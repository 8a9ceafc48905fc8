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


class Hessian:
    """Streaming H = 2 X Xᵀ / n over inputs x [..., K] (float64 sum, so hundreds of batches add exactly enough)."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.xtx += (x.t() @ x).double()
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("GPTQ Hessian has seen no calibration inputs")
        return (2.0 * self.xtx / self.n).float()


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
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """Quantize W [N, K] given the Hessian H [K, K] of its inputs. Works in float32 on W's device."""
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
        zero = None if spec.symmetric else torch.empty(n, g, dtype=spec.code_dtype, device=W.device)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, device=W.device)
    L = torch.linalg.cholesky(H)
    Linv = torch.linalg.solve_triangular(L, torch.eye(k, device=W.device), upper=False)
    Hinv = torch.linalg.cholesky(Linv.t() @ Linv, upper=True)  # H⁻¹ = L⁻ᵀ L⁻¹

    with _few_threads(W.device):
        Q = _quantize_columns(W, Hinv, perm, scale, zero, spec, observer, block_size, static)
    Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q, scale, zero, layer_error(W0, Q, H_orig))


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
    """The GPTQ loop over (permuted) columns with lazy block updates; fills dynamic group scales as it goes."""
    n, k = W.shape
    grouped = spec.granularity == "group"
    gs = spec.group_size
    col_spec = _column_spec(spec)
    cols_order = perm.tolist()
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols_order[i1 + i]
            if grouped:
                g = col // gs
                if not static and col % gs == 0:
                    # dynamic group: its scale from the weights as updated so far (block columns from W1)
                    cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : min(gs, k - col)]
                    s, z = weight_qparams(cols, col_spec, observer)
                    scale[:, g] = s
                    if zero is not None:
                        zero[:, g] = z
                s, z = scale[:, g], None if zero is None else zero[:, g]
            else:
                s, z = scale, zero
            w = W1[:, i]
            d = Hinv1[i, i]
            q = _fake_quantize_column(w, s, z, spec, col_spec)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def _fake_quantize_column(w: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], spec: QuantSpec,
                          col_spec: QuantSpec) -> torch.Tensor:
    """formats.fake_quantize of one column [N] with scale/zero [N] or [], its arithmetic inlined (same division,
    round-half-even, clamp and order): the loop runs it K times, and the generic path's conversions cost more
    than the math. The tests check Ŵ is a fixed point of formats.fake_quantize, so the two cannot drift."""
    if spec.is_float:
        return fake_quantize(w.unsqueeze(1), s, z, col_spec).squeeze(1)
    s = s.float()
    zf = float(spec.symmetric_zero) if z is None else z.float()
    q = torch.clamp(torch.round(w / s) + zf, spec.qmin, spec.qmax)
    return (q - zf) * s


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / 2 = mean over calibration rows of ‖(W − Ŵ) x‖² (with H = 2 X Xᵀ / n)."""
    dW = (W - W_hat).float()
    return float(((dW @ H.float()) * dW).sum() / 2)
