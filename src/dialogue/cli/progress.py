"""Long steps on the terminal: `Step`s (the service's progress convention, progress.py) drawn as
rich progress bars on stderr, one bar per task, while a command works.

Bars are drawn only when stderr is a terminal: stdout stays the command's result and a log or a
pipe gets no redrawn lines. Tasks without a total show a spinner with the time so far. Task names
are our words but may hold a file's name: they go through `terminal.markup` (rich reads a bar's
description as markup)."""
from __future__ import annotations

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
        self.live = self.console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), TimeElapsedColumn(), console=self.console,
                                 transient=False, disable=not self.live)
        self.tasks: dict[str, Any] = {}
        self.steps: list[Step] = []  # everything heard, for tests and for `last`

    def __call__(self, step: Step) -> None:
        self.steps.append(step)
        desc = markup(step.task)
        tid = self.tasks.get(step.task)
        total = step.total if step.total is not None else None
        if tid is None:
            tid = self.tasks[step.task] = self.progress.add_task(desc, total=total, completed=step.done)
        else:
            self.progress.update(tid, total=total, completed=step.done)
        if step.finished:
            done = step.total if step.total is not None else 1
            self.progress.update(tid, total=done, completed=done)

    def __enter__(self) -> "Bars":
        self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()
