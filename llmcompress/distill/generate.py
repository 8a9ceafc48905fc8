"""`llmc distill-data`: a teacher LLM writes supervised fine-tuning data.

prompts (a dataset, filtered by difficulty) -> a style per prompt (task mix) -> chat template -> batched
generation (left padding, KV cache) -> checks (format, GSM8K answer = rejection sampling, dedup) -> JSONL shards.

Resumable: the plan (which prompt, style and sample goes in which batch) is a pure function of the config, and
every finished batch is written to the work dir as its own file by an atomic rename, so a killed run loses at
most the batch in flight and a rerun skips the batches whose files exist: no row is written twice or lost.
Each batch reseeds the generator from (seed, batch index), so a resumed run writes the rows an uninterrupted run
would have. The artifact is assembled from the batch files only at the end. Under torchrun the batches are dealt
round-robin to the ranks and gathered to rank 0, which alone writes (see _generate).

Output (the artifact directory):
  data/train-00000.jsonl ...   one row per kept response: messages, prompt / response text and token ids, style,
                               gold / pred / correct; `datasets.load_dataset("json", data_files=".../data/*.jsonl")`
  logprobs/train-00000.safetensors   (save_logits) `ids` [tokens, k] int32 and `logprobs` [tokens, k] float16:
                               the teacher's top-k log-probs (T = 1) for every response token; a row's tokens are
                               rows logprobs_offset .. logprobs_offset + len(response_ids) of its shard
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..artifacts import sha256_json
from ..config import DISTILL_STYLES, DistillDataConfig, to_dict
from ..data import format_row, load_rows
from ..distributed import process_group
from ..errors import UserError
from ..models import load_model

COT = "Let's think step by step."
STRUCTURED = ("Reason step by step inside <analysis></analysis>, then give only the final answer inside "
              "<final></final>.")
STRUCTURED_PREFILL = "<analysis>\n"  # the assistant turn starts here, so the teacher follows the format
USER_SUFFIX = {"plain": "", "cot": "\n" + COT, "structured": "\n" + STRUCTURED, "multiturn": "\n" + COT}


# ---------------------------------------------------------------------------------------------------------------
# answers

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str):
    """'1,234.50' -> 1234.5; None when there is no number."""
    m = _NUM.search(text or "")
    if not m:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


def gold_answer(value) -> str | None:
    """GSM8K keeps the final answer after '####'; other datasets give it as the whole field."""
    if value is None:
        return None
    text = str(value)
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def final_answer(response: str, style: str) -> str | None:
    """The answer a response commits to: <final>…</final> for structured traces, else '#### N', '\\boxed{N}',
    'answer is N', or the last number in the text."""
    if style == "structured":
        m = re.search(r"<final>(.*?)(?:</final>|$)", response, re.S)
        return m.group(1).strip() if m else None
    for pat in (r"####\s*([^\n]+)", r"\\boxed\{([^}]*)\}", r"answer is[:\s]*\$?(-?\d[\d,]*(?:\.\d+)?)"):
        m = re.findall(pat, response, re.I)
        if m:
            return m[-1].strip()
    nums = _NUM.findall(response)
    return nums[-1] if nums else None


def answers_match(pred: str | None, gold: str | None) -> bool:
    p, g = parse_number(pred or ""), parse_number(gold or "")
    if p is None or g is None:
        return False
    return math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-6)


def well_formed(response: str, style: str) -> bool:
    if style != "structured":
        return True
    return "</analysis>" in response and "<final>" in response


# ---------------------------------------------------------------------------------------------------------------
# plan: which prompts, in which style, in which batch


def _difficulty_value(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value)
    num = parse_number(text) if re.fullmatch(r"\s*-?\d[\d,]*(?:\.\d+)?\s*", text) else None
    if num is not None:
        return num
    return float(sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("####")))


def select_prompts(cfg: DistillDataConfig, tok) -> tuple[list[dict], dict]:
    """Rows -> difficulty filter -> seeded sample of prompts.num_samples. Returns (prompts, filter counts)."""
    rows = load_rows(cfg.prompts.source, cfg.prompts.split)
    d = cfg.difficulty
    max_tokens = d.max_prompt_tokens or cfg.prompts.max_length
    kept, counts = [], {"rows": len(rows), "too_short": 0, "too_long": 0, "out_of_range": 0, "empty": 0}
    for i, row in enumerate(rows):
        text = format_row(row, cfg.prompts.template).strip()
        if not text:
            counts["empty"] += 1
            continue
        n = len(tok(text, add_special_tokens=False).input_ids)
        if n < d.min_prompt_tokens:
            counts["too_short"] += 1
            continue
        if n > max_tokens:
            counts["too_long"] += 1
            continue
        if d.field:
            if d.field not in row:
                raise UserError(f"difficulty.field: {d.field!r} is not a field of {cfg.prompts.source} "
                                f"(fields: {', '.join(row)})")
            v = _difficulty_value(row[d.field])
            if v is None or (d.min is not None and v < d.min) or (d.max is not None and v > d.max):
                counts["out_of_range"] += 1
                continue
        gold = gold_answer(row.get(cfg.answer_field)) if cfg.answer_field else None
        kept.append({"row_index": i, "text": text, "gold": gold})
    if not kept:
        raise UserError(f"{cfg.prompts.source}: no prompts left after the difficulty filter ({counts})")
    n = min(cfg.prompts.num_samples, len(kept))
    order = random.Random(cfg.seed).sample(range(len(kept)), n) if cfg.prompts.shuffle else list(range(n))
    prompts = [kept[i] for i in order]
    for j, p in enumerate(prompts):
        p["prompt_index"] = j
        p["n_tokens"] = len(tok(p["text"], add_special_tokens=False).input_ids)
    counts["selected"] = len(prompts)
    return prompts, counts


def assign_styles(n: int, weights: dict[str, float], seed: int) -> list[str]:
    """Exact task mix: style s gets round(n·w_s/Σw) prompts (largest remainder), in a seeded random order."""
    names = [s for s in DISTILL_STYLES if weights.get(s, 0) > 0]
    total = sum(weights[s] for s in names)
    quota = [n * weights[s] / total for s in names]
    counts = [int(q) for q in quota]
    for i in sorted(range(len(names)), key=lambda i: -(quota[i] - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    styles = [s for s, c in zip(names, counts) for _ in range(c)]
    random.Random(seed + 1).shuffle(styles)
    return styles


def make_plan(prompts: list[dict], styles: list[str], cfg: DistillDataConfig) -> list[list[dict]]:
    """Work items (prompt, style, sample) grouped by style and sorted by length, so a batch is one style and
    pads little, then cut into batches."""
    items = [{**p, "style": st, "sample_index": k}
             for p, st in zip(prompts, styles) for k in range(cfg.samples_per_prompt)]
    items.sort(key=lambda it: (DISTILL_STYLES.index(it["style"]), it["n_tokens"], it["prompt_index"],
                               it["sample_index"]))
    batches, cur = [], []
    for it in items:
        if cur and (len(cur) == cfg.batch_size or cur[-1]["style"] != it["style"]):
            batches.append(cur)
            cur = []
        cur.append(it)
    if cur:
        batches.append(cur)
    return batches


# ---------------------------------------------------------------------------------------------------------------
# generation


def stop_token_ids(model, tok) -> list[int]:
    """End-of-turn ids: the generation config's eos and the chat template's end marker (`<|im_end|>`, ...)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(ids)


