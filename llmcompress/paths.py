"""Where a stage may write, checked before any work: the output is a plain path whose parent can be created and
written, it never aliases, contains or sits inside one of the stage's inputs, and replacing it loses nothing of
the user's (see artifacts.check_replaceable). Also the rule for names that must stay one path component."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from .artifacts import check_replaceable
from .errors import UserError


def component_problem(name: str) -> Optional[str]:
    """Why `name` cannot be one directory name inside a root (None if it can): it must not be empty, '.', '..',
    hidden (temporary siblings are hidden), absolute, or hold a separator or control character."""
    if not name or not name.strip():
        return "a non-empty name"
    if name in (".", "..") or name.startswith("."):
        return "a name that does not start with '.'"
    if "/" in name or "\\" in name or os.sep in name:
        return "a single directory name (no '/' or '\\'), so the artifact stays under output_root"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "a name without control characters"
    if len(name.encode()) > 200:
        return "a name of at most 200 bytes"
    return None


def is_within(inner: Path, outer: Path) -> bool:
    """`inner` is `outer` or below it, after resolving symlinks on both."""
    try:
        Path(inner).resolve().relative_to(Path(outer).resolve())
        return True
    except ValueError:
        return False


def check_writable(out: Path, key: str) -> None:
    """The nearest existing ancestor of `out` must be a directory this process may create entries in."""
    out = Path(out)
    parent = out.absolute().parent
    probe = parent
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{out}: {key}: {probe} is not a directory, so nothing can be written below it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{out}: {key}: {probe} is not writable")


def check_output(out: Path, inputs: Iterable[tuple[str, Path]], key: str = "--output") -> None:
    """Refuse, before any work, an output that cannot be written, would replace something of the user's, or
    aliases an input: the same path, a directory holding an input (replacing it deletes the input), or a path
    inside an input (writing there changes the input under its manifest). `inputs` are (what, path) pairs."""
    out = Path(out)
    if not str(out).strip():
        raise UserError(f"{key}: expected an output directory path, got an empty one")
    if any(ord(c) < 32 for c in str(out)):
        raise UserError(f"{out!r}: {key}: a path with a control character is refused")
    if any(len(part.encode()) > 255 for part in out.parts):
        raise UserError(f"{str(out)[:60]}...: {key}: a path component longer than 255 bytes")
    check_writable(out, key)
    check_replaceable(out, key)
    for what, path in inputs:
        path = Path(path)
        if not (path.exists() or path.is_symlink()):
            continue
        if is_within(path, out):
            relation = "is" if path.resolve() == out.resolve() else "contains"
            raise UserError(f"{out}: {key}: {relation} the input {path} ({what}); choose another output path")
        if is_within(out, path):
            raise UserError(f"{out}: {key}: lies inside the input {path} ({what}); choose another output path")


def config_paths(obj, prefix: str = "") -> list[tuple[str, Path]]:
    """(key, path) for every string value of a resolved config that names an existing local file or directory
    (model directories, datasets, baselines, data folders): the inputs an output must not touch."""
    out: list[tuple[str, Path]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += config_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += config_paths(v, f"{prefix}[{i}]")
    elif isinstance(obj, str) and obj.strip() and "\x00" not in obj:
        name = obj[4:] if obj.startswith("hub:") else obj
        try:
            p = Path(name).expanduser()
            if p.exists():
                out.append((prefix, p))
        except (OSError, ValueError):
            pass
    return out
