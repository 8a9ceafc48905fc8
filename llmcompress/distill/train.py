"""`llmc train-student`: a smaller causal LM learns from the teacher's data and logits.

    L = α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α) · CE(z_s, y)   over response tokens only

The student is a Hugging Face model, or the teacher with every k-th layer kept and initialised from the
teacher's weights (as DistilBERT did). z_t comes from the teacher online (a forward pass per micro-batch) or from
the top-k log-probs distill-data stored (`kd_source: stored`, see losses.py for the tail). α = 0 is sequence-level
distillation: plain CE on the teacher's own outputs.

One loop, top to bottom: AdamW, linear warm-up then cosine decay, gradient accumulation, clipping, bf16 autocast
on CUDA, held-out evaluation every `eval_every` steps, a checkpoint every `save_every` steps in the stage's work
dir. The data order is a pure function of (seed, micro-batch index), so a rerun resumes exactly from the last
checkpoint: same batches, same optimizer state, same loss curve. Under `torchrun` the W processes split every
micro-batch of `batch_size` sequences (batch_size / W each) and weight their losses by their share of its response
tokens, so W processes follow the loss curve of one; DDP (default) or FSDP2 (`parallel: fsdp`) reduces the
gradients. Checkpoints hold full (unsharded) state, so a run resumes under any world size; rank 0 alone writes.
The artifact directory is itself a Hugging Face model directory (config.json, model.safetensors, tokenizer).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import TrainStudentConfig
from ..distributed import Ranks, process_group
from ..errors import UserError
from ..models import load_model
from .generate import stage_work_dir
from .losses import IGNORE, distill_loss, kd_full, kd_topk, select_response

# ---------------------------------------------------------------------------------------------------------------
# student


def build_student(teacher, keep_every: int):
    """The teacher with layers 0, k, 2k, ... kept; every weight (embeddings, kept blocks, final norm, head) is
    copied from the teacher, so the student starts as a shallower teacher rather than from scratch."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    n = cfg.num_hidden_layers
    kept = list(range(0, n, keep_every))
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    layers = _layer_prefix(teacher)
    src = teacher.state_dict()
    state = {}
    for key, value in src.items():
        if key.startswith(layers):
            i, rest = key[len(layers):].split(".", 1)
            if int(i) in kept:
                state[f"{layers}{kept.index(int(i))}.{rest}"] = value.float()
        else:
            state[key] = value.float()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"student: could not copy teacher weights (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    student.config.llmc_kept_teacher_layers = kept
    return student


def _layer_prefix(model) -> str:
    for name, _ in model.named_modules():
        if name.endswith(".layers") or name == "layers":
            return name + "."
    raise UserError(f"{model.config.model_type}: cannot find the decoder layers to build a student from")


# ---------------------------------------------------------------------------------------------------------------
# data


