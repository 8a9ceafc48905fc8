"""AWQ's end-loss guidance (awq.guided), per-group α refinement (awq.group_rounds) and q/k clipping (awq.clip_qk):
each checked against a hand computation."""

import pytest
import torch

from llmcompress.config import QuantizeConfig, load_config
from llmcompress.quant.awq import awq_search, refine_groups
from llmcompress.quant.formats import QuantSpec, fake_quantize
from llmcompress.quant.guidance import _targets, loss_gradients
from llmcompress.quant.layerwise import make_batches
from llmcompress.quant.observers import make_observer, weight_qparams
from llmcompress.quant.sequential import _clipped


def _fq(spec):
    return lambda w: fake_quantize(w, *weight_qparams(w, spec, make_observer("minmax", spec)), spec)


def _problem(seed, k=200, t=300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + 0.1 * torch.randn(k, k, generator=g))
    x[:, torch.randperm(k, generator=g)[:6]] *= 25.0  # salient channels
    ws = [torch.randn(40, k, generator=g), torch.randn(24, k, generator=g) * 0.2]
    return x, ws, g


def _weighted_loss(x, ws, s, fq, a=None, b=None):
    """Σ_n b_n Σ_t a_t (x_t · d_n)² / (T · N) in float64, d = W − Q(W·s)/s: the guided loss written out."""
    W = torch.cat(ws).double()
    d = W - torch.cat([fq(w * s) / s for w in ws]).double()
    err = (x.double() @ d.t()).pow(2)  # [T, N]
    if a is not None:
        err = err * a.double().unsqueeze(1)
    if b is not None:
        err = err * b.double().unsqueeze(0)
    return float(err.sum() / (x.shape[0] * W.shape[0]))


def test_targets_shift_by_one_and_skip_padding():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert _targets({"input_ids": ids, "attention_mask": mask}).tolist() == [[6, 7, -100, -100], [9, -100, -100, -100]]


@pytest.mark.parametrize("seed", range(3))
def test_awq_search_guided_loss_is_the_weighted_output_error(seed):
    x, ws, g = _problem(seed)
    spec = QuantSpec("int4", True, "group", 64)
    a = torch.rand(x.shape[0], generator=g) ** 3  # heavy-tailed token weights
    b = torch.rand(64, generator=g)
    s, rec = awq_search(x, ws, _fq(spec), grid=10, duo_scaling="both", group_size=64, token_weight=a, row_weight=b)
    assert rec["loss"] == pytest.approx(_weighted_loss(x, ws, s, _fq(spec), a, b), rel=1e-6)
    assert rec["loss"] <= rec["loss_unscaled"]
    # the weights change the choice: scored without them, this s is never better than the unweighted optimum
    s0, rec0 = awq_search(x, ws, _fq(spec), grid=10, duo_scaling="both", group_size=64)
    assert _weighted_loss(x, ws, s0, _fq(spec)) == pytest.approx(rec0["loss"], rel=1e-6)
    assert rec0["loss"] <= _weighted_loss(x, ws, s, _fq(spec)) * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_group_rounds_never_worse_and_report_their_real_loss(seed, symmetric):
    x, ws, g = _problem(seed, k=200)  # ragged: groups of 64, 64, 64, 8
    spec = QuantSpec("int4", symmetric, "group", 64)
    b = torch.rand(64, generator=g) if seed % 2 else None
    s0, rec0 = awq_search(x, ws, _fq(spec), grid=10, duo_scaling="both", group_size=64, row_weight=b)
    s1, rec1 = awq_search(x, ws, _fq(spec), grid=10, duo_scaling="both", group_size=64, row_weight=b,
                          group_rounds=2)
    assert rec1["loss"] <= rec0["loss"] * (1 + 1e-12)
    assert rec1["loss"] == pytest.approx(_weighted_loss(x, ws, s1, _fq(spec), None, b), rel=1e-6)
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
        return _weighted_loss(x, ws, s, fq)

    s, changed = refine_groups(W, ws, ones, cands, gram, None, fq, 4, rounds=3)
    best = min(loss(torch.cat([c0[:4], c1[4:]])) for c0 in cands for c1 in cands)
    assert loss(s) == pytest.approx(best, rel=1e-9)  # separable groups: coordinate descent finds the optimum
    assert changed >= 1


def test_clip_qk_clips_q_and_k_too():
    spec = QuantSpec("int4", True, "group", 64)
    off = load_config(QuantizeConfig, overrides=["method=awq"])
    on = load_config(QuantizeConfig, overrides=["method=awq", "awq.clip_qk=true"])
    assert not _clipped(off, spec, "self_attn.k_proj") and _clipped(off, spec, "mlp.up_proj")
    assert _clipped(on, spec, "self_attn.k_proj") and _clipped(on, spec, "self_attn.q_proj")


def test_loss_gradients_match_autograd_on_the_embedded_model(smollm):
    model, tok = smollm
    texts = ["The capital of France is Paris.", "Quantization maps weights to a small set of levels, so"]
    batches = make_batches(tok, texts, max_length=32, batch_size=2, device=torch.device("cpu"))
    names = ["model.layers.0.self_attn.v_proj", "model.layers.29.mlp.down_proj"]
    mods = dict(model.named_modules())
    before = [p.requires_grad for p in model.parameters()]
    guide = loss_gradients(model, {n: mods[n] for n in names}, batches)
    assert [p.requires_grad for p in model.parameters()] == before  # restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients computed

    # by hand: the same loss, the outputs' gradients retained by autograd
    outs = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outs[name] = out
        return hook
    hooks = [mods[n].register_forward_hook(keep(n)) for n in names]
    b = batches[0]
    mask = b["attention_mask"].bool()
    tgt = _targets(b)
    try:
        with torch.enable_grad():
            x = model.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, attention_mask=b["attention_mask"], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                                     reduction="sum") / int(tgt.ne(-100).sum())
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        g2 = outs[n].grad.double().pow(2)
        assert torch.allclose(guide.channel[n].double(), g2.sum((0, 1)), rtol=1e-4, atol=1e-12)
        assert torch.allclose(guide.token[n][0].double(), g2.sum(-1), rtol=1e-4, atol=1e-12)
        rows = guide.token_rows([n], [mask])[0]
        assert rows.shape == (int(mask.sum()),)
        assert float(guide.token[n][0][~mask].abs().sum()) == 0.0  # padding: no weight
    # the two Linears of one input add up; channels concatenate in order
    both = guide.token_rows(names, [mask])[0]
    assert torch.allclose(both, sum(guide.token_rows([n], [mask])[0] for n in names))
    assert guide.channels(names).shape == (192 + 576,)
