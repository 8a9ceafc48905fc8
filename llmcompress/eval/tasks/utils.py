"""Local-file datasets for the shipped llmc_* lm-eval tasks, shaped like their hub versions so every other line of
each task config (prompts, choices, targets, metrics) is the stock task's.

lm-eval calls a task's `custom_dataset` with the task metadata; `llmc_data_dir` there (set by llmcompress from
`tasks.data_dir`, else $LLMC_DATA_DIR) says where the files are. FILES is the one list of what each task reads:
llmcompress checks it before loading a model, so a missing file is a one-line error at once. A user who wants the
hub's copy asks for the stock task name instead (arc_easy, not llmc_arc_easy).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets

# task -> {split: file or [files]} under the data folder; the split names are the stock task's
FILES = {
    "llmc_arc_easy": {"test": "arc/ARC-Easy-Test.jsonl", "validation": "arc/ARC-Easy-Dev.jsonl"},
    "llmc_arc_challenge": {"validation": "arc/ARC-Challenge-Dev.jsonl"},
    "llmc_piqa": {"validation": ["piqa/valid.jsonl", "piqa/valid-labels.lst"]},
    "llmc_hellaswag": {"validation": "hellaswag/hellaswag_val.jsonl"},
    "llmc_lambada_openai": {"test": "lambada/lambada_test.jsonl"},
    "llmc_boolq": {"validation": "boolq/dev.jsonl"},
    "llmc_gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
}


def missing_files(task: str, base: Path) -> list[Path]:
    """The files of FILES[task] that are not under `base`."""
    return [base / f for fs in FILES[task].values() for f in ([fs] if isinstance(fs, str) else fs)
            if not (base / f).is_file()]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _local(task: str, kwargs, build) -> datasets.DatasetDict:
    base = Path(kwargs.get("llmc_data_dir") or os.environ.get("LLMC_DATA_DIR") or "").expanduser()
    missing = missing_files(task, base)
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(build(base, fs))
                                 for split, fs in FILES[task].items()})


def _arc_rows(base: Path, file: str) -> list[dict]:
    return [{"id": r["id"], "question": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in _jsonl(base / file)]


def arc_easy(**kwargs):
    return _local("llmc_arc_easy", kwargs, _arc_rows)


def arc_challenge(**kwargs):
    return _local("llmc_arc_challenge", kwargs, _arc_rows)


def _piqa_rows(base: Path, files) -> list[dict]:
    rows, labels = _jsonl(base / files[0]), (base / files[1]).read_text().split()
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(rows, labels, strict=True)]


def piqa(**kwargs):
    return _local("llmc_piqa", kwargs, _piqa_rows)


def hellaswag(**kwargs):
    return _local("llmc_hellaswag", kwargs, lambda base, f: [
        {k: r[k] for k in ("activity_label", "ctx", "query", "endings", "label")} for r in _jsonl(base / f)])


def lambada_openai(**kwargs):
    return _local("llmc_lambada_openai", kwargs, lambda base, f: [{"text": r["text"]} for r in _jsonl(base / f)])


def boolq(**kwargs):
    return _local("llmc_boolq", kwargs, lambda base, f: [
        {"question": r["question"], "passage": r["passage"], "label": int(r["label"])} for r in _jsonl(base / f)])


def gsm8k(**kwargs):
    return _local("llmc_gsm8k", kwargs, lambda base, f: [
        {"question": r["question"], "answer": r["answer"]} for r in _jsonl(base / f)])


# HellaSwag preprocessing, as lm-eval's stock task does it (WikiHow "[title]" markup and stray brackets)
def _preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def one(doc):
        # the local rows already carry the stock task's query, "activity_label: ctx"
        return {"query": _preprocess(doc["query"]), "choices": [_preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(one)