def read_distill_rows(art) -> list[dict]:
    rows = []
    for f in sorted((art.path / "data").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not rows:
        raise UserError(f"{art.path}: the distill-data artifact holds no rows")
    return rows


def encode(rows: list[dict], tok, max_length: int, use_ids: bool, art=None, stored: bool = False) -> list[dict]:
    """Row -> {ids, labels (IGNORE on the prompt), [top-k ids / log-probs of the kept response tokens]}.
    The teacher's own token ids are used when the student shares its vocabulary (they are what the stored
    log-probs describe); otherwise prompt and response text are tokenized by the student's tokenizer."""
    from safetensors.torch import load_file

    shards, out = {}, []
    for r in rows:
        if use_ids and "prompt_ids" in r:
            p, resp = r["prompt_ids"], r["response_ids"]
        else:
            p = tok(r["prompt"], add_special_tokens=False).input_ids
            resp = tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        n_resp = min(len(resp), max_length - len(p))
        if len(p) < 1 or n_resp < 1:
            continue  # prompt alone fills max_length: nothing to learn from this row
        ex = {"ids": torch.tensor(p + resp[:n_resp]), "labels": torch.tensor([IGNORE] * len(p) + resp[:n_resp])}
        if stored:
            f = r.get("logprobs_file")
            if f is None:
                raise UserError(f"{art.path}: kd_source is 'stored' but the data has no log-probs; rerun "
                                f"distill-data with save_logits: true")
            if f not in shards:
                shards[f] = load_file(str(art.file(f)))
            o = r["logprobs_offset"]
            ex["top_ids"] = shards[f]["ids"][o:o + n_resp]
            ex["top_lp"] = shards[f]["logprobs"][o:o + n_resp]
        out.append(ex)
    return out


SPLIT_SEED = 0


def split(examples: list, cfg: TrainStudentConfig) -> tuple[list, list]:
    """(train, held-out): an eval_fraction of the rows is held out. The split's seed is fixed, not cfg.seed, so
    runs that differ only in their seed score the same held-out rows and none trains on another's held-out."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_eval = max(1, round(cfg.eval_fraction * len(examples)))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right padding for training; padded positions are IGNORE and masked out of attention."""
    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = e["ids"], e["labels"], 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "top_ids" in examples[0]:  # row-major over (example, response position): the order select_response uses
        batch["top_ids"] = torch.cat([e["top_ids"] for e in examples])
        batch["top_lp"] = torch.cat([e["top_lp"] for e in examples])
    return batch


def micro_batch(examples: list[dict], index: int, batch_size: int, seed: int) -> list[dict]:
    """Micro-batch number `index` of an endless stream of seeded epoch permutations: a pure function of its
    arguments, which is what makes resuming exact and lets DDP ranks take disjoint slices."""
    n = len(examples)
    out = []
    for pos in range(index * batch_size, (index + 1) * batch_size):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(examples[int(torch.randperm(n, generator=g)[i])])
    return out


# ---------------------------------------------------------------------------------------------------------------
# schedule and evaluation


def lr_at(step: int, cfg: TrainStudentConfig) -> float:
    """Linear warm-up to lr, then cosine to lr·min_lr_ratio: lr_t = lr_min + ½(lr − lr_min)(1 + cos(π·progress))."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    lr_min = cfg.lr * cfg.min_lr_ratio
    return lr_min + 0.5 * (cfg.lr - lr_min) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(student, teacher, examples: list[dict], cfg: TrainStudentConfig, device, pad_id: int) -> dict:
    """Token-weighted held-out metrics: CE and perplexity exp(CE) on the teacher's responses, and KL(teacher ‖
    student) at T = 1 (from the live teacher, else from the stored top-k, a lower bound)."""
    student.eval()
    ce_sum = kl_sum = loss_sum = 0.0
    has_kl = False
    n_tok = 0
    for i in range(0, len(examples), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + cfg.batch_size], pad_id).items()}
        with _autocast(device, cfg):
            rows, targets, t_rows = _forward(student, teacher, batch)
        n = len(targets)
        ce_sum += F.cross_entropy(rows.float(), targets, reduction="sum").item()
        has_kl = has_kl or t_rows is not None or "top_ids" in batch
        if t_rows is not None:
            kl_sum += kd_full(rows, t_rows, 1.0).item() * n
        elif "top_ids" in batch:
            kl_sum += kd_topk(rows, batch["top_ids"], batch["top_lp"], 1.0, cfg.kd_tail).item() * n
        if cfg.alpha > 0 and (t_rows is not None or "top_ids" in batch):
            loss_sum += distill_loss(rows, targets, cfg.alpha, cfg.temperature, t_rows, batch.get("top_ids"),
                                     batch.get("top_lp"), cfg.kd_tail)[0].item() * n
        else:
            loss_sum += F.cross_entropy(rows.float(), targets, reduction="sum").item()
        n_tok += n
    student.train()
    ce = ce_sum / max(n_tok, 1)
    return {"eval_loss": loss_sum / max(n_tok, 1), "eval_ce": ce, "eval_ppl": math.exp(min(ce, 50.0)),
            "eval_kl": kl_sum / max(n_tok, 1) if has_kl else None, "eval_tokens": n_tok}


def _forward(student, teacher, batch):
    """Student logits at the response positions, their targets, and the teacher's logits there (if online)."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows, targets, mask = select_response(logits, batch["labels"])
    t_rows = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_rows = t_logits[:, :-1][mask]
    return rows, targets, t_rows


def _autocast(device, cfg):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# the stage


