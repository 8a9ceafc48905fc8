import json
import os

import pytest

from llmcompress.artifacts import MANIFEST, ArtifactWriter, clean_stale, read_artifact
from llmcompress.errors import ArtifactError


def make(tmp_path, name="a", stage="calibrate", content=b"hello"):
    out = tmp_path / name
    with ArtifactWriter(out, stage, {"k": 1}) as w:
        (w.dir / "data.bin").write_bytes(content)
        (w.dir / "sub").mkdir()
        (w.dir / "sub" / "x.json").write_text("{}")
    return out


def test_manifest_lists_files_with_hashes(tmp_path):
    out = make(tmp_path)
    art = read_artifact(out, ("calibrate",))
    m = art.manifest
    assert m["stage"] == "calibrate" and m["complete"] is True and m["config"] == {"k": 1}
    assert set(m["files"]) == {"data.bin", "sub/x.json"}
    assert {"torch", "transformers", "llmcompress", "python"} <= set(m["versions"])
    assert m["wall_time_s"] >= 0 and m["host"]


def test_wrong_stage_refused(tmp_path):
    out = make(tmp_path)
    with pytest.raises(ArtifactError, match="expected an artifact of stage quantize"):
        read_artifact(out, ("quantize",))


def test_tampered_and_truncated_files_refused(tmp_path):
    out = make(tmp_path)
    (out / "data.bin").write_bytes(b"hellO")
    with pytest.raises(ArtifactError, match="sha256"):
        read_artifact(out)
    (out / "data.bin").write_bytes(b"hell")
    with pytest.raises(ArtifactError, match="truncated"):
        read_artifact(out)


def test_missing_or_incomplete_manifest_refused(tmp_path):
    out = make(tmp_path)
    m = json.loads((out / MANIFEST).read_text())
    m["complete"] = False
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="incomplete"):
        read_artifact(out)
    (out / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest missing"):
        read_artifact(out)


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_manifest_paths_cannot_escape(tmp_path, entry):
    out = make(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"x")
    m = json.loads((out / MANIFEST).read_text())
    m["files"][entry] = {"sha256": "0", "size": 1}
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="leaves the artifact|outside"):
        read_artifact(out)


def test_symlink_leaving_artifact_refused(tmp_path):
    out = make(tmp_path)
    (tmp_path / "secret").write_bytes(b"hello")
    (out / "data.bin").unlink()
    os.symlink(tmp_path / "secret", out / "data.bin")
    with pytest.raises(ArtifactError):
        read_artifact(out)


def test_failure_inside_writer_leaves_previous_artifact(tmp_path):
    out = make(tmp_path, content=b"v1")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, "calibrate", {}) as w:
            (w.dir / "data.bin").write_bytes(b"v2-partial")
            raise RuntimeError("boom")
    assert (out / "data.bin").read_bytes() == b"v1"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    read_artifact(out)


def test_replacing_an_artifact_is_atomic_and_cleans_up(tmp_path):
    make(tmp_path, content=b"v1")
    out = make(tmp_path, content=b"v2")
    assert (out / "data.bin").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_clean_stale_removes_dead_temp_dirs(tmp_path):
    out = make(tmp_path)
    stale = tmp_path / ".a.tmp-999999-deadbeef"
    stale.mkdir()
    (stale / "partial").write_text("x")
    clean_stale(out)
    assert not stale.exists()
    read_artifact(out)
