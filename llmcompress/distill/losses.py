"""Distillation losses (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

    L = α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α) · CE(z_s, y)

The T² keeps the KD gradient's scale independent of T (the soft-target gradients scale as 1/T²). Every function
here takes logits already gathered at the positions that count (response tokens only: the prompt is masked), as
`[N, V]` rows, and returns a mean over those N rows. `select_response` does the gathering.

KD from stored top-k log-probs. distill-data can store, for every generated token, the teacher's k largest
log-probs `lp_1..k` (at T = 1) and their token ids; the other V − k logits are gone. Two ways to handle the tail:

* "bucket" (default): the tail becomes one extra outcome holding the leftover mass m = 1 − Σ exp(lp_i). The
  student is coarsened the same way (its probabilities at the same k ids + its own leftover mass), both
  (k + 1)-way distributions are tempered as p ∝ p^(1/T) (the tail as a single atom) and we take their KL. At
  T = 1 this is exactly KL between the coarsened distributions: a lower bound on the full KL (data processing
  inequality) that is exact when the teacher's tail mass is 0, and it still pushes the student's mass off
  tokens the teacher deems unlikely (they all sit in the tail bucket).
* "renormalize": both distributions are renormalised over the k ids and the tail is dropped: KL over the
  top-k support only. Simpler, but says nothing about mass the student puts outside the teacher's top-k.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

IGNORE = -100  # label of masked (prompt / padding) positions, as in Hugging Face
EPS = 1e-8


def select_response(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift for next-token prediction and keep the positions whose target is a response token.

    logits [B, S, V], labels [B, S] (IGNORE on prompt and padding) -> (rows [N, V], targets [N], mask [B, S-1]).
    Position s predicts token s + 1, so the logits at s pair with labels[:, s + 1]."""
    mask = labels[:, 1:] != IGNORE
    return logits[:, :-1][mask], labels[:, 1:][mask], mask


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE = −(1/N) Σ_n log softmax(z_s)[n, y_n]."""
    return F.cross_entropy(student_logits.float(), targets)


def kd_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · (1/N) Σ_n KL(p_t ‖ p_s), p = softmax(z / T), from the teacher's full logits."""
    T = temperature
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s)
    return T * T * kl.mean()


def _log_tail(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(log_p)) over the last dim: the log of the mass outside the given ids (clamped at EPS, since
    the stored float16 log-probs can sum a hair above 1)."""
    return torch.log(torch.clamp(1.0 - log_p.exp().sum(-1, keepdim=True), min=EPS))


def kd_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
            temperature: float, tail: Literal["bucket", "renormalize"] = "bucket") -> torch.Tensor:
    """T² · (1/N) Σ_n KL(q_t ‖ q_s) from the teacher's stored top-k log-probs (T = 1) at ids `topk_ids` [N, k];
    q is the (k + 1)-way tempered distribution ("bucket") or the top-k-renormalised one (see the module doc)."""
    T = temperature
    lp_t = topk_logprobs.float()
    lp_s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, topk_ids.long())  # student log p at T = 1
    if tail == "bucket":
        lp_t = torch.cat([lp_t, _log_tail(lp_t)], dim=-1)
        lp_s = torch.cat([lp_s, _log_tail(lp_s)], dim=-1)
    elif tail != "renormalize":
        raise ValueError(f"tail: expected 'bucket' or 'renormalize', got {tail!r}")
    # tempering a distribution over outcomes: q ∝ p^(1/T), i.e. log q = log_softmax(log p / T)
    log_q_t = F.log_softmax(lp_t / T, dim=-1)
    log_q_s = F.log_softmax(lp_s / T, dim=-1)
    kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1)
    return T * T * kl.mean()


def distill_loss(student_logits: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float,
                 teacher_logits: Optional[torch.Tensor] = None, topk_ids: Optional[torch.Tensor] = None,
                 topk_logprobs: Optional[torch.Tensor] = None, tail: str = "bucket"):
    """L = α·KD + (1 − α)·CE over response rows [N, V]; returns (loss, kd, ce) with kd/ce detached for logging.
    α = 0 is sequence-level distillation (CE on the teacher's own outputs) and needs no teacher logits."""
    ce = cross_entropy(student_logits, targets)
    if alpha == 0.0:
        return ce, torch.zeros((), device=ce.device), ce.detach()
    if teacher_logits is not None:
        kd = kd_full(student_logits, teacher_logits, temperature)
    elif topk_ids is not None and topk_logprobs is not None:
        kd = kd_topk(student_logits, topk_ids, topk_logprobs, temperature, tail)
    else:
        raise ValueError("alpha > 0 needs teacher_logits or stored top-k log-probs")
    loss = alpha * kd + (1.0 - alpha) * ce
    return loss, kd.detach(), ce.detach()