def run(cfg: TrainStudentConfig, out_dir: Path, inputs, reporter) -> dict:
    if cfg.task == "classification":
        from .task_student import run as run_classifier

        return run_classifier(cfg, out_dir, inputs, reporter)
    if cfg.task == "ranking":
        from .rank_student import run as run_ranker

        return run_ranker(cfg, out_dir, inputs, reporter)
    if inputs is None or inputs.artifact is None or inputs.artifact.stage != "distill-data":
        raise UserError("train-student: needs a distill-data artifact as --input (run `llmc distill-data`)")

    world = Ranks.from_env().world
    if cfg.batch_size % world:
        raise UserError(f"batch_size: {cfg.batch_size} sequences cannot be split evenly over {world} processes; "
                        f"use a multiple of {world}")
    with process_group() as ranks:  # one process, or one per torchrun rank
        return _train(cfg, out_dir, inputs, reporter, inputs.model or cfg.teacher, ranks.device, ranks.world,
                      ranks.rank)


def _shard(student, cfg: TrainStudentConfig, world: int, device):
    """The module the loop runs: the student itself (one process), DDP, or FSDP2 (each decoder layer, then the
    rest, sharded over the ranks in place)."""
    if world == 1:
        return student
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(student):
            fully_shard(block)
        return fully_shard(student)
    return torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def _blocks(model) -> list:
    prefix = _layer_prefix(model)[:-1]
    return list(model.get_submodule(prefix))


