"""`llmc run`: chaining, skip when config and inputs are unchanged, rerun downstream of a change, --force."""

import json

import pytest
import yaml

from llmcompress.errors import ConfigError, UserError
from llmcompress.pipeline import run_pipeline

CAL = {"data.num_samples": 2, "data.max_length": 32, "batch_size": 2, "histogram_bins": 64}
QUANT = {"weights.format": "int8", "activations.format": "none"}
EVAL = {"ppl.enabled": True, "ppl.max_tokens": 128, "ppl.seq_len": 64}


def write_pipeline(tmp_path, quant=None, root="out"):
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"output_root": str(tmp_path / root), "stages": [
        {"stage": "calibrate", "set": CAL},
        {"stage": "quantize", "name": "w8", "set": quant or QUANT},
        {"stage": "evaluate", "name": "eval-w8", "set": EVAL},
    ]}))
    return p


def statuses(res):
    return [s["status"] for s in res["stages"]]


def test_run_chains_skips_and_forces(tmp_path, smollm_path):
    p = write_pipeline(tmp_path)
    first = run_pipeline(p)
    assert statuses(first) == ["ran", "ran", "ran"]
    m = json.loads((tmp_path / "out" / "w8" / "manifest.json").read_text())
    assert m["inputs"][0]["stage"] == "calibrate" and m["inputs"][0]["path"].endswith("calibrate")
    assert first["stages"][2]["summary"]  # evaluate produced a summary

    assert statuses(run_pipeline(p)) == ["skipped", "skipped", "skipped"]

    # a changed quantize config reruns quantize and everything downstream, not calibrate
    p = write_pipeline(tmp_path, quant={**QUANT, "weights.granularity": "tensor"})
    assert statuses(run_pipeline(p)) == ["skipped", "ran", "ran"]

    assert statuses(run_pipeline(p, force=True)) == ["ran", "ran", "ran"]


def test_run_refuses_bad_stage_config_before_any_work(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"output_root": str(tmp_path / "o"), "stages": [
        {"stage": "calibrate"}, {"stage": "quantize", "set": {"weights.group_size": 0}}]}))
    with pytest.raises(ConfigError) as e:
        run_pipeline(p)
    assert "stages[1]" in str(e.value) and "weights.group_size" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_run_validates_structure(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"stages": [{"stage": "calibrate"}, {"stage": "calibrate"}]}))
    with pytest.raises(ConfigError, match="unique stage name"):
        run_pipeline(p)
    p.write_text(yaml.safe_dump({"stages": [{"stage": "quantize", "input": "later"}]}))
    with pytest.raises(ConfigError, match="earlier stage"):
        run_pipeline(p)
    p.write_text(yaml.safe_dump({"stages": [{"stage": "calibrate"}]}))
    with pytest.raises(UserError, match="STAGE_NAME"):
        run_pipeline(p, overrides=["nostage.x=1"])
