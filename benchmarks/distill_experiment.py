"""KD against CE-only for a half-depth student of the embedded default (SmolLM2-135M-Instruct), at scale.

1. distill-data: the teacher answers GSM8K training questions (with "Let's think step by step.") and instruction
   prompts (Alpaca demo, AlpacaEval, self-instruct seeds), sampled at T = 0.7; GSM8K answers are checked against
   the gold number (wrong ones dropped, rejection sampling); the teacher's top-k log-probs are stored.
2. train-student, same student (teacher layers 0, 2, ..., 28, initialised from the teacher), same rows, same
   held-out split, steps, batches and schedule per seed; only the loss differs (three arms):
     ce        α = 0: CE on the teacher's sampled text (sequence-level KD)
     kd_stored α > 0: KL to the stored top-k log-probs (tail as one bucket, see losses.py)
     kd_online α > 0: KL to the live teacher's full logits
3. Every student, the untrained student and the teacher are scored the same way:
     held-out teacher text (rows no arm trained on): perplexity exp(token-mean CE), KL(teacher ‖ student), T = 1
     WikiText-2 test: perplexity over non-overlapping windows and KL(teacher ‖ student) on the same tokens
     GSM8K: greedy answers to the first --gsm8k-test test questions, final number checked against the gold

    python benchmarks/distill_experiment.py --data ../shared/data --device cuda --out DIR            # the H100 run
    python benchmarks/distill_experiment.py --data ../shared/data --tiny --out /tmp/x                 # CPU smoke
    python benchmarks/distill_experiment.py --summarize DIR1/results.json DIR2/results.json           # the table

A run writes DIR/results.json (setup, per-arm training summaries with tokens/s and peak memory, every metric).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcompress.data import load_rows, resolve_source
from llmcompress.config import DistillDataConfig, ModelConfig, TrainStudentConfig, from_dict
from llmcompress.distill.generate import COT, answers_match, final_answer, gold_answer, render, stop_token_ids
from llmcompress.distill.losses import kd_full
from llmcompress.distill.train import build_student, encode, evaluate, read_distill_rows, split
from llmcompress.models import load_model
from llmcompress.stages import StageInputs, run_stage
from llmcompress.artifacts import read_artifact, is_artifact

ARMS = {"ce": {"alpha": 0.0, "kd_source": "online"},
        "kd_stored": {"alpha": 1.0, "kd_source": "stored"},
        "kd_online": {"alpha": 1.0, "kd_source": "online"}}


def build_prompts(data: Path, n_gsm8k: int, n_instr: int, out: Path) -> dict:
    """One JSONL of prompts: GSM8K train questions (with the CoT cue, gold answer kept for checking) then
    instruction prompts (no gold answer: kept unchecked)."""
    gsm = [json.loads(line) for line in (data / "gsm8k" / "train.jsonl").read_text().splitlines() if line.strip()]
    instr = json.loads((data / "instructions" / "alpaca_en_demo.json").read_text())
    instr = [{"instruction": r["instruction"], "input": r.get("input", "")} for r in instr]
    for name in ("alpaca_eval.jsonl", "seed_tasks.jsonl"):
        for line in (data / "instructions" / name).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                inp = (r.get("instances") or [{}])[0].get("input", "") if "instances" in r else ""
                instr.append({"instruction": r["instruction"], "input": inp})
    rows = [{"prompt": r["question"] + "\n" + COT, "answer": r["answer"]} for r in gsm[:n_gsm8k]]
    rows += [{"prompt": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")).strip(), "answer": None}
             for r in instr[:n_instr]]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"gsm8k_prompts": min(n_gsm8k, len(gsm)), "instruction_prompts": min(n_instr, len(instr))}


@torch.no_grad()
def gsm8k_accuracy(model, tok, rows: list[dict], batch: int, max_new_tokens: int) -> dict:
    """Greedy answers to the questions, in the prompt format the students were trained on; the final number
    (final_answer, as distill-data checks it) against the gold after '####'."""
    tok.padding_side = "left"
    stops = stop_token_ids(model, tok)
    correct = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [render(tok, [{"role": "user", "content": r["question"] + "\n" + COT}]) for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id, use_cache=True)
        for r, seq in zip(chunk, out[:, enc.input_ids.shape[1]:]):
            text = tok.decode(seq, skip_special_tokens=True)
            correct += answers_match(final_answer(text, "cot"), gold_answer(r["answer"]))
    return {"gsm8k_accuracy": correct / len(rows), "gsm8k_questions": len(rows)}


@torch.no_grad()
def wikitext_metrics(student, teacher, ids: torch.Tensor, seq_len: int, batch: int, bf16: bool) -> dict:
    """Perplexity of the student over non-overlapping windows of seq_len tokens (each window scored from its
    second token on) and token-mean KL(teacher ‖ student) at T = 1 on the same positions."""
    n_win = len(ids) // seq_len
    wins = ids[:n_win * seq_len].view(n_win, seq_len)
    nll = kl = 0.0
    n = 0
    dev = next(student.parameters()).device
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(0, n_win, batch):
        x = wins[i:i + batch].to(dev)
        with ac:
            z_s = student(x).logits[:, :-1].float().flatten(0, 1)
            z_t = teacher(x).logits[:, :-1].float().flatten(0, 1) if teacher is not None else None
        y = x[:, 1:].flatten()
        nll += F.cross_entropy(z_s, y, reduction="sum").item()
        if z_t is not None:
            kl += kd_full(z_s, z_t, 1.0).item() * len(y)
        n += len(y)
    return {"wiki_ppl": math.exp(nll / n), "wiki_kl": kl / n if teacher is not None else None, "wiki_tokens": n}


def score(name, model, teacher, tok, held_out, cfg, wiki_ids, gsm_rows, args) -> dict:
    t0 = time.perf_counter()
    model.eval()
    dev = next(model.parameters()).device
    pad = tok.pad_token_id
    h = evaluate(model, teacher, held_out, cfg, dev, pad)
    model.eval()  # evaluate() leaves its model in train mode
    row = {"model": name, "heldout_ppl": h["eval_ppl"], "heldout_kl": h["eval_kl"], "heldout_tokens": h["eval_tokens"]}
    row.update(wikitext_metrics(model, teacher, wiki_ids, args.wiki_seq_len, args.eval_batch, cfg.bf16))
    if gsm_rows:
        gen = model.to(torch.bfloat16) if dev.type == "cuda" else model
        row.update(gsm8k_accuracy(gen, tok, gsm_rows, args.gsm8k_batch, args.gsm8k_new_tokens))
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    print("score", json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="the shared data folder (gsm8k/train.jsonl, instructions/)")
    ap.add_argument("--out", type=Path, help="results folder (results.json)")
    ap.add_argument("--work", type=Path, help="artifacts (default OUT/work); a distill-data artifact there is reused")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke run: a few prompts, a few steps")
    ap.add_argument("--gsm8k-prompts", type=int, default=600)
    ap.add_argument("--instruction-prompts", type=int, default=1979)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--arms", default="ce,kd_stored,kd_online")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--wiki-seq-len", type=int, default=1024)
    ap.add_argument("--wiki-tokens", type=int, default=0, help="0 = the whole test split")
    ap.add_argument("--gsm8k-test", type=int, default=250)
    ap.add_argument("--gsm8k-batch", type=int, default=250)
    ap.add_argument("--gsm8k-new-tokens", type=int, default=256)
    ap.add_argument("--skip-reference", action="store_true", help="do not score the teacher and untrained student")
    ap.add_argument("--summarize", nargs="+", type=Path, help="results.json files -> the markdown table")
    args = ap.parse_args()
    if args.summarize:
        print(summarize([json.loads(p.read_text()) for p in args.summarize]))
        return
    if args.tiny:
        args.gsm8k_prompts, args.instruction_prompts, args.new_tokens, args.gen_batch = 4, 4, 16, 4
        args.steps, args.batch, args.max_length, args.wiki_tokens = 3, 2, 96, 512
        args.wiki_seq_len, args.gsm8k_test, args.gsm8k_batch, args.gsm8k_new_tokens = 128, 2, 2, 8
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    teacher_cfg = ModelConfig(device=args.device)
    result = {"setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "train": [],
              "scores": []}
    t_all = time.perf_counter()

    # -- 1. distill-data (reused when the artifact exists: the second call of a two-call run)
    dd_dir = work / "distill-data"
    prompts = build_prompts(args.data, args.gsm8k_prompts, args.instruction_prompts, work / "prompts.jsonl")
    dd_cfg = from_dict(DistillDataConfig, {
        "teacher": {"device": args.device},
        "prompts": {"source": str(work / "prompts.jsonl"), "template": "{prompt}", "shuffle": False,
                    "num_samples": sum(prompts.values()), "max_length": 384},
        "styles": {"plain": 1.0}, "answer_field": "answer", "check_answers": True,
        "max_new_tokens": args.new_tokens, "batch_size": args.gen_batch, "save_logits": True, "logits_top_k": 16,
        "do_sample": True, "temperature": 0.7, "top_p": 0.95, "seed": 0})
    if is_artifact(dd_dir):
        data = read_artifact(dd_dir)
    else:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        data = run_stage("distill-data", dd_cfg, dd_dir, StageInputs(model=dd_cfg.teacher))
        data.manifest["summary"]["peak_memory_mb"] = (
            round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None)
    s = data.manifest["summary"]
    result["distill_data"] = {**prompts, **{k: s.get(k) for k in (
        "prompts", "generated", "kept", "dropped_wrong_answer", "dropped_duplicate", "teacher_accuracy",
        "generated_tokens", "tokens_per_s", "peak_memory_mb")}, "batch_size": args.gen_batch}
    print("distill-data", json.dumps(result["distill_data"]), flush=True)
    save = lambda: (args.out / "results.json").write_text(json.dumps(result, indent=2))  # noqa: E731
    save()  # after every phase: a run cut short keeps what it finished

    # -- 2. the arms
    common = {"teacher": {"device": args.device}, "keep_every": 2, "steps": args.steps, "batch_size": args.batch,
              "lr": args.lr, "warmup_steps": max(1, args.steps // 20), "eval_every": args.steps,
              "save_every": args.steps, "max_length": args.max_length, "eval_fraction": 0.1,
              "temperature": args.temperature, "bf16": True}
    students = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            cfg = from_dict(TrainStudentConfig, {**common, **ARMS[arm], "seed": seed})
            t0 = time.perf_counter()
            path = work / f"{arm}_s{seed}"  # a finished arm (an earlier call) is scored, not retrained
            art = read_artifact(path) if is_artifact(path) else run_stage(
                "train-student", cfg, path, StageInputs(artifact=data, model=cfg.teacher))
            sm = art.manifest["summary"]
            row = {"arm": arm, "seed": seed, **ARMS[arm], "seconds": round(time.perf_counter() - t0, 1),
                   **{k: sm.get(k) for k in ("train_rows", "eval_rows", "final_loss", "tokens_per_s",
                                             "peak_memory_mb", "student_layers", "student_params")}}
            print("train", json.dumps(row), flush=True)
            result["train"].append(row)
            save()
            students.append((f"{arm}_s{seed}", art.path))

    # -- 3. scores, on the held-out rows every arm left out (the split does not depend on the seed)
    from transformers import AutoModelForCausalLM

    cfg = from_dict(TrainStudentConfig, common)
    teacher, tok = load_model(teacher_cfg)
    teacher.requires_grad_(False)
    _, held_out = split(encode(read_distill_rows(data), tok, cfg.max_length, True), cfg)
    text = resolve_source("builtin:wikitext2_test").read_text()  # = WikiText-2 raw test
    wiki_ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    if args.wiki_tokens:
        wiki_ids = wiki_ids[:args.wiki_tokens]
    gsm_rows = load_rows("builtin:gsm8k_test")[:args.gsm8k_test]  # the first 250 GSM8K test questions
    if not args.skip_reference:
        result["scores"].append(score("teacher", teacher, teacher, tok, held_out, cfg, wiki_ids, gsm_rows, args))
        untrained = build_student(teacher, 2).to(teacher.device)
        result["scores"].append(score("untrained", untrained, teacher, tok, held_out, cfg, wiki_ids, [], args))
        del untrained
        save()
    for name, path in students:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(teacher.device)
        result["scores"].append(score(name, model, teacher, tok, held_out, cfg, wiki_ids, gsm_rows, args))
        del model
        save()
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    save()
    print(summarize([result]))


def summarize(results: list[dict]) -> str:
    """Per arm: mean and half-range over seeds of every metric; the reference rows as they are."""
    rows = [r for res in results for r in res["scores"]]
    keys = ["heldout_ppl", "heldout_kl", "wiki_ppl", "wiki_kl", "gsm8k_accuracy"]
    lines = ["| model | seeds | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["model"].rsplit("_s", 1)[0], []).append(r)
    for name, rs in groups.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if not vals:
                cells.append("–")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.4g}")
            else:
                cells.append(f"{statistics.mean(vals):.4g} ± {(max(vals) - min(vals)) / 2:.2g}")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
