"""AWQ's per-group α refinement (awq.group_rounds) and q/k clipping (awq.clip_qk), checked against a hand
computation."""

import pytest
import torch

from llmcompress.config import QuantizeConfig, load_config
from llmcompress.quant.algorithms.awq import AWQ, awq_search, refine_groups
from llmcompress.quant.architectures import ARCHITECTURES
from llmcompress.quant.formats import QuantSpec, fake_quantize
from llmcompress.quant.observers import make_observer, weight_qparams


def _fq(spec):
    return lambda w: fake_quantize(w, *weight_qparams(w, spec, make_observer("minmax", spec)), spec)


def _problem(seed, k=200, t=300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + 0.1 * torch.randn(k, k, generator=g))
    x[:, torch.randperm(k, generator=g)[:6]] *= 25.0  # salient channels
    ws = [torch.randn(40, k, generator=g), torch.randn(24, k, generator=g) * 0.2]
    return x, ws, g


def _loss(x, ws, s, fq):
    """Σ_n Σ_t (x_t · d_n)² / (T · N) in float64, d = W − Q(W·s)/s: AWQ's loss written out."""
    W = torch.cat(ws).double()
    d = W - torch.cat([fq(w * s) / s for w in ws]).double()
    return float((x.double() @ d.t()).pow(2).sum() / (x.shape[0] * W.shape[0]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_group_rounds_never_worse_and_report_their_real_loss(seed, symmetric):
    x, ws, g = _problem(seed, k=200)  # ragged: groups of 64, 64, 64, 8
    spec = QuantSpec("int4", symmetric, "group", 64)
    s0, rec0 = awq_search(x, ws, _fq(spec), grid=10, duo_scaling="both", group_size=64)
    s1, rec1 = awq_search(x, ws, _fq(spec), grid=10, duo_scaling="both", group_size=64, group_rounds=2)
    assert rec1["loss"] <= rec0["loss"] * (1 + 1e-12)
    assert rec0["loss"] == pytest.approx(_loss(x, ws, s0, _fq(spec)), rel=1e-6)
    assert rec1["loss"] == pytest.approx(_loss(x, ws, s1, _fq(spec)), rel=1e-6)
    # each group's slice of s is the slice of one grid candidate: groups differ only by which α they took
    assert rec1["groups_changed"] >= 0
    if rec1["groups_changed"]:
        assert rec1["loss"] < rec0["loss"]


def test_refine_groups_takes_the_best_slice_per_group():
    """Two groups, each with one outlier channel: the best candidate for group 0 scales it, the best for group
    1 does not; a single α must compromise, the group search need not."""
    spec = QuantSpec("int4", True, "group", 4)
    fq = _fq(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    x[:, 0] *= 40.0
    ws = [torch.randn(16, 8, generator=g)]
    W = torch.cat(ws)
    gram = (x.t() @ x).double()
    ones = torch.ones(8)
    cands = [ones, torch.tensor([6.0, 1, 1, 1, 6, 1, 1, 1]), torch.tensor([1.0, 1, 1, 1, 0.3, 3, 3, 3])]

    def loss(s):
        return _loss(x, ws, s, fq)

    s, changed = refine_groups(W, ws, ones, cands, gram, None, fq, 4, rounds=3)
    best = min(loss(torch.cat([c0[:4], c1[4:]])) for c0 in cands for c1 in cands)
    assert loss(s) == pytest.approx(best, rel=1e-9)  # separable groups: coordinate descent finds the optimum
    assert changed >= 1


def _awq(overrides, arch):
    spec = QuantSpec("int4", True, "group", 64)
    a = AWQ(load_config(QuantizeConfig, overrides=["method=awq", *overrides]), spec,
            lambda sp: make_observer("minmax", sp))
    a.begin(None, arch)
    return a


def test_clip_qk_clips_q_and_k_too():
    llama, phi3 = ARCHITECTURES[0], next(a for a in ARCHITECTURES if a.name == "phi3")
    off, on = _awq([], llama), _awq(["awq.clip_qk=true"], llama)
    assert not off._clipped("self_attn.k_proj") and off._clipped("mlp.up_proj") and off._clipped("self_attn.v_proj")
    assert on._clipped("self_attn.k_proj") and on._clipped("self_attn.q_proj")
    assert not _awq([], phi3)._clipped("self_attn.qkv_proj")  # fused: its q/k rows make the logits
    assert not _awq(["awq.clip=false"], llama)._clipped("mlp.up_proj")