def _full_state(student, opt=None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state on every rank, keyed by parameter name: what a checkpoint holds, so
    that it loads under any world size and either parallel mode. A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    o = StateDictOptions(full_state_dict=True)
    return (get_model_state_dict(student, options=o),
            get_optimizer_state_dict(student, opt, options=o) if opt is not None else None)


def _train(cfg, out_dir, inputs, reporter, teacher_cfg, device_arg, world, rank) -> dict:
    from transformers import AutoModelForCausalLM

    from ..models import load_tokenizer, resolve_model

    torch.manual_seed(cfg.seed)
    teacher, tok = load_model(teacher_cfg, device=device_arg)
    device = teacher.device
    if cfg.student:
        src = resolve_model(cfg.student)
        student = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(device)
        s_tok = load_tokenizer(src)
        same_vocab = s_tok.get_vocab() == tok.get_vocab()
        if cfg.alpha > 0 and not same_vocab:
            raise UserError(f"student: {cfg.student} does not share the teacher's vocabulary, which logit "
                            f"distillation (alpha > 0) needs; use alpha: 0 (sequence distillation) or a student "
                            f"with the teacher's tokenizer")
        tok = s_tok
    else:
        student = build_student(teacher, cfg.keep_every).to(device)
        same_vocab = True
    if cfg.kd_source == "stored":
        teacher = None  # the stored top-k stands in for it (the student was built already)
    else:  # online: the teacher's logits for KD (α > 0) and for the held-out KL (any α)
        teacher.eval().requires_grad_(False)

    art = inputs.artifact
    rows = read_distill_rows(art)
    stored = cfg.kd_source == "stored" and (cfg.alpha > 0 or "logprobs_file" in rows[0])
    examples = encode(rows, tok, cfg.max_length, same_vocab, art, stored)
    if len(examples) < 2:
        raise UserError(f"{art.path}: need at least 2 usable rows (got {len(examples)}); raise max_length or "
                        f"generate more data")
    train_set, held_out = split(examples, cfg)

    model = _shard(student, cfg, world, device)
    fsdp = world > 1 and cfg.parallel == "fsdp"  # then every rank must join each forward, evaluation included
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # -- resume from the last checkpoint in the work dir (same config => same key => same dir)
    work = stage_work_dir(out_dir, inputs, cfg)
    ckpt_path = work / "checkpoint.pt"
    start, history, evals = 0, [], []
    if ckpt_path.exists():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        o = StateDictOptions(full_state_dict=True)
        set_model_state_dict(student, ckpt["student"], options=o)
        set_optimizer_state_dict(student, opt, ckpt["optimizer"], options=o)
        start, history, evals = ckpt["step"], ckpt["history"], ckpt["evals"]
        reporter.info(f"train-student: resuming from step {start} ({ckpt_path})")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, tokens = time.perf_counter(), 0
    for step in reporter.track(range(start, cfg.steps), total=cfg.steps - start, description="training"):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, dtype=torch.float64)  # this rank's token-weighted loss, kd, ce; its tokens
        for a in range(cfg.grad_accum):
            per_rank = cfg.batch_size // world  # this process's slice of the micro-batch one process would take
            examples = micro_batch(train_set, step * cfg.grad_accum + a, cfg.batch_size, cfg.seed)
            batch = {k: v.to(device) for k, v in collate(examples[rank * per_rank:(rank + 1) * per_rank],
                                                          pad_id).items()}
            # the micro-batch's loss is a mean over all its response tokens: this rank's mean, weighted by its
            # share of them (times W, which the gradient averaging divides out) gives one process's gradient
            n_local = int((batch["labels"][:, 1:] != IGNORE).sum())
            n_all = torch.tensor([n_local], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(n_all)
            weight = n_local * world / n_all.item()
            sync = a == cfg.grad_accum - 1 or world == 1  # reduce gradients once per optimizer step
            if fsdp:
                student.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or fsdp else model.no_sync()), _autocast(device, cfg):
                rows, targets, t_rows = _forward(model, teacher if cfg.alpha > 0 else None, batch)
                loss, kd, ce = distill_loss(rows, targets, cfg.alpha, cfg.temperature, t_rows,
                                            batch.get("top_ids"), batch.get("top_lp"), cfg.kd_tail)
                (loss * weight / cfg.grad_accum).backward()
            share = n_local / n_all.item() / cfg.grad_accum
            sums += torch.tensor([loss.item() * share, kd.item() * share, ce.item() * share,
                                  int(batch["attention_mask"].sum())], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        loss_acc, kd_acc, ce_acc = sums[:3].tolist()
        tokens += int(sums[3])
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss_acc, "kd": kd_acc, "ce": ce_acc, "lr": lr,
                        "grad_norm": grad_norm})
        reporter.update(loss=loss_acc, kd=kd_acc, ce=ce_acc, lr=lr,
                        tok_s=tokens / max(time.perf_counter() - t0, 1e-9))
        if (rank == 0 or fsdp) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            evals.append({"step": step + 1, **evaluate(student, teacher, held_out, cfg, device, pad_id)})
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            model_state, opt_state = _full_state(student, opt)
            if rank == 0:
                work.mkdir(parents=True, exist_ok=True)
                tmp = ckpt_path.with_name("checkpoint.pt.part")
                torch.save({"student": model_state, "optimizer": opt_state, "step": step + 1,
                            "history": history, "evals": evals}, tmp)
                os.replace(tmp, ckpt_path)  # a kill mid-save leaves the previous checkpoint whole

    train_s = time.perf_counter() - t0  # includes the periodic held-out evaluations and checkpoints
    # each rank's own copy under DDP; the gathered whole under FSDP (a collective: every rank runs it)
    final_state = _full_state(student)[0] if fsdp else None
    weights = [final_state[n] if fsdp else p for n, p in student.named_parameters()]
    summary = {"steps": cfg.steps, "resumed_from_step": start, "world_size": world,
               "parallel": cfg.parallel if world > 1 else "none",
               # every process's tokens (padding excluded, summed over the ranks) over the loop's wall time
               "tokens_per_s": round(tokens / max(train_s, 1e-9), 1),
               "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda"
               else None,
               "student_layers": student.config.num_hidden_layers,
               "student_params": sum(p.numel() for p in weights),
               # float64 sum of every weight: equal across torchrun ranks iff DDP kept them in sync
               "param_fingerprint": float(sum(p.detach().double().sum() for p in weights)),
               "train_rows": len(train_set), "eval_rows": len(held_out), "final_loss": history[-1]["loss"],
               "alpha": cfg.alpha, "temperature": cfg.temperature,
               "kd_source": cfg.kd_source if cfg.alpha > 0 else "none (sequence distillation)"}
    if rank == 0:
        summary.update({k: v for k, v in evals[-1].items() if k != "step"})
        summary["tables"] = {"train-student: held-out evaluation": evals}
        student.config.use_cache = True
        student.save_pretrained(out_dir, state_dict=final_state)
        tok.save_pretrained(out_dir)
        (out_dir / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return summary  # the driver removes the work dir (checkpoint) once the artifact is in place
