"""Runs, as the page sees them: every event of a run started from the web, kept from its start.

`DialogueService.subscribe` gives the events from the moment a listener subscribes. A page,
though, hears of a run only after the POST that started it has answered and the browser has
opened the event stream: a `print('hi')` may be over by then, and the store is flushed only every
`flush_every` seconds (and only when the next output arrives), so reading it would show nothing
for as long as the cell then sleeps. So the relay subscribes as soon as a run starts, keeps
the events in memory until the run is done, and gives each stream that connects a snapshot of
everything so far followed by the live events. A closed tab only drops its listener; the run and
the relay's own subscription go on, and a reopened page connects again and gets the snapshot.
A model's reports on reading a long prompt ("progress") fold into the snapshot as the latest one.

Runs started elsewhere in this process (not through `start`) are picked up when a page asks for
them: their snapshot is what the store holds at that moment, so text produced just before the
page connected may show late (it is in the final state).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..document import Kind, Message
from ..service import DialogueService, RunEvent

__all__ = ["RunRelay", "LiveState"]


@dataclass
class LiveState:
    """What a running message has produced so far, as the page shows it."""

    kind: Kind
    text: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # How far the model has read the prompt ({"read", "total", "eta_s"}), until its answer
    # starts: only the latest report counts, and the first piece of text replaces it.
    progress: dict[str, Any] | None = None

    @classmethod
    def from_message(cls, m: Message) -> "LiveState":
        return cls(m.kind, m.response, copy.deepcopy(m.outputs), copy.deepcopy(m.tool_calls),
                   [m.meta["error"]] if m.meta.get("error") else [])

    def apply(self, ev: RunEvent) -> None:
        """Fold one event in, the way the service folds it into the stored message."""
        if ev.type == "text":
            self.text += ev.data
            self.progress = None
        elif ev.type == "progress":
            self.progress = dict(ev.data)
        elif ev.type == "output":
            out = ev.data
            t = out.get("output_type")
            if t == "clear_output":
                self.outputs.clear()
            elif t == "update_display_data":
                did = out.get("display_id") or out.get("transient", {}).get("display_id")
                for o in self.outputs:
                    if did and did in (o.get("transient", {}).get("display_id"),
                                       o.get("metadata", {}).get("display_id")):
                        o["data"], o["metadata"] = out.get("data", {}), out.get("metadata", {})
            else:
                self.outputs.append(out)
        elif ev.type == "tool_call":
            self.tool_calls.append(dict(ev.data))
        elif ev.type == "tool_result":
            for c in self.tool_calls:
                if c.get("id") == ev.data.get("id"):
                    c.update(result=ev.data.get("result"), error=ev.data.get("error"))
        elif ev.type == "error":
            self.errors.append(str(ev.data))


class _Buffer:
    def __init__(self, base: LiveState):
        self.base = base
        self.events: list[RunEvent] = []
        self.done = False
        self._changed = asyncio.Event()

    def add(self, ev: RunEvent) -> None:
        self.events.append(ev)
        self._poke()

    def finish(self) -> None:
        self.done = True
        self._poke()

    def _poke(self) -> None:
        # wake everyone waiting now; later waiters wait on a fresh event
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def snapshot(self, upto: int) -> LiveState:
        s = copy.deepcopy(self.base)
        for ev in self.events[:upto]:
            s.apply(ev)
        return s


class RunRelay:
    """Starts runs through the service and relays their events to any number of page streams."""

    # How often a subscription checks that its run still exists, so that a run which ended before
    # the subscription was registered (a prompt whose model name is unknown fails at once) does
    # not leave it waiting for a "done" that was already sent.
    poll = 0.5

    def __init__(self, service: DialogueService):
        self.service = service
        self._bufs: dict[str, _Buffer] = {}
        self._pumps: set[asyncio.Task] = set()

    def start(self, dialogue: str, msg: str, *, prefill: str | None = None) -> str:
        """Start a run (see `DialogueService.start`) and begin keeping its events."""
        mid = self.service.start(dialogue, msg, prefill=prefill)
        m = self.service.store.get_message(mid)
        base = LiveState(m.kind, (prefill or "") if m.kind == Kind.prompt else "")
        self._follow(mid, base)
        return mid

    def snapshot(self, mid: str) -> LiveState | None:
        """What a run followed here has produced so far (None if the relay does not follow it)."""
        buf = self._bufs.get(mid)
        return buf.snapshot(len(buf.events)) if buf is not None else None

    def running(self, mid: str) -> bool:
        return self.service.running(mid) or (mid in self._bufs and not self._bufs[mid].done)

    def _follow(self, mid: str, base: LiveState) -> _Buffer:
        buf = self._bufs[mid] = _Buffer(base)
        # subscribed here, not in the task: the run may publish before the task first runs
        agen = self.service.subscribe(mid)
        task = asyncio.get_running_loop().create_task(self._pump(mid, buf, agen))
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)
        return buf

    async def _pump(self, mid: str, buf: _Buffer, agen: AsyncIterator[RunEvent]) -> None:
        nxt: asyncio.Future | None = None
        try:
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(agen.__anext__())
                done, _ = await asyncio.wait({nxt}, timeout=self.poll)
                if not done:
                    if not self.service.running(mid):
                        break  # ended without our hearing it: the store has the final state
                    continue
                try:
                    ev = nxt.result()
                except StopAsyncIteration:
                    break
                nxt = None
                buf.add(ev)
                if ev.type == "done":
                    break
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
            with contextlib.suppress(BaseException):
                await agen.aclose()
            buf.finish()
            if self._bufs.get(mid) is buf:
                del self._bufs[mid]

    async def listen(self, mid: str) -> AsyncIterator[tuple[str, Any]]:
        """("snapshot", LiveState) first, then ("event", RunEvent) as they come; nothing at all when
        the message is not running (the store has its final state)."""
        buf = self._bufs.get(mid)
        if buf is None:
            if not self.service.running(mid):
                return
            buf = self._follow(mid, LiveState.from_message(self.service.store.get_message(mid)))
        i = len(buf.events)
        yield "snapshot", buf.snapshot(i)
        while True:
            while i < len(buf.events):
                ev = buf.events[i]
                i += 1
                # A listener that fell behind gets only the latest of consecutive progress
                # reports: the page shows where the model is, not every step it took.
                if ev.type == "progress" and i < len(buf.events) \
                        and buf.events[i].type == "progress":
                    continue
                yield "event", ev
            if buf.done:
                return
            await buf._changed.wait()

    async def aclose(self) -> None:
        for t in list(self._pumps):
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
