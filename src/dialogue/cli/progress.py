"""Long steps on the terminal: `Step`s (the service's progress convention, progress.py) drawn as
rich progress bars on stderr, one bar per task, while a command works.

Bars are drawn only when stderr is a terminal: stdout stays the command's result and a log or a
pipe gets no redrawn lines. Tasks without a total show a spinner with the time so far. Task names
are our words but may hold a file's name: they go through `terminal.markup` (rich reads a bar's
description as markup)."""
from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

from ..service import Step
from ..terminal import markup
from .common import err


class Bars:
    """A context manager and a progress callback: `with Bars() as bars: svc.merge_adapters(...,
    on_progress=bars)`. Safe to call from other threads (rich's Progress locks)."""

    def __init__(self, console: Console | None = None):
        self.console = console if console is not None else err
        # the stream itself, not rich's is_terminal: FORCE_COLOR makes rich treat a pipe as a
        # terminal, and colour in a log is fine where redrawn lines and cursor codes are not
        try:
            self.live = bool(self.console.file.isatty())
        except (AttributeError, ValueError):
            self.live = False
        self._lock = threading.Lock()
        self._started = False
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), TimeElapsedColumn(), console=self.console,
                                 transient=False, disable=not self.live)
        self.tasks: dict[str, Any] = {}
        self.steps: list[Step] = []  # everything heard, in order

    def __call__(self, step: Step) -> None:
        self.steps.append(step)
        with self._lock:  # drawn from the first step on: a command with no long step draws nothing
            if not self._started:
                self._started = True
                self.progress.start()
        desc = markup(step.task)
        tid = self.tasks.get(step.task)
        if tid is None:
            tid = self.tasks[step.task] = self.progress.add_task(desc, total=step.total, completed=step.done)
        else:
            self.progress.update(tid, total=step.total, completed=step.done)
        if step.finished:
            done = step.total if step.total is not None else 1
            self.progress.update(tid, total=done, completed=done)

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._lock:
            if self._started:
                self.progress.stop()
