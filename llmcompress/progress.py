"""How stages report progress without knowing about the terminal: they receive a `Reporter`.

The CLI passes a rich-backed one (bars, one-line messages); tests and library callers get the silent default.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger("llmcompress")


class Reporter:
    """Silent reporter: `track` yields items unchanged, `info` goes to the logger only."""

    def track(self, items: Iterable[T], total: Optional[int] = None, description: str = "") -> Iterator[T]:
        yield from items

    def info(self, message: str) -> None:
        log.info(message)

    def update(self, **fields) -> None:
        """Live numbers for the current bar (loss, tokens/s, ...)."""


class RichReporter(Reporter):
    def __init__(self, console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self._fields: dict = {}
        self._progress = None
        self._task = None

    def track(self, items, total=None, description=""):
        # Each step first checks for a SIGINT/SIGTERM whose KeyboardInterrupt was swallowed on the way.
        from .artifacts import raise_if_interrupted

        if self.quiet:
            for item in items:
                raise_if_interrupted()
                yield item
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        if total is None and hasattr(items, "__len__"):
            total = len(items)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
                      console=self.console, transient=False) as progress:
            self._progress, self._fields = progress, {}
            self._task = progress.add_task(description, total=total, extra="")
            try:
                for item in items:
                    raise_if_interrupted()
                    yield item
                    progress.advance(self._task)
            finally:
                self._progress = self._task = None

    def update(self, **fields):
        self._fields.update(fields)
        if self._progress is not None:
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self._fields.items())
            self._progress.update(self._task, extra=extra)

    def info(self, message):
        log.info(message)
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)
