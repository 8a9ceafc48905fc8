"""Interruption with real subprocesses: SIGINT/SIGTERM and kill -9 leave the previous artifact intact and no
partial artifact a later stage would accept; `llmc run` resumes after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmcompress.artifacts import read_artifact
from llmcompress.errors import ArtifactError

SLOW_CAL = ["--set", "data.num_samples=64", "--set", "data.max_length=256", "--set", "batch_size=4"]
FAST_CAL = ["--set", "data.num_samples=2", "--set", "data.max_length=32", "--set", "histogram_bins=64"]


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "llmcompress.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, proc, timeout=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def temp_dirs(parent: Path, name: str):
    return list(parent.glob(f".{name}.tmp-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_stage_keeps_previous_artifact(tmp_path, smollm_path, sig):
    out = tmp_path / "cal"
    r = subprocess.run([sys.executable, "-m", "llmcompress.cli", "calibrate", "-o", str(out), "-q", *FAST_CAL],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before = (out / "manifest.json").read_bytes()

    proc = start(["calibrate", "-o", str(out), "-q", *SLOW_CAL], tmp_path)
    assert wait_for(lambda: temp_dirs(tmp_path, "cal"), proc), proc.communicate()
    time.sleep(2.0)  # let it get into the forward passes
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert (out / "manifest.json").read_bytes() == before
    read_artifact(out, ("calibrate",))
    assert not temp_dirs(tmp_path, "cal")


def test_kill_9_leaves_nothing_acceptable_and_run_resumes(tmp_path, smollm_path):
    root = tmp_path / "out"
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"output_root": str(root), "stages": [
        {"stage": "calibrate", "set": {"data.num_samples": 2, "data.max_length": 32, "histogram_bins": 64}},
        {"stage": "calibrate", "name": "cal-slow", "input": None,
         "set": {"data.num_samples": 64, "data.max_length": 256, "batch_size": 4}},
    ]}))
    proc = start(["run", str(pipe), "-q"], tmp_path)
    assert wait_for(lambda: temp_dirs(root, "cal-slow"), proc), proc.communicate()
    time.sleep(2.0)
    proc.kill()
    proc.wait()
    first = json.loads((root / "calibrate" / "manifest.json").read_text())
    assert first["complete"]
    # the killed stage's temp dir is never accepted as an artifact
    for d in temp_dirs(root, "cal-slow"):
        with pytest.raises(ArtifactError):
            read_artifact(d)
    assert not (root / "cal-slow").exists()

    # resume: the finished stage is skipped; make the second quick so the test stays short
    pipe.write_text(pipe.read_text().replace("max_length: 256", "max_length: 32").replace("num_samples: 64",
                                                                                           "num_samples: 2"))
    r = subprocess.run([sys.executable, "-m", "llmcompress.cli", "run", str(pipe), "--json"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [s["status"] for s in res["stages"]] == ["skipped", "ran"]
    assert not temp_dirs(root, "cal-slow")
    read_artifact(root / "cal-slow", ("calibrate",))


def test_swallowed_interrupt_still_keeps_previous_artifact(tmp_path, monkeypatch):
    """A SIGINT/SIGTERM whose KeyboardInterrupt got swallowed (it landed in a finalizer) has still marked the run:
    the writer refuses to rename the new artifact into place, and progress loops stop at their next step."""
    from llmcompress import artifacts
    from llmcompress.progress import RichReporter

    out = tmp_path / "a"
    with artifacts.ArtifactWriter(out, "calibrate", {}) as w:
        (w.dir / "x.txt").write_text("old")
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(artifacts, "_interrupt_requested", True)
    with pytest.raises(KeyboardInterrupt):
        with artifacts.ArtifactWriter(out, "calibrate", {}) as w:
            (w.dir / "x.txt").write_text("new")
    assert (out / "manifest.json").read_bytes() == before
    assert not temp_dirs(tmp_path, "a")
    with pytest.raises(KeyboardInterrupt):
        list(RichReporter(console=None, quiet=True).track(range(3)))
