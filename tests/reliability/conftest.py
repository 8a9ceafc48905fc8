"""Fixtures of the reliability tests: a tiny Llama with the embedded default's tokenizer, a calibration artifact of
it (made once per session), and `batch_llmc`, which runs a table of `llmc` invocations in one subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _shared import save_tiny_llama

HERE = Path(__file__).parent


def tiny_llama(path, hidden=64, layers=2, seed=0):
    """The suite's tiny Llama (tests/_shared.py) at width `hidden`, saved to `path`."""
    return save_tiny_llama(path, seed=seed, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers)


def with_tokenizer(model_dir: Path, smollm_path: Path) -> Path:
    for f in smollm_path.glob("tokenizer*"):
        shutil.copy(f, model_dir / f.name)
    return model_dir


@pytest.fixture()
def tiny(tmp_path, smollm_path):
    return with_tokenizer(tiny_llama(tmp_path / "tiny"), smollm_path)


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory, smollm_path):
    """(model dir, calibrate artifact of it): read-only for tests; copy before changing either."""
    from llmcompress.config import CalibrateConfig, load_config
    from llmcompress.stages import STAGES, resolve_inputs, run_stage

    root = tmp_path_factory.mktemp("tinycal")
    model = with_tokenizer(tiny_llama(root / "tiny"), smollm_path)
    cfg = load_config(CalibrateConfig, None, [f"model.name={model}", "data.num_samples=2", "data.max_length=16",
                                              "histogram_bins=64", "model.device=cpu"])
    art = run_stage("calibrate", cfg, root / "cal", resolve_inputs(STAGES["calibrate"], cfg, None, lambda m: None))
    return model, art.path


@pytest.fixture(scope="session")
def batch_llmc():
    """`batch_llmc(cases, env=None)`: each case {args, cwd, watch, files?}; one subprocess runs them all through
    the real CLI entry point and returns, per case, rc, stderr, stdout and the paths changed under `watch`."""

    def run(cases: list[dict], env: dict | None = None, timeout: float = 600):
        full_env = dict(os.environ)
        full_env.update(env or {})
        cases = [{**c, "cwd": str(c["cwd"]), "watch": str(c["watch"])} for c in cases]
        r = subprocess.run([sys.executable, str(HERE / "cli_batch.py")], input=json.dumps(cases), env=full_env,
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    return run
