"""End-loss guidance for the layer-wise objectives: how much the model's loss cares about each Linear's output.

A Linear's layer-wise error ‖X Wᵀ − X Ŵᵀ‖² weighs every token t and output channel n alike. To second order the
model's loss grows by about ½ Σ_t Σ_n f_tn (x_t · (w_n − ŵ_n))², f_tn = E[(∂L/∂y_tn)²] (the empirical Fisher of
the Linear's output y). One backward pass of the calibration set's next-token loss gives g_tn = ∂L/∂y_tn; f is
kept in the rank-one form f_tn ≈ a_t · b_n (a_t = Σ_n g_tn², b_n = Σ_t g_tn², the same Σ_t Σ_n f as the full
f), which keeps the objective a K × K Gram matrix: Σ_n b_n (w_n − ŵ_n) Xᵀ diag(a) X (w_n − ŵ_n)ᵀ. Used by AWQ's
awq.guided (GuidedQuant, Kim et al. 2025, weighs GPTQ's objective by such end-loss gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn


@dataclass
class Guidance:
    """channel[name] [N]: Σ_t g_tn² of the Linear `name`; token[name][b] [B, T]: Σ_n g_tn² per token of
    calibration batch b (zero on padding)."""
    channel: dict[str, torch.Tensor] = field(default_factory=dict)
    token: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def token_rows(self, names: Sequence[str], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per batch, a_t summed over the Linears `names` (which read one input) on its real tokens, in the
        row-major order sequential._rows gives their input rows."""
        return [sum(self.token[n][b] for n in names)[m.to(self.token[names[0]][b].device)]
                for b, m in enumerate(masks)]

    def channels(self, names: Sequence[str]) -> torch.Tensor:
        """b_n of the Linears `names`, concatenated in that order (the rows of their stacked weights)."""
        return torch.cat([self.channel[n] for n in names])


def loss_gradients(model: nn.Module, linears: dict[str, nn.Linear], batches: Sequence[dict]) -> Guidance:
    """One forward and backward pass of the next-token cross-entropy (summed over the real tokens of all
    `batches`, divided by their count) through `model` as it is; records the output gradients of `linears`.
    Parameters get no gradients (they are frozen for the pass and restored after)."""
    guide = Guidance()
    state = {"b": 0}
    handles = []

    def watch(name: str):
        def fwd(module, args, out):
            b = state["b"]

            def grad(g: torch.Tensor):
                g2 = g.detach().float().pow(2)
                chan = g2.reshape(-1, g2.shape[-1]).sum(0)
                guide.channel[name] = guide.channel[name] + chan if name in guide.channel else chan
                guide.token[name][b] = g2.sum(-1)
            if out.requires_grad:
                out.register_hook(grad)
        return fwd

    guide.token = {name: [None] * len(batches) for name in linears}  # one slot per batch, filled by the hooks
    for name, lin in linears.items():
        handles.append(lin.register_forward_hook(watch(name)))
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    targets = [_targets(b) for b in batches]
    n_tokens = sum(int(t.ne(-100).sum()) for t in targets)
    try:
        for p in params:
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        with torch.enable_grad():
            for b, batch in enumerate(batches):
                state["b"] = b
                x = emb(batch["input_ids"]).detach().requires_grad_(True)
                logits = model(inputs_embeds=x, attention_mask=batch["attention_mask"], use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[b].flatten(),
                                                         ignore_index=-100, reduction="sum") / max(n_tokens, 1)
                del logits
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, was):
            p.requires_grad_(r)
    for name, lin in linears.items():  # a Linear the loss does not reach: no guidance (uniform weights)
        if name not in guide.channel:
            guide.channel[name] = torch.ones(lin.out_features)
        guide.token[name] = [t if t is not None else batches[b]["attention_mask"].float()
                             for b, t in enumerate(guide.token[name])]
    return guide


def _targets(batch: dict) -> torch.Tensor:
    """Next-token labels [B, T]: token t predicts input t + 1; the last real token and padding get -100."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = torch.where(mask[:, 1:] & mask[:, :-1], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    return tgt
