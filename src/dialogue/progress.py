"""Progress of long work: the one callback convention every long step reports through.

A long step (loading a model, merging adapters, converting a PEFT adapter, scanning a base's
tensor shapes, importing a notebook) takes an optional `on_progress: OnProgress` and calls it
with `Step` values: once when it starts (done 0), as it goes, and once when it ends
(`finished=True`). `total` is None while the amount of work is unknown (a spinner, not a bar).
The code doing the work knows nothing of terminals or pages: the CLI draws `Step`s as rich
progress bars on stderr (`cli/progress.py`), the web app sends them to the page over SSE.

`Steps` is the small helper the workers use: it does nothing without a callback, so passing
`on_progress=None` costs nothing, and it throttles repeated updates of the same task (a merge
advances thousands of times) to one every `every_s` seconds, always passing the first and the
last. Training reports per step through its own `on_step` records (train/loop.py) and a model
reading a long prompt through `llm.base.Progress` events: those carry more than a count.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Step", "OnProgress", "Steps"]


@dataclass(frozen=True)
class Step:
    """How far one task is: `done` of `total` `unit`s (total None: not known yet)."""

    task: str
    done: float = 0
    total: float | None = None
    unit: str = ""
    finished: bool = False

    @property
    def fraction(self) -> float | None:
        if self.finished:
            return 1.0
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def describe(self) -> str:
        """The words each surface shows: "merging adapters: 120 / 480 tensors", "loading the
        model: 45%", "reading the base's tensor shapes…", "… done"."""
        if self.finished:
            return f"{self.task}: done"
        if self.total is None:
            return f"{self.task}…"
        if self.unit == "%":
            return f"{self.task}: {round(100 * (self.fraction or 0))}%"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.task}: {self.done:,.0f} / {self.total:,.0f}{unit}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Step":
        total = d.get("total")
        return cls(str(d.get("task", "")), float(d.get("done") or 0),
                   None if total is None else float(total), str(d.get("unit", "")),
                   bool(d.get("finished", False)))


OnProgress = Callable[[Step], None]


class Steps:
    """Report one task to an optional callback: `start`, `advance`/`update`, `finish`.

        steps = Steps(on_progress, "merging adapters", total=len(names), unit="tensors")
        for n in names:
            ...
            steps.advance()
        steps.finish()
    """

    def __init__(self, on_progress: OnProgress | None, task: str, total: float | None = None,
                 unit: str = "", *, every_s: float = 0.1, start: bool = True):
        self.cb = on_progress
        self.task, self.total, self.unit = task, total, unit
        self.done: float = 0
        self.every_s = every_s
        self._last = 0.0
        if start:
            self._send(force=True)

    def _send(self, *, force: bool = False, finished: bool = False) -> None:
        if self.cb is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        self.cb(Step(self.task, self.done, self.total, self.unit, finished))

    def update(self, done: float, total: float | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        last = self.total is not None and done >= self.total
        self._send(force=last)

    def advance(self, n: float = 1) -> None:
        self.update(self.done + n)

    def finish(self) -> None:
        if self.total is not None:
            self.done = self.total
        self._send(force=True, finished=True)

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.finish()
