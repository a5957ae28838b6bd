"""The Python API: `from dialogue import Dialogue`.

    d = Dialogue.create("scratch")
    m = d.add_code("1+1")
    d.run(m).outputs
    d.ask("What is 1+1?").response
    d.messages

A `Dialogue` here is a live handle on a stored dialogue (every read goes to the store, every write
is versioned); `dialogue.document.Dialogue` is the plain data it reads. Edits pass the version of
the message they were made from, so an edit based on a stale copy raises `ConflictError` instead of
overwriting someone else's change.

Running (`run`, `ask`, `run_all`) is synchronous: it works the same in a script and in Jupyter,
whose own event loop is busy running the cell. The runs go to a private event loop in a daemon
thread, with a service of its own on the same database file (SQLite serializes the two
connections' writes, as it does a CLI's and a server's), so the caller's thread never shares a
connection with a run that is writing.
"""
from __future__ import annotations

import asyncio
import html
import os
import queue
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Callable, Iterable

from . import document
from .document import Kind, Message
from .service import DialogueService, SearchHit, TextDelta, Version, default_db_path, mode_of

__all__ = ["Dialogue", "AnswerStream", "service", "shutdown"]

_services: dict[Path, DialogueService] = {}


def service(db: str | os.PathLike | None = None) -> DialogueService:
    """The process's service for a database file (one connection per file)."""
    path = Path(db).expanduser().resolve() if db else default_db_path().resolve()
    if path not in _services:
        _services[path] = DialogueService(path)
    return _services[path]


