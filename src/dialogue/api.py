"""The Python API: `from dialogue import Dialogue`.

    d = Dialogue.create("scratch")
    m = d.add_code("1+1")
    d.messages

A `Dialogue` here is a live handle on a stored dialogue (every read goes to the store, every write
is versioned); `dialogue.document.Dialogue` is the plain data it reads. Edits pass the version of
the message they were made from, so an edit based on a stale copy raises `ConflictError` instead of
overwriting someone else's change.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from . import document
from .document import Kind, Message
from .service import DialogueService, SearchHit, TextDelta, Version, default_db_path

__all__ = ["Dialogue", "service"]

_services: dict[Path, DialogueService] = {}


def service(db: str | os.PathLike | None = None) -> DialogueService:
    """The process's service for a database file (one connection per file)."""
    path = Path(db).expanduser().resolve() if db else default_db_path().resolve()
    if path not in _services:
        _services[path] = DialogueService(path)
    return _services[path]


class Dialogue:
    def __init__(self, id: str, *, db: str | os.PathLike | None = None):
        self._svc = service(db)
        self.id = id

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, name: str, *, db: str | os.PathLike | None = None, model: str | None = None,
               system: str = "") -> "Dialogue":
        return cls(service(db).create(name, model=model, system=system).id, db=db)

    @classmethod
    def open(cls, name: str, *, db: str | os.PathLike | None = None) -> "Dialogue":
        return cls(service(db).dialogue_id(name), db=db)

    @classmethod
    def list(cls, *, db: str | os.PathLike | None = None) -> list[str]:
        return [d["name"] for d in service(db).list()]

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
    def context(self) -> list[document.ContextItem]:
        """The attached context items: text every prompt of this dialogue sees."""
        return self._svc.open(self.id, messages=False).context

    def attach(self, path: str | os.PathLike | None = None, *, name: str | None = None,
               content: str | None = None) -> None:
        """Attach a text file (`d.attach("schema.sql")`) or a text under a name
        (`d.attach(name="rules", content="...")`); an item of the same name is replaced."""
        if (path is None) == (content is None):
            raise ValueError("attach a file path, or a name and its content, not both")
        if path is not None:
            self._svc.attach_file(self.id, path, name=name)
        else:
            if not name:
                raise ValueError("attached content needs a name")
            self._svc.attach(self.id, name, content)

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

    async def trial(self, prompt: str, adapters: dict[str, float] | None = None, *,
                    max_tokens: int | None = None) -> str:
        """The answer to `prompt` at the end of this dialogue under an adapter set (default: the
        bare base), storing nothing: for comparing adapter sets before choosing one. A coroutine,
        so that it works under Jupyter's running loop (`await d.trial(...)`)."""
        return "".join([ev.text async for ev in self._svc.trial(
            self.id, prompt, adapters=adapters or {}, max_tokens=max_tokens)
            if isinstance(ev, TextDelta)])

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
        return self.add(Kind.prompt, source, **kw)

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
        return f"Dialogue({self.name!r}, {len(self)} messages)"

    def _repr_markdown_(self) -> str:
        d = self.doc
        out = [f"**{_md_escape(d.name)}** · `{d.model}` · {len(d.messages)} messages\n"]
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


def _mid(m: Message | str) -> str:
    return m.id if isinstance(m, Message) else m


def _md_escape(s: str) -> str:
    return html.escape(s).replace("*", r"\*").replace("_", r"\_")
