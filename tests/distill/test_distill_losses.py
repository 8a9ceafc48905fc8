"""The distillation losses against hand computations (plain Python math, no torch in the expected values)."""

import math

import pytest
import torch

from llmcompress.distill.losses import (IGNORE, cross_entropy, distill_loss, kd_full, kd_topk,
                                        select_response)


def softmax(xs, T=1.0):
    m = max(x / T for x in xs)
    e = [math.exp(x / T - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


ZS = [[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 3.0, 1.0]]
ZT = [[2.0, 1.0, 0.0, -2.0], [0.5, 0.5, 2.0, 2.5]]


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kd_full_matches_hand_computation(T):
    want = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(ZS, ZT)) / len(ZS)
    got = kd_full(torch.tensor(ZS), torch.tensor(ZT), T)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert kd_full(torch.tensor(ZT), torch.tensor(ZT), T).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_matches_hand_computation():
    y = [1, 3]
    want = -sum(math.log(softmax(z)[t]) for z, t in zip(ZS, y)) / 2
    assert cross_entropy(torch.tensor(ZS), torch.tensor(y)).item() == pytest.approx(want, rel=1e-6)


def test_distill_loss_mixes_alpha():
    y = torch.tensor([0, 2])
    T, a = 2.0, 0.3
    loss, kd, ce = distill_loss(torch.tensor(ZS), y, a, T, teacher_logits=torch.tensor(ZT))
    kd_hand = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(ZS, ZT)) / 2
    ce_hand = -(math.log(softmax(ZS[0])[0]) + math.log(softmax(ZS[1])[2])) / 2
    assert kd.item() == pytest.approx(kd_hand, rel=1e-5)
    assert ce.item() == pytest.approx(ce_hand, rel=1e-5)
    assert loss.item() == pytest.approx(a * kd_hand + (1 - a) * ce_hand, rel=1e-5)
    # alpha = 0: sequence distillation, no teacher needed
    loss0, kd0, _ = distill_loss(torch.tensor(ZS), y, 0.0, T)
    assert loss0.item() == pytest.approx(ce_hand, rel=1e-6) and kd0.item() == 0.0
    with pytest.raises(ValueError):
        distill_loss(torch.tensor(ZS), y, 0.5, T)


def _topk(z, k):
    lp = [math.log(p) for p in softmax(z)]
    ids = sorted(range(len(z)), key=lambda i: -lp[i])[:k]
    return ids, [lp[i] for i in ids]


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_topk_bucket_matches_hand_computation(T):
    k = 2
    want = 0.0
    ids_all, lps_all = [], []
    for s, t in zip(ZS, ZT):
        ids, lp_t = _topk(t, k)
        ps = softmax(s)
        qt = [math.exp(v) for v in lp_t] + [1 - sum(math.exp(v) for v in lp_t)]  # top-k + tail bucket
        qs = [ps[i] for i in ids] + [1 - sum(ps[i] for i in ids)]
        temper = lambda q: [x ** (1 / T) / sum(y ** (1 / T) for y in q) for x in q]  # noqa: E731
        want += T * T * kl(temper(qt), temper(qs)) / len(ZS)
        ids_all.append(ids)
        lps_all.append(lp_t)
    got = kd_topk(torch.tensor(ZS), torch.tensor(ids_all), torch.tensor(lps_all), T, "bucket")
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_kd_topk_renormalize_matches_hand_computation():
    k, T = 3, 1.5
    want, ids_all, lps_all = 0.0, [], []
    for s, t in zip(ZS, ZT):
        ids, lp_t = _topk(t, k)
        pt = [math.exp(v / T) for v in lp_t]
        pt = [v / sum(pt) for v in pt]
        ps = softmax(s)
        qs = [ps[i] ** (1 / T) for i in ids]
        qs = [v / sum(qs) for v in qs]
        want += T * T * kl(pt, qs) / len(ZS)
        ids_all.append(ids)
        lps_all.append(lp_t)
    got = kd_topk(torch.tensor(ZS), torch.tensor(ids_all), torch.tensor(lps_all), T, "renormalize")
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_kd_topk_with_full_vocab_equals_full_kd_at_T1():
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 11), torch.randn(5, 11)
    lp, ids = torch.log_softmax(zt, -1).topk(11, -1)
    assert kd_topk(zs, ids, lp, 1.0).item() == pytest.approx(kd_full(zs, zt, 1.0).item(), rel=1e-4)
    # a lower bound on the full KL with a truncated top-k (data processing inequality)
    lp4, ids4 = torch.log_softmax(zt, -1).topk(4, -1)
    assert kd_topk(zs, ids4, lp4, 1.0).item() <= kd_full(zs, zt, 1.0).item() + 1e-6


def test_select_response_masks_prompt_and_shifts():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 7, IGNORE, IGNORE]])
    rows, targets, mask = select_response(logits, labels)
    assert targets.tolist() == [5, 6, 7]
    # position s predicts label s + 1
    assert torch.equal(rows, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_kd_gradient_pulls_student_toward_teacher():
    zs = torch.tensor(ZS, requires_grad=True)
    opt = torch.optim.SGD([zs], lr=1.0)
    before = kd_full(zs, torch.tensor(ZT), 2.0).item()
    for _ in range(50):
        opt.zero_grad()
        kd_full(zs, torch.tensor(ZT), 2.0).backward()
        opt.step()
    assert kd_full(zs, torch.tensor(ZT), 2.0).item() < 0.05 * before