class _Runner:
    """An event loop in a daemon thread and a service of its own on one database file: where the
    API's runs happen (kernels, the model), so that a synchronous call works under a running loop
    (Jupyter's) as well as in a script."""

    def __init__(self, path: Path):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dialogue-runs",
                                       daemon=True)
        self.thread.start()

        async def make() -> DialogueService:
            return DialogueService(path)
        self.svc = self.call(lambda: make())

    def call(self, work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a coroutine on the loop and wait for its result (its exception is raised here).
        Ctrl+C while waiting cancels it there (a run in flight is stopped, as Stop does)."""
        fut = asyncio.run_coroutine_threadsafe(work(), self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise


_runners: dict[Path, _Runner] = {}
_runners_lock = threading.Lock()


def _runner(path: Path) -> _Runner:
    with _runners_lock:
        if path not in _runners:
            _runners[path] = _Runner(path)
        return _runners[path]


def shutdown() -> None:
    """Stop every run and kernel the API started, and close their services (a process exiting
    does this by itself: kernels end with it)."""
    with _runners_lock:
        runners = list(_runners.values())
        _runners.clear()
    for r in runners:
        r.call(lambda r=r: r.svc.aclose())
        r.loop.call_soon_threadsafe(r.loop.stop)
        r.thread.join(10)


class AnswerStream:
    """The answer to `Dialogue.ask(..., stream=True)`: iterate it for the text as the model
    writes it; `message` is the stored prompt with its answer once the iteration is over.
    Leaving the loop early (break) ends the answer where it is, as Stop does: what was written
    is kept."""

    def __init__(self, runner: _Runner, did: str, mid: str, prefill: str | None,
                 approve: Any = None, tools: bool = True):
        self._runner, self._did, self._mid = runner, did, mid
        self._q: queue.Queue = queue.Queue()
        self.message: Message | None = None
        self._done = False
        self._approve, self._tools = approve, tools
        runner.call(lambda: self._start(prefill))

    async def _start(self, prefill: str | None) -> None:
        svc = self._runner.svc
        svc.start(self._did, self._mid, prefill=prefill, approve=self._approve, tools=self._tools)

        async def pump() -> None:
            try:
                async for ev in svc.subscribe(self._mid):
                    if ev.type == "text":
                        self._q.put(("text", ev.data))
                self._q.put(("done", await svc.wait(self._mid)))
            except BaseException as e:  # told to the reader, whatever it is
                self._q.put(("error", e))
        asyncio.get_running_loop().create_task(pump())

    def __iter__(self) -> Iterator[str]:
        try:
            while not self._done:
                kind, value = self._q.get()
                if kind == "text":
                    yield value
                elif kind == "done":
                    self.message, self._done = value, True
                else:
                    self._done = True
                    raise value
        finally:
            if not self._done:  # left early: end the answer where it is
                self._runner.call(lambda: self._runner.svc.stop(self._mid))
                self.message = self._runner.call(lambda: self._runner.svc.wait(self._mid))
                self._done = True

    def __str__(self) -> str:
        """The whole answer (waits for it)."""
        for _ in self:
            pass
        return self.message.response if self.message else ""


class Dialogue:
    def __init__(self, id: str, *, db: str | os.PathLike | None = None):
        self._svc = service(db)
        self.id = id

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, name: str, *, db: str | os.PathLike | None = None, model: str | None = None,
               system: str = "", folder: str | None = None, template: bool = True) -> "Dialogue":
        """A new dialogue; in `folder` (a path, "a/b") it starts from the folder's template, if
        it has one and `template` is True."""
        return cls(service(db).create(name, model=model, system=system, folder=folder,
                                      template=template).id, db=db)

    @classmethod
    def open(cls, name: str, *, db: str | os.PathLike | None = None) -> "Dialogue":
        return cls(service(db).dialogue_id(name), db=db)

    @classmethod
    def list(cls, *, db: str | os.PathLike | None = None, folder: str | None = None) -> list[str]:
        """Dialogue names, most recently updated first; with `folder`, those directly in it."""
        svc = service(db)
        fid = svc.folder_id(folder) if folder is not None else None
        return [d["name"] for d in svc.list() if fid is None or d["folder"] == fid]

    @classmethod
    def folders(cls, *, db: str | os.PathLike | None = None) -> list[str]:
        """Folder paths ("a", "a/b"), in path order."""
        return [f.path for f in service(db).folders()]

    @classmethod
    def new_folder(cls, path: str, *, db: str | os.PathLike | None = None,
                   note: str | None = None) -> str:
        """Make a folder (and the folders above it), optionally with its context note: text
        every dialogue in it sees first. Returns its path."""
        svc = service(db)
        f = svc.new_folder(path, exist_ok=True)
        if note is not None:
            f = svc.set_folder(f.id, note=note)
        return f.path

    # ------------------------------------------------------------ reading

    @property
    def doc(self) -> document.Dialogue:
        return self._svc.open(self.id)

    @property
    def messages(self) -> list[Message]:
        return self._svc.messages(self.id)

    @property
    def name(self) -> str:
        return self._svc.open(self.id, messages=False).name

    @property
    def model(self) -> str:
        return self._svc.open(self.id, messages=False).model

    @model.setter
    def model(self, value: str) -> None:
        """Checked: a name no provider serves raises UnknownModelError and changes nothing."""
        self._svc.update(self.id, model=value)

    @property
    def system(self) -> str:
        return self._svc.open(self.id, messages=False).system

    @system.setter
    def system(self, value: str) -> None:
        self._svc.update(self.id, system=value)

    @property
    def doc_tools(self) -> list[str]:
        """The document tools the model may use to read and edit this dialogue ([]: off, the
        default). Set "all", tool and group names ("read,run", ["read_message", "edit"]), or
        None to turn them off; an unknown name raises ValueError and changes nothing."""
        return self._svc.doc_tools(self.id)

    @doc_tools.setter
    def doc_tools(self, value: Any) -> None:
        self._svc.set_doc_tools(self.id, value)

    @property
    def context(self) -> list[document.ContextItem]:
        """The attached context items: text every prompt of this dialogue sees."""
        return self._svc.open(self.id, messages=False).context

    def attach(self, path: str | os.PathLike | None = None, *, name: str | None = None,
               content: str | None = None, package: str | None = None,
               url: str | None = None) -> Any:
        """Attach context every prompt sees, replacing an item of the same name: a text file or
        a folder's text files (`d.attach("schema.sql")`, `d.attach("src/")`), an installed
        package's docs (`d.attach(package="httpx")`), a web page's text
        (`d.attach(url="https://...")`), or a text under a name (`d.attach(name="rules",
        content="...")`). Returns what was read (`.files`, `.skipped`, `.summary()`); None for
        a text."""
        if content is not None:
            if path is not None or package or url:
                raise ValueError("attach a path, a package, a URL or a named content: one of them")
            if not name:
                raise ValueError("attached content needs a name")
            self._svc.attach(self.id, name, content)
            return None
        return self._svc.attach_source(self.id, path=path, package=package, url=url, name=name)[1]

    def refresh(self, item: str | None = None) -> list[dict[str, Any]]:
        """Read the attached `item` (default: every item with a source) again from its file,
        folder, package or URL; one record per item (`changed`, or why not)."""
        return self._svc.refresh(self.id, item)[1]

    def context_status(self) -> list[dict[str, Any]]:
        """Each attached item's name, kind, source, characters, tokens (by the model's tokenizer
        where it has one) and, for a local model, whether its KV state is in the prefix cache."""
        return self._svc.context_status(self.id)

    def detach(self, name: str) -> None:
        self._svc.detach(self.id, name)

    @property
    def max_tokens(self) -> int | None:
        """The longest answer, in tokens (None: the model's default)."""
        return self.doc.meta.get("max_tokens")

    @max_tokens.setter
    def max_tokens(self, value: int | None) -> None:
        self._svc.update(self.id, max_tokens=value)

    @property
    def folder(self) -> str:
        """The path of the folder it is in ("" at the top level); assigning a path moves it
        (`Dialogue.folders()` lists them, `Dialogue.new_folder(path)` makes one)."""
        fid = self._svc.open(self.id, messages=False).folder
        return self._svc.folder(fid).path if fid else ""

    @folder.setter
    def folder(self, path: str | None) -> None:
        self._svc.move_to(self.id, path or "")

    @property
    def mode(self) -> tuple[str, str]:
        """(name, text) of how the model answers: standard, learning or concise, the text
        appended to the system prompt. Assign a name for its preset text, or (name, text)."""
        return mode_of(self._svc.open(self.id, messages=False).meta)

    @mode.setter
    def mode(self, value: str | tuple[str, str]) -> None:
        name, text = (value, None) if isinstance(value, str) else value
        self._svc.set_mode(self.id, name, text)

    @property
    def sampling(self) -> dict[str, Any]:
        """The local model's sampling settings that differ from the defaults (repetition
        penalties, DRY, the loop stop: see `dialogue config --help`). Assigning merges; {} or
        None restores the defaults."""
        return dict(self.doc.meta.get("sampling") or {})

    @sampling.setter
    def sampling(self, value: dict[str, Any] | None) -> None:
        self._svc.update(self.id, sampling=value or None)

    @property
    def adapters(self) -> dict[str, float]:
        """The LoRA adapters applied to this dialogue's local model: {name or .gguf path: scale}.
        Assigning checks them against the model (unknown or ill-fitting adapters are refused)."""
        return self._svc.adapters(self.id)

    @adapters.setter
    def adapters(self, value: dict[str, float] | None) -> None:
        self._svc.set_adapters(self.id, value)

    @property
    def mcp(self) -> list[dict[str, Any]]:
        """The MCP servers this dialogue may use (the global file's, then its own), each
        {"name", "origin", "transport", "runs", "enabled", "running"}; starts none."""
        return self._svc.mcp_servers(self.id)

    def mcp_tools(self, name: str | None = None) -> list[dict[str, Any]]:
        """`mcp` with each server's tools (or the error it could not start with), starting them
        where this dialogue's answers run, so they stay up for its next answer."""
        return self._runner.call(lambda: self._runner.svc.mcp_list(self.id, name))

    def enable_mcp(self, *names: str) -> None:
        """Offer the tools of these MCP servers (configured globally or by `add_mcp`)."""
        self._svc.set_mcp(self.id, enable=names)

    def disable_mcp(self, *names: str) -> None:
        self._svc.set_mcp(self.id, disable=names)

    def add_mcp(self, name: str, entry: dict[str, Any], *, enable: bool = True) -> None:
        """Give this dialogue a server of its own: an mcpServers entry, {"command", "args",
        "env"} or {"url", "headers"} (checked now), enabled unless `enable=False`."""
        self._svc.set_mcp(self.id, servers={name: entry}, enable=[name] if enable else [])

    def remove_mcp(self, *names: str) -> None:
        """Forget servers of this dialogue's own (and stop offering them)."""
        self._svc.set_mcp(self.id, remove=names)

    async def trial(self, prompt: str, adapters: dict[str, float] | None = None, *,
                    max_tokens: int | None = None) -> str:
        """The answer to `prompt` at the end of this dialogue under an adapter set (default: the
        bare base), storing nothing: for comparing adapter sets before choosing one. A coroutine,
        so that it works under Jupyter's running loop (`await d.trial(...)`)."""
        return "".join([ev.text async for ev in self._svc.trial(
            self.id, prompt, adapters=adapters or {}, max_tokens=max_tokens)
            if isinstance(ev, TextDelta)])

    # ------------------------------------------------------------ running

    @property
    def _runner(self) -> _Runner:
        return _runner(self._svc.path)

    def run(self, msg: Message | str, *, timeout: float | None = None,
            stdin: Callable[[str, bool], str] | None = None, approve: Any = None,
            tools: bool = True) -> Message:
        """Run a code message in the dialogue's kernel (or send a prompt to its model) and return
        the stored result: `outputs`, or `response`; `meta["run"]["status"]` says how it ended.
        A message: a Message, an id, an id prefix or a 1-based position as a string ("-1").
        `stdin(prompt, password)` answers input() and getpass() in the cell (`stdin=lambda p, _:
        input(p)` asks at a terminal); without it they raise StdinNotImplementedError.
        `approve`, `tools`: a prompt's tool calls, see `ask`."""
        mid = self._svc.message_id(self.id, msg)
        ok = _approve(approve)
        return self._runner.call(lambda: self._runner.svc.run(
            self.id, mid, timeout=timeout, stdin=stdin or False, approve=ok, tools=tools))

    def ask(self, prompt: str, *, prefill: str | None = None, stream: bool = False,
            images: Iterable[str | os.PathLike | bytes | tuple[str, bytes]] = (),
            approve: Any = None, tools: bool = True) -> Message | AnswerStream:
        """Add a prompt at the end and answer it with the dialogue's model: the stored message
        (its `response`), or with `stream=True` an `AnswerStream` to iterate for the text as it
        comes (`for piece in d.ask("...", stream=True): print(piece, end="")`). `images` (files,
        bytes, or (name, bytes)) are attached to the prompt and sent to the model as images
        (`d.ask("What does this plot show?", images=["plot.png"])`).

        Tool calls that change or run anything (kernel functions referenced as &`fn`, and the
        like; reading tools and tools always allowed in this dialogue never ask) need approval:
        `approve=True` allows them all, a callable `approve(call)` (call: {"name", "arguments",
        "preview", ...}) answers each with "once", "always" (this tool in this dialogue, stored),
        "deny" or a bool; by default (None, False) they are denied and the model is told so.
        `tools=False` offers no tools."""
        ok = _approve(approve)
        m = self.add_prompt(prompt, images=images)
        if stream:
            return AnswerStream(self._runner, self.id, m.id, prefill, ok, tools)
        return self._runner.call(lambda: self._runner.svc.run(self.id, m.id, prefill=prefill,
                                                              approve=ok, tools=tools))

    def request(self, msg: Message | str, *, version: int | None = None) -> dict[str, Any]:
        """What was sent for a prompt's answer (its latest, or answer `version`): the system
        prompt, context, each turn as the model saw it with the messages it came from, what was
        hidden, shortened or dropped and why, tools, cache breakpoints, token counts, model and
        max_tokens, as recorded when it was sent (see `dialogue.sent`)."""
        return self._svc.sent_request(self.id, self._svc.message_id(self.id, msg), version=version)

    def estimate(self, msg: Message | str) -> dict[str, Any]:
        """What a prompt would send now, before sending it: {"tokens", "cached", "label", ...}
        (nothing is evaluated, no model is loaded for it)."""
        mid = self._svc.message_id(self.id, msg)
        return self._runner.call(lambda: self._runner.svc.estimate(self.id, mid))

    def run_all(self, *, stop_on_error: bool = True) -> list[Message]:
        """Run every code message top to bottom in the dialogue's kernel, as the page's Run all
        does; returns the stored messages that ran (stopping after the first failure unless
        `stop_on_error=False`)."""
        return self._runner.call(lambda: self._runner.svc.run_all(
            self.id, stop_on_error=stop_on_error))

    @property
    def kernel(self) -> dict[str, str] | None:
        """The kernel that runs this dialogue's code: {"spec": name} (an installed Jupyter
        kernelspec), {"python": path}, {"gateway": name} (a kernel of the configured gateway),
        or None (this interpreter, the default)."""
        return self._svc.kernel_choice(self.id).to_meta()

    def set_kernel(self, spec: str | None = None, *, python: str | None = None,
                   gateway: str | None = None) -> None:
        """Choose the kernel: an installed kernelspec's name (`jupyter kernelspec list`), a
        Python interpreter's path (it needs ipykernel), a kernelspec of the gateway the config
        names (`gateway`: it runs there), or none for the default. Checked now; the next run
        starts it."""
        self._svc.set_kernel(self.id, spec, python=python, gateway=gateway)

    def restart_kernel(self) -> None:
        """Restart the dialogue's kernel: its variables are gone."""
        self._runner.call(lambda: self._runner.svc.restart(self.id))

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, i: int | str) -> Message:
        return self._svc.message(self.id, str(i + 1 if isinstance(i, int) and i >= 0 else i))

    # ------------------------------------------------------------ writing

    def add(self, kind: str | Kind, source: str = "", **kw: Any) -> Message:
        return self._svc.add(self.id, kind, source, **kw)

    def add_code(self, source: str, **kw: Any) -> Message:
        return self.add(Kind.code, source, **kw)

    def add_note(self, source: str, **kw: Any) -> Message:
        return self.add(Kind.note, source, **kw)

    def add_prompt(self, source: str, **kw: Any) -> Message:
        """A prompt at the end (not run); `images=[...]` attaches images, as `ask` does."""
        return self.add(Kind.prompt, source, **kw)

    def add_images(self, msg: Message | str, *images: str | os.PathLike | bytes) -> Message:
        """Attach images to a note or prompt, each referenced on a line after its text."""
        return self._svc.add_images(self.id, _mid(msg), images, base_version=None)[0]

    def edit(self, msg: Message, **changes: Any) -> Message:
        """Change `msg` as you have it: refused if the stored message moved on since."""
        return self._svc.edit(self.id, msg.id, base_version=msg.version, **changes)

    def move(self, msg: Message | str, to: int) -> Message:
        return self._svc.move(self.id, _mid(msg), to=to)

    def delete(self, msg: Message | str) -> None:
        self._svc.delete_message(self.id, _mid(msg))

    def history(self, msg: Message | str) -> list[Version]:
        return self._svc.history(self.id, _mid(msg))

    def restore_version(self, msg: Message, version: int) -> Message:
        return self._svc.restore_version(self.id, msg.id, version, base_version=msg.version)

    def fork(self, at: Message | str, name: str | None = None) -> "Dialogue":
        return Dialogue(self._svc.fork(self.id, _mid(at), name=name).id, db=self._svc.path)

    def search(self, query: str) -> list[SearchHit]:
        return self._svc.search(query, dialogue=self.id)

    def rename(self, name: str) -> None:
        self._svc.rename(self.id, name)

    # ------------------------------------------------------------ display

    def __repr__(self) -> str:
        n = len(self)
        return f"Dialogue({self.name!r}, {n} message{'s' * (n != 1)})"

    def _repr_markdown_(self) -> str:
        d = self.doc
        n = len(d.messages)
        out = [f"**{_md_escape(d.name)}** · `{d.model}` · {n} message{'s' * (n != 1)}\n"]
        for m in d.messages:
            flags = " ".join(f for f in document.FLAGS if getattr(m, f))
            head = f"*{m.kind.value}* `{m.id}`" + (f" ({flags})" if flags else "")
            if m.kind == Kind.code:
                body = f"```python\n{m.source}\n```"
                if text := m.output_text():
                    body += f"\n```\n{text}\n```"
            elif m.kind == Kind.prompt:
                body = "> " + m.source.replace("\n", "\n> ") + (f"\n\n{m.response}" if m.response else "")
            else:
                body = m.source
            out.append(f"{head}\n\n{body}\n")
        return "\n---\n".join(out)


def _approve(value: Any) -> Any:
    """`approve=` as the service takes it; nothing here answers the page's "ask"."""
    if value is None or isinstance(value, bool) or callable(value):
        return value
    raise TypeError(f"approve must be True, False, None or a callable, not {value!r}")


def _mid(m: Message | str) -> str:
    return m.id if isinstance(m, Message) else m


def _md_escape(s: str) -> str:
    return html.escape(s).replace("*", r"\*").replace("_", r"\_")
