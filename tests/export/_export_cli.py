"""Helpers shared by the tests of tests/export (imported by name: this folder is on sys.path under pytest)."""


def error_line(stderr: str) -> str:
    """The one error line of a failed CLI run (progress lines above it are allowed)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]
