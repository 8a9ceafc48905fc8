"""train-student: the layer-dropped student, determinism, exact resume, stored-logit KD (torchrun: see
test_distill_torchrun.py).

A tiny random Llama (the real tokenizer, 4 layers of width 32) stands in for the teacher where only the training
mechanics are under test, so the folder stays fast on a shared 2-core CPU; the student construction is checked
on the real SmolLM2-135M."""

import json

import pytest
import torch

from llmcompress.config import DistillDataConfig, TrainStudentConfig, from_dict
from llmcompress.distill.train import build_student, lr_at, micro_batch
from llmcompress.progress import Reporter
from llmcompress.stages import StageInputs, run_stage


@pytest.fixture(scope="module")
def tiny_data(tiny_teacher, tmp_path_factory):
    """A real distill-data artifact written by the tiny teacher, with stored top-k log-probs."""
    cfg = from_dict(DistillDataConfig, {
        "teacher": {"name": str(tiny_teacher)}, "styles": {"plain": 1.0}, "check_answers": False,
        "prompts": {"source": "builtin:gsm8k_train", "template": "{question}", "num_samples": 12},
        "max_new_tokens": 12, "min_new_tokens": 12, "batch_size": 12, "save_logits": True, "logits_top_k": 8})
    out = tmp_path_factory.mktemp("tiny_dd") / "dd"
    return run_stage("distill-data", cfg, out, StageInputs(model=cfg.teacher))


def _train(tiny_teacher, tiny_data, out, reporter=None, **kw):
    base = {"teacher": {"name": str(tiny_teacher)}, "steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 3e-3,
            "warmup_steps": 2, "eval_every": 3, "save_every": 2, "max_length": 128, "eval_fraction": 0.25}
    base.update(kw)
    cfg = from_dict(TrainStudentConfig, base)
    return run_stage("train-student", cfg, out, StageInputs(artifact=tiny_data, model=cfg.teacher),
                     reporter or Reporter())


def _log(art):
    return [json.loads(l) for l in (art.path / "train_log.jsonl").read_text().splitlines()]


def test_built_student_copies_teacher_layers(smollm):
    teacher, tok = smollm
    same = build_student(teacher, keep_every=1)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(same(ids).logits, teacher(ids).logits, atol=1e-5)
    half = build_student(teacher, keep_every=2)
    assert half.config.num_hidden_layers == 15 and half.config.llmc_kept_teacher_layers == list(range(0, 30, 2))
    t_layers, s_layers = teacher.model.layers, half.model.layers
    assert torch.equal(s_layers[3].mlp.down_proj.weight, t_layers[6].mlp.down_proj.weight)
    assert torch.equal(s_layers[14].self_attn.q_proj.weight, t_layers[28].self_attn.q_proj.weight)
    assert torch.equal(half.model.norm.weight, teacher.model.norm.weight)
    assert half.lm_head.weight.data_ptr() == half.model.embed_tokens.weight.data_ptr()  # still tied
    assert not torch.equal(s_layers[1].mlp.up_proj.weight, t_layers[1].mlp.up_proj.weight)


def test_lr_schedule_and_data_stream():
    cfg = from_dict(TrainStudentConfig, {"lr": 1.0, "warmup_steps": 4, "steps": 14, "min_lr_ratio": 0.1})
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0) and lr_at(9, cfg) == pytest.approx(0.55)
    assert lr_at(14, cfg) == pytest.approx(0.1)
    items = [{"i": i} for i in range(10)]
    # one epoch = a permutation; micro-batches are a pure function of their index
    epoch = [e["i"] for m in range(5) for e in micro_batch(items, m, 2, seed=3)]
    assert sorted(epoch) == list(range(10))
    assert micro_batch(items, 7, 2, 3) == micro_batch(items, 7, 2, 3)


def test_training_is_deterministic_and_resumes_exactly(tiny_teacher, tiny_data, workdir):
    a = _train(tiny_teacher, tiny_data, workdir / "a")
    b = _train(tiny_teacher, tiny_data, workdir / "b")
    assert [h["loss"] for h in _log(a)] == [h["loss"] for h in _log(b)]
    assert _log(a)[-1]["loss"] < _log(a)[0]["loss"]

    class Kill(Reporter):  # dies after step 5, past the checkpoint of step 4
        def update(self, **f):
            self.n = getattr(self, "n", 0) + 1
            if self.n == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_teacher, tiny_data, workdir / "c", Kill())
    assert not (workdir / "c").exists() and list(workdir.glob(".c.work-*/checkpoint.pt"))
    c = _train(tiny_teacher, tiny_data, workdir / "c")
    assert c.manifest["summary"]["resumed_from_step"] == 4
    assert _log(c) == _log(a)
    assert c.manifest["summary"]["param_fingerprint"] == a.manifest["summary"]["param_fingerprint"]
    assert not list(workdir.glob(".c.work-*"))
    # the artifact is a model directory the later stages load
    from llmcompress.models import load_model

    model, _ = load_model(str(c.path), device="cpu")
    assert model.config.num_hidden_layers == 2


def test_stored_topk_kd_lowers_kl_to_the_teacher(tiny_teacher, tiny_data, workdir):
    art = _train(tiny_teacher, tiny_data, workdir / "s", alpha=1.0, kd_source="stored", temperature=1.0,
                 steps=9, eval_every=1, warmup_steps=0)
    evals = art.manifest["summary"]["tables"]["train-student: held-out evaluation"]
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    assert art.manifest["summary"]["kd_source"] == "stored"
