"""Kernel functions as tools for the model, and the tool loop.

A tool is a function the user defined in the dialogue's kernel. Its schema is computed *inside*
the kernel, where the function lives (by `kernel/inside/tools.py`, installed there), with
`fastcore.funccall.get_schema` (signature, type hints, docstring, and parameter descriptions from
`docments` comments), so nothing is pickled across processes and the description is exactly what
the code says. Calls run there too
(`fastcore.funccall.call_func`, which also coerces JSON arguments to the annotated types; an
async tool's coroutine is then awaited in a second step).

API::

    specs = await schemas(kernel, ["search", "fetch"])          # -> list[ToolSpec]
    text, is_error = await run_tool(kernel, "search", {"q": "x"})
    box = Toolbox()
    box.add(KernelTools(kernel), specs)                          # route names to where they run
    async for ev in tool_loop(provider, request, box, max_steps=10, approve=ask_user):
        ...  # TextDelta / ToolCall / Usage from the provider, ToolResult after each call,
             # and one Done at the end

A `ToolSource` is anything with `async call(name, arguments) -> (text, is_error)`: the kernel's
functions (`KernelTools`), and the other places a tool can live, each added to the answer's
`Toolbox` with the specs it offers. `tool_loop` also takes a bare kernel (its functions are the
request's tools).

Every ToolCall the model makes is answered by exactly one ToolResult (run, refused because the
tool was not offered, denied by `approve` (see approvals.py), or not run because the step limit
was reached), so a surface that keeps `ToolResult.to_dict()` on the response message keeps every call and result.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Literal, Protocol, Sequence

from .llm.base import Done, Event, Provider, Request, TextDelta, ToolCall, ToolCallReq, ToolSpec, Turn
from .render import plain_text

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = ["ToolResult", "ToolSchemaError", "schemas", "run_tool", "tool_loop", "Approve",
           "ToolSource", "KernelTools", "Toolbox"]


class ToolSchemaError(ValueError):
    """A referenced tool cannot be offered (undefined, not callable, no docstring, a parameter
    without a type hint); the message names each problem."""


@dataclass
class ToolResult:
    """The outcome of one tool call, as it went back to the model. `error` is True when the call
    raised, was refused, denied or not run; `result` then says why."""

    id: str
    name: str
    arguments: dict[str, Any]
    result: str
    error: bool = False
    type: Literal["tool_result"] = "tool_result"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# True runs the call; False, or a text saying why, does not (the text is the call's result)
Approve = Callable[[ToolCall], Awaitable["bool | str"]]


class ToolSource(Protocol):
    """Where some of an answer's tools run. `call` never raises for a tool's own failure: it
    returns (text, True) so the model is told and can carry on."""

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]: ...


class KernelTools:
    """The dialogue's kernel functions (&`fn` references) as a ToolSource."""

    def __init__(self, kernel: "Kernel", *, timeout: float = 60.0, limit: int = 20_000):
        self.kernel, self.timeout, self.limit = kernel, timeout, limit

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        return await run_tool(self.kernel, name, arguments, timeout=self.timeout, limit=self.limit)


class Toolbox:
    """The tools one answer may call: their specs, in the order offered, each routed to the
    source that runs it. Two sources offering one name is an error (the model could not tell
    them apart)."""

    def __init__(self) -> None:
        self.specs: list[ToolSpec] = []
        self._routes: dict[str, ToolSource] = {}

    def add(self, source: ToolSource, specs: Sequence[ToolSpec]) -> None:
        for spec in specs:
            if spec.name in self._routes:
                raise ToolSchemaError(f"two tools are named {spec.name!r}; rename one of them")
        for spec in specs:
            self._routes[spec.name] = source
            self.specs.append(spec)

    def __contains__(self, name: str) -> bool:
        return name in self._routes

    def __bool__(self) -> bool:
        return bool(self._routes)

    def spec(self, name: str) -> ToolSpec | None:
        return next((s for s in self.specs if s.name == name), None)

    def source(self, name: str) -> ToolSource | None:
        return self._routes.get(name)

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        source = self._routes.get(name)
        if source is None:
            return f"there is no tool named {name!r}", True
        return await source.call(name, arguments)

_MODULE = "_dialogue_tools"  # what kernel/inside/tools.py is called in the kernel


async def _install(kernel: "Kernel") -> None:
    from .kernel import inside
    await kernel.ensure_module(_MODULE, inside.source("tools"), filename=inside.path("tools"))


async def schemas(kernel: "Kernel", names: Sequence[str], *, timeout: float = 30.0) -> list[ToolSpec]:
    """Tool specs for kernel functions `names`, computed in the kernel. Raises ToolSchemaError
    listing every name that cannot be a tool."""
    names = list(dict.fromkeys(names))
    if not names:
        return []
    await _install(kernel)
    raw = await kernel.call("", f"__import__({_MODULE!r}).schemas({names!r})", timeout=timeout)
    got = json.loads(raw or "{}")
    errors = [got[n]["error"] for n in names if "error" in got.get(n, {"error": n})]
    if errors:
        raise ToolSchemaError("cannot offer these tools: " + "; ".join(errors))
    return [ToolSpec(name=n, description=got[n]["ok"].get("description", ""),
                     parameters=got[n]["ok"].get("parameters", {"type": "object", "properties": {}}),
                     source="kernel")
            for n in names]


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[result cut: {len(text) - limit:,} more characters]"