def render(tok, messages: list[dict], prefill: str = "") -> str:
    """Chat template up to the assistant's turn (plus any text the assistant turn is made to start with)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
    # a base model without a template: a plain transcript
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + "Assistant: " + prefill


@torch.no_grad()
def generate_batch(model, tok, prompts: list[str], cfg: DistillDataConfig, stop_ids: list[int]) -> list[dict]:
    """One left-padded generate() call with the KV cache; per sequence: the prompt and response token ids, the
    response text, whether it ended on a stop token, and (save_logits) the top-k log-probs of each response
    token, from the teacher's raw logits (T = 1, before any sampling processor)."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(
        **enc, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, do_sample=cfg.do_sample,
        temperature=cfg.temperature if cfg.do_sample else None, top_p=cfg.top_p if cfg.do_sample else None,
        top_k=cfg.top_k if cfg.do_sample else None, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
        use_cache=True, return_dict_in_generate=True, output_logits=cfg.save_logits)
    width = enc.input_ids.shape[1]
    new = out.sequences[:, width:].cpu()
    if cfg.save_logits:  # [steps, B, V] -> top-k per (sequence, step)
        lp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
        top_lp, top_ids = lp.topk(cfg.logits_top_k, dim=-1)
        top_lp, top_ids = top_lp.cpu(), top_ids.cpu()
    results = []
    for b in range(len(prompts)):
        ids = new[b].tolist()
        n = len(ids)
        for j, t in enumerate(ids):
            if t in stop_ids:
                n = j + 1  # keep the end-of-turn token: the student learns to stop
                break
        ids = ids[:n]
        finished = bool(ids) and ids[-1] in stop_ids
        prompt_ids = enc.input_ids[b][enc.attention_mask[b].bool()].tolist()
        text_ids = ids[:-1] if finished else ids
        r = {"prompt_ids": prompt_ids, "response_ids": ids, "finished": finished,
             "response": tok.decode(text_ids, skip_special_tokens=True)}
        if cfg.save_logits:
            r["top_ids"], r["top_logprobs"] = top_ids[b, :n].to(torch.int32), top_lp[b, :n].to(torch.float16)
        results.append(r)
    return results


