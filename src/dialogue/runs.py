"""Runs: a message being run (a code cell in its kernel, a prompt to its model), and a dialogue
run top to bottom.

A `Run` keeps its event log from its first event and folds each event into a `LiveState` (what
the run has produced so far) as it is published. Both the store and every listener are fed from
that one place: a flusher writes the folded state every `flush_every` seconds, and a listener that
arrives late (a page opened after a fast `print`, a CLI task that subscribes after the run
started) gets the whole log, or the folded state and what follows. There is no "from now on".

`RunAll` runs a dialogue's messages one after another (the web's Run all, `dialogue run`), with a
progress any number of pages can follow and a stop.

`Answer` and `follow` are the one consumer of a provider's event stream: text, tool calls, usage
totalled, the stop reason, the error a user can act on. The service's prompt runs, the web's
adapter trials and the CLI's trials all read a model through them, so every one of them ends with
the same usage record (counts, model, stop reason, cost).

Nothing here imports the service: it passes itself in as the `host` of `Runs`.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from .document import Dialogue, Kind, Message
from .kernel.outputs import fold_output, stored_outputs
from .approvals import settle_pending
from .store import StoreError

log = logging.getLogger(__name__)  # dialogue.runs

if TYPE_CHECKING:
    from .llm.base import Usage

__all__ = ["RunError", "RunEvent", "LiveState", "Run", "Runs", "RunAll", "Answer", "follow",
           "run_status"]


class RunError(StoreError):
    """A message cannot be run as asked (a note, an empty prompt, already running)."""


@dataclass
class RunEvent:
    """What a listener hears while a message runs.

    type: "output" (data: an nbformat output, or a clear_output / update_display_data control),
    "text" (data: a piece of the model's answer), "tool_call" / "tool_result" (data: dicts),
    "progress" (data: {"read", "total", "eta_s", "task"}: how far a local model has read the prompt,
    or with a task, loaded itself, in percent),
    "input" (data: {"prompt", "password"}: the cell waits for a line of input, see
    `Runs.reply`; None: the question was answered),
    "approval" (data: {"id", "name", "arguments", "preview", ...}: a tool call waits for the
    user's answer, see `Runs.decide`; or {"id", "name", "decision", "reason"}: it was decided),
    "doc" (data: {"op", "id"}: the answer's document tools changed message "id": "add", "edit",
    "delete", "move", or "run" once its run started),
    "error" (data: a message for the user), and last "done" (data: the stored Message)."""

    type: str
    message_id: str
    data: Any = None


@dataclass
class LiveState:
    """What a running message has produced so far: what the store is sent and a page shows."""

    kind: Kind
    text: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # How far the model has read the prompt ({"read", "total", "eta_s"}), until its answer
    # starts: only the latest report counts, and the first piece of text replaces it.
    progress: dict[str, Any] | None = None
    clear_pending: bool = False  # a clear_output(wait=True) that waits for the next output
    input: dict[str, Any] | None = None  # the question a cell waits on ({"prompt", "password"})
    pending: list[dict[str, Any]] = field(default_factory=list)  # tool calls awaiting approval

    @classmethod
    def from_message(cls, m: Message) -> "LiveState":
        return cls(m.kind, m.response, copy.deepcopy(m.outputs), copy.deepcopy(m.tool_calls),
                   [m.meta["error"]] if m.meta.get("error") else [])

    def apply(self, ev: RunEvent) -> None:
        """Fold one event in."""
        if ev.type == "text":
            self.text += ev.data
            self.progress = None
        elif ev.type == "progress":
            self.progress = dict(ev.data)
        elif ev.type == "output":
            self.clear_pending = fold_output(self.outputs, ev.data, self.clear_pending)
        elif ev.type == "tool_call":
            self.tool_calls.append(dict(ev.data))
        elif ev.type == "tool_result":
            for c in self.tool_calls:
                if c.get("id") == ev.data.get("id"):
                    c.update(result=ev.data.get("result"), error=ev.data.get("error"))
        elif ev.type == "error":
            self.errors.append(str(ev.data))
        elif ev.type == "input":
            self.input = dict(ev.data) if ev.data else None
        elif ev.type == "approval":
            if "decision" in ev.data:
                self.pending = [p for p in self.pending if p.get("id") != ev.data.get("id")]
            else:
                self.pending.append(dict(ev.data))


class _Signal:
    """Wakes every waiter once per change; a later waiter waits for the next change."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()

    def poke(self) -> None:
        ev, self._ev = self._ev, asyncio.Event()
        ev.set()

    async def wait(self) -> None:
        await self._ev.wait()


class Run:
    """One run of one message: its task, its event log from the first event, and the state those
    events fold into."""

    def __init__(self, message_id: str, dialogue_id: str, kind: Kind, state: LiveState):
        self.message_id, self.dialogue_id, self.kind = message_id, dialogue_id, kind
        self.state = state
        self.events: list[RunEvent] = []
        self.task: asyncio.Task | None = None
        self.finished = False
        self.execution: Any = None  # the kernel's Execution of a code run, once it has one
        self.stopping: asyncio.Task | None = None  # a Stop in progress (a second Stop joins it)
        self.restarted = ""  # why Stop restarted the kernel under this run, if it did
        self.gate: Any = None  # a prompt's approvals.Gate, once its tools are known
        self.outputs_changed = 0  # bumped by every output event: the flusher writes them then
        self._signal = _Signal()

    def publish(self, ev: RunEvent) -> None:
        self.events.append(ev)
        if ev.type != "done":
            self.state.apply(ev)
            if ev.type == "output":
                self.outputs_changed += 1
        self._signal.poke()

    def snapshot(self) -> LiveState:
        return copy.deepcopy(self.state)

    async def events_from(self, i: int = 0, *, latest_progress: bool = False
                          ) -> AsyncIterator[RunEvent]:
        """The log from event `i` on, then each event as it comes, ending with "done". With
        `latest_progress`, a listener that fell behind gets only the latest of consecutive
        progress reports: a page shows where the model is, not every step it took."""
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                if latest_progress and ev.type == "progress" and i < len(self.events) \
                        and self.events[i].type == "progress":
                    continue
                yield ev
                if ev.type == "done":
                    return
            await self._signal.wait()

    async def watch(self) -> AsyncIterator[tuple[str, Any]]:
        """("snapshot", LiveState) first, then ("event", RunEvent) for every later event."""
        i = len(self.events)
        yield "snapshot", self.snapshot()
        async for ev in self.events_from(i, latest_progress=True):
            yield "event", ev


class _Flusher:
    """Writes what a run produced since the last write to the store, every `every` seconds: a
    cell that prints and then computes for a minute has its print on disk (and in a reopened tab)
    within that time, while a model's tokens cost one write per interval, not one per token."""

    def __init__(self, store: Any, run: Run, every: float):
        self.store, self.run, self.every = store, run, every
        self.text_at = len(run.state.text)  # what begin_stream already wrote (a prefill)
        self.outputs_at = run.outputs_changed

    def flush(self) -> None:
        s = self.run.state
        if len(s.text) > self.text_at:
            self.store.stream_append(self.run.message_id, text=s.text[self.text_at:])
            self.text_at = len(s.text)
        if self.run.outputs_changed != self.outputs_at:
            self.outputs_at = self.run.outputs_changed
            self.store.stream_append(self.run.message_id, outputs=stored_outputs(s.outputs))

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.flush()


def run_status(m: Message) -> str:
    """ok | error | died | timeout | interrupted | restarted (Stop had to restart the kernel) |
    cancelled, for the last run of a code message or prompt."""
    if m.kind == Kind.prompt:
        if m.meta.get("error"):
            return "error"
        if m.meta.get("interrupted"):  # the process writing it died (recover_interrupted)
            return "interrupted"
        return "cancelled" if m.usage.get("stop_reason") == "cancelled" else "ok"
    return m.meta.get("run", {}).get("status", "ok")


# ---------------------------------------------------------------- a provider's event stream

def _user_errors() -> tuple[type[BaseException], ...]:
    """What a model run can fail with that the user can act on (an unknown model, a missing key,
    a context that does not fit, a kernel that would not start for references or tools)."""
    from .context import ContextError
    from .kernel import KernelError
    from .llm.base import ProviderError
    return (ProviderError, ContextError, KernelError, StoreError, ValueError)


@dataclass
class Answer:
    """What a provider's event stream came to: filled in by `follow` as the events pass."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: "Usage | None" = None
    stop_reason: str = "end"
    error: str = ""
    seconds: float = 0.0

    def record(self, model: str) -> dict[str, Any]:
        """The usage record stored with an answer: counts, model, stop reason and cost."""
        from .llm.base import Usage, cost
        u = self.usage or Usage()
        return {**u.counts(), "model": model, "stop_reason": self.stop_reason,
                "cost": cost(model, u)}


async def follow(events: AsyncIterator[Any], answer: Answer) -> AsyncIterator[Any]:
    """Pass a provider's events (TextDelta, ToolCall, tool results, Usage, Progress, Done) through,
    folding each into `answer` first. An error the user can act on ends the stream with
    `answer.error` set instead of raising; a cancellation is recorded ("cancelled") and raised.
    The provider's stream is closed however this ends."""
    from .llm.base import Done, TextDelta, ToolCall, Usage
    t0 = time.monotonic()
    if answer.usage is None:
        answer.usage = Usage()
    try:
        async with contextlib.aclosing(events) as evs:
            async for ev in evs:
                if isinstance(ev, TextDelta):
                    answer.text += ev.text
                elif isinstance(ev, ToolCall):
                    answer.tool_calls.append({"id": ev.id, "name": ev.name,
                                              "arguments": ev.arguments})
                elif isinstance(ev, Usage):
                    answer.usage = answer.usage + ev
                elif isinstance(ev, Done):
                    answer.stop_reason = ev.stop_reason
                elif getattr(ev, "type", "") == "tool_result":
                    for c in answer.tool_calls:
                        if c["id"] == ev.id:
                            c.update(result=ev.result, error=ev.error)
                yield ev
    except asyncio.CancelledError:
        answer.stop_reason = "cancelled"
        raise
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        answer.stop_reason, answer.error = "error", str(e)
    finally:
        answer.seconds = round(time.monotonic() - t0, 3)


# ---------------------------------------------------------------- the runs of one service

class Runs:
    """The runs in flight in one service, by message id, and its Run alls, by dialogue id.

    `host` is the service: its `store`, `kernel(did)`, `flush_every`, `run_timeout`, `stop_grace`,
    and `request` (the model request answering a prompt) are read when a run needs them, so a
    setting changed on the service applies to the next run."""

    def __init__(self, host: Any):
        self.host = host
        self.active: dict[str, Run] = {}
        self.alls: dict[str, RunAll] = {}

    @property
    def store(self) -> Any:
        return self.host.store

    def get(self, msg_id: str) -> Run | None:
        return self.active.get(msg_id)

    def running(self, msg_id: str) -> bool:
        return msg_id in self.active

    async def cancel_all(self) -> None:
        tasks = [j.task for j in self.alls.values() if j.task is not None]
        tasks += [r.task for r in self.active.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ one message

    def start(self, did: str, mid: str, *, prefill: str | None = None,
              timeout: float | None = None, stdin: Any = False, approve: Any = None,
              tools: bool = True) -> str:
        if mid in self.active:
            raise RunError(f"message {mid} is already running")
        if who := self.store.stream_writer(mid):
            raise RunError(f"message {mid} is being written by {who}; wait for it to finish, "
                           "or stop it there")
        m = self.store.get_message(mid)
        if m.kind == Kind.code:
            state = LiveState(m.kind)
            coro = self._run_code
            args: tuple = (did, m, timeout if timeout is not None else self.host.run_timeout,
                           stdin)
        elif m.kind == Kind.prompt:
            if not m.source.strip():
                raise RunError("the prompt is empty")
            state = LiveState(m.kind, prefill or "")
            coro, args = self._run_prompt, (did, m, prefill, approve, tools)
        else:
            raise RunError(f"a {m.kind.value} message does not run")
        run = self.active[mid] = Run(mid, did, m.kind, state)
        run.task = asyncio.get_running_loop().create_task(self._guard(run, coro(run, *args)))
        return mid

    async def _guard(self, run: Run, coro: Any) -> None:
        """Whatever happens inside a run, listeners hear "done" exactly once, after the run has
        left the running set."""
        t0 = time.monotonic()
        log.info("run of %s message %s started", run.kind.value, run.message_id)
        try:
            await coro
        except StoreError:  # the message went away under the run (deleted in another tab)
            pass
        finally:
            self.active.pop(run.message_id, None)
            if not run.finished:
                with contextlib.suppress(StoreError):
                    self._finish(run, self.store.get_message(run.message_id, deleted_ok=True))
            if log.isEnabledFor(logging.INFO):
                with contextlib.suppress(StoreError):
                    m = self.store.get_message(run.message_id, deleted_ok=True)
                    log.info("run of %s message %s ended: %s in %.2f s", run.kind.value,
                             run.message_id, run_status(m), time.monotonic() - t0)

    def _finish(self, run: Run, final: Message) -> None:
        self.active.pop(run.message_id, None)  # not running any more when listeners hear "done"
        run.finished = True
        run.publish(RunEvent("done", run.message_id, final))

    def subscribe(self, msg_id: str) -> AsyncIterator[RunEvent]:
        """Every event of the run of `msg_id`, from its first, ending with "done"; nothing if it
        is not running (the store has its final state)."""
        run = self.active.get(msg_id)
        if run is None:
            return _no_events()
        return run.events_from(0)

    def watch(self, msg_id: str) -> AsyncIterator[tuple[str, Any]]:
        """("snapshot", LiveState) then ("event", RunEvent) as they come; nothing if the message
        is not running."""
        run = self.active.get(msg_id)
        return run.watch() if run is not None else _no_events()

    def live(self, msg_id: str) -> LiveState | None:
        run = self.active.get(msg_id)
        return run.snapshot() if run is not None else None

    async def wait(self, msg_id: str) -> Message:
        run = self.active.get(msg_id)
        if run is not None and run.task is not None:
            await asyncio.shield(run.task)
        return self.store.get_message(msg_id)

    async def stop(self, msg_id: str) -> None:
        run = self.active.get(msg_id)
        if run is None:
            return
        if run.kind != Kind.code:
            if run.task is not None:
                run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(run.task), 10)
            return
        if run.stopping is None:  # a second Stop (a double click) waits for the first
            run.stopping = asyncio.get_running_loop().create_task(self._stop_code(run))
        with contextlib.suppress(Exception):
            await asyncio.shield(run.stopping)

    async def _stop_code(self, run: Run) -> None:
        grace = self.host.stop_grace
        ex = run.execution
        if ex is not None:
            await ex.interrupt()
        elif run.task is not None:  # still waiting for its kernel to start
            run.task.cancel()
        if run.task is None:
            return
        await asyncio.wait([run.task], timeout=grace)
        if run.task.done():
            return
        ex = run.execution
        if ex is None or not ex.running:  # queued behind another run: drop it, leave the kernel
            if ex is not None:
                await ex.interrupt()
            else:
                run.task.cancel()
        else:
            run.restarted = (
                f"Stop: the cell was still running {grace:g} s after it was "
                "interrupted (it caught KeyboardInterrupt, or was stuck where Python cannot "
                "interrupt it), so the kernel was restarted; its variables are lost.")
            await ex.kernel.restart()
        await asyncio.wait([run.task], timeout=10)

    def decide(self, msg_id: str, call_id: str, decision: Any) -> None:
        """Answer the approval tool call `call_id` of the running answer `msg_id` waits on
        (approvals.decision_of: once / always / deny)."""
        from .approvals import ApprovalError
        run = self.active.get(msg_id)
        if run is None or run.gate is None:
            raise ApprovalError("This answer is not running any more; its calls that were "
                                "waiting were denied.")
        run.gate.decide(call_id, decision)

    def reply(self, msg_id: str, text: str) -> None:
        """Answer the input() that the running cell `msg_id` waits on."""
        run = self.active.get(msg_id)
        ex = run.execution if run is not None else None
        if ex is None or not ex.waiting_for_input:
            raise RunError("This cell is not waiting for input.")
        ex.reply(text)
        run.publish(RunEvent("input", msg_id, None))

    async def _answer(self, run: Run, question: dict[str, Any], stdin: Callable) -> None:
        """Ask `stdin(prompt, password)` (a coroutine function, or a plain one run in a thread)
        and pass its answer on; EOFError or KeyboardInterrupt from it interrupts the cell."""
        import inspect
        try:
            if inspect.iscoroutinefunction(stdin):
                text = await stdin(question["prompt"], question["password"])
            else:
                text = await asyncio.to_thread(stdin, question["prompt"], question["password"])
        except (EOFError, KeyboardInterrupt):
            run.publish(RunEvent("error", run.message_id, "No input was given; the cell was "
                                                           "interrupted."))
            if run.execution is not None:
                await run.execution.interrupt()
            return
        with contextlib.suppress(RunError):
            self.reply(run.message_id, str(text))

    async def _run_code(self, run: Run, did: str, m: Message, timeout: float | None,
                        stdin: Any = False) -> None:
        store = self.store
        res = None
        store.begin_stream(m.id)
        mark = store.last_version_row()  # what the cell changes through dialogue.here comes after
        m = m.copy(meta={k: v for k, v in m.meta.items() if k != "interrupted"})  # a new run
        flusher = _Flusher(store, run, self.host.flush_every)
        flushing = asyncio.get_running_loop().create_task(flusher.loop())
        ex = None
        extra: list[dict] = []
        try:
            kernel = await self.host.kernel(did)
            ex = run.execution = kernel.execute(m.source, timeout=timeout, allow_stdin=bool(stdin),
                                                cell_id=m.id)
            asking: set[asyncio.Task] = set()
            async for out in ex:
                if out.get("output_type") == "input_request":  # a question, not an output
                    q = {"prompt": out["prompt"], "password": out["password"]}
                    run.publish(RunEvent("input", m.id, q))
                    if callable(stdin):
                        t = asyncio.get_running_loop().create_task(self._answer(run, q, stdin))
                        asking.add(t)
                        t.add_done_callback(asking.discard)
                    continue
                run.publish(RunEvent("output", m.id, out))
            res = await ex
        except asyncio.CancelledError:
            if ex is not None:  # this run only: a run of another cell may hold the kernel
                await ex.interrupt()
        except Exception as e:  # the kernel could not start: say so on the message
            from .kernel import KernelError
            if not isinstance(e, KernelError):
                raise
            extra.append({"output_type": "error", "ename": type(e).__name__, "evalue": str(e),
                          "traceback": [str(e)]})
            run.publish(RunEvent("error", m.id, str(e)))
        finally:
            flushing.cancel()
            if res is not None:
                status, message = res.status, res.message
                if run.restarted and status == "died":
                    status, message = "restarted", run.restarted
                meta = {**m.meta, "run": {"status": status, "message": message,
                                          "duration": round(res.duration, 3)}}
                final = store.finish_stream(m.id, outputs=res.outputs,
                                            execution_count=res.execution_count, meta=meta)
                if status != "ok" and message:
                    run.publish(RunEvent("error", m.id, message))
            else:
                final = store.finish_stream(
                    m.id, outputs=stored_outputs(run.state.outputs + extra),
                    meta={**m.meta, "run": {"status": "interrupted"}})
            # the messages the cell changed (dialogue.here, from the kernel's process): a page
            # following the run shows them now, as it shows the model's changes
            for mid, first, gone, moved in store.caused_since(mark, m.id):
                run.publish(RunEvent("doc", m.id, {"op": "delete" if gone else "add" if first == 1
                                                   else "move" if moved else "edit", "id": mid}))
            self._finish(run, final)

    async def _run_prompt(self, run: Run, did: str, m: Message, prefill: str | None,
                          approve: Any = None, offer_tools: bool = True) -> None:
        from . import context
        from .llm.base import Progress, TextDelta, ToolCall, Usage, get_provider
        from .provenance import finish as finish_provenance, produced_by
        store = self.store
        d = store.get_dialogue(did)
        prefill = prefill or ""
        answer = Answer()
        provider = req = None
        meta = dict(m.meta)
        meta.pop("error", None)
        meta.pop("interrupted", None)  # a new answer: whatever cut off the last one is history
        meta.pop("provenance", None)
        prov: dict[str, Any] = {}
        store.begin_stream(m.id, response=prefill)
        flusher = _Flusher(store, run, self.host.flush_every)
        flushing = asyncio.get_running_loop().create_task(flusher.loop())

        async def events() -> AsyncIterator[Any]:
            # building the request inside the stream: its errors end the answer like the model's
            nonlocal provider, req
            provider = get_provider(d.model)
            kernel, req = await self.request(d, m, provider, d.meta.get("adapters"),
                                             tools_offered=None if offer_tools else False)
            req.prefill = prefill
            meta["refs"] = req.meta.get("refs", "")
            meta.pop("dropped", None)  # not a previous run's figures
            meta.pop("cut", None)
            if req.dropped:
                meta["dropped"] = req.dropped
            if req.meta.get("cut"):
                meta["cut"] = req.meta["cut"]  # the code outputs the model saw shortened
            tools = self.toolbox(d, m, kernel, req) if offer_tools else None
            if tools is not None and getattr(self.host, "mcp", None) is not None:
                from .mcptools import offer  # the MCP servers it enables (started on first use)
                await offer(self.host.mcp, d, tools, req, getattr(provider, "count_tokens", None))
            # what the toolbox holds is what is offered (none: --no-tools, or nothing to offer)
            req.tools = list(tools.specs) if tools else []
            if tools:
                from .tools import tool_loop
                run.gate = self._gate(run, did, tools, approve, meta)
                inner = tool_loop(provider, req, tools, approve=run.gate)
            else:
                inner = provider.stream(req)
            # what produced this answer (model and adapter hashes, sampling, tools offered)
            prov.update(await asyncio.to_thread(produced_by, req, provider, d.meta.get("adapters")))
            async with contextlib.aclosing(inner) as evs:
                async for ev in evs:
                    yield ev

        try:
            async for ev in follow(events(), answer):
                if isinstance(ev, TextDelta):
                    run.publish(RunEvent("text", m.id, ev.text))
                elif isinstance(ev, ToolCall):
                    run.publish(RunEvent("tool_call", m.id, answer.tool_calls[-1]))
                elif isinstance(ev, Progress):
                    run.publish(RunEvent("progress", m.id, {"read": ev.read, "total": ev.total,
                                                             "eta_s": ev.eta_s, "task": ev.task}))
                elif getattr(ev, "type", "") == "tool_result":
                    run.publish(RunEvent("tool_result", m.id, ev.to_dict()))
        except asyncio.CancelledError:
            pass  # follow recorded it: the answer ends where it is
        finally:
            flushing.cancel()
            if answer.error:
                meta["error"] = answer.error
                run.publish(RunEvent("error", m.id, answer.error))
            # a call still waiting for the user (Stop, a closed server) is stored as denied
            meta, answer.tool_calls = settle_pending(meta, answer.tool_calls,
                                                     pending=run.state.pending)
            usage = answer.usage or Usage()
            estimated = False
            if answer.stop_reason == "cancelled" and req is not None \
                    and not (usage.input or usage.output):
                # A stream stopped early never got the provider's usage report: count what was
                # sent and received ourselves, and say it is a count of ours.
                counted = provider.count_tokens(answer.text) if provider else None
                answer.usage = Usage(int(req.meta.get("tokens", 0)), counted if counted is not None
                                     else context.estimate_tokens(answer.text))
                estimated = True
            u = answer.record(d.model)
            if estimated:
                u["estimated"] = True
            if prov:
                meta["provenance"] = finish_provenance(prov, answer.tool_calls, answer.usage)
            final = store.finish_stream(m.id, response=prefill + answer.text,
                                        tool_calls=answer.tool_calls, usage=u, meta=meta)
            if req is not None:
                _keep_request(store, final, req, provider)
            self._finish(run, final)

    def _gate(self, run: Run, did: str, tools: Any, approve: Any, meta: dict[str, Any]) -> Any:
        """The approvals of one answer's tool calls (approvals.Gate): each approval event is
        published, and a pending one is written to the message at once, so a reloaded page,
        another process and a recovery after a crash all see it."""
        from .approvals import Gate
        store = self.store

        def event(data: dict[str, Any]) -> None:
            was = any(p.get("id") == data["id"] for p in run.state.pending)
            run.publish(RunEvent("approval", run.message_id, data))
            if "decision" not in data or was:  # the pending calls changed
                pending = run.state.pending
                store.stream_append(run.message_id, tool_calls=run.state.tool_calls,
                                    meta={**meta, "pending": pending} if pending else meta)

        return Gate(tools, approve,
                    settings=lambda: store.get_dialogue(did, with_messages=False).meta,
                    remember=lambda name: self.host.allow_tool(did, name), event=event)

    def toolbox(self, d: Dialogue, m: Message, kernel: Any, req: Any) -> Any:
        """The tools answering prompt `m` may call, each routed to where it runs: the kernel
        functions the dialogue references (&`fn`, already specified in `req.tools`), and the
        document tools the dialogue turned on (`meta["doc_tools"]`), acting for answer `m`."""
        from .tools import KernelTools, Toolbox
        box = Toolbox()
        if req.tools and kernel is not None:
            box.add(KernelTools(kernel), req.tools)
        if d.meta.get("doc_tools"):
            from .doc_tools import DocumentTools
            run = self.active.get(m.id)

            def changed(op: str, mid: str) -> None:  # a page following the answer shows it
                if run is not None:
                    run.publish(RunEvent("doc", m.id, {"op": op, "id": mid}))
            docs = DocumentTools(self.host, d.id, author="model", cause=m.id,
                                 enabled=d.meta["doc_tools"], on_change=changed)
            box.add(docs, docs.specs())
        return box

    async def request(self, d: Dialogue, m: Message, provider: Any,
                      adapters: Any, *, estimate: bool = False,
                      tools_offered: bool | None = None) -> tuple[Any, Any]:
        """The request answering prompt `m` of `d` (which must contain it), with `adapters` (a set
        {name or path: scale}, or None) resolved into `req.meta["adapters"]`. A kernel is started
        only when the prompt has references or the dialogue offers tools. `estimate`: the request
        as it would be sent, for counting, evaluating nothing (no kernel is started: $`x` may be
        slow and !`cmd` has effects), so references count without their values and tools by
        name only. `tools_offered`: whether the request will be sent with tools (False: the
        caller clears them); by default whether the answer's toolbox will offer any (the kernel
        functions referenced, the document tools, the MCP servers it enables), so earlier tool
        calls are replayed as tool turns exactly when tools are offered (see `context.build`)."""
        from . import context
        from .mcptools import enabled_names
        if tools_offered is None and (d.meta.get("doc_tools") or enabled_names(d)):
            tools_offered = True  # added to the toolbox after the build (`toolbox`, mcptools.offer)
        window = getattr(provider, "context_window", None)
        max_tokens = int(d.meta.get("max_tokens", getattr(provider, "default_max_tokens", 1024)))
        kw = dict(budget=(window - max_tokens) if window else None, max_tokens=max_tokens,
                  count_tokens=getattr(provider, "count_tokens", None),
                  folders=self.host.folder_context(d),  # its folders' notes, outermost first
                  tools_offered=tools_offered)
        _check_images(d, m, provider)
        needs_kernel = bool(context.references(m.source)) or bool(context.tool_names(d, m.id))
        if estimate:
            # off the event loop: a loaded local model counts each text over a pipe
            kernel, req = None, await asyncio.to_thread(
                context.build, d, m.id, resolved=_unevaluated(d, m) if needs_kernel else None, **kw)
        elif needs_kernel:
            kernel = await self.host.kernel(d.id)
            req = await context.build_async(d, m.id, kernel=kernel, **kw)
        else:
            kernel, req = None, context.build(d, m.id, **kw)
        if d.meta.get("sampling"):
            req.meta["sampling"] = d.meta["sampling"]  # the local model's repetition settings
        if d.meta.get("temperature") is not None:
            req.temperature = float(d.meta["temperature"])
        if d.meta.get("seed") is not None:
            req.meta["seed"] = int(d.meta["seed"])
        elif req.temperature and d.model.startswith("local:"):
            # a sampled local answer gets a seed of its own, recorded with it, so it can be replayed
            import secrets
            req.meta["seed"] = secrets.randbelow(2 ** 31)
        if adapters and any(_scale_of(v) for v in adapters.values()):
            # the adapter set {name or path: scale}, applied at run time on the quantized base
            # (never merged); the provider keys its KV cache by it. Reading a base's shapes the
            # first time takes seconds: off the event loop.
            req.meta["adapters"] = await asyncio.to_thread(self.host.resolve_adapters, d.model,
                                                           adapters)
        return kernel, req

    async def trial(self, d: Dialogue, source: str, *, adapters: Any,
                    max_tokens: int | None = None) -> AsyncIterator[Any]:
        """The provider's events answering `source` as a new prompt at the end of `d`, under
        `adapters`, with tools off, storing nothing (see DialogueService.trial)."""
        from .llm.base import get_provider
        if not source.strip():
            raise RunError("the prompt is empty")
        probe = Message(kind=Kind.prompt, source=source)
        d.messages = [*d.messages, probe]
        provider = get_provider(d.model)
        _, req = await self.request(d, probe, provider, adapters, tools_offered=False)
        req.tools = []
        if max_tokens is not None:
            req.max_tokens = int(max_tokens)
        async with contextlib.aclosing(provider.stream(req)) as evs:
            async for ev in evs:
                yield ev

    async def replay(self, d: Dialogue, m: Message,
                     on_text: Callable[[str], Any] | None = None) -> dict[str, Any]:
        """Answer prompt `m` of `d` again under the settings its answer's provenance records
        (model, adapter set, max tokens, temperature, seed, repetition settings, prefill), with
        the messages above it as they are now and tools off, storing nothing. Returns
        `provenance.compare`'s verdict plus "usage" and "error". `on_text` hears each piece."""
        from .llm.base import TextDelta, get_provider
        from .provenance import compare, produced_by, replay_settings
        then = m.meta.get("provenance")
        d.messages = d.messages[: d.index(m.id) + 1]
        if then:
            d.model = then.get("model") or d.model
        adapters = ((then.get("adapters") or {}).get("set") if then else d.meta.get("adapters"))
        provider = get_provider(d.model)
        _, req = await self.request(d, m, provider, adapters, tools_offered=False)
        req.tools = []
        if then:
            s = replay_settings(then)
            req.max_tokens = int(s["max_tokens"] or req.max_tokens)
            req.temperature = s["temperature"]
            for key in ("seed", "sampling"):
                if s[key] is None:
                    req.meta.pop(key, None)
                else:
                    req.meta[key] = s[key]
            req.prefill = then.get("prefill") or ""
        now = await asyncio.to_thread(produced_by, req, provider, adapters)
        answer = Answer()
        async for ev in follow(provider.stream(req), answer):
            if isinstance(ev, TextDelta) and on_text is not None:
                on_text(ev.text)
        out = compare(m.response, req.prefill + answer.text, then, now)
        out.update(message=m.id, usage=answer.record(d.model), error=answer.error,
                   provenance=now)
        return out

    # ------------------------------------------------------------ a dialogue top to bottom

    def start_all(self, d: Dialogue, todo: list[str], *, what: str = "message",
                  allow_errors: bool = False, on_start: Callable | None = None,
                  on_done: Callable | None = None, stdin: Any = False, approve: Any = None,
                  tools: bool = True) -> "RunAll":
        """Run the messages `todo` (ids of `d`) one after another in the background."""
        job = self.alls.get(d.id)
        if job is not None and not job.done:
            raise RunError("Run all is already running in this dialogue.")
        job = self.alls[d.id] = RunAll(self, d.id, todo, what=what, allow_errors=allow_errors,
                                       on_start=on_start, on_done=on_done)
        job.stdin = stdin
        job.approve, job.tools = approve, tools
        job.task = asyncio.get_running_loop().create_task(job._drive())
        return job


def _check_images(d: Dialogue, m: Message, provider: Any) -> None:
    """Refuse, before anything is evaluated or sent, a prompt whose visible notes and prompts
    hold images when the model cannot see them (`provider.sees_images`). Code outputs' images are
    not counted: they reach such a model as a mention, as they always have."""
    from .context import attached_images
    from .errors import ImagesNotSupportedError
    from .llm.catalog import sees_images
    # the provider knows best (a class attribute or property); else the catalog's rule, which
    # reads DIALOGUE_VISION_MODELS for a name it does not know
    if getattr(provider, "sees_images", None) or sees_images(d.model):
        return
    upto = d.messages[:d.index(m.id) + 1]
    found = attached_images([x for x in upto if not x.hidden or x.id == m.id])
    if not found:
        return
    n, where = len(found), sorted({f["message"] for f in found})
    names = ", ".join(f["name"] for f in found[:5]) + (", ..." if n > 5 else "")
    raise ImagesNotSupportedError(
        f"model {d.model} cannot see images; the prompt has {n} image{'s' if n != 1 else ''} "
        f"({names}) in message{'s' if len(where) != 1 else ''} {', '.join(where)}. Nothing was "
        "sent: choose a model that can (claude-*, gpt-4o and later; an openai-compatible one "
        "listed in DIALOGUE_VISION_MODELS), or hide those messages or remove the images.")


def _unevaluated(d: Dialogue, m: Message) -> Any:
    """Stand-ins for the values of prompt `m`'s references and its dialogue's tools: empty
    values, tools by name (see `Runs.request(estimate=True)`)."""
    from .context import Resolved, references, tool_names
    from .llm.base import ToolSpec
    refs = references(m.source)
    return Resolved(values=dict.fromkeys(refs.exprs, ""), shell=dict.fromkeys(refs.cmds, ""),
                    tools=[ToolSpec(n) for n in tool_names(d, m.id)])


def _keep_request(store: Any, final: Message, req: Any, provider: Any) -> None:
    """Record the request this answer was sent with (`sent.record`), beside its version. The
    answer is stored already: a record that cannot be made is logged, never the answer's loss.
    A tool loop's later steps send this request plus the calls and results the answer keeps."""
    from . import sent
    try:
        store.save_request(final.id, final.version, sent.record(req, provider))
    except Exception:
        log.exception("could not record the request of message %s", final.id)


class RunAll:
    """A dialogue run top to bottom: the messages to run, those started so far (a page puts each
    in its running state), the finished ones, and why it stopped early, if it did. Each message
    is an ordinary `Run`, so it is followed, stored and stopped like a single run."""

    def __init__(self, runs: Runs, did: str, todo: list[str], *, what: str = "message",
                 allow_errors: bool = False, on_start: Callable | None = None,
                 on_done: Callable | None = None):
        self.runs, self.did, self.todo, self.what = runs, did, list(todo), what
        self.allow_errors, self.on_start, self.on_done = allow_errors, on_start, on_done
        self.started: list[str] = []
        self.results: list[Message] = []  # the stored state of each message that ran
        self.failures: list[Message] = []
        self.done = False
        self.stopped = ""  # why it ended early, for the user
        self.error: Exception | None = None  # what ended it, if a run could not even start
        self.task: asyncio.Task | None = None
        self.stdin: Any = False  # how input() in its cells is answered (Runs.start)
        self.approve: Any = None  # how its prompts' tool calls are approved (approvals.py)
        self.tools = True  # whether its prompts offer tools
        self._signal = _Signal()

    def progress(self) -> tuple[int, int]:
        """(messages started, messages to run)."""
        return len(self.started), len(self.todo)

    async def changed(self) -> None:
        await self._signal.wait()

    async def wait(self) -> list[Message]:
        """The failures, once it is over; what kept a message from starting (another process
        writing it) is raised."""
        if self.task is not None:
            await asyncio.shield(self.task)
        if self.error is not None:
            raise self.error
        return self.failures

    async def stop(self) -> None:
        """Stop the message running now (as Stop does) and run no further one."""
        if self.done:
            return
        current = self.started[-1] if self.started else None
        self.stopped = "Run all was stopped."
        if self.task is not None:
            self.task.cancel()
        if current is not None:
            await self.runs.stop(current)
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self.task), 10)

    async def _drive(self) -> None:
        runs = self.runs
        try:
            for i, mid in enumerate(self.todo):
                while runs.running(mid):  # started by hand meanwhile: let it finish first
                    await asyncio.sleep(0.1)
                try:
                    m = runs.store.get_message(mid)
                except StoreError:  # deleted since the run began
                    continue
                if m.kind not in (Kind.code, Kind.prompt) or not m.source.strip():
                    continue
                if self.on_start:
                    self.on_start(i, len(self.todo), m)
                runs.start(self.did, mid, stdin=self.stdin, approve=self.approve, tools=self.tools)
                self.started.append(mid)
                self._signal.poke()
                final = await runs.wait(mid)
                self.results.append(final)
                if self.on_done:
                    self.on_done(i, len(self.todo), final)
                status = run_status(final)
                if status != "ok":
                    self.failures.append(final)
                    if not self.allow_errors:
                        self.stopped = (f"Run all stopped at {self.what} {i + 1} of "
                                        f"{len(self.todo)} ({status}).")
                        break
        except asyncio.CancelledError:
            self.stopped = self.stopped or "Run all was stopped."
            raise
        except Exception as e:  # noqa: BLE001 - told to a page; raised again by wait()
            self.error = e
            self.stopped = f"Run all failed: {e}"
        finally:
            self.done = True
            self._signal.poke()


def _scale_of(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 1.0  # not a number: resolve_set refuses it with a clear message


async def _no_events() -> AsyncIterator[Any]:
    return
    yield  # an async generator that yields nothing
