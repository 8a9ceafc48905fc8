"""Inputs that look right but are not: a truncated safetensors model, calibration stats of other weights, an
artifact of the wrong stage, a manifest that is a symlink or was edited, a listed file that is not a regular
file. Each is refused with one line, exit 2, and nothing written."""

import json
import os
import shutil

import pytest
import torch

from llmcompress.config import CalibrateConfig, QuantizeConfig, load_config
from llmcompress.errors import UserError
from llmcompress.stages import STAGES, resolve_inputs, run_stage

from cli_batch import assert_refused
from _shared import save_tiny_llama


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
    other = save_tiny_llama(tmp_path / "other", seed=1, hidden_size=96, intermediate_size=192, num_hidden_layers=3)
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


def _edit_manifest(art, edit, rehash: bool):
    from llmcompress.artifacts import manifest_self_sha256

    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    if rehash:  # what a user who knows the format could do: the weights fingerprint still catches it
        m["self_sha256"] = manifest_self_sha256(m)
    (art / "manifest.json").write_text(json.dumps(m))


def test_forged_and_broken_artifacts_through_the_cli(tmp_path, tiny_calibration, batch_llmc):
    model, cal = tiny_calibration
    box = tmp_path / "box"
    box.mkdir()
    arts = {}

    def variant(name, change):
        arts[name] = box / name
        shutil.copytree(cal, arts[name])
        change(arts[name])

    def point_at_embedded(m):
        m["meta"]["model"]["name"] = m["config"]["model"]["name"] = "smollm2-135m"

    variant("renamed", lambda a: _edit_manifest(a, point_at_embedded, rehash=False))
    variant("renamed_rehashed", lambda a: _edit_manifest(a, point_at_embedded, rehash=True))
    variant("config_edit", lambda a: _edit_manifest(a, lambda m: m["config"].update(seed=7), rehash=False))
    variant("v1", lambda a: _edit_manifest(a, lambda m: (m.pop("self_sha256"), m.update(manifest_version=1)),
                                           rehash=False))
    variant("no_fingerprint", lambda a: _edit_manifest(a, lambda m: m["meta"].pop("model_weights_sha256"),
                                                       rehash=True))

    def manifest_symlink(a):
        (tmp_path / "elsewhere.json").write_bytes((a / "manifest.json").read_bytes())
        (a / "manifest.json").unlink()
        os.symlink(tmp_path / "elsewhere.json", a / "manifest.json")

    variant("manifest_link", manifest_symlink)

    def listed_dir(a):
        rel = next(iter(json.loads((a / "manifest.json").read_text())["files"]))
        (a / rel).unlink()
        (a / rel).mkdir()

    variant("listed_dir", listed_dir)
    table = [
        ("renamed", ["self_sha256: the manifest was edited"]),
        ("renamed_rehashed", ["meta.model_weights_sha256: the calibration was measured on other weights"]),
        ("config_edit", ["self_sha256: the manifest was edited"]),
        ("v1", ["manifest_version: expected 2, got 1"]),
        ("no_fingerprint", ["meta.model_weights_sha256: missing"]),
        ("manifest_link", ["manifest.json: is a symlink"]),
        ("listed_dir", ["is not a regular file"]),
    ]
    cases = [{"args": ["quantize", "-i", name, "-o", f"q_{name}", "--set", "activations.dynamic=false",
                       "--set", "model.device=cpu"], "cwd": box, "watch": tmp_path} for name, _ in table]
    results = batch_llmc(cases)
    failures = []
    for (name, needles), result in zip(table, results):
        try:
            assert_refused(result, name, *needles)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_weights_changed_in_place_after_calibration_are_refused(tmp_path, tiny_calibration):
    """Same path, same shapes, other weights: the calibration no longer describes the model."""
    model, cal = tiny_calibration
    moved = tmp_path / "tiny"
    shutil.copytree(model, moved)
    shutil.copytree(cal, tmp_path / "cal")
    # rebind the copy's manifest to the copied model (the path is part of what a user would move)
    from llmcompress.artifacts import read_artifact

    _edit_manifest(tmp_path / "cal", lambda m: (m["meta"]["model"].update(name=str(moved)),
                                                m["config"]["model"].update(name=str(moved))), rehash=True)
    cfg = load_config(QuantizeConfig, None, ["activations.dynamic=false", "model.device=cpu"])
    inputs = resolve_inputs(STAGES["quantize"], cfg, tmp_path / "cal", print)
    assert inputs.model.name == str(moved)
    # an untouched copy is the same weights: accepted up to the work (fingerprints are of content, not paths)
    from llmcompress.stages import check_calibration_model
    from llmcompress.models import weights_fingerprint

    check_calibration_model(read_artifact(tmp_path / "cal"), str(moved), weights_fingerprint(moved))
    save_tiny_llama(tmp_path / "other", seed=1).joinpath("model.safetensors").replace(moved / "model.safetensors")
    with pytest.raises(UserError, match="measured on other weights") as e:
        run_stage("quantize", cfg, tmp_path / "q", inputs)
    assert "\n" not in str(e.value) and not (tmp_path / "q").exists()
