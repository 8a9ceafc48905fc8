"""distill-data: answer parsing, the task mix, and real generation on the embedded teacher (tiny lengths)."""

import json
from pathlib import Path

import pytest
import torch

from llmcompress.config import ConfigError, DistillDataConfig, from_dict
from llmcompress.distill.generate import (answers_match, assign_styles, final_answer, gold_answer,
                                          _difficulty_value)
from llmcompress.progress import Reporter
from llmcompress.stages import StageInputs, run_stage

GSM = {"source": "builtin:gsm8k_train", "template": "{question}", "max_length": 256}


def test_answer_parsing():
    assert gold_answer("She sold 48/2 = 24.\n#### 1,072") == "1,072"
    assert answers_match("1072", gold_answer("#### 1,072"))
    assert answers_match("$72.00", "72") and not answers_match("71", "72") and not answers_match(None, "72")
    assert final_answer("so 3 + 4 = 7.\n#### 7", "cot") == "7"
    assert final_answer("first 12, then 30. The answer is 42 apples, not 5", "cot") == "42"
    assert final_answer("we get \\boxed{18} since 3", "plain") == "18"
    assert final_answer("12 and then 13", "plain") == "13"
    assert final_answer("<analysis>\n5 + 6 = 11</analysis>\n<final>11</final>", "structured") == "11"
    assert final_answer("<analysis>\n5 + 6 = 11 and no final", "structured") is None
    assert _difficulty_value("a = 1\nb = 2\n#### 3") == 2.0 and _difficulty_value(4) == 4.0


def test_task_mix_is_exact_and_seeded():
    styles = assign_styles(10, {"cot": 3.0, "plain": 1.0, "structured": 1.0}, seed=0)
    assert sorted(styles) == sorted(["cot"] * 6 + ["plain"] * 2 + ["structured"] * 2)
    assert styles == assign_styles(10, {"cot": 3.0, "plain": 1.0, "structured": 1.0}, seed=0)
    assert styles != assign_styles(10, {"cot": 3.0, "plain": 1.0, "structured": 1.0}, seed=1)


def test_config_rejects_bad_mix_and_lengths():
    with pytest.raises(ConfigError, match="styles.poem"):
        from_dict(DistillDataConfig, {"styles": {"poem": 1.0}})
    with pytest.raises(ConfigError, match="min_new_tokens"):
        from_dict(DistillDataConfig, {"min_new_tokens": 9, "max_new_tokens": 4})
    with pytest.raises(ConfigError, match="difficulty.field"):
        from_dict(DistillDataConfig, {"difficulty": {"min": 2}})


def _cfg(**kw):
    base = {"prompts": {**GSM, "num_samples": 4}, "max_new_tokens": 6, "batch_size": 2, "do_sample": True,
            "check_answers": False}
    base.update(kw)
    return from_dict(DistillDataConfig, base)


def _rows(path: Path) -> list[dict]:
    return [json.loads(l) for f in sorted((path / "data").glob("*.jsonl")) for l in f.read_text().splitlines()]


def test_greedy_batched_generation_and_stored_logprobs_match_the_teacher(smollm, smollm_path, workdir):
    """Left-padded batched generation: the stored top-k log-probs equal the teacher's own log-probs when it
    re-reads prompt + response unpadded, and greedy tokens are the stored top-1."""
    import datasets
    from safetensors.torch import load_file

    cfg = _cfg(do_sample=False, save_logits=True, logits_top_k=5, min_new_tokens=0,
               styles={"cot": 1.0, "plain": 1.0}, max_new_tokens=5)
    art = run_stage("distill-data", cfg, workdir / "dd", StageInputs(model=from_dict(
        type(cfg.teacher), {"name": str(smollm_path)})))
    rows = _rows(art.path)
    assert len(rows) == 4 and {r["style"] for r in rows} == {"cot", "plain"}
    ds = datasets.load_dataset("json", data_files=str(art.path / "data" / "*.jsonl"), split="train")
    assert ds.num_rows == 4 and ds[0]["messages"][-1]["role"] == "assistant"
    model, tok = smollm
    store = load_file(str(art.path / "logprobs" / "train-00000.safetensors"))
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        n, p = len(r["response_ids"]), len(r["prompt_ids"])
        top_ids = store["ids"][r["logprobs_offset"]:r["logprobs_offset"] + n].long()
        top_lp = store["logprobs"][r["logprobs_offset"]:r["logprobs_offset"] + n].float()
        want = lp[p - 1:p - 1 + n].gather(-1, top_ids)  # position s predicts token s + 1
        assert torch.allclose(top_lp, want, atol=2e-2), (top_lp - want).abs().max()
        assert top_ids[:, 0].tolist() == r["response_ids"]  # greedy = argmax
        assert r["prompt"].endswith("<|im_start|>assistant\n")
    s = art.manifest["summary"]
    assert s["generated"] == s["kept"] == 4 and s["generated_tokens"] == sum(len(r["response_ids"]) for r in rows)