def run_batch(model, tok, batch: list[dict], cfg: DistillDataConfig, stop_ids: list[int]) -> tuple[list, dict]:
    """Generate one planned batch into output rows (every row, checks recorded but not yet applied)."""
    style = batch[0]["style"]
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    convs = [system + [{"role": "user", "content": it["text"] + USER_SUFFIX[style]}] for it in batch]
    prefill = STRUCTURED_PREFILL if style == "structured" else ""
    outs = generate_batch(model, tok, [render(tok, c, prefill) for c in convs], cfg, stop_ids)
    n_tokens = sum(len(o["response_ids"]) for o in outs)
    if style == "multiturn":  # the follow-up turn is generated on the first answer
        convs = [c + [{"role": "assistant", "content": o["response"]}, {"role": "user", "content": cfg.followup}]
                 for c, o in zip(convs, outs)]
        outs = generate_batch(model, tok, [render(tok, c) for c in convs], cfg, stop_ids)
        n_tokens += sum(len(o["response_ids"]) for o in outs)
    rows, tensors = [], {}
    for it, conv, o in zip(batch, convs, outs):
        content = prefill + o["response"]
        pred = final_answer(content, style)
        row = {
            "id": f"p{it['prompt_index']}-s{it['sample_index']}",
            "prompt_index": it["prompt_index"], "sample_index": it["sample_index"], "row_index": it["row_index"],
            "style": style, "messages": conv + [{"role": "assistant", "content": content}],
            "prompt": tok.decode(o["prompt_ids"]), "response": o["response"],
            "prompt_ids": o["prompt_ids"], "response_ids": o["response_ids"], "finished": o["finished"],
            "well_formed": well_formed(content, style), "gold": it["gold"], "pred": pred,
            "correct": None if it["gold"] is None or parse_number(it["gold"]) is None
            else answers_match(pred, it["gold"]),
        }
        rows.append(row)
        if cfg.save_logits:
            tensors[f"{row['id']}.ids"] = o["top_ids"].contiguous()
            tensors[f"{row['id']}.logprobs"] = o["top_logprobs"].contiguous()
    return rows, {"tokens": n_tokens, "tensors": tensors}


# ---------------------------------------------------------------------------------------------------------------
# the stage


