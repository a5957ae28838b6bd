"""The dialogue this kernel belongs to, scripted from its own cells (as solveit's `dialoghelper`
does inside solveit)::

    from dialogue.here import messages, read, find, add, edit, replace, delete, move, current

    fix = read(-1)                                   # a Message; the last one
    replace(fix.id, "prnt(", "print(")              # exactly once, or ValueError saying how often
    add("## Results\\nSee below.", kind="note")       # after the running cell

How it reaches the dialogue: the app starts each dialogue's kernel with `DIALOGUE_DB` (its
database file) and `DIALOGUE_DIALOGUE` (the dialogue's id) in the environment, and sends each run
with the message's id as the request's "cellId" metadata. This module opens that database with
the app's own Store (through a DialogueService of its own) and edits it the way the model's
document tools do (`doc_tools.DocumentTools`): every change is a new version by author "kernel",
caused by the running cell, and an edit based on a version older than the one this kernel last
read is refused (`ConflictError` wrapped in a ValueError saying to read it again).

So it works wherever the kernel runs the app's own Python (the default kernel). A kernel of
another interpreter (a project's virtualenv, a kernelspec) has the variables set but not this
package: importing `dialogue.here` there fails with ModuleNotFoundError unless that environment
has `dialogue` installed too, at a version that reads this database's schema.

A code message cannot be run from a cell: the kernel is busy with the running cell, so the run
would wait for itself. `run` raises and says so; run it from the page, or let the model do it.
The page shows the messages a cell changed when its run ends: the run reads the versions caused
by its cell (`Store.caused_since`) and tells its listeners, as the model's changes are told.
"""
from __future__ import annotations

import os
from typing import Any

from .document import Kind, Message
from .service import DialogueService

__all__ = ["messages", "read", "find", "add", "edit", "replace", "delete", "move", "run",
           "current", "dialogue_id"]

_state: dict[str, Any] = {}


def dialogue_id() -> str:
    did = os.environ.get("DIALOGUE_DIALOGUE", "")
    if not did:
        raise RuntimeError("dialogue.here works in a dialogue's kernel (DIALOGUE_DIALOGUE names "
                           "the dialogue; the app sets it when it starts the kernel)")
    return did


def current() -> str:
    """The id of the message running now ("" outside a run the app started, e.g. a silent
    call): the request's "cellId" metadata, as the app sends it."""
    try:
        from IPython import get_ipython
        ip = get_ipython()
        parent = ip.kernel.get_parent() if ip is not None and hasattr(ip, "kernel") else {}
    except Exception:  # not in a kernel, or a kernel without parent tracking
        return ""
    return str(((parent or {}).get("metadata") or {}).get("cellId") or "")


def _tools() -> Any:
    """This kernel's DocumentTools (one per kernel, so what it read is remembered across cells),
    acting for the running cell."""
    did = dialogue_id()
    tools = _state.get("tools")
    if tools is None or tools.did != did:
        svc = DialogueService(os.environ.get("DIALOGUE_DB") or None)
        tools = _state["tools"] = svc.doc_tools_for(did, author="kernel")
    tools.cause = current()
    return tools


def messages() -> list[Message]:
    """Every live message of the dialogue, in order (as stored now)."""
    t = _tools()
    ms = t.host.messages(t.did)
    for m in ms:
        t.seen[m.id] = m.version
    return ms


def read(ref: str | int) -> Message:
    """One message by id, id prefix or 1-based position (-1: the last)."""
    t = _tools()
    m = t.resolve(str(ref))
    t.seen[m.id] = m.version
    return m


def find(query: str, limit: int = 20) -> list[Message]:
    """The dialogue's messages matching `query` (full-text, every word), best first."""
    t = _tools()
    return [t.host.store.get_message(h.message_id)
            for h in t.host.search(query, dialogue=t.did, limit=limit)]


def add(source: str, kind: str | Kind = "code", after: str | int | None = None) -> Message:
    """Add a message after `after` (an id or position; 0: at the top), by default after the
    running cell (at the end outside a run)."""
    t = _tools()
    if after is None:
        ms = t.host.messages(t.did)
        after = t.cause or (ms[-1].id if ms else 0)
    kind = Kind(kind).value
    t.add_message(str(after), kind, source)
    return t.host.store.get_message(t.added)


def edit(ref: str | int, source: str) -> Message:
    """Replace a message's source (refused if it changed since this kernel read it)."""
    t = _tools()
    m = t.resolve(str(ref))
    t.edit_message(m.id, source)
    return t.host.store.get_message(m.id)


def replace(ref: str | int, old: str, new: str) -> Message:
    """Replace the one occurrence of `old` in a message's source with `new`; ValueError (saying
    how many times it occurs) unless it occurs exactly once."""
    t = _tools()
    m = t.resolve(str(ref))
    t.replace_text(m.id, old, new)
    return t.host.store.get_message(m.id)


def delete(ref: str | int) -> None:
    """Move a message to the trash."""
    t = _tools()
    t.delete_message(t.resolve(str(ref)).id)


def move(ref: str | int, to: int) -> Message:
    """Move a message to 1-based position `to`."""
    t = _tools()
    m = t.resolve(str(ref))
    t.move_message(m.id, to)
    return t.host.store.get_message(m.id)


def run(ref: str | int) -> None:
    """Refused: see the module's doc."""
    raise RuntimeError("a code message cannot be run from a cell of the same kernel: the kernel "
                       "is busy with this cell, so the run would wait for itself. Run it from "
                       "the page (or `dialogue exec`), or ask the model, whose run_code tool can.")