def test_rejection_sampling_keeps_only_matching_answers(smollm_path, workdir):
    data = workdir / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "What is 2 + 3? Reply with only the number.", "answer": "#### 5"},
        {"question": "What is 10 + 10? Reply with only the number.", "answer": "#### 20"},
        {"question": "What is 4 + 4? Reply with only the number.", "answer": "#### 987654"},  # wrong gold
        {"question": "Say hello.", "answer": "#### 31337"}]))
    cfg = _cfg(prompts={"source": str(data), "template": "{question}", "num_samples": 4}, styles={"plain": 1.0},
               check_answers=True, do_sample=False, max_new_tokens=10, samples_per_prompt=2, batch_size=8)
    art = run_stage("distill-data", cfg, workdir / "dd", StageInputs(model=from_dict(
        type(cfg.teacher), {"name": str(smollm_path)})))
    s = art.manifest["summary"]
    rows = _rows(art.path)
    assert s["generated"] == 8
    # greedy twice gives the same response: the second sample of each prompt is a duplicate
    assert s["kept"] + s["dropped_wrong_answer"] + s["dropped_duplicate"] + s["dropped_malformed"] == 8
    assert all(r["correct"] for r in rows) and len(rows) == s["kept"]
    assert not any(r["gold"] in ("987654", "31337") for r in rows)
    assert s["dropped_wrong_answer"] >= 4  # the two prompts with a wrong gold, twice each
    assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows)


class _KillAfter(Reporter):
    """Raises after `n` batches were written, like a kill between two batches."""

    def __init__(self, n):
        self.n = n

    def update(self, **fields):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


def test_resume_after_interrupt_equals_uninterrupted_run(smollm_path, workdir):
    model = {"name": str(smollm_path)}
    cfg = _cfg(styles={"cot": 1.0, "multiturn": 1.0}, max_new_tokens=3, batch_size=1, samples_per_prompt=1,
               save_logits=True, logits_top_k=2)
    inputs = StageInputs(model=from_dict(type(cfg.teacher), model))
    with pytest.raises(KeyboardInterrupt):
        run_stage("distill-data", cfg, workdir / "a", inputs, _KillAfter(2))
    assert not (workdir / "a").exists()
    work = list(workdir.glob(".a.work-*"))
    assert len(work) == 1 and len(list((work[0] / "batches").glob("*.jsonl"))) == 2
    resumed = run_stage("distill-data", cfg, workdir / "a", inputs)
    assert resumed.manifest["summary"]["batches_resumed"] == 2
    assert not list(workdir.glob(".a.work-*"))  # removed once the artifact is complete
    whole = run_stage("distill-data", cfg, workdir / "b", inputs)
    assert whole.manifest["summary"]["batches_resumed"] == 0
    assert _rows(resumed.path) == _rows(whole.path)
    assert (resumed.path / "logprobs" / "train-00000.safetensors").read_bytes() == \
        (whole.path / "logprobs" / "train-00000.safetensors").read_bytes()


def test_difficulty_filter_on_metadata_and_length(smollm):
    """GSM8K 'answer' lines = solution steps: only problems of 2 steps or fewer are prompted; prompt length
    bounds are in tokens."""
    from llmcompress.data import load_rows
    from llmcompress.distill.generate import select_prompts

    _, tok = smollm
    cfg = _cfg(prompts={**GSM, "num_samples": 50}, difficulty={"field": "answer", "max": 2})
    prompts, counts = select_prompts(cfg, tok)
    src = load_rows("builtin:gsm8k_train")
    assert len(prompts) == 50 and counts["out_of_range"] > 0
    assert all(_difficulty_value(src[p["row_index"]]["answer"]) <= 2 for p in prompts)
    cfg = _cfg(prompts={**GSM, "num_samples": 400}, difficulty={"min_prompt_tokens": 40, "max_prompt_tokens": 60})
    prompts, counts = select_prompts(cfg, tok)
    assert prompts and all(40 <= p["n_tokens"] <= 60 for p in prompts)
    assert counts["too_short"] + counts["too_long"] + len(prompts) == 400
