"""Artifact directories: manifest, hashing, atomic write, verified read.

Every stage writes one directory holding its files and a `manifest.json` (stage, versions, resolved config,
inputs with their manifest hashes, every output file with its sha256, wall time, host). The directory is built
as a temporary sibling and renamed into place only once complete, so a killed stage never leaves a directory
that `read_artifact` accepts: the manifest is the last file written and carries `"complete": true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: the manifest carries `self_sha256`, the hash of everything else in it


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def manifest_self_sha256(manifest: dict) -> str:
    """The hash a manifest records of itself: every key but `self_sha256`, so an edit to the recorded config,
    inputs, meta or file list is detected (a checksum against mistakes and stale edits, not a signature)."""
    return sha256_json({k: v for k, v in manifest.items() if k != "self_sha256"})


def _versions() -> dict:
    from . import __version__
    out = {"llmcompress": __version__, "python": platform.python_version()}
    for mod in ("torch", "transformers"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        out[mod] = getattr(m, "__version__", "?")
    return out


def _safe_relpath(root: Path, rel: str) -> Path:
    """A manifest entry must name a file inside the artifact: no absolute path, no '..', no symlink out."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")):
        raise ArtifactError(f"{root / MANIFEST}: files: entry {rel!r} leaves the artifact directory")
    full = root / p
    try:
        resolved = full.resolve(strict=False)
        resolved.relative_to(root.resolve())
    except ValueError:
        raise ArtifactError(f"{root / MANIFEST}: files: entry {rel!r} resolves outside the artifact "
                            f"directory (symlink?)") from None
    return full


@dataclass
class Artifact:
    """A verified, complete artifact directory."""

    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.path / MANIFEST)

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def file(self, rel: str) -> Path:
        return _safe_relpath(self.path, rel)


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_replaceable(out: Path, what: str = "output") -> None:
    """An artifact may be written only where nothing of the user's is lost: a path that does not exist, an empty
    directory, or an earlier llmc artifact. A file, a symlink or a directory holding other things is refused."""
    out = Path(out)
    if out.is_symlink():
        raise ArtifactError(f"{out}: {what}: is a symlink; refusing to replace it (name a plain path)")
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out}: {what}: is an existing file; refusing to replace it with an artifact "
                            f"directory (choose another path)")
    manifest = out / MANIFEST
    if not (manifest.is_file() and not manifest.is_symlink()) and any(out.iterdir()):
        raise ArtifactError(f"{out}: {what}: is a non-empty directory that is not an llmc artifact; refusing to "
                            f"replace it (choose another path or remove it)")


def read_artifact(path, stages: Optional[tuple[str, ...]] = None, verify_hashes: bool = True) -> Artifact:
    """Open an artifact, refusing one whose manifest is missing, incomplete, from the wrong stage, or whose
    files are missing, escape the directory, or fail their sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory not found")
    if mpath.is_symlink():
        raise ArtifactError(f"{mpath}: is a symlink; an artifact's manifest must be a regular file inside it")
    if not mpath.exists():
        raise ArtifactError(f"{mpath}: manifest missing (not an llmc artifact, or an incomplete one)")
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: is not a regular file")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: manifest is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise ArtifactError(f"{mpath}: complete: artifact is incomplete (stage did not finish)")
    if stages is not None and manifest.get("stage") not in stages:
        raise ArtifactError(f"{mpath}: stage: expected an artifact of stage {' or '.join(stages)}, "
                            f"got {manifest.get('stage')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        raise ArtifactError(f"{mpath}: files: expected a mapping of file -> {{sha256, size}}")
    for rel in files:
        full = _safe_relpath(path, rel)
        if full.is_symlink():
            raise ArtifactError(f"{mpath}: files: {rel!r} is a symlink; artifacts hold plain files only")
        if not full.exists():
            raise ArtifactError(f"{full}: file listed in the manifest is missing")
        if not full.is_file():
            raise ArtifactError(f"{mpath}: files: {rel!r} is not a regular file")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"{mpath}: manifest_version: expected {MANIFEST_VERSION}, got "
                            f"{manifest.get('manifest_version')!r} (written by another llmc version; rerun the stage)")
    if manifest.get("self_sha256") != manifest_self_sha256(manifest):
        raise ArtifactError(f"{mpath}: self_sha256: the manifest was edited after it was written (its recorded "
                            f"config, inputs or file list no longer match its hash); rerun the stage")
    for rel, entry in files.items():
        full = path / rel
        if full.stat().st_size != entry.get("size"):
            raise ArtifactError(f"{full}: size {full.stat().st_size} != {entry.get('size')} in the manifest "
                                f"(truncated or tampered)")
        if verify_hashes and sha256_file(full) != entry.get("sha256"):
            raise ArtifactError(f"{full}: sha256 does not match the manifest (tampered or corrupted)")
    return Artifact(path, manifest)


_interrupt_requested = False


def note_interrupt() -> None:
    """Called by the CLI's SIGINT/SIGTERM handler. Its KeyboardInterrupt can be swallowed where it lands inside a
    finalizer (Python then prints "Exception ignored" and goes on), so the writer also checks this flag before it
    renames anything into place: an interrupted stage never replaces the previous artifact."""
    global _interrupt_requested
    _interrupt_requested = True


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a SIGINT/SIGTERM has come (see note_interrupt); stages' progress loops call it."""
    if _interrupt_requested:
        raise KeyboardInterrupt


@dataclass
class ArtifactWriter:
    """`with ArtifactWriter(out, stage, config) as w:` write into `w.dir`; on success the manifest is written
    last and the directory renamed onto `out` (replacing an older artifact only then); on any exception the
    temporary directory is removed and `out` is left untouched."""

    out: Path
    stage: str
    config: dict
    inputs: list[Artifact] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    cache_key: Optional[str] = None
    dir: Path = field(init=False)

    def __post_init__(self):
        self.out = Path(self.out)

    def __enter__(self) -> "ArtifactWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        self._t0 = time.time()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return False
        try:
            self._finalize()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        return False

    def _finalize(self):
        raise_if_interrupted()
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_symlink():
                raise ArtifactError(f"{p}: stages must not write symlinks into artifacts")
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.dir).as_posix()
                files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": self.stage,
            "complete": True,
            "config": self.config,
            "inputs": [{"path": str(a.path), "stage": a.stage, "manifest_sha256": a.manifest_sha256}
                       for a in self.inputs],
            "files": files,
            "meta": self.meta,
            "summary": self.summary,
            "cache_key": self.cache_key,
            "wall_time_s": round(time.time() - self._t0, 3),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "versions": _versions(),
        }
        manifest = json.loads(json.dumps(manifest, default=str))  # hash what a reader will load (int keys -> str)
        manifest["self_sha256"] = manifest_self_sha256(manifest)
        tmp_manifest = self.dir / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp_manifest, self.dir / MANIFEST)
        check_replaceable(self.out)
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(out: Path) -> None:
    """Remove temporary siblings left by killed runs of `out` (their manifests are never complete)."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.split(".tmp-")[-1].split("-")[0]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        shutil.rmtree(p, ignore_errors=True)
    if not out.exists():
        # killed between the two renames of a replace: the previous artifact is still whole; put it back
        olds = sorted(out.parent.glob(f".{out.name}.old-*"))
        if olds:
            os.replace(olds[-1], out)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
