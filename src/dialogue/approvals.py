"""Approvals: which of the model's tool calls ask the user first, and how they are asked.

The rule (the same for every tool, wherever it runs: kernel functions, document tools, MCP):

- a tool that changes or runs anything (`ToolSpec.reads_only` False; kernel functions are) asks;
- a reading tool runs without asking, unless the dialogue says to ask for those too;
- a tool the user allowed "always" in this dialogue runs without asking.

What the dialogue says lives in its meta, versioned like every setting:
`meta["approvals"] = {"always": [tool names], "ask_reads": bool}`.

How a call is asked depends on the surface (`Gate`'s `mode`): "ask" (the web: an approval
event, answered later through `DialogueService.approve`), True (allow all: `--yes`,
`approve=True`), False / None (nobody to ask: calls that need asking are denied), or a callable
`(call info) -> "once" | "always" | "deny" | bool` (the terminal's y / a / n). The model gets
"denied by the user" for a denial, and goes on.

A call waiting for an answer is "pending": the run's state and the message's
`meta["pending"]` (so a reloaded page shows it and another process sees it) hold
`{"id", "name", "arguments", "preview"}`. An answer that ends before the user decided (Stop, a
closed server, a killed process found by `Store.recover_interrupted`) stores each pending call as
denied: `settle_pending`.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .llm.base import ToolCall, ToolSpec

log = logging.getLogger(__name__)

__all__ = ["ONCE", "ALWAYS", "DENY", "DECISIONS", "DENIED", "UNATTENDED", "ENDED",
           "ApprovalError", "settings_of", "needs_asking", "with_always",
           "decision_of", "settle_pending", "describe_call", "Gate"]

ONCE, ALWAYS, DENY = "once", "always", "deny"
DECISIONS = (ONCE, ALWAYS, DENY)

# What the model reads as the tool's result when a call was not run.
DENIED = "denied by the user"
UNATTENDED = ("denied: this call needs the user's approval and nobody was there to give it "
              "(a command without a terminal, or approve= not given)")
ENDED = "denied: the answer ended before the user decided on this call"


class ApprovalError(ValueError):
    """An answer to an approval that cannot be taken (an unknown decision, no such call)."""


def settings_of(meta: dict[str, Any] | None) -> dict[str, Any]:
    """The dialogue's approval settings, with their defaults: {"always": [...], "ask_reads": bool}.
    A malformed value (an imported file is data) counts as unset."""
    a = (meta or {}).get("approvals")
    a = a if isinstance(a, dict) else {}
    always = a.get("always")
    return {"always": [n for n in always if isinstance(n, str)] if isinstance(always, list) else [],
            "ask_reads": a.get("ask_reads") is True}


def needs_asking(spec: "ToolSpec | None", meta: dict[str, Any] | None) -> bool:
    """Whether a call of `spec` (None: a tool nobody described) asks the user first."""
    if spec is None:
        return True
    s = settings_of(meta)
    if spec.name in s["always"]:
        return False
    return not spec.reads_only or s["ask_reads"]


def with_always(meta: dict[str, Any], name: str, allow: bool = True) -> dict[str, Any]:
    """`meta` with tool `name` added to (or, `allow=False`, taken off) the always-allowed list."""
    s = settings_of(meta)
    always = [n for n in s["always"] if n != name] + ([name] if allow else [])
    return {**meta, "approvals": {**s, "always": always}}


def decision_of(value: Any) -> str:
    """once | always | deny from what a surface answered (True: once, False/None: deny; the
    terminal's y / a / n and yes / no too)."""
    if value is True:
        return ONCE
    if value is False or value is None:
        return DENY
    word = value.strip().lower() if isinstance(value, str) else ""
    word = {"y": ONCE, "yes": ONCE, "a": ALWAYS, "n": DENY, "no": DENY}.get(word, word)
    if word in DECISIONS:
        return word
    raise ApprovalError(f"an approval is one of {', '.join(DECISIONS)}, not {value!r}")


def settle_pending(meta: dict[str, Any], tool_calls: list[dict[str, Any]], reason: str = ENDED,
                   *, pending: list[dict[str, Any]] | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, tool_calls) with every pending call stored as denied (`reason`) and no pending
    left: what an answer that ended before the user decided keeps. `pending`: the calls still
    waiting (by default the ones `meta["pending"]` lists)."""
    if pending is None:
        pending = meta.get("pending") or []
    ids = {p.get("id") for p in pending if isinstance(p, dict)}
    calls = [{**c, "result": reason, "error": True, "denied": True}
             if c.get("id") in ids and c.get("result") is None else c for c in tool_calls]
    return {k: v for k, v in meta.items() if k != "pending"}, calls


def describe_call(info: dict[str, Any]) -> str:
    """The call as one line of text: name(arguments as JSON)."""
    return f"{info.get('name', '?')}({json.dumps(info.get('arguments', {}), ensure_ascii=False)})"


Mode = Any  # "ask" | bool | None | Callable[[dict], str | bool | Awaitable[str | bool]]


class Gate:
    """The `approve` callable a tool loop awaits before each call (tools.tool_loop).

    `toolbox`: the answer's Toolbox (specs, and each tool's source, whose optional
    `preview(name, arguments)` says what the call would do). `settings()`: the dialogue's meta
    now (read at each call, so an "always" given earlier in this answer, or in another tab,
    counts). `remember(name)`: store "always allow `name`" in the dialogue. `event(data)`: each
    approval event ({"id", "name", "arguments", "preview"} when asking, then {"id", "name",
    "decision", "reason"} when decided). In "ask" mode the decision comes through `decide`."""

    def __init__(self, toolbox: Any, mode: Mode, *, settings: Callable[[], dict[str, Any]],
                 remember: Callable[[str], Any], event: Callable[[dict[str, Any]], None]):
        self.toolbox, self.mode = toolbox, mode
        self.settings, self.remember, self.event = settings, remember, event
        self.waiting: dict[str, asyncio.Future] = {}

    async def preview(self, call: "ToolCall") -> dict[str, Any] | None:
        source = self.toolbox.source(call.name)
        fn = getattr(source, "preview", None)
        if fn is None:
            return None
        try:
            got = await fn(call.name, call.arguments)
        except Exception as e:  # noqa: BLE001 - a preview is an aid: the call is still shown
            log.warning("preview of %s failed: %s", call.name, e)
            return {"kind": "error", "text": f"no preview: {e}"}
        return got if isinstance(got, dict) else None

    def decide(self, call_id: str, decision: Any) -> None:
        """Answer the pending call `call_id` (the web's buttons, through the service)."""
        d = decision_of(decision)
        fut = self.waiting.get(call_id)
        if fut is None or fut.done():
            raise ApprovalError("this tool call is not waiting for an answer (it was answered, "
                                "or the answer ended)")
        fut.set_result(d)

    async def __call__(self, call: "ToolCall") -> bool | str:
        spec = self.toolbox.spec(call.name)
        if not needs_asking(spec, self.settings()):
            return True
        base = {"id": call.id, "name": call.name, "arguments": call.arguments}
        mode = self.mode
        if mode is True:
            return self._decided(base, ONCE, "allowed for the whole run")
        if mode is False or mode is None:
            self._decided(base, DENY, "unattended")
            return UNATTENDED
        info = {**base, "preview": await self.preview(call),
                "source": spec.source if spec else "", "reads_only": bool(spec and spec.reads_only)}
        if mode == "ask":
            fut = self.waiting[call.id] = asyncio.get_running_loop().create_future()
            self.event(info)
            try:
                decision = await fut
            finally:
                self.waiting.pop(call.id, None)
        elif callable(mode):
            if inspect.iscoroutinefunction(mode):
                got = await mode(info)
            else:
                got = await asyncio.to_thread(mode, info)
                if inspect.isawaitable(got):
                    got = await got
            decision = decision_of(got)
        else:
            raise ApprovalError(f"approve must be 'ask', True, False or a callable, not {mode!r}")
        if decision == DENY:
            self._decided(base, DENY, "the user")
            return DENIED
        if decision == ALWAYS:
            self.remember(call.name)
        return self._decided(base, decision, "the user")

    def _decided(self, base: dict[str, Any], decision: str, reason: str) -> bool:
        self.event({**base, "decision": decision, "reason": reason})
        return decision != DENY
