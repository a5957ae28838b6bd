"""The dialogue service: the one API that the web app, the CLI and Python code call.

Surfaces name dialogues by name or id and messages by id, a unique id prefix, or a 1-based
position; the service resolves those, applies defaults, and delegates persistence to the store.
Running code and prompts (kernel, providers) is added here as well, so that no surface talks to a
kernel or an SDK directly.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from .document import FLAGS, ContextItem, Dialogue, Kind, Message
from .store import NotFoundError, SearchHit, Store, StoreError, TrashItem, Version

if TYPE_CHECKING:
    from .kernel import Kernel, KernelPool

__all__ = ["DialogueService", "RunEvent", "RunError", "DEFAULT_MODEL", "default_model"]

DEFAULT_MODEL = "local:default"


def default_model() -> str:
    """`DIALOGUE_MODEL` if set, else the bundled local model: works offline, with no key."""
    return os.environ.get("DIALOGUE_MODEL") or DEFAULT_MODEL


DEFAULT_STOP_GRACE = 5.0


def _stop_grace() -> float:
    """`DIALOGUE_STOP_GRACE` (seconds) if set, else 5: how long Stop waits for an interrupted
    cell before it restarts the kernel."""
    v = os.environ.get("DIALOGUE_STOP_GRACE", "").strip()
    if not v:
        return DEFAULT_STOP_GRACE
    try:
        g = float(v)
        if 0 < g < float("inf"):
            return g
    except ValueError:
        pass
    # a StoreError, so every surface reports it in one line
    raise RunError(f"DIALOGUE_STOP_GRACE must be a positive number of seconds, got {v!r}")


class RunError(StoreError):
    """A message cannot be run as asked (a note, an empty prompt, already running)."""


@dataclass
class RunEvent:
    """What a surface hears while a message runs.

    type: "output" (data: an nbformat output, or a clear_output / update_display_data control),
    "text" (data: a piece of the model's answer), "tool_call" / "tool_result" (data: dicts),
    "progress" (data: {"read", "total", "eta_s"}: how far a local model has read the prompt),
    "error" (data: a message for the user), and last "done" (data: the stored Message)."""

    type: str
    message_id: str
    data: Any = None


@dataclass
class _Run:
    message_id: str
    dialogue_id: str
    kind: Kind
    task: asyncio.Task | None = None
    subscribers: list[asyncio.Queue] = field(default_factory=list)

    finished: bool = False
    execution: Any = None  # the kernel's Execution of a code run, once it has one
    stopping: asyncio.Task | None = None  # a Stop in progress (a second Stop joins it)
    restarted: str = ""  # why Stop restarted the kernel under this run, if it did

    def publish(self, ev: RunEvent) -> None:
        for q in self.subscribers:
            q.put_nowait(ev)


class _Pending:
    """What a run produced since its last write to the store. A flusher task writes it every
    `every` seconds, so a cell that prints and then computes for a minute has its print on disk
    (and in a reopened tab) within that time, while a model's tokens cost one write per interval,
    not one per token."""

    def __init__(self, store: Store, msg_id: str, every: float):
        self.store, self.msg_id, self.every = store, msg_id, every
        self.text = ""
        self.outputs: list[dict] | None = None  # the whole list, when it changed

    def flush(self) -> None:
        if self.text:
            self.store.stream_append(self.msg_id, text=self.text)
            self.text = ""
        if self.outputs is not None:
            self.store.stream_append(self.msg_id, outputs=self.outputs)
            self.outputs = None

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.flush()


class DialogueService:
    # Streamed text and outputs are written to the store at most this often (seconds): each write
    # is a transaction, and a model emits tokens faster than a page needs them on disk.
    flush_every = 0.1

    def __init__(self, store: Store | str | os.PathLike | None = None, *,
                 kernel_idle_timeout: float | None = 3600.0, run_timeout: float | None = None,
                 stop_grace: float | None = None):
        stop_grace = _stop_grace() if stop_grace is None else stop_grace
        if not 0 < stop_grace < float("inf"):
            raise ValueError(f"stop_grace must be a positive number of seconds, got {stop_grace}")
        self.store = store if isinstance(store, Store) else Store(store)
        self.kernel_idle_timeout = kernel_idle_timeout
        self.run_timeout = run_timeout
        # Seconds a cell gets to stop after Stop interrupts it before its kernel is restarted.
        self.stop_grace = stop_grace
        self._kernels: "KernelPool | None" = None
        self._runs: dict[str, _Run] = {}

    def close(self) -> None:
        self.store.close()

    async def shutdown_kernels(self) -> None:
        """Stop every run and kernel; the store stays open."""
        for r in list(self._runs.values()):
            if r.task:
                r.task.cancel()
        await asyncio.gather(*(r.task for r in list(self._runs.values()) if r.task),
                             return_exceptions=True)
        if self._kernels is not None:
            await self._kernels.shutdown_all()

    async def aclose(self) -> None:
        """Stop every run and kernel, then close the store."""
        await self.shutdown_kernels()
        self.close()

    # ------------------------------------------------------------ resolving references

    def dialogue_id(self, ref: str | Dialogue) -> str:
        return ref.id if isinstance(ref, Dialogue) else self.store.find_dialogue(ref)

    def message_id(self, dialogue: str | Dialogue, ref: str | Message) -> str:
        """A message id from an id, a unique prefix of one (4+ characters), or a 1-based position
        in the dialogue ("1" is the first message, "-1" the last)."""
        if isinstance(ref, Message):
            return ref.id
        msgs = self.store.messages(self.dialogue_id(dialogue))
        ref = str(ref).strip()
        # A short all-digit ref is a position, even where a message's id is the same string (an
        # older import kept a cell id "1"): ids we make always hold a letter and imports replace
        # any other id (trust.is_local_id). Older stores may still hold all-digit 8-character ids,
        # so a 4+ character ref that is a prefix of an id is that id ("89253" of "89253012").
        prefix_hit = len(ref) >= 4 and any(m.id.startswith(ref) for m in msgs)
        position = ref.lstrip("-").isdigit() and len(ref) < 8 and not prefix_hit
        if not position and any(m.id == ref for m in msgs):
            return ref
        if position:
            i = int(ref)
            if i == 0 or abs(i) > len(msgs):
                raise NotFoundError(f"no message at position {ref} (the dialogue has {len(msgs)})")
            return msgs[i - 1 if i > 0 else i].id
        hits = [m.id for m in msgs if len(ref) >= 4 and m.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise NotFoundError(f"message id prefix {ref!r} is ambiguous: {', '.join(hits)}")
        raise NotFoundError(f"no message {ref!r} in this dialogue")

    # ------------------------------------------------------------ dialogues

    def create(self, name: str, *, model: str | None = None, system: str = "",
               context: list[ContextItem] | None = None, meta: dict | None = None) -> Dialogue:
        return self.store.create_dialogue(name, model=model or default_model(), system=system,
                                          context=context, meta=meta)

    def open(self, ref: str) -> Dialogue:
        # A page or `show` of a dialogue says so when the process writing one of its messages
        # died since the store was opened (a killed `dialogue ask`); an indexed lookup when not.
        self.store.recover_interrupted()
        return self.store.get_dialogue(self.dialogue_id(ref))

    def list(self, *, deleted: bool = False) -> list[dict[str, Any]]:
        return self.store.list_dialogues(deleted=deleted)

    def rename(self, ref: str, new_name: str, *, base_version: int | None = None) -> Dialogue:
        return self.update(ref, base_version=base_version, name=new_name)

    def update(self, ref: str, *, base_version: int | None = None, **settings: Any) -> Dialogue:
        """Change name, model, system, attached context, meta, or `output_limit` (how much of
        long code outputs the model sees, kept in meta: see context.parse_output_limit; a bad
        value is refused now, not at the next prompt). Without `base_version` the current
        version is used: fine for a one-shot CLI command, while a long-lived surface (a browser
        tab) passes the version it showed the user."""
        did = self.dialogue_id(ref)
        if "output_limit" in settings or "output_limit" in (settings.get("meta") or {}):
            from .context import with_output_limit
            meta = settings.get("meta")
            if meta is None:
                meta = self.store.get_dialogue(did, with_messages=False).meta
            settings["meta"] = with_output_limit(
                meta, settings.pop("output_limit", meta.get("output_limit", "default")))
        if base_version is None:
            base_version = self.store.get_dialogue(did, with_messages=False).version
        return self.store.update_dialogue(did, base_version=base_version, **settings)

    def attach(self, ref: str, name: str, content: str, *, kind: str = "text",
               source: str = "") -> Dialogue:
        d = self.open(ref)
        items = [c for c in d.context if c.name != name] + [ContextItem(name, content, kind, source)]
        return self.store.update_dialogue(d.id, base_version=d.version, context=items)

    def attach_file(self, ref: str, path: str | os.PathLike) -> Dialogue:
        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"cannot attach {p}: {e}") from e
        return self.attach(ref, p.name, text, kind="file", source=str(p.resolve()))

    def import_dialogue(self, doc: Dialogue, *, name: str | None = None,
                        trust: bool = False) -> Dialogue:
        """Store a dialogue read from elsewhere (a notebook), messages and all, in one
        transaction: either all of it is created or nothing is.

        The file is data, not configuration (`trust.vet_import`): its model is kept only when the
        user configured it, its system prompt only with `trust=True`, and its ids never address
        anything (the dialogue gets a fresh id). What was set aside is in the returned dialogue's
        ``meta["import"]``, with ``["warnings"]`` to show the user (`trust.import_record`)."""
        from .trust import vet_import
        safe = vet_import(doc, default_model=default_model(), trust=trust).dialogue
        with self.store.tx():
            d = self.store.create_dialogue(name or safe.name, model=safe.model,
                                           system=safe.system, context=safe.context,
                                           meta=safe.meta)
            self.store.add_messages(d.id, safe.messages, op="import")
        return self.store.get_dialogue(d.id)

    def delete(self, ref: str) -> None:
        self.store.delete_dialogue(self.dialogue_id(ref))

    def restore(self, ref: str) -> Dialogue:
        """Bring back a trashed dialogue by id or by name (the most recently deleted of that name)."""
        trashed = [t for t in self.store.trash() if t.type == "dialogue" and ref in (t.id, t.name)]
        if not trashed:
            raise NotFoundError(f"no dialogue {ref!r} in the trash")
        return self.store.restore_dialogue(trashed[0].id)

    def fork(self, ref: str, at: str, *, name: str | None = None) -> Dialogue:
        did = self.dialogue_id(ref)
        return self.store.fork(did, self.message_id(did, at), name=name)

    def search(self, query: str, *, limit: int = 50, dialogue: str | None = None) -> list[SearchHit]:
        return self.store.search(query, limit=limit,
                                 dialogue_id=self.dialogue_id(dialogue) if dialogue else None)

    def trash(self) -> list[TrashItem]:
        return self.store.trash()

    # ------------------------------------------------------------ messages

    def add(self, ref: str, kind: str | Kind, source: str = "", *, after: str | None = None,
            before: str | None = None, index: int | None = None, **fields: Any) -> Message:
        did = self.dialogue_id(ref)
        msg = Message(kind=kind, source=source, **fields)
        return self.store.add_message(
            did, msg, after=self.message_id(did, after) if after else None,
            before=self.message_id(did, before) if before else None, index=index)

    def message(self, ref: str, msg: str) -> Message:
        return self.store.get_message(self.message_id(ref, msg))

    def edit(self, ref: str, msg: str, *, base_version: int | None, **changes: Any) -> Message:
        """Change a message. `base_version` is the version the change was based on: a stale one is
        refused with ConflictError. None means "the current one" (one-shot CLI use only)."""
        mid = self.message_id(ref, msg)
        if base_version is None:
            base_version = self.store.get_message(mid).version
        return self.store.update_message(mid, base_version=base_version, **changes)

    def set_flags(self, ref: str, msg: str, *, base_version: int | None = None,
                  **flags: bool) -> Message:
        mid = self.message_id(ref, msg)
        if base_version is None:
            base_version = self.store.get_message(mid).version
        return self.store.set_flags(mid, base_version=base_version, **flags)

    def move(self, ref: str, msg: str, *, to: int | None = None, by: int | None = None) -> Message:
        """Move to a 0-based index `to`, or up (`by` < 0) / down (`by` > 0)."""
        mid = self.message_id(ref, msg)
        if (to is None) == (by is None):
            raise StoreError("give exactly one of a target position or a number of places to move")
        return self.store.move_message(mid, to) if to is not None else self.store.move_by(mid, by)

    def delete_message(self, ref: str, msg: str, *, base_version: int | None = None) -> None:
        self.store.delete_message(self.message_id(ref, msg), base_version=base_version)

    def restore_message(self, ref: str, msg: str) -> Message:
        did = self.dialogue_id(ref)
        hits = [t.id for t in self.store.trash()
                if t.type == "message" and t.dialogue_id == did and t.id.startswith(str(msg))]
        if len(hits) != 1:
            raise NotFoundError(f"no single message {msg!r} of this dialogue in the trash"
                                + (f" (matches: {', '.join(hits)})" if hits else ""))
        return self.store.restore_message(hits[0])

    def history(self, ref: str, msg: str) -> list[Version]:
        return self.store.history(self.message_id(ref, msg))

    def restore_version(self, ref: str, msg: str, version: int, *,
                        base_version: int | None = None) -> Message:
        mid = self.message_id(ref, msg)
        if base_version is None:
            base_version = self.store.get_message(mid).version
        return self.store.restore_version(mid, version, base_version=base_version)


    # ------------------------------------------------------------ kernels

    @property
    def kernels(self) -> "KernelPool":
        if self._kernels is None:
            from .kernel import KernelPool  # jupyter_client is slow to import: only when needed
            self._kernels = KernelPool(idle_timeout=self.kernel_idle_timeout)
        return self._kernels

    async def kernel(self, ref: str) -> "Kernel":
        return await self.kernels.get(self.dialogue_id(ref))

    def kernel_status(self, ref: str) -> str:
        """none (not started) | idle | busy | dead."""
        k = self._kernels.peek(self.dialogue_id(ref)) if self._kernels else None
        if k is None:
            return "none"
        if not k.is_alive:
            return "dead"
        return "busy" if k.busy else "idle"

    async def interrupt(self, ref: str) -> None:
        k = self._kernels.peek(self.dialogue_id(ref)) if self._kernels else None
        if k is not None:
            await k.interrupt()

    async def restart(self, ref: str) -> None:
        did = self.dialogue_id(ref)
        k = self._kernels.peek(did) if self._kernels else None
        if k is not None:
            await k.restart()
        else:
            await self.kernels.get(did)

    # ------------------------------------------------------------ running messages

    def running(self, msg_id: str) -> bool:
        return msg_id in self._runs

    def start(self, ref: str, msg: str, *, prefill: str | None = None,
              timeout: float | None = None) -> str:
        """Start running a code message in the dialogue's kernel, or sending a prompt to the
        dialogue's model, in the background; returns the message id. The run goes on if every
        listener goes away (a closed tab): what it produces is written to the store as it
        arrives. Listen with `subscribe`, stop with `stop`."""
        did = self.dialogue_id(ref)
        mid = self.message_id(did, msg)
        if mid in self._runs:
            raise RunError(f"message {mid} is already running")
        if who := self.store.stream_writer(mid):
            raise RunError(f"message {mid} is being written by {who}; wait for it to finish, "
                           "or stop it there")
        m = self.store.get_message(mid)
        if m.kind == Kind.code:
            coro = self._run_code(did, m, timeout if timeout is not None else self.run_timeout)
        elif m.kind == Kind.prompt:
            if not m.source.strip():
                raise RunError("the prompt is empty")
            coro = self._run_prompt(did, m, prefill)
        else:
            raise RunError(f"a {m.kind.value} message does not run")
        run = self._runs[mid] = _Run(mid, did, m.kind)
        run.task = asyncio.get_running_loop().create_task(self._guard(run, coro))
        return mid

    async def _guard(self, run: _Run, coro: Any) -> None:
        """Whatever happens inside a run, listeners hear "done" exactly once, after the run has
        left the running set."""
        try:
            await coro
        except StoreError:  # the message went away under the run (deleted in another tab)
            pass
        finally:
            self._runs.pop(run.message_id, None)
            if not run.finished:
                with contextlib.suppress(StoreError):
                    self._finish(run, self.store.get_message(run.message_id, deleted_ok=True))

    def _finish(self, run: _Run, final: Message) -> None:
        self._runs.pop(run.message_id, None)  # not running any more when listeners hear "done"
        run.finished = True
        run.publish(RunEvent("done", run.message_id, final))

    def subscribe(self, msg_id: str) -> AsyncIterator[RunEvent]:
        """Events of the run of `msg_id` from now on, ending with "done"; nothing if it is not
        running (read the store for its state). The call itself registers the listener, not the
        first iteration: a listener that a task drains later (the web relay) misses nothing the
        run publishes before that task runs."""
        run = self._runs.get(msg_id)
        if run is None or run.finished:
            return _no_events()
        q: asyncio.Queue = asyncio.Queue()
        run.subscribers.append(q)
        return self._drain(run, q)

    @staticmethod
    async def _drain(run: _Run, q: asyncio.Queue) -> AsyncIterator[RunEvent]:
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.type == "done":
                    return
        finally:
            with contextlib.suppress(ValueError):
                run.subscribers.remove(q)

    async def wait(self, msg_id: str) -> Message:
        run = self._runs.get(msg_id)
        if run is not None and run.task is not None:
            await asyncio.shield(run.task)
        return self.store.get_message(msg_id)

    async def run(self, ref: str, msg: str, *, prefill: str | None = None,
                  timeout: float | None = None) -> Message:
        """Run a message and wait for the stored result."""
        return await self.wait(self.start(ref, msg, prefill=prefill, timeout=timeout))

    async def stop(self, msg_id: str) -> None:
        """Stop a run: interrupt a running cell, end a model's answer where it is. What was
        produced so far is kept.

        An interrupt is a KeyboardInterrupt, which a cell can catch and ignore, or never see
        (stuck in C code). A cell still running `stop_grace` seconds after the interrupt is
        ended by restarting its kernel: its variables are lost, and the cell's status says so
        (`meta.run.status == "restarted"`, with a message). A cell still waiting for its turn
        behind another run never runs; the other run is left alone."""
        run = self._runs.get(msg_id)
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

    async def _stop_code(self, run: _Run) -> None:
        ex = run.execution
        if ex is not None:
            await ex.interrupt()
        elif run.task is not None:  # still waiting for its kernel to start
            run.task.cancel()
        if run.task is None:
            return
        await asyncio.wait([run.task], timeout=self.stop_grace)
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
                f"Stop: the cell was still running {self.stop_grace:g} s after it was "
                "interrupted (it caught KeyboardInterrupt, or was stuck where Python cannot "
                "interrupt it), so the kernel was restarted; its variables are lost.")
            await ex.kernel.restart()
        await asyncio.wait([run.task], timeout=10)

    async def run_all(self, ref: str, *, above: str | None = None,
                      stop_on_error: bool = True) -> list[Message]:
        """Run the code messages in order (only those above `above` when given)."""
        d = self.open(ref)
        msgs = d.above(self.message_id(d.id, above)) if above else d.messages
        done = []
        for m in msgs:
            if m.kind != Kind.code or not m.source.strip():
                continue
            r = await self.run(d.id, m.id)
            done.append(r)
            if stop_on_error and r.meta.get("run", {}).get("status", "ok") != "ok":
                break
        return done

    @staticmethod
    def run_status(m: Message) -> str:
        """ok | error | died | timeout | interrupted | restarted (Stop had to restart the
        kernel) | cancelled, for the last run of a code message or prompt."""
        if m.kind == Kind.prompt:
            if m.meta.get("error"):
                return "error"
            if m.meta.get("interrupted"):  # the process writing it died (recover_interrupted)
                return "interrupted"
            return "cancelled" if m.usage.get("stop_reason") == "cancelled" else "ok"
        return m.meta.get("run", {}).get("status", "ok")

    async def run_through(self, ref: str, *, allow_errors: bool = False,
                          on_start: Any = None, on_done: Any = None) -> list[Message]:
        """The headless run: every code message and prompt, top to bottom, like
        `jupyter nbconvert --execute`. Stops at the first failure unless `allow_errors`; a kernel
        that dies is then replaced by a fresh one for the next message. Returns the failures."""
        d = self.open(ref)
        todo = [m for m in d.messages if m.kind in (Kind.code, Kind.prompt) and m.source.strip()]
        failures = []
        for i, m in enumerate(todo):
            if on_start:
                on_start(i, len(todo), m)
            r = await self.run(d.id, m.id)
            if on_done:
                on_done(i, len(todo), r)
            if self.run_status(r) != "ok":
                failures.append(r)
                if not allow_errors:
                    break
        return failures

    async def _run_code(self, did: str, m: Message, timeout: float | None) -> None:
        run = self._runs[m.id]
        outputs: list[dict] = []
        res = None
        self.store.begin_stream(m.id)
        m = m.copy(meta={k: v for k, v in m.meta.items() if k != "interrupted"})  # a new run
        pending = _Pending(self.store, m.id, self.flush_every)
        flusher = asyncio.get_running_loop().create_task(pending.loop())
        ex = None
        try:
            kernel = await self.kernels.get(did)
            ex = run.execution = kernel.execute(m.source, timeout=timeout)
            async for out in ex:
                t = out.get("output_type")
                if t == "clear_output":
                    outputs.clear()
                elif t == "update_display_data":
                    display = out.get("display_id")
                    for o in outputs:
                        if o.get("transient", {}).get("display_id") == display or \
                                o.get("metadata", {}).get("display_id") == display:
                            o["data"], o["metadata"] = out.get("data", {}), out.get("metadata", {})
                else:
                    outputs.append(out)
                pending.outputs = outputs
                run.publish(RunEvent("output", m.id, out))
            res = await ex
        except asyncio.CancelledError:
            if ex is not None:  # this run only: a run of another cell may hold the kernel
                await ex.interrupt()
        except Exception as e:  # the kernel could not start: say so on the message
            from .kernel import KernelError
            if not isinstance(e, KernelError):
                raise
            outputs.append({"output_type": "error", "ename": type(e).__name__, "evalue": str(e),
                            "traceback": [str(e)]})
            run.publish(RunEvent("error", m.id, str(e)))
        finally:
            flusher.cancel()
            if res is not None:
                status, message = res.status, res.message
                if run.restarted and status == "died":
                    status, message = "restarted", run.restarted
                meta = {**m.meta, "run": {"status": status, "message": message,
                                          "duration": round(res.duration, 3)}}
                final = self.store.finish_stream(m.id, outputs=res.outputs,
                                                 execution_count=res.execution_count, meta=meta)
                if status != "ok" and message:
                    run.publish(RunEvent("error", m.id, message))
            else:
                final = self.store.finish_stream(
                    m.id, outputs=outputs, meta={**m.meta, "run": {"status": "interrupted"}})
            self._finish(run, final)

    async def _request(self, d: Dialogue, m: Message, provider: Any,
                       adapters: Any) -> tuple["Kernel | None", Any]:
        """The request answering prompt `m` of `d` (which must contain it), with `adapters` (a set
        {name or path: scale}, or None) resolved into `req.meta["adapters"]`. A kernel is started
        only when the prompt has references or the dialogue offers tools."""
        from . import context
        window = getattr(provider, "context_window", None)
        max_tokens = int(d.meta.get("max_tokens", getattr(provider, "default_max_tokens", 1024)))
        kw = dict(budget=(window - max_tokens) if window else None, max_tokens=max_tokens,
                  count_tokens=getattr(provider, "count_tokens", None))
        needs_kernel = bool(context.references(m.source)) or bool(context.tool_names(d, m.id))
        if needs_kernel:
            kernel = await self.kernels.get(d.id)
            req = await context.build_async(d, m.id, kernel=kernel, **kw)
        else:
            kernel, req = None, context.build(d, m.id, **kw)
        if d.meta.get("sampling"):
            req.meta["sampling"] = d.meta["sampling"]  # the local model's repetition settings
        if adapters and any(_scale_of(v) for v in adapters.values()):
            # the adapter set {name or path: scale}, applied at run time on the quantized base
            # (never merged); the provider keys its KV cache by it. Reading a base's shapes the
            # first time takes seconds: off the event loop.
            req.meta["adapters"] = await asyncio.to_thread(self.resolve_adapters, d.model, adapters)
        return kernel, req

    @staticmethod
    def resolve_adapters(model: str, adapters: Any) -> dict[str, float]:
        """{name or path: scale} -> {file: scale} for `model`, refusing what does not fit. Pure
        (no store access), so a server may call it in a worker thread."""
        from .llm.base import ProviderError
        if not model.startswith("local:"):
            raise ProviderError(f"adapters apply to local models only, not {model}: choose a "
                                "local model or clear the dialogue's adapters")
        from .local.adapters import resolve_set
        return resolve_set(adapters, base=model)

    # -- adapters ---------------------------------------------------------------------------

    def adapters(self, ref: str) -> dict[str, float]:
        """The dialogue's adapter set {registered name or .gguf path: scale}; 0 = listed but off."""
        return dict(self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
                    .meta.get("adapters") or {})

    def set_adapters(self, ref: str, adapters: Any, *, base_version: int | None = None) -> Dialogue:
        """Choose the dialogue's LoRA adapters: {registered name or .gguf path: scale}.

        Checked now, not at the next prompt: an unknown name raises UnknownAdapterError, an
        adapter that does not fit the dialogue's local model AdapterMismatchError, a non-local
        model with a non-empty set ProviderError. A scale of 0 keeps an adapter listed but off.
        None or {} clears the set. A versioned settings change like a model change; a stale
        `base_version` raises ConflictError."""
        did = self.dialogue_id(ref)
        d = self.store.get_dialogue(did, with_messages=False)
        if base_version is None:
            base_version = d.version
        clean: dict[str, float] = {}
        if adapters:
            if not hasattr(adapters, "items"):
                raise _adapter_error()(
                    f"an adapter set is a mapping {{name: scale}}, got {type(adapters).__name__}")
            from .local.adapters import _scale
            clean = {str(k).strip(): _scale(str(k), v) for k, v in adapters.items()}
            if "" in clean:
                raise _adapter_error()("an adapter name cannot be empty")
            self.resolve_adapters(d.model, clean)
        meta = dict(d.meta)
        if clean:
            meta["adapters"] = clean
        else:
            meta.pop("adapters", None)
        return self.store.update_dialogue(did, base_version=base_version, op="adapters", meta=meta)

    def adapter_choices(self, ref: str) -> list[Any]:
        """Registered adapters (AdapterInfo) that fit the dialogue's local model; [] for any other
        model. An adapter registered on another file of the same architecture and shapes fits."""
        d = self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
        if not d.model.startswith("local:"):
            return []
        from .local import adapters as A
        from .local.models import resolve as resolve_model
        spec = resolve_model(d.model)
        base_hash = A.model_hash(spec.path)
        out = []
        for info in A.list_adapters():
            if info.base_hash == base_hash:
                out.append(info)
                continue
            try:
                A.check_against_base(A.read_lora(info.path), spec)
            except (A.AdapterError, OSError):
                continue
            out.append(info)
        return out

    async def trial(self, ref: str, source: str, *, adapters: Any,
                    max_tokens: int | None = None) -> AsyncIterator[Any]:
        """Answer `source` as if it were a new prompt at the end of the dialogue, under the given
        adapter set (not the dialogue's), with tools off, storing nothing: the way to compare
        adapter sets side by side before choosing one. Yields the provider's events (TextDelta,
        Usage, Done). Bad input (unknown adapter, wrong base, an unknown model, a context error)
        raises before the first event."""
        from .llm.base import get_provider
        if not source.strip():
            raise RunError("the prompt is empty")
        d = self.store.get_dialogue(self.dialogue_id(ref))
        probe = Message(kind=Kind.prompt, source=source)
        d.messages = [*d.messages, probe]
        provider = get_provider(d.model)
        _, req = await self._request(d, probe, provider, adapters)
        req.tools = []
        if max_tokens is not None:
            req.max_tokens = int(max_tokens)
        async with contextlib.aclosing(provider.stream(req)) as evs:
            async for ev in evs:
                yield ev

    async def _run_prompt(self, did: str, m: Message, prefill: str | None) -> None:
        from . import context
        from .llm.base import Done, Progress, ProviderError, TextDelta, ToolCall, Usage, cost, get_provider
        run = self._runs[m.id]
        d = self.store.get_dialogue(did)
        prefill = prefill or ""
        text: list[str] = []
        tool_calls: list[dict] = []
        usage = Usage()
        stop_reason, error = "end", ""
        provider = req = None
        meta = dict(m.meta)
        meta.pop("error", None)
        meta.pop("interrupted", None)  # a new answer: whatever cut off the last one is history
        self.store.begin_stream(m.id, response=prefill)
        pending = _Pending(self.store, m.id, self.flush_every)
        flusher = asyncio.get_running_loop().create_task(pending.loop())
        try:
            provider = get_provider(d.model)
            kernel, req = await self._request(d, m, provider, d.meta.get("adapters"))
            req.prefill = prefill
            meta["refs"] = req.meta.get("refs", "")
            meta.pop("dropped", None)  # not a previous run's figures
            meta.pop("cut", None)
            if req.dropped:
                meta["dropped"] = req.dropped
            if req.meta.get("cut"):
                meta["cut"] = req.meta["cut"]  # the code outputs the model saw shortened
            if req.tools and kernel is not None:
                from .tools import tool_loop
                events = tool_loop(provider, req, kernel)
            else:
                events = provider.stream(req)
            async with contextlib.aclosing(events) as evs:
                async for ev in evs:
                    if isinstance(ev, TextDelta):
                        text.append(ev.text)
                        pending.text += ev.text
                        run.publish(RunEvent("text", m.id, ev.text))
                    elif isinstance(ev, ToolCall):
                        tool_calls.append({"id": ev.id, "name": ev.name, "arguments": ev.arguments})
                        run.publish(RunEvent("tool_call", m.id, tool_calls[-1]))
                    elif isinstance(ev, Usage):
                        usage = usage + ev
                    elif isinstance(ev, Done):
                        stop_reason = ev.stop_reason
                    elif isinstance(ev, Progress):
                        run.publish(RunEvent("progress", m.id, {"read": ev.read, "total": ev.total,
                                                                 "eta_s": ev.eta_s}))
                    elif getattr(ev, "type", "") == "tool_result":
                        for c in tool_calls:
                            if c["id"] == ev.id:
                                c.update(result=ev.result, error=ev.error)
                        run.publish(RunEvent("tool_result", m.id, ev.to_dict()))
        except asyncio.CancelledError:
            stop_reason = "cancelled"
        except (ProviderError, context.ContextError, StoreError, ValueError) as e:
            stop_reason, error = "error", str(e)
        except Exception as e:  # a kernel that failed to start for references or tools
            from .kernel import KernelError
            if not isinstance(e, KernelError):
                raise
            stop_reason, error = "error", str(e)
        finally:
            flusher.cancel()
            if error:
                meta["error"] = error
                run.publish(RunEvent("error", m.id, error))
            u: dict[str, Any] = {**usage.counts(), "model": d.model, "stop_reason": stop_reason}
            if stop_reason == "cancelled" and req is not None and not (usage.input or usage.output):
                # A stream stopped early never got the provider's usage report: count what was
                # sent and received ourselves, and say it is a count of ours.
                counted = provider.count_tokens("".join(text)) if provider else None
                u.update(input=int(req.meta.get("tokens", 0)), estimated=True,
                         output=counted if counted is not None else
                         context.estimate_tokens("".join(text)))
                usage = Usage(u["input"], u["output"])
            u["cost"] = cost(d.model, usage)
            final = self.store.finish_stream(m.id, response=prefill + "".join(text),
                                             tool_calls=tool_calls, usage=u, meta=meta)
            self._finish(run, final)


async def _no_events() -> AsyncIterator[RunEvent]:
    return
    yield  # an async generator that yields nothing


def _scale_of(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 1.0  # not a number: resolve_set refuses it with a clear message


def _adapter_error() -> type[Exception]:
    from .local.adapters import AdapterError
    return AdapterError


def flag_changes(**opts: bool | None) -> dict[str, bool]:
    """The flags that an option set mentions (None = leave as is)."""
    return {f: v for f, v in opts.items() if f in FLAGS and v is not None}
