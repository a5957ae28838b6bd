"""Long steps started from the page, shown while they work: the service's `Step`s (progress.py)
sent to the page over SSE, as the cells' streams are.

The request that does the work (a notebook import) names a job id that the page made (a hidden
field of the form); the same submit makes htmx fetch `progress_box`, whose event stream shows the
latest `Step` of that job until the request ends. The work keeps its own response (a redirect or
a refusal) whatever happens to the stream, and a page that never opens one loses nothing."""
from __future__ import annotations

import asyncio
import collections
import re
import time
from typing import Any, AsyncIterator

from fasthtml.common import APIRouter, Div, to_xml
from starlette.requests import Request

from ...service import Step
from .. import paths
from .. import views as V
from ..common import event_stream, refuse

rt = APIRouter()

_JOB_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
KEEP = 64          # jobs remembered (the latest step of each), oldest forgotten first
WAIT_S = 30.0      # how long a stream waits for its job's first step before it gives up


class Job:
    """The latest step of each task of one long request, and whether it ended."""

    def __init__(self) -> None:
        self.steps: dict[str, Step] = {}
        self.ended = False
        self.changed = asyncio.Event()


class Jobs:
    """Jobs by id, fed from worker threads (`reporter`), read by event streams."""

    def __init__(self) -> None:
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()

    def begin(self, job_id: str | None) -> Job | None:
        """A fresh job under the page's id (a retry after a refusal reuses it), or None for a
        missing or malformed id (the work then runs without showing progress)."""
        if not job_id or not _JOB_RE.fullmatch(job_id):
            return None
        old = self._jobs.pop(job_id, None)
        job = self._jobs[job_id] = Job()
        if old is not None:  # a stream still on the old one moves to the new one
            old.changed.set()
        while len(self._jobs) > KEEP:
            self._jobs.popitem(last=False)[1].changed.set()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def reporter(self, job: Job | None) -> Any:
        """An `on_progress` for the worker thread: each step lands on the event loop's side."""
        if job is None:
            return None
        loop = asyncio.get_running_loop()

        def put(step: Step) -> None:
            job.steps[step.task] = step
            job.changed.set()

        return lambda step: loop.call_soon_threadsafe(put, step)

    def end(self, job: Job | None) -> None:
        if job is not None:
            job.ended = True
            job.changed.set()


JOBS = Jobs()


@rt(paths.progress_box)
async def progress_box(job: str, req: Request) -> Any:
    """The box that follows a job's stream (fetched by the form's submit)."""
    if not _JOB_RE.fullmatch(job):
        return refuse("Unknown progress.", 404)
    return Div(Div(sse_swap="step", hx_swap="innerHTML", cls="steps"),
               Div(sse_swap="done", hx_target="closest .job-progress", hx_swap="outerHTML", hidden=True),
               hx_ext="sse", sse_connect=paths.progress_stream.to(job=job), sse_close="done",
               cls="job-progress", aria_live="polite")


@rt(paths.progress_stream)
async def progress_stream(job: str, req: Request) -> Any:
    """The job's latest steps as "step" events, then "done" (an empty box) when it ended; also
    "done" if no job of that id starts within WAIT_S (a request refused before it began)."""

    async def events() -> AsyncIterator[str]:
        deadline = time.monotonic() + WAIT_S
        shown: dict[str, Step] = {}
        while True:
            j = JOBS.get(job)
            if j is None:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
                continue
            j.changed.clear()  # before reading: a step landing after this wakes the wait below
            if j.steps != shown:
                shown = dict(j.steps)
                yield V.sse("step", to_xml(V.steps_view(list(shown.values()))))
            if j.ended:
                break
            try:
                await asyncio.wait_for(j.changed.wait(), timeout=WAIT_S)
            except asyncio.TimeoutError:
                pass
            if JOBS.get(job) is None:  # forgotten (many jobs since): nothing more to show
                break
        yield V.sse("done", "")

    return event_stream(req, events())