async def run_tool(kernel: "Kernel", name: str, arguments: dict[str, Any], *, timeout: float = 60.0,
                   limit: int = 20_000) -> tuple[str, bool]:
    """Call kernel function `name` with `arguments`; returns (text, is_error). The text is what
    it printed followed by its value (a str as is, anything else as the kernel displays it), or
    the traceback when it raised. A timeout or a dead kernel is an error result, not an
    exception: the model is told and can carry on."""
    from .kernel import ExecutionError, KernelDied, KernelTimeout

    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}", True
    await _install(kernel)
    take = f"__import__({_MODULE!r}).take()"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        raw = await kernel.call(f"__import__({_MODULE!r}).call({name!r}, {json.dumps(arguments)!r})",
                                take, timeout=timeout)
        if json.loads(raw or "null") == {"pending": True}:  # an async tool: await it
            raw = await kernel.call(f"await __import__({_MODULE!r}).finish()", take,
                                    timeout=max(0.1, deadline - loop.time()))
    except KernelTimeout as e:
        return f"{name} did not finish: {e}", True
    except KernelDied as e:
        return f"the kernel died while running {name}: {e}", True
    except ExecutionError as e:  # KeyboardInterrupt and the like, outside the function's try
        return f"{name} was stopped: {e}", True
    got = json.loads(raw or "null") or {"ok": False, "text": "no result came back"}
    # what the tool printed as a page shows it: a progress bar's last state, no escape codes
    return _cap(plain_text(got["text"]), limit), not got["ok"]


async def tool_loop(provider: Provider, request: Request, tools: "Toolbox | Kernel", *, max_steps: int = 10,
                    approve: Approve | None = None, timeout: float = 60.0, limit: int = 20_000
                    ) -> AsyncIterator[Event | ToolResult]:
    """Stream `request`, running the model's tool calls through `tools` (a Toolbox, or a kernel
    whose functions are the request's tools) and sending their results back, until the model
    answers without calling a tool.

    Yields the provider's TextDelta, ToolCall and Usage events, a ToolResult after each call,
    and a single Done at the end: the model's own last stop reason, or "max_steps" when the
    model still wanted tools after `max_steps` rounds of calls (those calls are answered with an
    error result and not run). A call to a tool the Toolbox does not hold (for a kernel: one the
    request did not offer) is refused without running anything; `approve(call)` returning False (or a text: the reason the model is told)
    denies a call. `request` is not modified.
    Closing the iterator closes the provider's stream."""
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if not isinstance(tools, Toolbox):
        box = Toolbox()
        box.add(KernelTools(tools, timeout=timeout, limit=limit), request.tools)
        tools = box
    req = replace(request, messages=list(request.messages))
    rounds = 0
    while True:
        text: list[str] = []
        calls: list[ToolCall] = []
        done = Done()
        async with contextlib.aclosing(provider.stream(req)) as events:
            async for ev in events:
                if isinstance(ev, Done):
                    done = ev
                    continue
                if isinstance(ev, TextDelta):
                    text.append(ev.text)
                elif isinstance(ev, ToolCall):
                    calls.append(ev)
                yield ev
        if not calls:
            yield done
            return
        # the prefill began this round's answer: it is part of that turn now, not the next one's
        req.messages.append(Turn(role="assistant", content=req.prefill + "".join(text), tool_calls=[
            ToolCallReq(id=c.id, name=c.name, arguments=c.arguments) for c in calls]))
        req.prefill = ""
        over = rounds >= max_steps
        for c in calls:
            res = await _answer(c, tools, approve, over, max_steps)
            yield res
            req.messages.append(Turn(role="tool", content=res.result, tool_call_id=c.id, name=c.name))
        if over:
            yield Done(stop_reason="max_steps")
            return
        rounds += 1


async def _answer(c: ToolCall, tools: Toolbox, approve: Approve | None, over: bool,
                  max_steps: int) -> ToolResult:
    def result(text: str, error: bool) -> ToolResult:
        return ToolResult(id=c.id, name=c.name, arguments=c.arguments, result=text, error=error)

    if c.name not in tools:
        avail = ", ".join(sorted(s.name for s in tools.specs)) or "none"
        return result(f"there is no tool named {c.name!r} (tools offered: {avail}); it was not run", True)
    if getattr(c, "error", ""):
        return result(c.error, True)
    if over:
        return result(f"not run: the limit of {max_steps} rounds of tool calls was reached", True)
    if approve is not None:
        ok = await approve(c)
        if ok is not True:  # False, or why it was not run (approvals.Gate's texts)
            return result(ok if isinstance(ok, str) and ok else "denied by the user", True)
    text, err = await tools.call(c.name, c.arguments)
    return result(text, err)
