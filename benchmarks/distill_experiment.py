"""KD vs CE-only for a half-depth student of the real teacher (SmolLM2-135M-Instruct), on CPU.

1. distill-data: the teacher writes chain-of-thought answers to GSM8K training questions (sampled, T = 0.7).
2. train-student twice, same student (every 2nd teacher layer, 15 of 30, initialised from the teacher), same
   rows, same held-out split, same steps, batches and schedule; only the loss differs:
     CE only  (α = 0): sequence distillation, CE on the teacher's tokens
     KD       (α > 0): α·T²·KL(teacher ‖ student) + (1 − α)·CE, teacher logits online
3. Held-out (rows neither run trained on): perplexity of the teacher's responses, exp(token-mean CE), and
   KL(teacher ‖ student) at T = 1, token-mean; also for the untrained student and the teacher itself.

    python benchmarks/distill_experiment.py            # ~10 min on 2 free CPU cores; writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llmcompress.config import DistillDataConfig, TrainStudentConfig, from_dict
from llmcompress.distill.train import build_student, encode, evaluate, read_distill_rows, split
from llmcompress.models import load_model
from llmcompress.stages import StageInputs, run_stage

RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, loaded CPU)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmc-distill-exp",
                    help="artifacts; a rerun with the same settings resumes the generation from here")
    ap.add_argument("--out", type=Path, default=RESULTS / "distill_experiment.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    dd_cfg = from_dict(DistillDataConfig, {
        "prompts": {"source": "builtin:gsm8k_train", "template": "{question}", "num_samples": args.prompts,
                    "max_length": 256},
        "styles": {"cot": 1.0}, "check_answers": False, "max_new_tokens": args.new_tokens, "batch_size": 8,
        "do_sample": True, "temperature": 0.7, "top_p": 0.95, "seed": 0})
    data = run_stage("distill-data", dd_cfg, work / "dd", StageInputs(model=dd_cfg.teacher))
    gen_s = time.perf_counter() - t0
    print(f"distill-data: {data.manifest['summary']['rows']} rows in {gen_s:.0f}s", flush=True)

    common = {"keep_every": 2, "steps": args.steps, "batch_size": args.batch, "lr": args.lr,
              "warmup_steps": max(1, args.steps // 10), "eval_every": args.steps, "save_every": args.steps,
              "max_length": 256, "eval_fraction": 0.2, "temperature": args.temperature, "seed": 0}
    runs = {}
    for name, alpha in (("ce_only", 0.0), ("kd", args.alpha)):
        t0 = time.perf_counter()
        cfg = from_dict(TrainStudentConfig, {**common, "alpha": alpha})
        art = run_stage("train-student", cfg, work / name, StageInputs(artifact=data, model=cfg.teacher))
        s = art.manifest["summary"]
        runs[name] = {"alpha": alpha, "eval_ppl": s["eval_ppl"], "eval_kl": s["eval_kl"], "eval_ce": s["eval_ce"],
                      "final_train_loss": s["final_loss"], "seconds": round(time.perf_counter() - t0, 1)}
        print(name, runs[name], flush=True)

    # the same held-out rows, scored for the untrained student and for the teacher itself
    cfg = from_dict(TrainStudentConfig, common)
    teacher, tok = load_model(cfg.teacher, device="cpu")
    examples = encode(read_distill_rows(data), tok, cfg.max_length, True)
    _, held_out = split(examples, cfg)
    pad = tok.pad_token_id
    ref = {"untrained_student": evaluate(build_student(teacher, 2), teacher, held_out, cfg, teacher.device, pad),
           "teacher": evaluate(teacher, teacher, held_out, cfg, teacher.device, pad)}
    for k, v in ref.items():
        ref[k] = {"eval_ppl": v["eval_ppl"], "eval_kl": v["eval_kl"], "eval_ce": v["eval_ce"]}

    result = {
        "setup": {"teacher": "SmolLM2-135M-Instruct (30 layers)", "student": "every 2nd teacher layer (15)",
                  "data": f"{data.manifest['summary']['rows']} teacher CoT answers to GSM8K train questions",
                  "held_out_rows": len(held_out), "held_out_tokens": sum(int((e["labels"] != -100).sum()) for e in held_out), **vars(args),
                  "out": str(args.out), "torch_threads": torch.get_num_threads()},
        "runs": runs, "reference": ref,
        "kd_wins_ppl": runs["kd"]["eval_ppl"] < runs["ce_only"]["eval_ppl"],
        "kd_wins_kl": runs["kd"]["eval_kl"] < runs["ce_only"]["eval_kl"],
        "generation_seconds": round(gen_s, 1), "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)  # only once the results are written


if __name__ == "__main__":
    main()
