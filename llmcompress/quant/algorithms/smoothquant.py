"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", 2023): move activation outliers into the weights with a per-input-channel scale s, so that both X/s and
W·s quantize well to 8 bits.

    Y = X Wᵀ = (X diag(s)⁻¹) (W diag(s))ᵀ          s_j = max|X_j|^α / max|W_j|^(1−α)

max|W_j| is taken over every Linear reading the same input (q/k/v share the input norm). The division by s is
folded into the op that produces X, so the float function is unchanged:
  RMSNorm (γ ⊙ x̂)          γ ← γ / s
  Linear (up_proj → down_proj, since down's input is act(gate) ⊙ up):   rows of the producer ← rows / s
The fold is architectures.Architecture.fold_scales (norm conventions per family); AWQ (awq.py) uses the same
equivalent transformation and only chooses s differently.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from llmcompress.errors import UserError

from ..formats import QuantSpec, compute_qparams, fake_quantize
from ..observers import make_observer, weight_qparams
from .base import Algorithm, Layer

EPS = 1e-5


def smooth_scales(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] from the per-channel max |X_j| [K] and the weights [N_i, K] that read X."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = x_absmax.float().clamp(min=EPS).pow(alpha) / w_absmax.clamp(min=EPS).pow(1 - alpha)
    return s.clamp(min=EPS)


def output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], w_hat: Sequence[torch.Tensor],
                 x_hat: Optional[torch.Tensor] = None) -> float:
    """Mean squared error of the concatenated outputs: ‖X Wᵀ − X̂ Ŵᵀ‖² / numel (X̂ = X unless given)."""
    W = torch.cat([w.float() for w in weights])
    W_hat = torch.cat([w.float() for w in w_hat])
    x_hat = x if x_hat is None else x_hat
    return float((x.float() @ W.t() - x_hat.float() @ W_hat.t()).pow(2).mean())


def search_alpha(x: torch.Tensor, weights: Sequence[torch.Tensor], alphas: Sequence[float],
                 fq_weight: Callable[[torch.Tensor], torch.Tensor],
                 fq_act: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Optional[float], torch.Tensor, float]:
    """Pick α (or no smoothing, returned as α None and s = 1) minimising the quantized output error on the
    calibration rows x [T, K]. Returns (α, s, error)."""
    x = x.float()
    x_absmax = x.abs().amax(dim=0)
    ones = torch.ones(x.shape[1], device=x.device)
    candidates: list[tuple[Optional[float], torch.Tensor]] = [(None, ones)]
    candidates += [(a, smooth_scales(x_absmax, weights, a)) for a in alphas]
    best = (None, ones, float("inf"))
    for alpha, s in candidates:
        scaled = [w.float() * s for w in weights]
        err = output_error(x, weights, [fq_weight(w) for w in scaled], fq_act(x / s))
        if err < best[2]:
            best = (alpha, s, err)
    return best


SEARCH_TOKENS = 4096  # calibration rows (sampled per layer) each α of smoothquant.alpha_grid is scored on


class SmoothQuant(Algorithm):
    """Per group with a producer (not o_proj: under GQA one v channel feeds several heads' o columns; down_proj
    only with smoothquant.mlp_down): s from the float pass's max |x| (or the α grid's best), folded in."""
    needs_data = True

    @classmethod
    def wanted(cls, cfg) -> bool:
        return cfg.smoothquant.enabled

    def __init__(self, cfg, spec, new_observer):
        super().__init__(cfg, spec, new_observer)
        self.wants_inputs = "rows" if cfg.smoothquant.alpha_grid else "absmax"

    def begin(self, model, arch) -> None:
        if arch.generic:
            raise UserError(f"smoothquant.enabled: no architecture mapping for model_type "
                            f"{getattr(model.config, 'model_type', None)!r} says which op produces each Linear's "
                            f"input, so there is nothing to fold the scales into (see quant/architectures.py)")

    def apply(self, layer: Layer) -> None:
        c = self.cfg.smoothquant
        layer.record["smoothquant_alpha"] = {}
        for g in layer.groups:
            producer = layer.producer(g)
            if producer is None or g.name == "o" or (g.name == "down" and not c.mlp_down):
                continue
            ws = [layer.linears[n].weight for n in g.consumers]
            if c.alpha_grid:
                alpha, s, _ = search_alpha(self._rows(layer.inputs[g.name]), ws, c.alpha_grid,
                                           self.weight_fake_quant(), self._act_fake_quant())
            else:
                alpha, s = c.alpha, smooth_scales(layer.absmax[g.name], ws, c.alpha)
            layer.arch.fold_scales(producer, [layer.linears[n] for n in g.consumers], s)
            layer.record["smoothquant_alpha"][g.producer] = alpha

    @staticmethod
    def _rows(rows: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
        x = torch.cat(rows)
        if x.shape[0] > SEARCH_TOKENS:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:SEARCH_TOKENS].sort().values.to(x.device)]
        return x

    def _act_fake_quant(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The activation quantizer W8A8 will apply, for scoring α: per-token dynamic or per-tensor."""
        a = self.cfg.activations
        spec = QuantSpec("int8" if a.format == "int8" else "fp8_e4m3", True, "tensor")
        if a.dynamic:
            tok = QuantSpec(spec.dtype, True, "token")
            return lambda x: fake_quantize(x, *compute_qparams(x.amin(dim=1), x.amax(dim=1), tok), tok)
        return lambda x: fake_quantize(x, *weight_qparams(x, spec, make_observer("minmax", spec)), spec)
