"""What a document tool costs the model's answer beyond the work itself: a call through the tool
machinery against calling the same function directly, side by side in the same run.

    python bench/doc_tools_bench.py [--n 2000] [--messages 200] [--http 50]

Rows, each for a reading tool (read_message) and a changing one (replace_text, which writes a
version: alternately "a" -> "b" and back):

- direct: the DocumentTools method called as Python (`tools.read_message(id)`), the baseline;
- ToolSource: `await tools.call(name, arguments)`, as the Toolbox calls it (argument dispatch,
  error wrapping, the result cap);
- tool loop: one whole round of `tools.tool_loop` per call with an in-process provider that asks
  for the call and then answers (the ToolCall event, the Toolbox route, the ToolResult, the turns
  appended for the next request, a new stream): the loop's own overhead per round trip;
- SDK + HTTP (with --http N): the same round through the official Anthropic SDK against the
  local replay server of the tests (tests/servers.py), so the figure a real round trip starts
  from (the model's own time not included) can be set beside the tool's.

The figures are wall-clock microseconds per call (the median of 5 batches), on a real SQLite
file of `--messages` messages; ratios are against the direct call of the same tool.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dialogue.llm.base import Done, Request, TextDelta, ToolCall, Turn
from dialogue.service import DialogueService
from dialogue.tools import Toolbox, tool_loop


class ScriptedProvider:
    """Asks for `call` once per request whose last turn is the user's, answers after a result."""

    name = "scripted"

    def __init__(self, name: str, args: dict):
        self.tool, self.args, self.n = name, args, 0

    async def stream(self, req: Request):
        if req.messages[-1].role == "tool":
            yield TextDelta("done")
            yield Done("end")
            return
        self.n += 1
        yield ToolCall(id=f"c{self.n}", name=self.tool, arguments=dict(self.args))
        yield Done("tool_use")


async def per_call(fn, n: int) -> float:
    """Median microseconds per call of the coroutine function `fn` over 5 batches of n//5."""
    per = []
    k = max(1, n // 5)
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(k):
            await fn(i)
        per.append((time.perf_counter() - t0) / k * 1e6)
    return statistics.median(per)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--http", type=int, default=0, help="round trips through the Anthropic SDK")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    svc = DialogueService(Path(tmp) / "bench.db")
    svc.create("b", model="claude-sonnet-4-5")
    for i in range(a.messages):
        svc.add("b", "code" if i % 2 else "note", f"# message {i}\nx_{i} = {i}\nprint(x_{i})\n")
    target = svc.add("b", "code", "value = 'a'\nprint(value)\n").id
    prompt = svc.add("b", "prompt", "bench").id
    tools = svc.doc_tools_for("b", author="model", cause=prompt)
    swap = [("'a'", "'b'"), ("'b'", "'a'")]

    async def direct_read(i):
        tools.read_message(target)

    async def direct_replace(i):
        old, new = swap[i % 2]
        tools.replace_text(target, old, new)

    async def source_read(i):
        _, err = await tools.call("read_message", {"id": target})
        assert not err

    async def source_replace(i):
        old, new = swap[i % 2]
        _, err = await tools.call("replace_text", {"id": target, "old": old, "new": new})
        assert not err, _

    box = Toolbox()
    box.add(tools, tools.specs())

    def looped(name, args_of):
        async def go(i):
            prov = ScriptedProvider(name, args_of(i))
            req = Request(model="x", messages=[Turn("user", "go")], tools=list(box.specs))
            async for ev in tool_loop(prov, req, box):
                if getattr(ev, "type", "") == "tool_result":
                    assert not ev.error, ev.result
        return go

    read_args = lambda i: {"id": target}  # noqa: E731
    replace_args = lambda i: {"id": target, "old": swap[i % 2][0], "new": swap[i % 2][1]}  # noqa: E731
    # the replacement must start from 'a' in every row
    rows = []
    for label, read_fn, replace_fn in [
            ("direct (baseline)", direct_read, direct_replace),
            ("ToolSource.call", source_read, source_replace),
            ("tool loop round", looped("read_message", read_args),
             looped("replace_text", replace_args))]:
        r = await per_call(read_fn, a.n)
        tools.seen.clear()
        w = await per_call(replace_fn, a.n // 4 * 2)  # even, so it ends on 'a'
        rows.append((label, r, w))
    if a.http:
        rows.append(await through_sdk(svc, box, target, swap, a.http))
    base_r, base_w = rows[0][1], rows[0][2]
    print(f"{a.messages + 2} messages; median µs per call (ratio to the direct call)")
    print(f"{'':22} {'read_message':>22} {'replace_text':>22}")
    for label, r, w in rows:
        print(f"{label:22} {r:12.1f} ({r / base_r:5.2f}x) {w:12.1f} ({w / base_w:5.2f}x)")
    svc.close()


async def through_sdk(svc, box, target, swap, n):
    """One tool round per call through the Anthropic SDK and the local replay server."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from servers import ReplayServer, anthropic_events, sse
    from dialogue.llm.base import get_provider
    with ReplayServer() as srv:
        os.environ["ANTHROPIC_BASE_URL"] = srv.base_url
        os.environ.setdefault("ANTHROPIC_API_KEY", "bench")
        prov = get_provider("claude-sonnet-4-5")
        out = []
        for name, args_of in [("read_message", lambda i: {"id": target}),
                              ("replace_text", lambda i: {"id": target, "old": swap[i % 2][0],
                                                          "new": swap[i % 2][1]})]:
            async def go(i, name=name, args_of=args_of):
                srv.push(sse(anthropic_events(tool_uses=[(f"toolu_{i}", name, args_of(i))])),
                         sse(anthropic_events(["done"])))
                req = Request(model="claude-sonnet-4-5", messages=[Turn("user", "go")],
                              tools=list(box.specs), max_tokens=16)
                async for _ in tool_loop(prov, req, box):
                    pass
            box.source("read_message").seen.clear()
            out.append(await per_call(go, n // 2 * 2))
        await prov.aclose()
    return ("SDK + HTTP round", out[0], out[1])


if __name__ == "__main__":
    asyncio.run(main())
