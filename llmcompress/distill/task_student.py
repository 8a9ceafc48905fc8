"""`llmc train-student` with `task: classification`: a small classifier learns from the teacher's soft labels.

The teacher labels text zero-shot: for each label it scores the verbalizer word ("negative", "positive") as its
answer to a chat prompt by log-likelihood, s_l = log p(verbalizer_l | prompt), and p_t = softmax(s) over the
labels is the soft label. The student is a sequence classifier (a linear head on the last token's hidden state)
on a small model: by default the teacher with every k-th layer kept (classification.keep_every), or any Hugging
Face model (`student`). It reads the bare text, no prompt, and is trained with

    L = α · T² · KL(softmax(s / T) ‖ softmax(z_s / T)) + (1 − α) · CE(z_s, argmax s)

on unlabelled text: gold labels are never trained on; they only score the teacher's and the student's accuracy
on the held-out set. The report gives both accuracies, their agreement, and per-example latency of each (batch 1).
The artifact is a Hugging Face sequence-classification model directory (AutoModelForSequenceClassification).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..config import ClassificationConfig, TrainStudentConfig
from ..data import sample_rows
from ..errors import UserError
from ..models import load_model, load_tokenizer, resolve_model
from .losses import distill_loss
from .train import build_student, lr_at, micro_batch


def read_examples(data_cfg, c: ClassificationConfig, seed: int, n_labels: int) -> list[dict]:
    rows = sample_rows(data_cfg, seed)
    out = []
    for r in rows:
        if c.text_field not in r:
            raise UserError(f"{data_cfg.source}: classification.text_field {c.text_field!r} is not a field "
                            f"(fields: {', '.join(r)})")
        gold = None
        if c.label_field and r.get(c.label_field) not in (None, ""):
            gold = int(r[c.label_field])
            if not 0 <= gold < n_labels:
                raise UserError(f"{data_cfg.source}: label {gold} outside 0..{n_labels - 1} (classification."
                                f"verbalizers has {n_labels} entries)")
        out.append({"text": str(r[c.text_field]).strip(), "gold": gold})
    return out


# ---------------------------------------------------------------------------------------------------------------
# the teacher: zero-shot scores by verbalizer log-likelihood


def teacher_prompt(tok, text: str, c: ClassificationConfig) -> str:
    messages = [{"role": "user", "content": c.prompt.format(text=text)}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def teacher_scores(teacher, tok, texts: list[str], c: ClassificationConfig, batch_size: int) -> torch.Tensor:
    """[N, L] log p(verbalizer_l | prompt). Single-token verbalizers: one forward, read at the last prompt
    position. Otherwise: one forward per (text, label) summing the verbalizer tokens' log-probs."""
    verb_ids = [tok(v, add_special_tokens=False).input_ids for v in c.verbalizers]
    prompts = [teacher_prompt(tok, t, c) for t in texts]
    tok.padding_side = "left"
    out = []
    if all(len(v) == 1 for v in verb_ids):
        first = torch.tensor([v[0] for v in verb_ids], device=teacher.device)
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            logits = teacher(**enc.to(teacher.device)).logits[:, -1].float()
            out.append(torch.log_softmax(logits, -1)[:, first].cpu())
        return torch.cat(out)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        scores = torch.zeros(len(chunk), len(verb_ids))
        for l, v in enumerate(verb_ids):
            enc = tok([p for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            ids = torch.cat([enc.input_ids, torch.tensor([v] * len(chunk))], 1).to(teacher.device)
            mask = torch.cat([enc.attention_mask, torch.ones(len(chunk), len(v), dtype=torch.long)], 1)
            lp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask.to(teacher.device)).logits.float(), -1)
            n = len(v)  # positions -n-1 .. -2 predict the n verbalizer tokens
            scores[:, l] = lp[:, -n - 1:-1].gather(-1, ids[:, -n:, None]).squeeze(-1).sum(-1).cpu()
        out.append(scores)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# the student


def make_student(cfg: TrainStudentConfig, teacher, tok, n_labels: int):
    from transformers import AutoModelForSequenceClassification

    c = cfg.classification
    if cfg.student:
        src = resolve_model(cfg.student)
        s_tok = load_tokenizer(src)
        model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=n_labels, dtype=torch.float32)
    else:
        s_tok = tok
        lm = build_student(teacher, c.keep_every)
        lm.config.num_labels = n_labels
        model = AutoModelForSequenceClassification.from_config(lm.config, dtype=torch.float32)
        model.base_model.load_state_dict(lm.base_model.state_dict())  # the head stays freshly initialised
    model.config.pad_token_id = s_tok.pad_token_id  # the head reads the last non-pad token
    model.config.id2label = dict(enumerate(c.verbalizers))
    model.config.label2id = {v: i for i, v in enumerate(c.verbalizers)}
    return model.to(teacher.device), s_tok


