"""Where task data comes from: the shipped llmc_* tasks read tasks.data_dir or $LLMC_DATA_DIR and fail at once,
in one line, without it; stock names read the hub and fail at once, with a hint, when it is unreachable; a user's
own task runs from a YAML path or an include folder; each shipped task says which split it reads."""

from __future__ import annotations

import json
import re

import pytest

from _shared import one_thread, shared_data  # noqa: F401  (one_thread: autouse, one torch thread)
from llmcompress.errors import UserError
from llmcompress.eval.harness import TASKS_DIR, check_tasks, local_tasks, run_tasks, task_data

# no data folder from the environment, and a hub endpoint that refuses at once (nothing listens on port 9)
NO_DATA = {"LLMC_DATA_DIR": "", "OMP_NUM_THREADS": "1"}
OFFLINE = {**NO_DATA, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}


def _error_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("evaluate: no input")]


def test_llmc_task_without_data_folder_is_one_line_naming_both_options(llmc, workdir):
    r = llmc("eval", "--tasks", "llmc_arc_easy", cwd=workdir, env=NO_DATA)
    assert r.returncode == 2 and len(_error_lines(r)) == 1, r.stderr
    assert "tasks.data_dir" in r.stderr and "$LLMC_DATA_DIR" in r.stderr and "arc_easy" in r.stderr
    assert not (workdir / "runs" / "evaluate").exists()
    r = llmc("eval", "--tasks", "llmc_piqa", "--set", f"tasks.data_dir={workdir / 'nowhere'}", cwd=workdir,
             env=NO_DATA)
    assert r.returncode == 2 and len(_error_lines(r)) == 1 and "nowhere is not a folder" in r.stderr, r.stderr


def test_stock_task_with_the_hub_unreachable_fails_at_once_with_a_hint(llmc, workdir):
    r = llmc("eval", "--tasks", "arc_easy,hellaswag", cwd=workdir, env=OFFLINE)
    assert r.returncode == 2 and len(_error_lines(r)) == 1, r.stderr
    assert "unreachable" in r.stderr and "llmc_arc_easy, llmc_hellaswag with tasks.data_dir" in r.stderr
    assert "HF_HUB_OFFLINE=1" in r.stderr and "Retrying" not in r.stderr


def test_checks_name_the_missing_file_the_task_yaml_and_the_include_folder(tmp_path):
    (tmp_path / "arc").mkdir()
    with pytest.raises(UserError, match=r"task llmc_arc_easy: .*arc/ARC-Easy-Test.jsonl not found"):
        check_tasks(["llmc_arc_easy"], str(tmp_path))
    with pytest.raises(UserError, match="task file mine.yaml does not exist"):
        check_tasks(["mine.yaml"])
    with pytest.raises(UserError, match="tasks.include_path: .* is not a folder"):
        check_tasks(["my_task"], include_path=str(tmp_path / "none"))
    check_tasks(["llmc_arc_easy", "llmc_arc_challenge"], str(shared_data("arc/ARC-Easy-Test.jsonl").parents[1]))


def test_a_users_task_runs_from_its_yaml_and_from_an_include_folder(smollm, tmp_path, monkeypatch, capfd):
    model, tok = smollm
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's git probe must print nothing here
    rows = [{"question": "What is the capital of France?", "choices": [" Paris", " Rome"], "answer": 0},
            {"question": "What is the capital of Italy?", "choices": [" Paris", " Rome"], "answer": 1}]
    (tmp_path / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "capitals.yaml").write_text(
        "task: my_capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'capitals.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    check_tasks(["tasks/capitals.yaml"])
    by_path = run_tasks(model, tok, ["tasks/capitals.yaml"])
    check_tasks(["my_capitals"], include_path="tasks")  # a task of include_path is not taken for a stock one
    by_name = run_tasks(model, tok, ["my_capitals"], include_path="tasks")
    for out in (by_path, by_name):
        assert out["my_capitals"]["acc"] == 1.0  # the embedded default knows both capitals
        assert out["_meta"]["n_samples"]["my_capitals"]["effective"] == 2
        assert "capitals.jsonl" in out["_meta"]["data"]["my_capitals"]
    assert "fatal" not in capfd.readouterr().err


def test_every_shipped_task_says_which_split_it_reads():
    from llmcompress.eval.tasks.utils import FILES

    assert sorted(FILES) == local_tasks()
    for path in TASKS_DIR.glob("llmc_*.yaml"):
        data = re.search(r'^  data: "(.+)"$', path.read_text(), re.M)
        assert data and "split" in data.group(1), path.name
        assert path.stem.removeprefix("llmc_") in data.group(1).replace("-", "_").lower() or \
            path.stem == "llmc_boolq" or path.stem.endswith(("gsm8k", "lambada_openai")), path.name
    challenge = (TASKS_DIR / "llmc_arc_challenge.yaml").read_text()
    assert "ARC-Challenge Dev split" in challenge and "stock arc_challenge reads the Test split" in challenge
    stock = {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", "test_split": "test",
             "validation_split": "validation", "metadata": {"version": 1.0}}
    assert task_data(stock) == "allenai/ai2_arc ARC-Easy, test split"
