"""Classification student: the teacher's verbalizer scores against a hand computation on the real model, the loss
against a hand computation, the student's construction from the teacher's layers, the whole stage on a tiny
teacher (mechanics; the real run is in docs/distillation.md), and bad input through the CLI."""

import json
import math

import pytest
import torch

from llmcompress.config import ClassificationConfig, TrainStudentConfig, from_dict
from llmcompress.distill.task_student import (classification_loss, load_classifier, make_student, teacher_prompt,
                                              teacher_scores)
from llmcompress.stages import StageInputs, run_stage

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("verbalizers", [["negative", "positive"], ["very bad", "really great"]])
def test_teacher_scores_are_verbalizer_log_likelihoods(smollm, verbalizers):
    model, tok = smollm
    c = ClassificationConfig(verbalizers=verbalizers)
    got = teacher_scores(model, tok, TEXTS, c, batch_size=2)
    assert got.shape == (2, 2)
    for i, text in enumerate(TEXTS):
        p = tok(teacher_prompt(tok, text, c), add_special_tokens=False).input_ids
        for l, v in enumerate(verbalizers):
            v_ids = tok(v, add_special_tokens=False).input_ids
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([p + v_ids])).logits[0].float(), -1)
            want = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(v_ids))
            assert got[i, l].item() == pytest.approx(want, abs=1e-3)
    if verbalizers[0] == "negative":  # the real teacher gets these two right
        assert got[0].argmax().item() == 1 and got[1].argmax().item() == 0


def test_classification_loss_by_hand():
    z_s = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 0.3]])
    s_t = torch.tensor([[-0.2, -1.8], [-3.0, -0.1], [-0.7, -0.7]])  # log-likelihoods, not normalised
    gold = torch.tensor([0, -1, 1])  # the middle row has no gold label
    alpha, T = 0.3, 2.0
    want = []
    for r in range(3):
        ps = [math.exp(z_s[r, k] / T) for k in range(2)]
        pt = [math.exp(s_t[r, k] / T) for k in range(2)]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kd = T * T * sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(2))
        if gold[r] < 0:
            want.append(kd)
        else:
            q = [math.exp(z_s[r, k]) for k in range(2)]
            ce = -math.log(q[gold[r]] / sum(q))
            want.append(alpha * kd + (1 - alpha) * ce)
    got = classification_loss(z_s, s_t, gold, alpha, T).item()
    assert got == pytest.approx(sum(want) / 3, rel=1e-5)
    # α = 1: gold labels have no effect
    assert classification_loss(z_s, s_t, gold, 1.0, T).item() == pytest.approx(
        classification_loss(z_s, s_t, torch.full((3,), -1), 1.0, T).item(), rel=1e-6)


def test_student_is_the_teachers_layers_with_mean_pooling(tiny_teacher):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    student = make_student(teacher, [0, 2], 3)
    t, s = teacher.model.state_dict(), student.backbone.state_dict()
    assert torch.equal(s["layers.1.mlp.up_proj.weight"], t["layers.2.mlp.up_proj.weight"])
    assert torch.equal(s["embed_tokens.weight"], t["embed_tokens.weight"]) and student.backbone.config.num_hidden_layers == 2
    assert not student.backbone.embed_tokens.weight.requires_grad
    # the head reads the mean of the text's hidden states: padding must not change a row's logits
    torch.nn.init.normal_(student.head.weight)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = student(ids[:1, :3], mask[:1, :3])
        h = student.backbone(input_ids=ids[:1, :3]).last_hidden_state.mean(1)
        both = student(ids, mask)
    assert torch.allclose(both[0], alone[0], atol=1e-5)
    assert torch.allclose(alone, student.head(h), atol=1e-5)


def test_classification_stage_writes_a_classifier(tiny_teacher, workdir):
    (workdir / "train.csv").write_text("review,sentiment\n" + "".join(
        f"{t},{l}\n" for t, l in [("great fun", "pos"), ("dull and long", "neg"), ("a joy", "pos"),
                                  ("awful", "neg")] * 4))
    (workdir / "dev.jsonl").write_text("".join(json.dumps({"review": t, "sentiment": l}) + "\n" for t, l in
                                               [("lovely", "pos"), ("boring", "neg"), ("superb", "pos")]))
    cfg = from_dict(TrainStudentConfig, {
        "task": "classification", "teacher": {"name": str(tiny_teacher)}, "steps": 6, "batch_size": 8,
        "lr": 3e-3, "warmup_steps": 0, "alpha": 0.5, "temperature": 1.0,
        "classification": {"train": {"source": str(workdir / "train.csv"), "num_samples": 16},
                           "eval": {"source": str(workdir / "dev.jsonl"), "num_samples": 3},
                           "text_field": "review", "label_field": "sentiment", "labels": ["neg", "pos"],
                           "layers": [0, 2], "latency_examples": 2}})
    art = run_stage("train-student", cfg, workdir / "cls", StageInputs(model=cfg.teacher))
    s = art.manifest["summary"]
    assert s["eval_examples"] == 3 and s["train_examples"] == 16 and s["student_layers"] == [0, 2]
    assert s["majority_class_accuracy"] == pytest.approx(2 / 3) and s["train_gold_labels_used"] == 16
    assert 0.0 <= s["student_accuracy"] <= 1.0 and 0.0 <= s["teacher_accuracy"] <= 1.0
    assert s["student_latency_ms"] > 0 and s["teacher_latency_ms"] > 0
    assert s["final_loss"] < s["first_loss"]
    model, tok, meta = load_classifier(art.path)
    assert meta["labels"] == ["neg", "pos"] and model.backbone.config.num_hidden_layers == 2
    enc = tok(["lovely", "boring"], return_tensors="pt", padding=True)
    assert model(enc.input_ids, enc.attention_mask).shape == (2, 2)


@pytest.mark.parametrize("case,override,message", [
    ("no label column", "classification.label_field=stars", "classification.label_field 'stars' is not a field"),
    ("unknown label", "classification.labels=[negative,positive]", "label '0' is not one of"),
    ("layer out of range", "classification.layers=[0,4]", "classification.layers: 4 is not a layer"),
])
def test_bad_classification_input_exits_2_and_writes_nothing(llmc, workdir, tiny_teacher, case, override, message):
    p = llmc("train-student", "--set", "task=classification", "--set", f"teacher.name={tiny_teacher}",
             "--set", "classification.train.num_samples=4", "--set", "classification.eval.num_samples=4",
             "--set", override, "-o", "out", cwd=workdir, env=ONE_THREAD)
    assert p.returncode == 2, (case, p.stderr)
    err = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert len(err) == 1 and message in err[0] and ("sst2_train" in err[0] or "tiny_teacher" in err[0]), (case, p.stderr)
    assert not (workdir / "out").exists() and not any(workdir.glob(".out*"))
