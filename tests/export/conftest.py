"""Every test of tests/export runs on one torch thread (see _shared.one_thread)."""

from _shared import one_thread  # noqa: F401  (autouse: every test here runs on one torch thread)
