"""The lm-eval path scores exactly what a direct forward pass scores, and runs the shipped local tasks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from _shared import one_thread, shared_data  # noqa: F401  (one_thread: autouse, one torch thread)
from llmcompress.eval.harness import LlmcLM, run_tasks


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@torch.no_grad()
def _direct_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one unbatched forward pass over the concatenated token ids."""
    if context:
        ctx = tok.encode(context, add_special_tokens=False)
        whole = tok.encode(context + continuation, add_special_tokens=False)
        cont = whole[len(ctx):]
    else:
        ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        whole, cont = ctx + tok.encode(continuation, add_special_tokens=False), None
        cont = whole[1:]
    ids = torch.tensor([whole])
    logprobs = F.log_softmax(model(ids).logits[0, :-1].double(), -1)[-len(cont):]  # float64: a reference
    target = torch.tensor(cont)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_matches_a_direct_forward_pass(smollm):
    model, tok = smollm
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"),
             ("Question: What is the capital of France?\nAnswer:", " the moon, obviously"),
             ("The quick brown fox jumps over the lazy", " dog"),
             ("2 + 2 =", " 4"),
             ("Water boils at 100 degrees ", "Celsius at sea level."),  # trailing space moves to the continuation
             ("", "Hello world")]  # empty context: conditions on the prefix token
    lm = LlmcLM(model, tok, batch_size=4)  # 6 requests of different lengths: two batches, right-padded
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ref_ll, ref_greedy = _direct_loglikelihood(model, tok, ctx.rstrip(" "), ctx[len(ctx.rstrip(" ")):] + cont)
        assert ll == pytest.approx(ref_ll, abs=1e-3), (ctx, cont)
        assert greedy == ref_greedy
    assert got[0][0] > got[1][0]  # the model prefers Paris to nonsense: the scores mean something


def test_loglikelihood_rolling_scores_every_token_once(smollm):
    model, tok = smollm
    text = "Robert Boulter is an English film, television and theatre actor. He had a guest role in 2000."
    ids = tok.encode(text, add_special_tokens=False)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([[prefix] + ids])).logits[0, :-1].double(), -1)
    ref = logprobs.gather(-1, torch.tensor(ids)[:, None]).sum().item()
    long_ctx = LlmcLM(model, tok, batch_size=2)
    assert long_ctx.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])[0] == pytest.approx(ref, abs=1e-3)
    # short windows: each token still scored exactly once, now with less context, so the total is lower
    short = LlmcLM(model, tok, batch_size=2, max_length=8).loglikelihood_rolling(
        [_req("loglikelihood_rolling", (text,))])[0]
    assert short < ref


def test_generate_until_batched_equals_greedy_one_by_one(smollm):
    model, tok = smollm
    prompts = ["Question: Tom has 3 apples and buys 2 more. How many apples does he have?\nAnswer:",
               "The capital of Italy is"]
    args = {"until": ["\n", "Question:"], "max_gen_toks": 10, "do_sample": False}
    got = LlmcLM(model, tok, batch_size=2).generate_until([_req("generate_until", (p, args), i)
                                                          for i, p in enumerate(prompts)])
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id)
        ref = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False,
                         clean_up_tokenization_spaces=False)
        for stop in args["until"] + [tok.eos_token]:
            ref = ref.split(stop)[0]
        assert text == ref
        assert "\n" not in text


def test_local_task_runs_through_simple_evaluate_with_lm_eval_metric_names(smollm):
    model, tok = smollm
    data = shared_data("arc/ARC-Easy-Test.jsonl").parents[1]
    out = run_tasks(model, tok, ["llmc_arc_easy", "llmc_lambada_openai"], limit=2, batch_size=8,
                    data_dir_path=str(data))
    meta = out.pop("_meta")
    assert meta["n_samples"]["llmc_arc_easy"] == {"original": 2376, "effective": 2}
    assert meta["n_samples"]["llmc_lambada_openai"] == {"original": 5153, "effective": 2}
    assert set(out["llmc_arc_easy"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(out["llmc_lambada_openai"]) == {"perplexity", "perplexity_stderr", "acc", "acc_stderr"}
    assert all(0.0 <= v <= 1.0 for v in out["llmc_arc_easy"].values())
    assert out["llmc_lambada_openai"]["perplexity"] >= 1.0
    assert meta["data"] == {"llmc_arc_easy": "ARC-Easy Test split, as stock arc_easy",
                            "llmc_lambada_openai": "LAMBADA (OpenAI) test split, as stock lambada_openai"}


def test_local_loaders_shape_rows_like_the_hub_and_name_missing_files(tmp_path, monkeypatch):
    import importlib.util

    from llmcompress.eval.harness import TASKS_DIR

    spec = importlib.util.spec_from_file_location("llmc_task_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    data = shared_data("piqa/valid.jsonl").parents[1]
    piqa = utils.piqa(llmc_data_dir=str(data))["validation"]
    labels = (data / "piqa/valid-labels.lst").read_text().split()
    assert len(piqa) == len(labels) == 1838 and piqa[2]["label"] == int(labels[2])
    arc = utils.arc_easy(llmc_data_dir=str(data))
    row = arc["test"][0]
    assert row["choices"]["label"][row["choices"]["label"].index(row["answerKey"])] == row["answerKey"]
    gsm = utils.gsm8k(llmc_data_dir=str(data))
    assert len(gsm["test"]) == 1319 and "#### " in gsm["test"][0]["answer"]
    # a missing file is named, and the hub is never asked (the stock task name is the hub's copy)
    asked = []
    monkeypatch.setattr(utils.datasets, "load_dataset", lambda *a, **k: asked.append(a))
    with pytest.raises(FileNotFoundError, match="boolq/dev.jsonl"):
        utils.boolq(llmc_data_dir=str(tmp_path))
    assert asked == []
