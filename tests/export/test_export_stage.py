"""`stage: export` in a pipeline: quantize -> export chains, writes a verified artifact, and the export reads back
(through our compressed-tensors import) as the very checkpoint it came from."""

from __future__ import annotations

import json

import torch
import yaml

from llmcompress.artifacts import read_artifact
from llmcompress.pipeline import run_pipeline
from llmcompress.quant.checkpoint import load_quantized


def test_pipeline_quantize_then_export_round_trips(workdir):
    pipe = {"output_root": "runs/p", "stages": [
        {"stage": "quantize", "name": "w4", "set": {"weights.format": "int4", "weights.granularity": "group",
                                                    "weights.group_size": 64, "weights.symmetric": False,
                                                    "activations.format": "none",
                                                    "include": ["model.layers.0.*"]}},
        {"stage": "export", "name": "ct"}]}
    (workdir / "p.yaml").write_text(yaml.safe_dump(pipe))
    result = run_pipeline(workdir / "p.yaml")
    assert [s["status"] for s in result["stages"]] == ["ran", "ran"]
    art = read_artifact(workdir / "runs/p/ct", ("export",))
    assert art.manifest["summary"]["ct_format"] == "pack-quantized" and art.manifest["summary"]["layers"] == 7
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(art.manifest["files"])
    qc = json.loads((art.path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and len(qc["ignore"]) == 30 * 7 - 7 + 1
    a, b = load_quantized(workdir / "runs/p/w4"), load_quantized(art.path)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    again = run_pipeline(workdir / "p.yaml")  # unchanged config and input: skipped
    assert [s["status"] for s in again["stages"]] == ["skipped", "skipped"]
