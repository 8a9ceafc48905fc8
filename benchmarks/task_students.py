"""Task students of the embedded default (SmolLM2-135M-Instruct): SST-2 classifiers and a HellaSwag ranker.

  sst2_soft   classification, α = 1: the teacher's zero-shot soft labels only (gold labels unused)
  sst2_soft_fewshot   the same with a 4-shot teacher prompt (FEW_SHOT: four SST-2 train phrases, two per label)
  sst2_gold   classification, α = 0.5: soft labels mixed with the gold labels
  hellaswag   ranking, α = 0.5: the teacher's candidate scores mixed with the gold index

Train rows: SST-2 train (the first --sst2-train sentences of data/sst2/train.tsv), HellaSwag validation rows
0 .. --hs-train − 1; held out: SST-2 dev (872, GLUE dev), HellaSwag rows from --hs-train on (never trained on).
Each stage reports accuracy of teacher and student, the majority / chance baseline, and batch-1 latency of both
on the run's device; --cpu-latency re-times both on the CPU (float32, --cpu-threads threads) in the same run.

    python benchmarks/task_students.py --data ../shared/data --device cuda --out DIR      # the reported run
    python benchmarks/task_students.py --data ../shared/data --tiny --out /tmp/x          # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmcompress.config import ModelConfig, TrainStudentConfig, from_dict
from llmcompress.data import load_rows
from llmcompress.distill import rank_student, task_student
from llmcompress.models import load_model
from llmcompress.stages import StageInputs, run_stage


FEW_SHOT = ("Review: contains no wit , only labored gags\nSentiment: negative\n\n"
            "Review: that loves its characters and communicates something rather beautiful about human nature\n"
            "Sentiment: positive\n\n"
            "Review: excruciatingly unfunny and pitifully unromantic\nSentiment: negative\n\n"
            "Review: equals the original and in some ways even betters it\nSentiment: positive\n\n"
            "Review: {text}\nIs the sentiment of this review positive or negative? Answer with one word.")


def cpu_latency(art_path: Path, cfg: TrainStudentConfig, threads: int, n: int) -> dict:
    """Batch-1 latency of the saved student and of the teacher on the CPU, float32, timed by the same function."""
    torch.set_num_threads(threads)
    teacher, tok = load_model(ModelConfig(device="cpu", dtype="float32"))
    student, s_tok, meta = task_student.load_classifier(art_path, "cpu")
    with torch.no_grad():
        if cfg.task == "classification":
            c = cfg.classification
            texts = [e["text"] for e in task_student.read_examples(c.eval, c, cfg.seed)[:n]]
            s_ms = task_student._latency_ms(lambda t: task_student.student_logits(student, s_tok, t, c.eval.max_length),
                                            texts)
            t_ms = task_student._latency_ms(lambda t: task_student.teacher_scores(teacher, tok, t, c, 1), texts)
        else:
            r = cfg.ranking
            rows = rank_student.read_rows(r.eval, r, cfg.seed, None)[:n]
            s_ms = task_student._latency_ms(lambda x: rank_student.student_scores(student, s_tok, x, r.eval.max_length),
                                            rows)
            t_ms = task_student._latency_ms(lambda x: rank_student.teacher_scores(teacher, tok, x, 64), rows)
    return {"cpu_threads": threads, "cpu_student_latency_ms": round(s_ms, 3), "cpu_teacher_latency_ms": round(t_ms, 3),
            "cpu_latency_speedup": round(t_ms / s_ms, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with sst2/train.tsv and hellaswag/*.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke run: a few rows, a few steps")
    ap.add_argument("--only", default="sst2_soft,sst2_gold,hellaswag,sst2_soft_fewshot")
    ap.add_argument("--sst2-train", type=int, default=20000)
    ap.add_argument("--hs-train", type=int, default=4000)
    ap.add_argument("--hs-eval", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=4, help="the student keeps teacher layers 0 .. layers − 1")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cpu-latency", action="store_true")
    ap.add_argument("--cpu-threads", type=int, default=4)
    args = ap.parse_args()
    if args.tiny:
        args.sst2_train, args.hs_train, args.hs_eval, args.steps, args.batch = 32, 16, 8, 3, 4
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    hs = load_rows(str(args.data / "hellaswag" / "val.jsonl"))
    for name, part in (("hs_train", hs[:args.hs_train]), ("hs_eval", hs[args.hs_train:args.hs_train + args.hs_eval])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(
            {"ctx": r["ctx"], "endings": r["endings"], "label": r["label"]}) + "\n" for r in part))
    layers = list(range(args.layers))
    common = {"teacher": {"device": args.device}, "steps": args.steps, "batch_size": args.batch, "lr": args.lr,
              "warmup_steps": max(1, args.steps // 20), "weight_decay": 0.01, "temperature": 1.0}
    sst2 = {"train": {"source": str(args.data / "sst2" / "train.tsv"), "num_samples": args.sst2_train,
                      "shuffle": False},
            "eval": {"source": "builtin:sst2_dev", "num_samples": 8 if args.tiny else 872},
            "layers": layers, "teacher_batch_size": 4 if args.tiny else 256,
            "latency_examples": 2 if args.tiny else 64}
    runs = {
        "sst2_soft": {"task": "classification", "alpha": 1.0, "classification": sst2},
        "sst2_soft_fewshot": {"task": "classification", "alpha": 1.0, "classification": {**sst2, "prompt": FEW_SHOT}},
        "sst2_gold": {"task": "classification", "alpha": 0.5, "classification": sst2},
        "hellaswag": {"task": "ranking", "alpha": 0.5, "ranking": {
            "train": {"source": str(work / "hs_train.jsonl"), "num_samples": args.hs_train},
            "eval": {"source": str(work / "hs_eval.jsonl"), "num_samples": args.hs_eval},
            "layers": layers, "teacher_batch_size": 4 if args.tiny else 256,
            "latency_examples": 2 if args.tiny else 64}},
    }
    results = {"setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": {}}
    for name in args.only.split(","):
        cfg = from_dict(TrainStudentConfig, {**common, **runs[name]})
        t0 = time.perf_counter()
        art = run_stage("train-student", cfg, work / name, StageInputs(model=cfg.teacher))
        s = {k: v for k, v in art.manifest["summary"].items() if k != "tables"}
        s["seconds"] = round(time.perf_counter() - t0, 1)
        s["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        if args.cpu_latency:
            s.update(cpu_latency(art.path, cfg, args.cpu_threads, 2 if args.tiny else 64))
        results["runs"][name] = s
        print(name, json.dumps(s), flush=True)
        (args.out / "task_students.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