def stage_work_dir(out_dir: Path, inputs, cfg) -> Path:
    """The driver's stable work dir (keyed by the cache key); without the driver, a sibling of the final
    output keyed by the config hash."""
    if inputs is not None and getattr(inputs, "work_dir", None) is not None:
        return Path(inputs.work_dir)
    final = out_dir.parent / out_dir.name.split(".tmp-")[0].lstrip(".")
    return final.parent / f".{final.name}.work-{sha256_json(to_dict(cfg))[:16]}"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


def _norm(text: str) -> str:
    return " ".join(text.split())


def run(cfg: DistillDataConfig, out_dir: Path, inputs, reporter) -> dict:
    with process_group() as ranks:
        return _generate(cfg, out_dir, inputs, reporter, ranks)


def _generate(cfg: DistillDataConfig, out_dir: Path, inputs, reporter, ranks) -> dict:
    """Under torchrun rank r generates the planned batches r, r + W, ... of those not yet done; each round's
    batches are gathered to rank 0, which alone writes them to the work dir and assembles the artifact. A batch's
    rows depend only on the batch (its prompts and its seed), not on which rank made them, so W ranks write the
    rows one process would."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(cfg.seed)
    model, tok = load_model(inputs.model if inputs and inputs.model else cfg.teacher, device=ranks.device)
    tok.padding_side = "left"  # generation appends on the right; every prompt must end at the same column
    stop_ids = stop_token_ids(model, tok)

    prompts, filter_counts = select_prompts(cfg, tok)
    batches = make_plan(prompts, assign_styles(len(prompts), cfg.styles, cfg.seed), cfg)
    plan_key = sha256_json({"config": to_dict(cfg), "model": to_dict(inputs.model) if inputs and inputs.model
                            else None, "plan": [[(it["prompt_index"], it["sample_index"], it["style"]) for it in b]
                                                for b in batches]})
    work = stage_work_dir(out_dir, inputs, cfg)
    plan_file = work / "plan.json"

    def done(b: int) -> bool:
        return (work / "batches" / f"{b:06d}.jsonl").exists() and (
            not cfg.save_logits or (work / "batches" / f"{b:06d}.safetensors").exists())

    todo = [None]
    if ranks.rank == 0:
        if work.exists() and (not plan_file.exists()
                              or json.loads(plan_file.read_text()).get("plan_key") != plan_key):
            shutil.rmtree(work)  # a work dir of another plan: nothing in it is ours
        (work / "batches").mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps({"plan_key": plan_key, "batches": len(batches)}))
        todo = [[b for b in range(len(batches)) if not done(b)]]
    if ranks.world > 1:
        dist.broadcast_object_list(todo, src=0)
    todo = todo[0]
    resumed = len(batches) - len(todo)
    if resumed:
        reporter.info(f"distill-data: resuming: {resumed}/{len(batches)} batches already generated in {work}")
    gen_tokens, gen_time, mine = 0, 0.0, 0
    rounds = math.ceil(len(todo) / ranks.world)
    for k in reporter.track(range(rounds), total=rounds, description="generating"):
        t0 = time.perf_counter()
        i = k * ranks.world + ranks.rank
        result = None
        if i < len(todo):
            b = todo[i]
            torch.manual_seed(cfg.seed * 1_000_003 + b)  # per-batch seed: any rank, any rerun samples the same
            result = (b, *run_batch(model, tok, batches[b], cfg, stop_ids))
            mine += 1
        results = [result]
        if ranks.world > 1:
            results = [None] * ranks.world if ranks.rank == 0 else None
            dist.gather_object(result, results, dst=0)
        gen_time += time.perf_counter() - t0
        for res in results or []:
            if res is None:
                continue
            b, rows, extra = res
            gen_tokens += extra["tokens"]
            if cfg.save_logits:  # logits first: a batch counts as done only once its .jsonl exists
                _atomic_write(work / "batches" / f"{b:06d}.safetensors",
                              lambda p: save_file(extra["tensors"], str(p)))
            _atomic_write(work / "batches" / f"{b:06d}.jsonl",
                          lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
        reporter.update(tok_s=gen_tokens / max(gen_time, 1e-9))
    if ranks.rank != 0:
        return {"world_size": ranks.world, "rank": ranks.rank, "batches_generated": mine}

    # assemble: every generated row, in prompt order; checks applied here
    rows = []
    for b in range(len(batches)):
        rows += [json.loads(line) for line in (work / "batches" / f"{b:06d}.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
    check = cfg.check_answers and cfg.answer_field is not None
    seen, kept = set(), []
    counts = {"generated": len(rows), "dropped_malformed": 0, "dropped_wrong_answer": 0, "dropped_duplicate": 0}
    per_style = {s: {"style": s, "generated": 0, "kept": 0, "correct": 0, "checked": 0} for s in cfg.styles}
    for r in rows:
        st = per_style[r["style"]]
        st["generated"] += 1
        if r["correct"] is not None:
            st["checked"] += 1
            st["correct"] += int(r["correct"])
        if not r["well_formed"]:
            counts["dropped_malformed"] += 1
            continue
        if check and r["correct"] is False:
            counts["dropped_wrong_answer"] += 1
            continue
        key = (_norm(r["prompt"]), _norm(r["response"]))
        if cfg.dedup and key in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add(key)
        kept.append(r)
        st["kept"] += 1
    counts["kept"] = len(kept)
    if not kept:
        raise UserError(f"distill-data: every generated row was dropped ({counts}); loosen check_answers, "
                        f"raise max_new_tokens or samples_per_prompt")

    (out_dir / "data").mkdir()
    if cfg.save_logits:
        (out_dir / "logprobs").mkdir()
    n_shards = math.ceil(len(kept) / cfg.shard_rows)
    tensors_of_batch: dict[int, dict] = {}
    batch_of = {(it["prompt_index"], it["sample_index"]): b for b, batch in enumerate(batches) for it in batch}
    for s in range(n_shards):
        shard = kept[s * cfg.shard_rows:(s + 1) * cfg.shard_rows]
        name = f"train-{s:05d}"
        if cfg.save_logits:
            ids, lps, offset = [], [], 0
            for r in shard:
                b = batch_of[(r["prompt_index"], r["sample_index"])]
                if b not in tensors_of_batch:
                    tensors_of_batch = {b: load_file(str(work / "batches" / f"{b:06d}.safetensors"))}
                t = tensors_of_batch[b]
                ids.append(t[f"{r['id']}.ids"])
                lps.append(t[f"{r['id']}.logprobs"])
                r["logprobs_file"], r["logprobs_offset"] = f"logprobs/{name}.safetensors", offset
                offset += len(r["response_ids"])
            save_file({"ids": torch.cat(ids), "logprobs": torch.cat(lps)}, str(out_dir / "logprobs" /
                                                                               f"{name}.safetensors"))
        (out_dir / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shard))
    shutil.rmtree(work, ignore_errors=True)  # the driver also removes it; library callers have no driver

    checked = [r for r in rows if r["correct"] is not None]
    summary = {
        "prompts": len(prompts), **{f"filter_{k}": v for k, v in filter_counts.items()}, **counts,
        "rows": len(kept), "shards": n_shards, "batches": len(batches), "batches_resumed": resumed,
        "world_size": ranks.world,
        "teacher_accuracy": (sum(r["correct"] for r in checked) / len(checked)) if checked else None,
        # every rank's tokens over rank 0's wall time of the generation rounds
        "generated_tokens": gen_tokens, "tokens_per_s": round(gen_tokens / gen_time, 2) if gen_time else None,
        "data_files": "data/*.jsonl", "logprobs": cfg.save_logits,
        "tables": {"distill-data: rows by style": list(per_style.values()),
                   "distill-data: kept and dropped": [{"reason": k, "rows": v} for k, v in counts.items()]},
    }
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
