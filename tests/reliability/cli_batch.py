"""Run many `llmc` invocations in one Python process and report, for each, the exit code, stderr, stdout and every
file it created, changed or removed under a watched folder.

A CLI subprocess costs 2-3 s of imports; the refusals checked here happen before any model is loaded, so one
subprocess (`python tests/reliability/cli_batch.py < cases.json`) runs a whole table of them through the real
`llmc` entry point (`llmcompress.cli:app`, the console script's target). `run_case` is the same code in-process,
for hypothesis."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """path -> kind with size and mtime (files), link target (symlinks), 'dir'; never follows a symlink."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                st = p.stat()
                out[rel] = f"file:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            else:
                out[rel] = "other"
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def run_case(args: list[str], cwd: Path, watch: Path, files: dict[str, str] | None = None) -> dict:
    """Write `files` (relative to cwd), run `llmc *args` in `cwd`, then remove them again; report what changed
    under `watch` besides them."""
    from llmcompress.cli import app

    cwd, watch = Path(cwd), Path(watch)
    written = []
    for rel, text in (files or {}).items():
        p = cwd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        written.append(p)
    before = snapshot(watch)
    old_cwd = os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    err, out = io.StringIO(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = app(args, prog_name="llmc", standalone_mode=False)
                rc = 0 if rc is None else rc
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except Exception as e:  # click's usage errors, raised as exceptions when standalone_mode is off
                code = getattr(e, "exit_code", None)
                if code is None:
                    raise
                if hasattr(e, "show"):
                    e.show()
                rc = code
    finally:
        os.chdir(old_cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
    after = snapshot(watch)
    for p in written:
        p.unlink(missing_ok=True)
    return {"args": args, "rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue(),
            "changed": changes(before, after)}


def assert_refused(result: dict, *needles: str) -> None:
    """Exit 2, exactly one line on stderr holding every needle, nothing on stdout, nothing written."""
    what = f"{result['args']}: rc={result['rc']} stderr={result['stderr']!r}"
    assert result["rc"] == 2, what
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), what
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {what}"
    assert "Traceback" not in result["stderr"] and result["stdout"].strip() == "", what
    assert result["changed"] == [], f"{what} changed {result['changed']}"


def assert_stopped_at_memory_check(result: dict) -> None:
    """Accepted by every check before work: refused only by the (deliberately tiny) memory limit; nothing written."""
    what = f"{result['args']}: rc={result['rc']} stderr={result['stderr']!r}"
    assert result["rc"] == 2 and "needs about" in result["stderr"].strip().splitlines()[-1], what
    assert result["changed"] == [], f"{what} changed {result['changed']}"


def main() -> None:
    cases = json.load(sys.stdin)
    results = [run_case(c["args"], Path(c["cwd"]), Path(c["watch"]), c.get("files")) for c in cases]
    sys.__stdout__.write(json.dumps(results))


if __name__ == "__main__":
    main()
