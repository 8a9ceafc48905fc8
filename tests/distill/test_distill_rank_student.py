"""Ranking student: the teacher's candidate scores against a hand computation on the real model, the stage on a
tiny teacher (mechanics; the real run is in docs/distillation.md), and rows it must refuse."""

import json

import pytest
import torch

from llmcompress.config import RankingConfig, TrainStudentConfig, from_dict
from llmcompress.distill.rank_student import read_rows, teacher_scores
from llmcompress.distill.task_student import load_classifier
from llmcompress.errors import UserError
from llmcompress.stages import StageInputs, run_stage

ROWS = [{"ctx": "She poured the coffee into the", "endings": ["cup.", "carburettor of a tractor."], "label": 0},
        {"ctx": "He put on his", "endings": ["shoes and left.", "fish."], "label": 0}]


def test_teacher_scores_are_mean_candidate_log_likelihoods(smollm):
    model, tok = smollm
    rows = [{"context": r["ctx"], "candidates": r["endings"], "gold": r["label"]} for r in ROWS]
    got = teacher_scores(model, tok, rows, batch_size=3)  # batches cut across rows
    assert got.shape == (2, 2)
    for i, r in enumerate(rows):
        for c, cand in enumerate(r["candidates"]):
            a = tok(r["context"], add_special_tokens=False).input_ids
            b = tok(" " + cand, add_special_tokens=False).input_ids
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([a + b])).logits[0].float(), -1)
            want = sum(lp[len(a) - 1 + j, t].item() for j, t in enumerate(b)) / len(b)
            assert got[i, c].item() == pytest.approx(want, abs=1e-3)
    assert got[0].argmax().item() == 0  # the real teacher prefers coffee in a cup


def test_ranking_stage_writes_a_scorer(tiny_teacher, workdir):
    (workdir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    cfg = from_dict(TrainStudentConfig, {
        "task": "ranking", "teacher": {"name": str(tiny_teacher)}, "steps": 4, "batch_size": 4, "lr": 3e-3,
        "warmup_steps": 0, "alpha": 0.5, "temperature": 1.0,
        "ranking": {"train": {"source": str(workdir / "rows.jsonl"), "num_samples": 8},
                    "eval": {"source": str(workdir / "rows.jsonl"), "num_samples": 2},
                    "layers": [1], "latency_examples": 2}})
    s = run_stage("train-student", cfg, workdir / "rank", StageInputs(model=cfg.teacher)).manifest["summary"]
    assert s["candidates"] == 2 and s["chance_accuracy"] == 0.5 and s["student_layers"] == [1]
    assert 0.0 <= s["student_accuracy"] <= 1.0 and s["final_loss"] < s["first_loss"]
    model, _, meta = load_classifier(workdir / "rank")
    assert meta["task"] == "ranking" and model.head.out_features == 1


@pytest.mark.parametrize("rows,message", [
    ([{"ctx": "a", "endings": ["b", "c"], "label": 0}, {"ctx": "a", "endings": ["b", "c", "d"], "label": 0}],
     "a row has 3 candidates, others 2"),
    ([{"ctx": "a", "endings": ["b", "c"], "label": 2}], "label 2 is not a candidate index 0..1"),
    ([{"context": "a", "endings": ["b", "c"], "label": 0}], "ranking.context_field 'ctx' is not a field"),
])
def test_bad_ranking_rows(tmp_path, rows, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = from_dict(RankingConfig, {"train": {"source": str(f), "num_samples": 9, "shuffle": False}})
    with pytest.raises(UserError, match=message) as e:
        read_rows(r.train, r, 0, None)
    assert str(f) in str(e.value)
