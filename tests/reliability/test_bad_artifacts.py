"""Inputs that look right but are not: a truncated safetensors model, calibration stats of another model,
an artifact of the wrong stage. Each is refused with one line, exit 2, and nothing written."""

import json
import shutil

import pytest
import torch

from _shared import save_tiny_llama, tiny_llama
from llmcompress.config import CalibrateConfig, QuantizeConfig, load_config
from llmcompress.errors import UserError
from llmcompress.stages import STAGES, resolve_inputs, run_stage


@pytest.fixture()
def tiny(tmp_path, smollm_path):
    return save_tiny_llama(tmp_path / "tiny", smollm_path)


def calibrate(tmp_path, model_dir):
    cfg = load_config(CalibrateConfig, None, [f"model.name={model_dir}", "data.num_samples=2",
                                              "data.max_length=16", "histogram_bins=64", "model.device=cpu"])
    return run_stage("calibrate", cfg, tmp_path / "cal", resolve_inputs(STAGES["calibrate"], cfg, None, print))


def test_truncated_safetensors_model_is_refused(tmp_path, tiny):
    from llmcompress.models import load_model

    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match=str(tiny)):
        load_model(str(tiny), device="cpu")


def test_calibration_of_another_model_is_refused(tmp_path, tiny):
    art = calibrate(tmp_path, tiny)
    # the model at that path is replaced by one of another shape after calibration
    shutil.rmtree(tiny / "model.safetensors", ignore_errors=True)
    (tiny / "model.safetensors").unlink(missing_ok=True)
    other = tmp_path / "other"
    tiny_llama(seed=1, hidden_size=96, intermediate_size=192, num_hidden_layers=3).save_pretrained(other)
    for f in other.iterdir():
        shutil.copy(f, tiny / f.name)
    cfg = load_config(QuantizeConfig, None, ["activations.dynamic=false", "model.device=cpu"])
    inputs = resolve_inputs(STAGES["quantize"], cfg, art.path, print)
    with pytest.raises(UserError) as e:
        run_stage("quantize", cfg, tmp_path / "q", inputs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "q").exists()


def test_wrong_stage_artifact_as_input_is_refused(llmc, tmp_path, tiny):
    art = calibrate(tmp_path, tiny)
    r = llmc("train-student", "--input", str(art.path), "-o", str(tmp_path / "s"), cwd=tmp_path)
    assert r.returncode == 2 and "expected an artifact of stage distill-data" in r.stderr
    assert not (tmp_path / "s").exists()
