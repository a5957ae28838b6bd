"""A message's history read as steps, not as raw versions.

The store keeps every version (append-only: nothing is ever lost), and one edit-and-run writes
three (the edit, the run clearing the old outputs, the result). A person reads that as one step:
"changed the code to this, ran it, got that". Here consecutive versions that hold the same source
(and kind) are one `Step`; each step carries a unified diff (difflib) of its source against the
step before, and what its last version holds (the outputs or answer of that source, if it ran).

`belonging_state` is what restoring a version brings back: that version's source, with the
outputs (or answer) that a run of that very source produced, never those of other code that an
edit version happens to carry along (an edit keeps the previous outputs beside the new source).

Pure functions over `store.Version` lists; the service calls them (`history_steps`,
`restore_version`) and the surfaces read the result.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from .document import Kind

__all__ = ["Step", "steps", "source_diff", "belonging_state", "who", "op_words", "moved",
           "MOVE_NOTE", "RESULT_OPS", "STATE_OF_A_RUN", "RUN_META"]

# the ops that end a run: the version they write holds what a run of its source produced
RESULT_OPS = ("result", "recovered")
# what a run notes in a message's meta (how it ended, why, what of the context was cut)
RUN_META = ("run", "error", "interrupted", "cut")
# the fields a run writes, by kind: what belongs to one source and not to another
STATE_OF_A_RUN = {
    Kind.code.value: {"outputs": [], "execution_count": None},
    Kind.prompt.value: {"response": "", "tool_calls": [], "usage": {}},
}


@dataclass
class Step:
    """Consecutive versions of one source. `number` counts from 1 (oldest); `diff` is the
    unified diff of the source against the previous step's ("" for the first step, or when only
    the kind changed); `ops` are the versions' ops in order; `state` is the last version's."""

    number: int
    versions: list[Any] = field(default_factory=list)  # store.Version, oldest first
    diff: str = ""

    @property
    def first(self) -> int:
        return self.versions[0].version

    @property
    def last(self) -> int:
        return self.versions[-1].version

    @property
    def at(self) -> float:
        return self.versions[-1].at

    @property
    def state(self) -> dict[str, Any]:
        return self.versions[-1].state

    @property
    def source(self) -> str:
        return self.state.get("source") or ""

    @property
    def kind(self) -> str:
        return str(self.state.get("kind") or "")

    @property
    def ops(self) -> list[str]:
        return [v.op for v in self.versions]

    @property
    def ran(self) -> bool:
        """Whether a run of this source finished within the step."""
        return any(v.op in RESULT_OPS for v in self.versions)

    @property
    def status(self) -> str:
        """How the step's last run ended ("ok", "error", ...), "" when it did not run."""
        if not self.ran:
            return ""
        st = self.state
        run = (st.get("meta") or {}).get("run") or {}
        if run.get("status"):
            return str(run["status"])
        if any(o.get("output_type") == "error" for o in st.get("outputs") or []):
            return "error"
        return "error" if (st.get("meta") or {}).get("error") else "ok"

    def summary(self) -> str:
        """What happened in the step, in words: "edited · ran: ok", "created", "restored v3";
        a change the model or a kernel script made names it: "edited by model, in answer
        3f2a91c0"."""
        words: list[tuple[str, str]] = []  # (what happened, by whom: "" for the user's own)
        for v in self.versions:
            op = v.op
            w = op_words(op)
            if op in RESULT_OPS:
                w = f"{w}: {self.status}" if self.status else w
            by = who(v) if getattr(v, "author", "user") in _CAUSED else ""
            if not words or words[-1] != (w, by):
                words.append((w, by))
        ran = [x for x in words if x[0] == "ran"]
        for x in ran:  # "ran · ran: ok" reads as "ran: ok"
            if any(w.startswith(("ran:", "cut off:")) and by == x[1] for w, by in words):
                words.remove(x)
        return " · ".join(f"{w} by {by}" if by else w for w, by in words)

    def versions_text(self) -> str:
        return f"v{self.first}" if self.first == self.last else f"v{self.first}–v{self.last}"


