"""`llmc train-student` with `task: ranking`: a small scorer learns to rank candidates as the teacher does.

Rows hold a context, a list of candidates (the same number in every row) and, optionally, the index of the right
one (HellaSwag: `ctx`, `endings`, `label`). The teacher scores candidate c by its mean per-token log-likelihood
as the context's continuation, s_c = (1/|c|) Σ log p(c_j | context, c_<j) (lm-eval's length-normalised choice),
and p_t = softmax(s) over the row's candidates is the soft ranking. The student is task_student's backbone +
mean pooling + a one-output head, run on "context candidate" and read as a score z_c; the loss is the
classification loss over each row's candidates,

    L = α · T² · KL(softmax(s / T) ‖ softmax(z / T)) + (1 − α) · CE(z, gold)

(KD alone on rows without a gold index). Reported: the teacher's and the student's held-out accuracy (the top
candidate is the right one), the chance baseline 1 / candidates, their agreement, and per-row latency of each
(all of a row's candidates in one batch, batch 1 row), timed the same way in the same run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RankingConfig, TrainStudentConfig
from ..data import sample_rows
from ..errors import UserError
from ..models import load_model
from .task_student import (Classifier, _latency_ms, check_layers, encode_texts, make_student, save_classifier,
                           train_on_teacher_scores)


def read_rows(data_cfg, r: RankingConfig, seed: int, n_candidates: int | None) -> list[dict]:
    out = []
    for row in sample_rows(data_cfg, seed):
        for key in (r.context_field, r.candidates_field):
            if key not in row:
                raise UserError(f"{data_cfg.source}: ranking.{'context_field' if key == r.context_field else 'candidates_field'} "
                                f"{key!r} is not a field (fields: {', '.join(row)})")
        cands = row[r.candidates_field]
        if not isinstance(cands, list) or len(cands) < 2:
            raise UserError(f"{data_cfg.source}: ranking.candidates_field {r.candidates_field!r}: expected a list of "
                            f"at least 2 candidates, got {cands!r:.60}")
        n_candidates = n_candidates or len(cands)
        if len(cands) != n_candidates:
            raise UserError(f"{data_cfg.source}: ranking.candidates_field {r.candidates_field!r}: a row has "
                            f"{len(cands)} candidates, others {n_candidates}; every row needs the same number")
        gold = None
        if r.label_field:
            if r.label_field not in row:
                raise UserError(f"{data_cfg.source}: ranking.label_field {r.label_field!r} is not a field "
                                f"(fields: {', '.join(row)})")
            v = row[r.label_field]
            if v is not None and str(v).strip() != "":
                try:
                    gold = int(v)
                except (TypeError, ValueError):
                    gold = -1
                if not 0 <= gold < n_candidates:
                    raise UserError(f"{data_cfg.source}: ranking.label_field: label {v!r} is not a candidate index "
                                    f"0..{n_candidates - 1}")
        out.append({"context": str(row[r.context_field]).strip(), "candidates": [str(c).strip() for c in cands],
                    "gold": gold})
    return out


@torch.no_grad()
def teacher_scores(teacher, tok, rows: list[dict], batch_size: int) -> torch.Tensor:
    """[N, C] mean per-token log p(candidate | context), one forward per batch of (context, candidate) pairs."""
    pairs = [(r["context"], c) for r in rows for c in r["candidates"]]
    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        ctx = [tok(c, add_special_tokens=False).input_ids for c, _ in chunk]
        cand = [tok(" " + e, add_special_tokens=False).input_ids for _, e in chunk]
        width = max(len(a) + len(b) for a, b in zip(ctx, cand))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (a, b) in enumerate(zip(ctx, cand)):
            ids[j, :len(a) + len(b)] = torch.tensor(a + b)
            mask[j, :len(a) + len(b)] = 1
        logits = teacher(input_ids=ids.to(teacher.device), attention_mask=mask.to(teacher.device)).logits
        lp = torch.log_softmax(logits.float(), -1)
        for j, (a, b) in enumerate(zip(ctx, cand)):
            # position t predicts token t + 1: the candidate's tokens sit at len(a) .. len(a)+len(b)-1
            pos = torch.arange(len(a) - 1, len(a) + len(b) - 1, device=lp.device)
            scores.append(lp[j, pos, torch.tensor(b, device=lp.device)].mean())
    return torch.stack(scores).cpu().view(len(rows), -1)


def student_scores(model: Classifier, tok, rows: list[dict], max_length: int) -> torch.Tensor:
    texts = [r["context"] + " " + c for r in rows for c in r["candidates"]]
    enc = encode_texts(tok, texts, max_length, next(model.parameters()).device)
    return model(**enc).float().view(len(rows), -1)


def run(cfg: TrainStudentConfig, out_dir: Path, inputs, reporter) -> dict:
    r = cfg.ranking
    if not r.train.source or not r.eval.source:
        raise UserError("ranking.train.source and ranking.eval.source: both are required for task: ranking")
    torch.manual_seed(cfg.seed)
    train = read_rows(r.train, r, cfg.seed, None)
    held_out = read_rows(r.eval, r, cfg.seed, len(train[0]["candidates"]))
    teacher_cfg = inputs.model if inputs and inputs.model else cfg.teacher
    teacher, tok = load_model(teacher_cfg)
    teacher.eval().requires_grad_(False)
    check_layers(list(r.layers), teacher.config.num_hidden_layers, teacher_cfg.name)

    reporter.info(f"train-student: the teacher scores {len(train) + len(held_out)} rows")
    t_train = teacher_scores(teacher, tok, train, r.teacher_batch_size)
    t_eval = teacher_scores(teacher, tok, held_out, r.teacher_batch_size)
    for e, s in zip(train, t_train):
        e["t_scores"] = s

    student = make_student(teacher, list(r.layers), 1)
    history = train_on_teacher_scores(student, train, cfg, teacher.device, reporter, "training ranker",
                                      lambda batch: student_scores(student, tok, batch, r.train.max_length))

    student.eval()
    with torch.no_grad():
        preds = torch.cat([student_scores(student, tok, held_out[i:i + 32], r.eval.max_length).argmax(-1).cpu()
                           for i in range(0, len(held_out), 32)])
        t_preds = t_eval.argmax(-1)
        labelled = [i for i, e in enumerate(held_out) if e["gold"] is not None]
        acc = (lambda p: sum(int(p[i]) == held_out[i]["gold"] for i in labelled) / len(labelled)) if labelled else None
        rows = held_out[:r.latency_examples]
        s_ms = _latency_ms(lambda x: student_scores(student, tok, x, r.eval.max_length), rows)
        t_ms = _latency_ms(lambda x: teacher_scores(teacher, tok, x, len(x[0]["candidates"])), rows)

    save_classifier(student, tok, out_dir, labels=["score"], meta={"task": "ranking", "context_field": r.context_field,
                                                                  "candidates_field": r.candidates_field,
                                                                  "max_length": r.eval.max_length})
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    s_acc = acc(preds) if acc else None
    t_acc = acc(t_preds) if acc else None
    n_c = len(held_out[0]["candidates"])
    return {
        "task": "ranking", "candidates": n_c, "train_rows": len(train), "eval_rows": len(held_out),
        "alpha": cfg.alpha, "chance_accuracy": 1 / n_c, "student_accuracy": s_acc, "teacher_accuracy": t_acc,
        "student_teacher_agreement": float((preds == t_preds).float().mean()),
        "student_latency_ms": round(s_ms, 3), "teacher_latency_ms": round(t_ms, 3),
        "latency_speedup": round(t_ms / s_ms, 2), "student_layers": list(r.layers),
        "student_params": n_params(student), "teacher_params": n_params(teacher),
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        "tables": {"train-student: ranker vs teacher (held-out)": [
            {"model": "chance", "accuracy": 1 / n_c, "latency_ms": None},
            {"model": "teacher (mean log-likelihood per candidate token)", "accuracy": t_acc,
             "latency_ms": round(t_ms, 3)},
            {"model": f"student ({len(r.layers)} teacher layers + mean pool + score head)", "accuracy": s_acc,
             "latency_ms": round(s_ms, 3)}]},
    }
