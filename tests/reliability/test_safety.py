"""Untrusted files: no pickle is ever unpickled from a model dir or artifact, YAML is safe_load-ed,
trust_remote_code is off unless asked and loud when on."""

import json
import logging
import pickle
import shutil

import pytest

from llmcompress.config import ModelConfig, QuantizeConfig, load_config
from llmcompress.errors import UserError
from llmcompress.models import load_model


class _Boom:
    """Unpickling this runs `open(marker, 'w')`: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_is_never_unpickled(tmp_path, smollm_path):
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    shutil.copy(smollm_path / "config.json", model_dir / "config.json")
    for f in smollm_path.glob("tokenizer*"):
        shutil.copy(f, model_dir / f.name)
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Boom(str(marker))}))
    with pytest.raises(UserError, match="could not load model"):
        load_model(ModelConfig(name=str(model_dir)), device="cpu")
    assert not marker.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "c.yaml"
    p.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_config(QuantizeConfig, p)
    assert not marker.exists()


def test_trust_remote_code_off_by_default_and_loud_when_on(smollm_path, caplog):
    assert ModelConfig().trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="llmcompress"):
        load_model(ModelConfig(name=str(smollm_path), trust_remote_code=True), device="cpu")
    assert any("trust_remote_code is ON" in r.getMessage() for r in caplog.records)


def test_stage_outputs_hold_no_pickles(tmp_path):
    """Every file an artifact lists is JSON, safetensors or plain text (checked on a fresh calibrate run)."""
    from llmcompress.config import CalibrateConfig
    from llmcompress.stages import STAGES, resolve_inputs, run_stage

    cfg = load_config(CalibrateConfig, None, ["data.num_samples=2", "data.max_length=32", "histogram_bins=64"])
    art = run_stage("calibrate", cfg, tmp_path / "cal", resolve_inputs(STAGES["calibrate"], cfg, None, print))
    for rel in art.manifest["files"]:
        data = (art.path / rel).read_bytes()
        assert not data.startswith(b"\x80"), rel  # pickle protocol 2+ magic
        assert rel.endswith((".json", ".safetensors", ".md", ".txt", ".jsonl", ".png")), rel
    json.loads((art.path / "manifest.json").read_text())