_OP_WORDS = {"create": "created", "edit": "edited", "run": "ran", "result": "ran",
             "recovered": "cut off", "flags": "flags", "delete": "deleted",
             "restore": "restored from the trash", "merge": "merged", "split": "split",
             "import": "imported", "fork": "forked"}


def op_words(op: str) -> str:
    """A version's op in words: "edited", "restored v3", "moved from 3 to 5" (a move's op is
    "move:FROM:TO", 1-based places in the dialogue at the time)."""
    if op in _OP_WORDS:
        return _OP_WORDS[op]
    what, _, rest = op.partition(":")
    if what == "restore" and rest:
        return f"restored v{rest}"
    if what == "move" and rest.count(":") == 1:
        a, b = rest.split(":")
        return f"moved from {a} to {b}"
    return op


def moved(versions: list[Any]) -> bool:
    """Whether any of these versions is a move (`MOVE_NOTE` then says what a restore does)."""
    return any(v.op.startswith("move:") for v in versions)


# what a restore does with a moved message, said wherever its history offers a restore
MOVE_NOTE = ("A move is a version too; restoring a version brings back its content, not its "
             "place (move the message to put it back).")


# the authors that act for a message of the dialogue (an answer, a cell), named with it
_CAUSED = {"model": "answer", "kernel": "cell"}


def who(v: Any) -> str:
    """Who made version `v` (a store.Version), in words: "user", "restore", "model, in answer
    3f2a91c0", "kernel, in cell 8d01bb2e"."""
    author = getattr(v, "author", "user") or "user"
    cause = getattr(v, "cause", "")
    return f"{author}, in {_CAUSED[author]} {cause}" if author in _CAUSED and cause else author


def _key(state: dict[str, Any]) -> tuple[str, str]:
    return (str(state.get("kind") or ""), state.get("source") or "")


def source_diff(before: str, after: str, *, old: str = "before", new: str = "after") -> str:
    """A unified diff of two sources (difflib, 2 lines of context); "" when they are equal."""
    if before == after:
        return ""
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), old, new, n=2,
                                 lineterm="")
    return "\n".join(lines)


def steps(versions: list[Any]) -> list[Step]:
    """Group versions (oldest first) into steps: a new step wherever the source or kind changes."""
    out: list[Step] = []
    for v in versions:
        if out and _key(out[-1].state) == _key(v.state):
            out[-1].versions.append(v)
            continue
        prev = out[-1] if out else None
        step = Step(len(out) + 1, [v])
        if prev is not None:
            step.diff = source_diff(prev.source, v.state.get("source") or "",
                                    old=f"step {prev.number} ({prev.versions_text()})",
                                    new=f"step {step.number} (v{v.version})")
        out.append(step)
    for s in out:  # the header names the step's whole span once it is known
        if s.diff:
            head, _, rest = s.diff.partition("\n")
            second, _, body = rest.partition("\n")
            s.diff = "\n".join([head, second.replace(f"(v{s.first})", f"({s.versions_text()})"),
                                body])
    return out


def belonging_state(versions: list[Any], version: int) -> dict[str, Any]:
    """The state that restoring `version` brings back: its source, kind and flags, with the
    outputs (or answer) of the last finished run of that same source in its step; with none
    (the source never ran), the run's fields are cleared, so no output of other code stays
    beside it. Raises KeyError if there is no such version."""
    target = next((v for v in versions if v.version == version), None)
    if target is None:
        raise KeyError(version)
    state = dict(target.state)
    kind = str(state.get("kind") or "")
    if kind not in STATE_OF_A_RUN:
        return state
    step = next(s for s in steps(versions) if any(v.version == version for v in s.versions))
    results = [v for v in step.versions if v.op in RESULT_OPS]
    ran = results[-1].state if results else {}
    for k, empty in STATE_OF_A_RUN[kind].items():
        state[k] = ran[k] if k in ran else (type(empty)() if empty is not None else None)
    meta = {k: v for k, v in (state.get("meta") or {}).items() if k not in RUN_META}
    meta.update({k: v for k, v in (ran.get("meta") or {}).items() if k in RUN_META})
    state["meta"] = meta
    return state
