"""The dialogue service: the one API that the web app, the CLI and Python code call.

Surfaces name dialogues by name or id and messages by id, a unique id prefix, or a 1-based
position; the service resolves those, applies defaults, and delegates persistence to the store.
Running code and prompts (kernel, providers) is added here as well, so that no surface talks to a
kernel or an SDK directly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .document import FLAGS, ContextItem, Dialogue, Kind, Message
from .store import NotFoundError, SearchHit, Store, StoreError, TrashItem, Version

__all__ = ["DialogueService", "DEFAULT_MODEL", "default_model"]

DEFAULT_MODEL = "local:default"


def default_model() -> str:
    """`DIALOGUE_MODEL` if set, else the bundled local model: works offline, with no key."""
    return os.environ.get("DIALOGUE_MODEL") or DEFAULT_MODEL


class DialogueService:
    def __init__(self, store: Store | str | os.PathLike | None = None):
        self.store = store if isinstance(store, Store) else Store(store)

    def close(self) -> None:
        self.store.close()

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
        if any(m.id == ref for m in msgs):
            return ref
        if ref.lstrip("-").isdigit() and len(ref) < 8:
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
        return self.store.get_dialogue(self.dialogue_id(ref))

    def list(self, *, deleted: bool = False) -> list[dict[str, Any]]:
        return self.store.list_dialogues(deleted=deleted)

    def rename(self, ref: str, new_name: str, *, base_version: int | None = None) -> Dialogue:
        return self.update(ref, base_version=base_version, name=new_name)

    def update(self, ref: str, *, base_version: int | None = None, **settings: Any) -> Dialogue:
        """Change name, model, system or attached context. Without `base_version` the current
        version is used: fine for a one-shot CLI command, while a long-lived surface (a browser
        tab) passes the version it showed the user."""
        did = self.dialogue_id(ref)
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


def flag_changes(**opts: bool | None) -> dict[str, bool]:
    """The flags that an option set mentions (None = leave as is)."""
    return {f: v for f, v in opts.items() if f in FLAGS and v is not None}
