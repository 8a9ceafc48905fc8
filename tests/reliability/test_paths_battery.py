"""Every path the user names, through the real CLI: outputs, inputs, pipeline stage names, output roots and
stage config paths. A bad one is refused with one line naming it and its key, exit 2, before any work, and
nothing anywhere under the test's temporary root changes. LLMC_MAX_MEMORY_GB is set tiny so that a path that is
accepted stops at the memory check, also before any work: the battery never loads a model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_batch import assert_refused, assert_stopped_at_memory_check, run_case

TINY_MEMORY = {"LLMC_MAX_MEMORY_GB": "0.0001"}


@pytest.fixture()
def box(tmp_path, tiny_calibration):
    """tmp_path/box: a file, a user's non-empty dir, an empty dir, a symlink out, a calibration artifact, an
    artifact nested inside another, a binary file, runs/, and a file outside the box (tmp_path/outside.yaml)."""
    model, cal = tiny_calibration
    b = tmp_path / "box"
    (b / "userdir").mkdir(parents=True)
    (b / "userdir" / "keep.txt").write_text("mine")
    (b / "emptydir").mkdir()
    (b / "runs").mkdir()
    (b / "afile").write_text("mine")
    (b / "data.txt").write_text("some calibration text\n")
    (b / "bin.yaml").write_bytes(b"\x00\xff\xfe\x80 binary")
    (tmp_path / "outside.yaml").write_text("seed: 1\n")
    os.symlink(tmp_path / "outside.yaml", b / "link")
    shutil.copytree(cal, b / "cal")
    shutil.copytree(cal, b / "outer")
    shutil.copytree(cal, b / "outer" / "inner")
    (b / "cfgs").mkdir()
    (b / "cfgs" / "c.yaml").write_text("seed: 1\n")
    os.symlink(tmp_path / "outside.yaml", b / "cfgs" / "out.yaml")
    return b


def pipeline(**stage) -> str:
    root = stage.pop("output_root", "out")
    return yaml.safe_dump({"output_root": root, "stages": [{"stage": "calibrate", **stage}]})


# (args, files written for the case, needles of the one-line error)
CASES = [
    # outputs
    (["calibrate", "-o", "afile"], {}, ["afile: --output: is an existing file"]),
    (["calibrate", "-o", "afile/sub"], {}, ["afile/sub: --output:", "is not a directory"]),
    (["calibrate", "-o", "userdir"], {}, ["userdir: --output: is a non-empty directory that is not an llmc"]),
    (["calibrate", "-o", "."], {}, [".: --output: is a non-empty directory"]),
    (["calibrate", "-o", "link"], {}, ["link: --output: is a symlink"]),
    (["calibrate", "-o", "bad\nname"], {}, ["--output: a path with a control character"]),
    (["calibrate", "-o", "x" * 300], {}, ["--output: a path component longer than 255 bytes"]),
    (["quantize", "-i", "cal", "-o", "cal"], {}, ["cal: --output: is the input"]),
    (["quantize", "-i", "cal", "-o", "cal/sub"], {}, ["cal/sub: --output: lies inside the input"]),
    (["quantize", "-i", "cal", "-o", "./cal/../cal"], {}, ["--output: is the input"]),
    (["quantize", "-i", "outer/inner", "-o", "outer"], {}, ["outer: --output: contains the input outer/inner"]),
    (["calibrate", "--set", "data.source=data.txt", "-o", "data.txt"], {}, ["is an existing file"]),
    (["calibrate", "-c", "cfgs/c.yaml", "-o", "cfgs/c.yaml/x"], {}, ["cfgs/c.yaml/x: --output:", "not a directory"]),
    # inputs: a path that is not there is never taken for a hub id
    (["quantize", "-i", "runs/calibrat", "-o", "q"], {}, ["runs/calibrat: --input: no such artifact"]),
    (["quantize", "-i", "./nope", "-o", "q"], {}, ["nope: --input: no such artifact"]),
    (["calibrate", "--set", "model.name=runs/model", "-o", "c"], {}, ["runs/model: model.name: model path does not"]),
    (["calibrate", "--set", "model.name=mymodel", "-o", "c"], {}, ["mymodel: model.name: model path does not exist",
                                                                   "hub:ORG/NAME"]),
    (["calibrate", "-i", "afile", "-o", "c"], {}, ["afile: --input: not a model"]),
    (["evaluate", "-i", "userdir", "-o", "e"], {}, ["userdir: --input: not a model directory"]),
    (["train-student", "-i", "userdir", "-o", "s"], {}, ["userdir: --input: not an llmc artifact"]),
    (["quantize", "-i", "hub:bad id!", "-o", "q"], {}, ["hub:bad id!: --input: expected hub:ORG/NAME"]),
    # pipeline files: stage names stay one directory under output_root, configs stay beside the pipeline
    (["run", "p.yaml"], {"p.yaml": pipeline(name="../../escaped")}, ["p.yaml: stages[0].name: expected a name"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(name="/tmp/abs")}, ["p.yaml: stages[0].name: expected a single"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(name="a/b")}, ["p.yaml: stages[0].name: expected a single"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(name="..")}, ["p.yaml: stages[0].name"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(name=".hidden")}, ["p.yaml: stages[0].name"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(name="a\tb")}, ["p.yaml: stages[0].name: expected a name without"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(config="../outside.yaml")}, ["p.yaml: stages[0].config"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(config="/etc/hostname")}, ["p.yaml: stages[0].config"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(config="cfgs/out.yaml")}, ["p.yaml: stages[0].config: expected a "
                                                                       "config file inside the pipeline's folder"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(output_root="afile")}, ["p.yaml: stages[0].name: ", "not a directory"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(output_root=".", name="userdir")}, ["userdir: ", "stages[0].name: is a "
                                                                                "non-empty directory"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(output_root=".", name="cfgs", config="cfgs/c.yaml")},
     ["cfgs: ", "stages[0].name: is a non-empty directory"]),
    (["run", "p.yaml"], {"p.yaml": pipeline(output_root="cfgs", name="c.yaml")}, ["stages[0].name: is an existing "
                                                                                  "file"]),
    (["run", "p.yaml"], {"p.yaml": yaml.safe_dump({"output_root": ".", "stages": [
        {"stage": "calibrate", "name": "first"}, {"stage": "quantize", "name": "afile"}]})},
     ["afile: p.yaml: stages[1].name: is an existing file"]),  # the last stage's output, before the first runs
    (["run", "p.yaml"], {"p.yaml": yaml.safe_dump({"output_root": "out", "stages": [
        {"stage": "calibrate"}, {"stage": "calibrate", "name": "second", "input": None,
                                 "set": {"model.name": "runs/mdl"}}]})},
     ["runs/mdl: p.yaml: stages[1] model.name: model path does not exist"]),
    (["run", "userdir"], {}, ["userdir: is a directory; expected a YAML config file"]),
    (["run", "bin.yaml"], {}, ["bin.yaml: not UTF-8 text"]),
]


GOOD = [["calibrate", "-o", "fresh"], ["calibrate", "-o", "emptydir"], ["calibrate", "-o", "new/deep/dir"],
        ["quantize", "-i", "cal", "-o", "cal2"], ["calibrate", "-o", "outer"], ["run", "good.yaml"]]


def test_bad_paths_are_refused_and_good_ones_pass_before_any_work(box, batch_llmc):
    """Bad: one line naming the path and key, nothing changed. Good neighbours reach the memory check (the last
    step before work). One subprocess runs both tables."""
    good_files = {"good.yaml": pipeline(name="ok-name", config="cfgs/c.yaml")}
    cases = [{"args": args, "cwd": box, "watch": box.parent, "files": files} for args, files, _ in CASES] + \
        [{"args": args, "cwd": box, "watch": box.parent, "files": good_files} for args in GOOD]
    results = batch_llmc(cases, env=TINY_MEMORY)
    failures = []
    for (args, _, needles), result in zip(CASES, results):
        try:
            assert_refused(result, *needles)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    for result in results[len(CASES):]:
        try:
            assert_stopped_at_memory_check(result)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


# ---- generated: output paths and stage names assembled from the pieces that go wrong


PIECES = ["afile", "userdir", "emptydir", "cal", "outer", "inner", "link", "cfgs", "c.yaml", "..", ".", "new",
          "ü", "a b", "", "runs", "keep.txt"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(PIECES), min_size=1, max_size=4), absolute=st.booleans(),
       stage=st.sampled_from(["calibrate", "quantize", "run"]))
def test_generated_paths(box, parts, absolute, stage):
    """Any output path or stage name: refused in one line with nothing changed, or accepted (stopping at the
    memory check) only if writing there would lose nothing and touch no input."""
    path = "/".join(parts)
    if absolute:
        path = str(box / path)
    if stage == "run":
        args, files = ["run", "p.yaml"], {"p.yaml": pipeline(name=path, output_root="out")}
        out = box / "out" / path
    else:
        args = ["calibrate", "-o", path] if stage == "calibrate" else ["quantize", "-i", "cal", "-o", path]
        files, out = {}, box / path
    env = os.environ.get("LLMC_MAX_MEMORY_GB")
    os.environ.update(TINY_MEMORY)
    try:
        result = run_case(args, box, box.parent, files)
    finally:
        os.environ.pop("LLMC_MAX_MEMORY_GB") if env is None else os.environ.update(LLMC_MAX_MEMORY_GB=env)
    if "needs about" not in result["stderr"]:
        assert_refused(result)
        return
    assert_stopped_at_memory_check(result)
    # accepted: then the path was one that loses nothing and touches no input
    assert not out.is_symlink() and (not out.exists() or out.is_dir())
    assert not out.exists() or (out / "manifest.json").is_file() or not any(out.iterdir())
    if stage == "run":
        assert out.resolve().parent == (box / "out").resolve()
    if stage == "quantize":
        cal = (box / "cal").resolve()
        assert cal != out.resolve() and cal not in out.resolve().parents and out.resolve() not in cal.parents


def test_unwritable_output_is_refused_before_any_work(box, monkeypatch):
    """As root every directory is writable, so the permission is denied through os.access (what the check asks);
    the chmod variant below runs where the tests do not run as root (CI)."""
    real_access = os.access
    ro = box / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    result = run_case(["calibrate", "-o", "ro/deep/out"], box, box.parent)
    assert_refused(result, "ro/deep/out: --output:", "ro is not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a mode-555 directory")
def test_unwritable_output_is_refused_before_any_work_chmod(box, batch_llmc):
    ro = box / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        [result] = batch_llmc([{"args": ["calibrate", "-o", "ro/out"], "cwd": box, "watch": box.parent}])
        assert_refused(result, "ro/out: --output:", "ro is not writable")
    finally:
        ro.chmod(0o755)
