"""Local-file datasets for the shipped lm-eval tasks, shaped like their hub versions so every other line of each
task config (prompts, choices, targets, metrics) is the stock task's.

lm-eval calls a task's `custom_dataset` with the task metadata; `llmc_data_dir` there (set by llmcompress from
`tasks.data_dir`, $LLMC_DATA_DIR, else ../shared/data) says where the files are. Where they are absent, the stock
hub dataset is loaded instead, so the same config gives the stock task to a user who is online.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets


def _dir(kwargs) -> Path:
    return Path(kwargs.get("llmc_data_dir") or os.environ.get("LLMC_DATA_DIR") or "../shared/data").expanduser()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _local_or_hub(kwargs, files: dict, build, hub_path: str, hub_name=None) -> datasets.DatasetDict:
    base = _dir(kwargs)
    missing = [base / f for fs in files.values() for f in ([fs] if isinstance(fs, str) else fs)
               if not (base / f).is_file()]
    if not missing:
        return datasets.DatasetDict({split: datasets.Dataset.from_list(build(base, fs))
                                     for split, fs in files.items()})
    try:
        return datasets.load_dataset(hub_path, hub_name)
    except Exception as e:  # offline or no such hub dataset: name the local file that was looked for first
        raise FileNotFoundError(f"{missing[0]} not found, and the hub dataset {hub_path} could not be loaded "
                                f"({e.__class__.__name__})") from None


def _arc_rows(base: Path, file: str) -> list[dict]:
    return [{"id": r["id"], "question": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in _jsonl(base / file)]


def arc_easy(**kwargs):
    return _local_or_hub(kwargs, {"test": "arc/ARC-Easy-Test.jsonl", "validation": "arc/ARC-Easy-Dev.jsonl"},
                         _arc_rows, "allenai/ai2_arc", "ARC-Easy")


def arc_challenge(**kwargs):
    # only the dev split ships locally; it is the evaluation split here
    return _local_or_hub(kwargs, {"validation": "arc/ARC-Challenge-Dev.jsonl"}, _arc_rows,
                         "allenai/ai2_arc", "ARC-Challenge")


def _piqa_rows(base: Path, files) -> list[dict]:
    rows, labels = _jsonl(base / files[0]), (base / files[1]).read_text().split()
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(rows, labels, strict=True)]


def piqa(**kwargs):
    return _local_or_hub(kwargs, {"validation": ["piqa/valid.jsonl", "piqa/valid-labels.lst"]}, _piqa_rows,
                         "baber/piqa")


def hellaswag(**kwargs):
    return _local_or_hub(kwargs, {"validation": "hellaswag/hellaswag_val.jsonl"},
                         lambda base, f: [{k: r[k] for k in ("activity_label", "ctx", "query", "endings", "label")}
                                          for r in _jsonl(base / f)], "Rowan/hellaswag")


def lambada_openai(**kwargs):
    return _local_or_hub(kwargs, {"test": "lambada/lambada_test.jsonl"},
                         lambda base, f: [{"text": r["text"]} for r in _jsonl(base / f)],
                         "EleutherAI/lambada_openai", "default")


def boolq(**kwargs):
    return _local_or_hub(kwargs, {"validation": "boolq/dev.jsonl"},
                         lambda base, f: [{"question": r["question"], "passage": r["passage"],
                                           "label": int(r["label"])} for r in _jsonl(base / f)],
                         "aps/super_glue", "boolq")


def gsm8k(**kwargs):
    return _local_or_hub(kwargs, {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
                         lambda base, f: [{"question": r["question"], "answer": r["answer"]}
                                          for r in _jsonl(base / f)], "openai/gsm8k", "main")


# HellaSwag preprocessing, as lm-eval's stock task does it (WikiHow "[title]" markup and stray brackets)
def _preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def one(doc):
        if "ctx_a" in doc:  # the hub rows: rebuild the query the way the stock task does
            query = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        else:  # the local rows already carry "label: ctx"
            query = doc["query"]
        return {"query": _preprocess(query), "choices": [_preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(one)
