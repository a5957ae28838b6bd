"""The dialogue document: pure data, no I/O.

A dialogue is an ordered, editable document of messages. Everything that persists, renders or
sends a dialogue to a model works from these classes, so they carry every field a round trip
through a notebook needs (metadata, attachments, execution counts) and nothing that belongs to a
particular surface.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

__all__ = ["Kind", "FLAGS", "Message", "ContextItem", "Dialogue", "new_id", "output_text"]


class Kind(StrEnum):
    """What a message is. `raw` keeps a notebook's raw cells through a round trip."""

    code = "code"
    note = "note"
    prompt = "prompt"
    raw = "raw"


FLAGS = ("hidden", "pinned", "collapsed", "exported")
"""hidden: the model never sees it; pinned: never trimmed from context; collapsed: shown folded;
exported: written to the exported module."""

# Fields that make up a message's versioned state: a change to any of them writes a version.
STATE_FIELDS = ("kind", "source", "outputs", "execution_count", "response", "tool_calls",
                "usage", "attachments", "meta", *FLAGS)


def new_id(n: int = 8) -> str:
    """A short random id. 8 hex digits: short enough to type in the CLI, and the store retries on
    the (rare) collision, so it stays unique. Never all digits (about 2% of draws would be): an
    all-digit message reference is a position, so an id must not look like one."""
    while True:
        s = secrets.token_hex(n // 2)
        if not s.isdigit():
            return s


@dataclass
class Message:
    """One cell of a dialogue.

    `outputs` holds nbformat-shaped outputs of a code message (`stream`, `execute_result`,
    `display_data`, `error`). A prompt's answer is `response`, with `tool_calls` (each call with
    its result) and `usage` (tokens, cost, model) beside it. `version` is the number of the stored
    version this copy reflects; an edit names it so that a stale edit can be refused.
    """

    kind: Kind = Kind.code
    source: str = ""
    id: str = field(default_factory=new_id)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    execution_count: int | None = None
    response: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    attachments: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    hidden: bool = False
    pinned: bool = False
    collapsed: bool = False
    exported: bool = False
    version: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        try:
            self.kind = Kind(self.kind)
        except ValueError:
            raise ValueError(f"unknown message kind {self.kind!r}; expected one of "
                             f"{', '.join(k.value for k in Kind)}") from None

    @property
    def flags(self) -> dict[str, bool]:
        return {f: getattr(self, f) for f in FLAGS}

    def state(self) -> dict[str, Any]:
        """The versioned state as plain JSON-able data."""
        d = {k: getattr(self, k) for k in STATE_FIELDS}
        d["kind"] = self.kind.value
        return d

    def output_text(self) -> str:
        """Plain text of what the message produced (code outputs or the model's answer)."""
        if self.kind == Kind.prompt:
            return self.response
        return output_text(self.outputs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Message":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def copy(self, **changes: Any) -> "Message":
        return replace(self, **changes)


def output_text(outputs: list[dict[str, Any]]) -> str:
    """Text of nbformat outputs: streams, text/plain of results and displays, and errors. Used for
    search and for terminals; images and HTML are represented by their text/plain if they have
    one."""
    parts: list[str] = []
    for o in outputs:
        t = o.get("output_type")
        if t == "stream":
            parts.append(_join(o.get("text", "")))
        elif t in ("execute_result", "display_data"):
            data = o.get("data", {})
            if "text/plain" in data:
                parts.append(_join(data["text/plain"]))
            elif "text/markdown" in data:
                parts.append(_join(data["text/markdown"]))
        elif t == "error":
            parts.append(f"{o.get('ename', '')}: {o.get('evalue', '')}")
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts if p).rstrip("\n")


def _join(v: str | list[str]) -> str:
    return "".join(v) if isinstance(v, list) else v


@dataclass
class ContextItem:
    """Something attached to the whole dialogue (a library's docs, a file, a URL's text). Attached
    context goes right after the system prompt, so it is part of the stable prefix that caches
    reuse. `source` says where it came from (a path or URL) so it can be refreshed."""

    name: str
    content: str
    kind: str = "text"  # text | file | directory | package | url (sources.py); folder: a folder's note
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ContextItem":
        return cls(**{k: v for k, v in d.items() if k in ("name", "content", "kind", "source")})


@dataclass
class Dialogue:
    """A dialogue's data: settings and its ordered, live (not deleted) messages."""

    name: str
    id: str = field(default_factory=new_id)
    model: str = ""
    system: str = ""
    context: list[ContextItem] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    deleted: float | None = None
    folder: str = ""  # the id of the folder it lives in ("" at the top level)

    def index(self, msg_id: str) -> int:
        for i, m in enumerate(self.messages):
            if m.id == msg_id:
                return i
        raise KeyError(msg_id)

    def message(self, msg_id: str) -> Message:
        return self.messages[self.index(msg_id)]

    def above(self, msg_id: str) -> list[Message]:
        """The messages the model may see when answering `msg_id`: those above it."""
        return self.messages[: self.index(msg_id)]

    def settings(self) -> dict[str, Any]:
        """The dialogue-level versioned state (a move between folders is a version too)."""
        return {"name": self.name, "model": self.model, "system": self.system,
                "context": [c.to_dict() for c in self.context], "meta": self.meta,
                "folder": self.folder}
