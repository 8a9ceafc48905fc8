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
from dataclasses import dataclass
from typing import Optional

import torch

from ..formats import QuantizedWeight, QuantSpec, fake_quantize, quantize
from ..layerwise import Stop, input_of, real_rows, run_until_stop
from ..observers import Observer, weight_qparams
from ..refit import dampen_, few_threads, refit_row_scales, unit_rows
from .base import Algorithm, Layer


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

    with few_threads(W.device):
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


class GPTQ(Algorithm):
    """GPTQ over a decoder layer's groups, each group's Linears stacked row-wise (one Cholesky for all: rows are
    independent given H). gptq.true_sequential: group by group, each on the inputs the already-quantized groups
    before it produce; on a Llama-shaped layer (architecture.llama_residual, checked once on the first layer by
    computing one batch both ways) fused into one forward's worth of compute (`_fused`), unless an observer
    needs the quantized pass."""
    stage = "weights"
    needs_data = True

    @classmethod
    def wanted(cls, cfg) -> bool:
        return cfg.method == "gptq" or (cfg.method == "awq" and cfg.awq.gptq)

    def __init__(self, cfg, spec, new_observer):
        super().__init__(cfg, spec, new_observer)
        self.fusable: Optional[bool] = None  # decided on the first layer: does it decompose Llama-style?

    def apply(self, layer: Layer) -> None:
        full = layer.arch.llama_residual and list(layer.groups) == list(layer.arch.groups)
        if full and self.cfg.gptq.true_sequential and not layer.observed:
            if self.fusable is None:
                self.fusable = _decomposes(layer)
            if self.fusable:
                layer.outputs = self._fused(layer)
                return
        stages = [[g] for g in layer.groups] if self.cfg.gptq.true_sequential else [layer.groups]
        for stage in stages:
            hess = _hessians(layer, stage, self.cfg.gptq.normalize_tokens)
            for g in stage:
                self._group(layer, g.consumers, hess[g.name].value())

    def _group(self, layer: Layer, cons, H: torch.Tensor) -> None:
        """GPTQ on the group's Linears stacked row-wise, then split back per Linear. A per-tensor scale spans one
        Linear, so those go one by one."""
        g, spec, mine = self.cfg.gptq, self.spec, layer.linears
        for chunk in ([[c] for c in cons] if spec.granularity == "tensor" else [list(cons)]):
            W = torch.cat([mine[c].weight for c in chunk])
            res = gptq_quantize(W, H, spec, self.new_observer(spec), g.damp, g.block_size, g.act_order,
                                g.static_groups, g.refit_scales)
            r0 = 0
            for c in chunk:
                n = mine[c].out_features
                w_hat = res.weight[r0:r0 + n]
                scale = res.scale if spec.granularity == "tensor" else res.scale[r0:r0 + n]
                zero = res.zero_point
                if zero is not None and spec.granularity != "tensor":
                    zero = zero[r0:r0 + n]
                layer.quantized[c] = QuantizedWeight(quantize(w_hat, scale, zero, spec), scale, zero, spec)
                mine[c].weight.copy_(w_hat.to(mine[c].weight.dtype))
                r0 += n

    def _fused(self, layer: Layer) -> list[torch.Tensor]:
        """True-sequential GPTQ for a Llama-shaped layer in one forward's worth of compute: q/k/v's input, then the
        attention output with the quantized q/k/v, then h = x + o_proj(that), then down_proj's input are each
        computed once and kept, so the quantized output h + down_proj(x_d) falls out at the end (no second pass;
        memory: those per-batch activations). Same Hessians and result as the generic path."""
        lw, masks, mine, mod = layer.runner, layer.masks, layer.linears, layer.module
        g_qkv, g_o, g_gu, g_d = layer.groups
        o, down = mine[g_o.consumers[0]], mine[g_d.consumers[0]]
        n_b = len(lw.batches)

        def stage(cons, inputs) -> None:
            hess = Hessian(mine[cons[0]].in_features, mine[cons[0]].weight.device, self.cfg.gptq.normalize_tokens)
            for b, x in enumerate(inputs):
                hess.add(real_rows(x, masks[b]))
            self._group(layer, cons, hess.value())

        def qkv_input(b):
            lw.current = b
            return input_of(mod, mine[g_qkv.consumers[0]], lw.hidden[b], **lw.kwargs[b])

        stage(g_qkv.consumers, (qkv_input(b) for b in range(n_b)))
        x_o = []
        for b in range(n_b):
            lw.current = b
            x_o.append(input_of(mod, o, lw.hidden[b], **lw.kwargs[b]))  # attention with the quantized q/k/v
        lw.current = None
        stage(g_o.consumers, x_o)
        h = [lw.hidden[b] + o(x_o[b]) for b in range(n_b)]
        del x_o
        stage(g_gu.consumers, (mod.post_attention_layernorm(h[b]) for b in range(n_b)))
        x_d = [input_of(mod.mlp, down, mod.post_attention_layernorm(h[b])) for b in range(n_b)]
        stage(g_d.consumers, x_d)
        return [h[b] + down(x_d[b]) for b in range(n_b)]


def _decomposed(layer: Layer, hidden, kwargs) -> torch.Tensor:
    """The Llama decoder layer written out: h = x + o_proj(attention(...)); out = h + down_proj(mlp input)."""
    mod = layer.module
    o, down = layer.linears[layer.groups[1].consumers[0]], layer.linears[layer.groups[3].consumers[0]]
    h = hidden + o(input_of(mod, o, hidden, **kwargs))
    x_d = input_of(mod.mlp, down, mod.post_attention_layernorm(h))
    return h + down(x_d)


def _decomposes(layer: Layer) -> bool:
    """Whether this decoder layer computes exactly as `_decomposed` writes it, checked on one reference batch;
    otherwise GPTQ takes the generic path."""
    lw, ref = layer.runner, layer.ref
    if not all(hasattr(layer.module, a) for a in ("mlp", "post_attention_layernorm")) or not ref:
        return False
    b = min(ref)
    try:
        lw.current = b
        out = _decomposed(layer, lw.hidden[b], lw.kwargs[b])
    except Exception:
        return False
    finally:
        lw.current = None
    m = layer.masks[b]
    err = float((out - ref[b])[m].float().pow(2).sum()) / max(float(ref[b][m].float().pow(2).sum()), 1e-30)
    return err < 1e-8


def _hessians(layer: Layer, stage, normalize: bool = False) -> dict[str, Hessian]:
    """H of each group's shared input, from one pass of the layer that stops at the stage's last group."""
    mine, lw = layer.linears, layer.runner
    hess = {g.name: Hessian(mine[g.consumers[0]].in_features, mine[g.consumers[0]].weight.device, normalize)
            for g in stage}
    last = stage[-1].consumers[0]

    def make(key, stop):
        def hook(module, args):
            hess[key].add(real_rows(args[0], layer.masks[lw.current]))
            if stop:
                raise Stop
        return hook

    handles = [mine[g.consumers[0]].register_forward_pre_hook(make(g.name, g.consumers[0] == last))
               for g in stage]
    try:
        run_until_stop(layer.module, lw)
    finally:
        for h in handles:
            h.remove()
    return hess
