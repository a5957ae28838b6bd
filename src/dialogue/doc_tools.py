"""Document tools: the model (or a script in the dialogue's own kernel) reads and changes the
dialogue it lives in.

`DocumentTools(host, dialogue_id, author=..., cause=...)` is a ToolSource (tools.Toolbox routes
the model's calls here) and a plain Python object (dialogue.here calls its methods from a cell).
`host` is the service (store, message resolution, edits, runs, kernels); this module never
imports it, as runs.py does not.

Every change is a new version written inside `store.acting(author, cause)`: the history says
who made it ("model, in answer 3f2a91c0") and restoring the old version undoes it. An edit is
based on the version of the message this object last read (or the current one when it never
read it): if the user changed the message since, the edit is refused as a conflict, exactly as a
stale browser tab's edit is, and the model is told to read it again.

Results are compact text; every error (an unknown message, a conflict, a refused replacement) is
a `DocToolError` whose text the model (or the cell) can act on.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable

from .context import output_limit_of, render_outputs
from .document import Kind, Message
from .history import source_diff
from .llm.base import ToolSpec
from .store import HIT_END, HIT_START, ConflictError, NotFoundError, StoreError, acting
from .tools import _cap

__all__ = ["DocumentTools", "DocToolError", "TOOLS", "GROUPS", "READING", "resolve_enabled"]


class DocToolError(ValueError):
    """A document tool could not do what was asked; the text says why and what to do."""


def _obj(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


_ID = {"type": "string", "description": "The message: its id (as list_messages shows it) or its "
                                        "1-based position (\"1\" is the first, \"-1\" the last)."}

LIST_MAX = 200  # lines of one list_messages: a long dialogue is listed in pages

# name -> (description, JSON schema of its arguments, reads only)
TOOLS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "list_messages": (
        "List the messages of this dialogue, one line each: position, id, kind (code, note, "
        "prompt, raw), version, how its last run ended, and its first line. At most `count` "
        "lines from position `start`; the first line says how many there are in all.",
        _obj({"start": {"type": "integer", "description": "The first position to list "
                                                          "(default 1)."},
              "count": {"type": "integer", "description": f"How many to list (default and "
                                                          f"at most {LIST_MAX})."}}, []), True),
    "read_message": (
        "Read one message in full: its source and, for code, its outputs as text (long outputs "
        "cut as in your context); for a prompt, its answer. Read a message before editing it.",
        _obj({"id": _ID}, ["id"]), True),
    "find_text": (
        "Full-text search over this dialogue's sources, outputs and answers (every word must "
        "match; a word ending in * matches as a prefix). Returns matching messages, best first.",
        _obj({"query": {"type": "string", "description": "The words to look for."}}, ["query"]),
        True),
    "read_variable": (
        "The value of a variable in the dialogue's running Python kernel, as the kernel shows "
        "it (its repr, cut when long). A name or a dotted attribute path, e.g. df or df.shape.",
        _obj({"name": {"type": "string", "description": "A variable name or dotted path."}},
             ["name"]), True),
    "add_message": (
        "Add a new message after a given one (\"0\" for the top). Returns its id and position.",
        _obj({"after": {"type": "string", "description": "The id or position to add after; "
                                                          "\"0\" adds at the top."},
              "kind": {"type": "string", "enum": ["code", "note", "prompt", "raw"],
                       "description": "code (Python run in the kernel), note (markdown), "
                                      "prompt (a question to the model), raw (text)."},
              "source": {"type": "string", "description": "The message's text."}},
             ["after", "kind", "source"]), False),
    "edit_message": (
        "Replace a message's whole source. Refused if the message changed since you read it: "
        "read it again, then edit.",
        _obj({"id": _ID, "source": {"type": "string", "description": "The new source."}},
             ["id", "source"]), False),
    "replace_text": (
        "Replace one exact piece of a message's source with new text. The old text must occur "
        "exactly once (include surrounding lines to make it unique); otherwise nothing changes "
        "and you are told how many times it occurs.",
        _obj({"id": _ID,
              "old": {"type": "string", "description": "The exact text to replace."},
              "new": {"type": "string", "description": "The text to put in its place."}},
             ["id", "old", "new"]), False),
    "delete_message": (
        "Move a message to the trash (the user can restore it).",
        _obj({"id": _ID}, ["id"]), False),
    "move_message": (
        "Move a message to a 1-based position in the dialogue.",
        _obj({"id": _ID, "to": {"type": "integer", "description": "The new 1-based position."}},
             ["id", "to"]), False),
    "run_code": (
        "Run a code message in the dialogue's kernel (the user sees it run) and return how it "
        "ended and its outputs as text.",
        _obj({"id": _ID}, ["id"]), False),
}
READING = frozenset(n for n, (_, _, ro) in TOOLS.items() if ro)
# names a user can turn on together: `dialogue tools NAME --only read,edit`
GROUPS = {"read": [n for n in TOOLS if n in READING], "edit": ["add_message", "edit_message", "replace_text",
                                            "delete_message", "move_message"],
          "run": ["run_code"], "all": list(TOOLS)}

_VARIABLE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def resolve_enabled(value: Any) -> list[str]:
    """The tool names a setting stands for (Dialogue.meta["doc_tools"]: "all", a list of tool or
    group names, a comma-separated string of them; falsy: none), in the order TOOLS lists them.
    An unknown name raises DocToolError naming the known ones."""
    if not value:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen: set[str] = set()
    for n in (str(x).strip() for x in names):
        if not n:
            continue
        if n in GROUPS:
            chosen.update(GROUPS[n])
        elif n in TOOLS:
            chosen.add(n)
        else:
            raise DocToolError(f"no document tool {n!r}; the tools are {', '.join(TOOLS)} and "
                               f"the groups {', '.join(GROUPS)}")
    return [n for n in TOOLS if n in chosen]


def _first_line(text: str, n: int = 70) -> str:
    line = next((x for x in text.splitlines() if x.strip()), "").strip()
    return line if len(line) <= n else line[:n - 1] + "…"


def _status(m: Message, running: bool = False) -> str:
    if running:
        return "running" if m.kind == Kind.code else "answering"
    if m.kind == Kind.code:
        if m.execution_count is None and not m.outputs and not m.meta.get("run"):
            return "not run"
        return m.meta.get("run", {}).get("status", "ok")
    if m.kind == Kind.prompt:
        if m.meta.get("error"):
            return "error"
        return "answered" if m.response else "no answer"
    return ""


@functools.lru_cache(maxsize=None)
def _signature(cls: type, name: str) -> inspect.Signature:
    return inspect.signature(getattr(cls, name))  # the function's, computed once


class DocumentTools:
    """The document tools over one dialogue, acting as `author` for message `cause` (the answer
    or cell making the changes). `enabled`: what `resolve_enabled` takes ("all" by default)."""

    def __init__(self, host: Any, dialogue_id: str, *, author: str = "model", cause: str = "",
                 enabled: Any = "all", limit: int = 20_000, run_timeout: float | None = None,
                 on_change: Callable[[str, str], None] | None = None):
        self.host, self.did, self.author, self.cause = host, dialogue_id, author, cause
        # told (op, message id) after each change: "add", "edit", "delete", "move", and "run"
        # once a run has started (the answer's page shows each as it happens)
        self.on_change = on_change
        self.enabled = resolve_enabled(enabled)
        self.limit = limit  # the most characters of one result
        self.run_timeout = run_timeout
        self.seen: dict[str, int] = {}  # message id -> the version last read or written here
        self.added = ""  # the id of the message add_message added last

    # ------------------------------------------------------------ as a ToolSource

    def specs(self) -> list[ToolSpec]:
        return [ToolSpec(name=n, description=TOOLS[n][0], parameters=TOOLS[n][1],
                         reads_only=TOOLS[n][2], source="dialogue") for n in self.enabled]

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        if name not in self.enabled:
            return f"the document tool {name!r} is not turned on in this dialogue", True
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}", True
        fn: Callable = getattr(self, name)
        try:
            _signature(type(self), name).bind(self, **arguments)
        except TypeError as e:  # missing or unexpected arguments
            wants = ", ".join(TOOLS[name][1]["properties"]) or "no arguments"
            return f"bad arguments for {name}: {e} (it takes: {wants})", True
        try:
            out = fn(**arguments)
            if inspect.isawaitable(out):
                out = await out
        except (DocToolError, StoreError) as e:
            return str(e), True
        return _cap(out, self.limit), False

    async def preview(self, name: str, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """What an approval shows before a changing call runs: the diff of an edit, the code of
        a run; None for a reading tool or a call that would fail anyway."""
        a = arguments if isinstance(arguments, dict) else {}
        try:
            if name == "add_message":
                return {"kind": "diff", "text": source_diff("", str(a.get("source", "")),
                                                            new=f"new {a.get('kind', '')}")}
            if name in ("edit_message", "replace_text", "delete_message", "run_code",
                        "move_message"):
                m = self.resolve(str(a.get("id", "")))
                if name == "run_code":
                    return {"kind": "code", "text": m.source}
                if name == "move_message":
                    return {"kind": "text", "text": f"move message {m.id} to position "
                                                    f"{a.get('to')}"}
                new = "" if name == "delete_message" else (
                    str(a.get("source", "")) if name == "edit_message"
                    else self._replaced(m, str(a.get("old", "")), str(a.get("new", ""))))
                return {"kind": "diff", "text": source_diff(m.source, new, old=f"{m.id} now",
                                                            new=f"{m.id} after")}
        except (DocToolError, StoreError):
            return None
        return None

    # ------------------------------------------------------------ reading

    def _messages(self) -> list[Message]:
        return self.host.store.messages(self.did)

    def resolve(self, ref: str) -> Message:
        """The message `ref` names (id, id prefix, 1-based position); DocToolError if none."""
        ref = str(ref).strip()
        store = self.host.store
        try:
            # an exact id (ours always hold a letter; a short all-digit ref is a position) is
            # one lookup; prefixes and positions go through the service, which lists them all
            if not (ref.lstrip("-").isdigit() and len(ref) < 8):
                try:
                    m = store.get_message(ref)
                except NotFoundError:
                    pass
                else:
                    if store.message_dialogue(m.id) == self.did:
                        return m
            return store.get_message(self.host.message_id(self.did, ref))
        except NotFoundError as e:
            raise DocToolError(f"{e}; list_messages shows the ids and positions") from None

    def _position(self, mid: str) -> int:
        return self.host.store.position(mid)

    def list_messages(self, start: int = 1, count: int = LIST_MAX) -> str:
        ms = self._messages()
        if not ms:
            return "The dialogue has no messages."
        try:
            start, count = max(1, int(start)), max(1, min(int(count), LIST_MAX))
        except (TypeError, ValueError):
            raise DocToolError("start and count must be whole numbers") from None
        shown = ms[start - 1:start - 1 + count]
        if not shown:
            raise DocToolError(f"start {start} is past the end: the dialogue has {len(ms)} "
                               "messages")
        more = f"; positions {start} to {start + len(shown) - 1} shown" \
            if len(shown) < len(ms) else ""
        lines = [f"{len(ms)} message{'s' * (len(ms) != 1)}{more} (position. id kind version "
                 "status: first line)"]
        for i, m in enumerate(shown, start):
            st = _status(m, self.host.running(m.id))
            mark = " (this answer)" if m.id == self.cause and self.author == "model" else ""
            lines.append(f"{i}. {m.id} {m.kind.value} v{m.version}{' ' + st if st else ''}"
                         f"{mark}: {_first_line(m.source)}")
        return "\n".join(lines)

    def read_message(self, id: str) -> str:
        m = self.resolve(id)
        self.seen[m.id] = m.version
        return self._describe(m)

    def _describe(self, m: Message, *, source: bool = True) -> str:
        st = _status(m, self.host.running(m.id))
        head = (f"message {self._position(m.id)} · id {m.id} · {m.kind.value} · version "
                f"{m.version}{' · ' + st if st else ''}")
        parts = [head]
        if source:
            parts.append(f"<source>\n{m.source}\n</source>")
        if m.kind == Kind.code and m.outputs:
            d = self.host.store.get_dialogue(self.did, with_messages=False)
            text = "\n".join(p.text or f"[{p.mime} image]" for p in render_outputs(
                m.outputs, images=False, limit=output_limit_of(d)))
            parts.append(f"<outputs>\n{text}\n</outputs>")
        elif m.kind == Kind.code:
            parts.append("(no outputs)")
        if m.kind == Kind.prompt and m.response:
            parts.append(f"<answer>\n{m.response}\n</answer>")
        return "\n".join(parts)

    def find_text(self, query: str) -> str:
        hits = self.host.search(str(query), dialogue=self.did, limit=20)
        if not hits:
            return f"nothing in this dialogue matches {query!r}"
        where = {m.id: i for i, m in enumerate(self._messages(), 1)}
        lines = [f"{len(hits)} message{'s' * (len(hits) != 1)} match (best first):"]
        for h in hits:
            snip = " ".join(h.snippet.replace(HIT_START, "«").replace(HIT_END, "»").split())
            lines.append(f"{where.get(h.message_id, '?')}. {h.message_id} {h.kind}: {snip}")
        return "\n".join(lines)

    async def read_variable(self, name: str) -> str:
        name = str(name).strip()
        if not _VARIABLE.fullmatch(name):
            raise DocToolError(f"{name!r} is not a variable name or dotted path (such as df or "
                               "df.shape); nothing was evaluated")
        kernel = self.host.kernels.peek(self.did)
        if kernel is None or not kernel.is_alive:
            raise DocToolError("the dialogue's kernel is not running, so no variable has a value "
                               "yet; run a code message first")
        from .kernel import ExecutionError, KernelTimeout
        try:
            value = await kernel.eval(name, timeout=30)
        except (ExecutionError, KernelTimeout) as e:
            raise DocToolError(f"{name}: {e}") from None
        return value

    # ------------------------------------------------------------ changing

    def _base(self, m: Message) -> int:
        return self.seen.get(m.id, m.version)

    def _conflict(self, m: Message, e: ConflictError) -> DocToolError:
        busy = self.host.running(m.id) or self.host.store.stream_writer(m.id)
        detail = "it is being written by a running cell or model" if busy else ""
        return DocToolError(
            f"message {m.id} changed since you read it (you read version {e.based_on}, it is "
            f"now version {e.current}{'; ' + detail if detail else ''}): nothing was "
            "changed; read it again with read_message, then edit")

    def _edit(self, m: Message, **changes: Any) -> Message:
        try:
            with acting(self.author, self.cause):
                # the store directly: `m` is resolved already (the service would list the
                # dialogue again to resolve it)
                new = self.host.store.update_message(m.id, base_version=self._base(m), **changes)
        except ConflictError as e:
            raise self._conflict(m, e) from None
        self.seen[new.id] = new.version
        self._changed("edit", new.id)
        return new

    def _changed(self, op: str, mid: str) -> None:
        if self.on_change is not None:
            self.on_change(op, mid)

    def add_message(self, after: str, kind: str, source: str) -> str:
        if kind not in Kind._value2member_map_:
            raise DocToolError(f"kind must be one of code, note, prompt, raw; got {kind!r}")
        after = str(after).strip()
        top = after in ("", "0")
        if not top:
            after = self.resolve(after).id
        with acting(self.author, self.cause):
            m = self.host.store.add_message(self.did, Message(kind=kind, source=str(source)),
                                            **({"index": 0} if top else {"after": after}))
        self.seen[m.id] = m.version
        self.added = m.id
        self._changed("add", m.id)
        return f"added {kind} message {m.id} at position {self._position(m.id)}"

    def edit_message(self, id: str, source: str) -> str:
        m = self.resolve(id)
        if m.source == source:
            return f"message {m.id} already has that source; nothing changed"
        new = self._edit(m, source=str(source))
        return f"message {new.id} is now version {new.version}"

    def _replaced(self, m: Message, old: str, new: str) -> str:
        if not old:
            raise DocToolError("old must not be empty")
        n = m.source.count(old)
        if n != 1:
            raise DocToolError(
                f"the text to replace occurs {n} times in message {m.id}" +
                (" (it must occur exactly once: include more of the lines around it)" if n
                 else "; read the message and copy the text exactly") + "; nothing changed")
        return m.source.replace(old, new, 1)

    def replace_text(self, id: str, old: str, new: str) -> str:
        m = self.resolve(id)
        if m.id in self.seen and self.seen[m.id] != m.version and \
                self.host.store.changed_since(m.id, self.seen[m.id]):  # a move is no change
            # checked before the text, so a stale read is reported as such, not as "not found"
            raise self._conflict(m, ConflictError(f"message {m.id}", self.seen[m.id], m.version))
        out = self._edit(m, source=self._replaced(m, str(old), str(new)))
        return f"replaced; message {out.id} is now version {out.version}"

    def delete_message(self, id: str) -> str:
        m = self.resolve(id)
        if self.host.running(m.id) or self.host.store.stream_writer(m.id):
            what = "this answer" if m.id == self.cause else f"message {m.id}"
            raise DocToolError(f"{what} is being run or answered now; it cannot be deleted "
                               "until it finishes")
        try:
            with acting(self.author, self.cause):
                self.host.store.delete_message(m.id, base_version=self._base(m))
        except ConflictError as e:
            raise self._conflict(m, e) from None
        self._changed("delete", m.id)
        return f"message {m.id} is in the trash"

    def move_message(self, id: str, to: int) -> str:
        m = self.resolve(id)
        try:
            to = int(to)
        except (TypeError, ValueError):
            raise DocToolError(f"to must be a position number, got {to!r}") from None
        count = len(self._messages())
        if not 1 <= to <= count:
            raise DocToolError(f"position {to} is outside the dialogue (1 to {count})")
        with acting(self.author, self.cause):  # a move is a version, attributed like an edit
            self.host.move(self.did, m.id, to=to - 1)
        self._changed("move", m.id)
        return f"message {m.id} is now at position {self._position(m.id)}"

    async def run_code(self, id: str) -> str:
        m = self.resolve(id)
        if m.kind != Kind.code:
            raise DocToolError(f"message {m.id} is a {m.kind.value} message; only code runs")
        with acting(self.author, self.cause):  # the run's versions (its task copies this)
            self.host.start(self.did, m.id, timeout=self.run_timeout)
        self._changed("run", m.id)
        final = await self.host.wait(m.id)
        self.seen[final.id] = final.version
        return self._describe(final, source=False)