def student_logits(model, tok, texts: list[str], max_length: int) -> torch.Tensor:
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
              add_special_tokens=False)
    return model(**enc.to(model.device)).logits.float()


def _latency_ms(fn, texts: list[str]) -> float:
    fn(texts[:1])  # warm-up
    times = []
    for t in texts:
        t0 = time.perf_counter()
        fn([t])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(cfg: TrainStudentConfig, out_dir: Path, inputs, reporter) -> dict:
    c = cfg.classification
    n_labels = len(c.verbalizers)
    torch.manual_seed(cfg.seed)
    teacher, tok = load_model(inputs.model if inputs and inputs.model else cfg.teacher)
    teacher.eval().requires_grad_(False)
    train = read_examples(c.train, c, cfg.seed, n_labels)
    held_out = read_examples(c.eval, c, cfg.seed, n_labels)

    reporter.info(f"train-student: the teacher labels {len(train) + len(held_out)} examples")
    t_train = teacher_scores(teacher, tok, [e["text"] for e in train], c, c.teacher_batch_size)
    t_eval = teacher_scores(teacher, tok, [e["text"] for e in held_out], c, c.teacher_batch_size)
    for e, s in zip(train, t_train):
        e["t_scores"] = s

    student, s_tok = make_student(cfg, teacher, tok, n_labels)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for step in reporter.track(range(cfg.steps), total=cfg.steps, description="training classifier"):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_acc = 0.0
        for a in range(cfg.grad_accum):
            batch = micro_batch(train, step * cfg.grad_accum + a, cfg.batch_size, cfg.seed)
            z_s = student_logits(student, s_tok, [e["text"] for e in batch], c.train.max_length)
            z_t = torch.stack([e["t_scores"] for e in batch]).to(z_s.device)
            # soft labels p_t = softmax(s / T); the CE term uses the teacher's hard label argmax s, never gold
            loss, kd, ce = distill_loss(z_s, z_t.argmax(-1), cfg.alpha, cfg.temperature, teacher_logits=z_t)
            (loss / cfg.grad_accum).backward()
            loss_acc += loss.item() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss_acc, "lr": lr})
        reporter.update(loss=loss_acc, lr=lr)

    student.eval()
    with torch.no_grad():
        preds = torch.cat([student_logits(student, s_tok, [e["text"] for e in held_out[i:i + 32]], c.eval.max_length)
                           .argmax(-1).cpu() for i in range(0, len(held_out), 32)])
        t_preds = t_eval.argmax(-1)
        gold = [e["gold"] for e in held_out]
        labelled = [i for i, g in enumerate(gold) if g is not None]
        acc = (lambda p: sum(int(p[i]) == gold[i] for i in labelled) / len(labelled)) if labelled else None
        texts = [e["text"] for e in held_out[:c.latency_examples]]
        s_ms = _latency_ms(lambda t: student_logits(student, s_tok, t, c.eval.max_length), texts)
        t_ms = _latency_ms(lambda t: teacher_scores(teacher, tok, t, c, 1), texts)

    student.save_pretrained(out_dir)
    s_tok.save_pretrained(out_dir)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    s_acc = acc(preds) if acc else None
    t_acc = acc(t_preds) if acc else None
    agree = float((preds == t_preds).float().mean())
    return {
        "task": "classification", "labels": list(c.verbalizers), "train_examples": len(train),
        "eval_examples": len(held_out), "student_accuracy": s_acc, "teacher_zero_shot_accuracy": t_acc,
        "student_teacher_agreement": agree, "student_latency_ms": round(s_ms, 3),
        "teacher_latency_ms": round(t_ms, 3), "latency_speedup": round(t_ms / s_ms, 2),
        "student_layers": student.config.num_hidden_layers, "student_params": n_params(student),
        "teacher_params": n_params(teacher), "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        "tables": {"train-student: classifier vs teacher (held-out)": [
            {"model": "teacher (zero-shot, verbalizer log-likelihood)", "accuracy": t_acc, "latency_ms": round(t_ms, 3),
             "params": n_params(teacher)},
            {"model": f"student ({student.config.num_hidden_layers} layers + head)", "accuracy": s_acc,
             "latency_ms": round(s_ms, 3), "params": n_params(student)}]},
    }
