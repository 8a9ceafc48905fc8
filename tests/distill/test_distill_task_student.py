"""Classification student: the teacher's verbalizer scores against a hand computation on the real model, and the
whole stage on a tiny teacher (mechanics only; the real run is in the README/report)."""

import pytest
import torch

from llmcompress.config import ClassificationConfig, TrainStudentConfig, from_dict
from llmcompress.distill.task_student import teacher_prompt, teacher_scores
from llmcompress.stages import StageInputs, run_stage

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"]


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


def test_classification_stage_writes_a_classifier(tiny_teacher, workdir):
    from transformers import AutoModelForSequenceClassification

    cfg = from_dict(TrainStudentConfig, {
        "task": "classification", "teacher": {"name": str(tiny_teacher)}, "steps": 12, "batch_size": 8,
        "lr": 3e-3, "warmup_steps": 0, "alpha": 0.2, "temperature": 1.0,
        "classification": {"train": {"source": "builtin:sst2_train", "num_samples": 32},
                           "eval": {"source": "builtin:sst2_dev", "num_samples": 16, "shuffle": False},
                           "keep_every": 2, "latency_examples": 2}})
    art = run_stage("train-student", cfg, workdir / "cls", StageInputs(model=cfg.teacher))
    s = art.manifest["summary"]
    assert s["eval_examples"] == 16 and s["train_examples"] == 32 and s["student_layers"] == 2
    assert 0.0 <= s["student_accuracy"] <= 1.0 and 0.0 <= s["teacher_zero_shot_accuracy"] <= 1.0
    assert s["student_latency_ms"] > 0 and s["teacher_latency_ms"] > 0
    assert s["final_loss"] < s["first_loss"]
    clf = AutoModelForSequenceClassification.from_pretrained(art.path)
    assert clf.config.id2label == {0: "negative", 1: "positive"} and clf.config.num_labels == 2
