"""Bad files and values through the real CLI: each is one line naming the file (or option) and the key, exit 2,
nothing written. One subprocess runs the whole table; every case is refused before a model is loaded."""

from __future__ import annotations

import pytest
import yaml

from cli_batch import assert_refused


def write(box, name, data) -> str:
    (box / name).write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return name


@pytest.fixture()
def box(tmp_path):
    b = tmp_path / "box"
    (b / "adir").mkdir(parents=True)
    (b / "adir" / "x.txt").write_text("text\n")
    (b / "bin.yaml").write_bytes(b"\x00\xff\xfe\x80 binary")
    (b / "latin1.yaml").write_bytes("seed: caf\xe9\n".encode("latin-1"))
    (b / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return b


def cases(box):
    """(args, needles). Config files are written into the box first."""
    tpl = lambda t: write(box, f"t{abs(hash(t))}.yaml", {"data": {"source": "data.jsonl", "template": t}})  # noqa: E731
    return [
        # files that are not what they claim
        (["calibrate", "-c", "bin.yaml", "-o", "o"], ["bin.yaml: not UTF-8 text"]),
        (["calibrate", "-c", "latin1.yaml", "-o", "o"], ["latin1.yaml: not UTF-8 text"]),
        (["calibrate", "-c", "adir", "-o", "o"], ["adir: is a directory; expected a YAML config file"]),
        (["calibrate", "-c", "/dev/null", "-o", "o"], ["/dev/null: not a regular file"]),
        (["calibrate", "-c", write(box, "list.yaml", "- a\n- b\n"), "-o", "o"], ["list.yaml: <root>: expected"]),
        (["calibrate", "--set", "data.source=adir", "-o", "o"], ["--set: data.source: expected a dataset file, "
                                                                 "not a directory"]),
        (["calibrate", "-c", write(box, "src.yaml", {"data": {"source": "adir"}}), "-o", "o"],
         ["src.yaml: data.source: expected a dataset file, not a directory"]),
        (["calibrate", "--set", "data.source=/dev/null", "-o", "o"], ["data.source: expected a regular dataset"]),
        (["calibrate", "--set", "data.source=bin.yaml", "-o", "o"], ["data.source: expected a .txt, .json"]),
        (["calibrate", "--set", "data.source=missing/file.jsonl", "-o", "o"], ["data.source: expected an existing"]),
        (["evaluate", "--set", "ppl.dataset=adir", "-o", "o"], ["--set: ppl.dataset: expected a dataset file"]),
        (["distill-data", "--set", "prompts.source=adir", "-o", "o"], ["--set: prompts.source"]),
        # templates: named fields only
        (["calibrate", "-c", tpl("{0.__class__}"), "-o", "o"], ["data.template: expected plain field names"]),
        (["calibrate", "-c", tpl("{}"), "-o", "o"], ["data.template: expected named fields only"]),
        (["calibrate", "-c", tpl("{0}"), "-o", "o"], ["data.template: expected named fields only"]),
        (["calibrate", "-c", tpl("{instruction[0]}"), "-o", "o"], ["data.template: expected plain field names"]),
        (["calibrate", "-c", tpl("{instruction"), "-o", "o"], ["data.template: expected a Python format string"]),
        (["calibrate", "-c", tpl("{instruction:{w}}"), "-o", "o"], ["data.template: expected field formats"]),
        (["distill-data", "-c", write(box, "dt.yaml", {"prompts": {"template": "{0}"}}), "-o", "o"],
         ["dt.yaml: prompts.template"]),
        (["train-student", "--set", "task=classification", "--set",
          "classification.prompt=Review {text} {label}", "-o", "o"], ["classification.prompt: expected only the "
                                                                      "fields {text}"]),
        # CLI flags are validated like --set, and blamed on themselves
        (["eval", "--limit", "-1", "-o", "o"], ["--limit: tasks.limit: expected a value >= 1, got -1"]),
        (["eval", "--limit", "0", "-o", "o"], ["--limit: tasks.limit"]),
        (["eval", "--baseline", "./nowhere", "-o", "o"], ["nowhere", "does not exist"]),
        # unknown keys given with --set are blamed on --set, also inside a config file's run
        (["calibrate", "--set", "bogus=1", "-o", "o"], ["--set: bogus: expected a known key"]),
        (["calibrate", "--set", "model.bogus.deeper=1", "-o", "o"], ["--set: model.bogus: expected a known key"]),
        (["calibrate", "-c", write(box, "ok.yaml", {"seed": 1}), "--set", "data.bogus=1", "-o", "o"],
         ["--set: data.bogus"]),
        # values that can only be mistakes
        (["calibrate", "--set", "percentiles=[]", "-o", "o"], ["--set: percentiles: expected at least 1 item"]),
        (["quantize", "--set", "include=[]", "-o", "o"], ["--set: include: expected at least 1 item"]),
        (["quantize", "--set", "include=['']", "-o", "o"], ["--set: include[0]: expected a non-empty"]),
        (["quantize", "-c", write(box, "ex.yaml", {"exclude": ["lm_head", "*"]}), "-o", "o"],
         ["ex.yaml: exclude[1]: expected a pattern that leaves some layer"]),
        (["quantize", "--set", "weights.group_size=1000000", "-o", "o"], ["--set: weights.group_size"]),
        (["evaluate", "--set", "ppl.seq_len=64", "--set", "ppl.stride=128", "-o", "o"], ["--set: ppl.stride"]),
        # the memory refusal names the file and the keys that size the run
        (["calibrate", "-c", write(box, "big.yaml", {"batch_size": 100000, "data": {"max_length": 4096}}),
          "-o", "o"], ["big.yaml: batch_size=100000, data.max_length=4096: calibrate on smollm2-135m: needs about"]),
        (["calibrate", "--set", "batch_size=100000", "-o", "o"], ["--set: batch_size=100000"]),
        (["evaluate", "--set", "ppl.batch_size=100000", "-o", "o"], ["--set: ppl.batch_size=100000, ppl.seq_len"]),
    ]


def test_bad_files_and_values_are_one_line_exit_2(box, batch_llmc):
    table = cases(box)
    results = batch_llmc([{"args": args, "cwd": box, "watch": box.parent} for args, _ in table])
    failures = []
    for (args, needles), result in zip(table, results):
        try:
            assert_refused(result, *needles)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_template_and_source_refused_by_the_library_too(tmp_path):
    """The data layer refuses what validation would have (library callers skip validation)."""
    from llmcompress.data import format_row, resolve_source
    from llmcompress.errors import UserError

    with pytest.raises(UserError, match="cannot format a row"):
        format_row({"a": "x"}, "{0.__class__}")
    with pytest.raises(UserError, match="expected a dataset file, got a directory"):
        resolve_source(str(tmp_path))
    from llmcompress.data import load_rows

    (tmp_path / "ints.jsonl").write_text("1\n2\n")
    with pytest.raises(UserError, match="ints.jsonl: row 1: expected a mapping"):
        load_rows(str(tmp_path / "ints.jsonl"))


def test_hub_prefix_forces_the_hub_and_org_name_shape_stays_a_hub_id(tmp_path, monkeypatch):
    from llmcompress.errors import UserError
    from llmcompress.models import resolve_model

    monkeypatch.chdir(tmp_path)
    assert resolve_model("hub:gpt2") == "gpt2"
    assert resolve_model("hub:HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "HuggingFaceTB").mkdir()  # now the same name is a mistyped local path
    with pytest.raises(UserError, match="model path does not exist"):
        resolve_model("HuggingFaceTB/SmolLM2-135M")
    for name in ("gpt2", "a/b/c", "model.gguf", "./x", "~/x", "x\\y"):
        with pytest.raises(UserError, match="hub:ORG/NAME"):
            resolve_model(name)


def test_group_longer_than_every_row_is_refused(tiny):
    from llmcompress.config import QuantizeConfig, load_config
    from llmcompress.errors import UserError
    from llmcompress.models import load_model
    from llmcompress.quant.quantize import quantize_model

    model, _ = load_model(str(tiny), device="cpu")
    cfg = load_config(QuantizeConfig, None, ["weights.format=int4", "weights.granularity=group",
                                             "weights.group_size=4096", "activations.format=none"])
    with pytest.raises(UserError, match="weights.group_size: 4096 is longer than every selected layer's rows"):
        quantize_model(model, cfg)
