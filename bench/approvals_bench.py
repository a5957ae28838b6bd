"""What the approval check adds to a tool call that needs no question, side by side in one run.

    python bench/approvals_bench.py [--n 5000] [--kernel 200]

Rows (microseconds per call, the median of 5 batches of `--n` calls; ratios against the direct
call of the same in-process tool):

- direct: `Toolbox.call` of a trivial in-process tool source, the baseline;
- gate, reading tool: `approvals.Gate` deciding that a reads_only tool runs without asking (it
  reads the dialogue's settings from the real SQLite file at each call, so an "always allow"
  given in another tab counts), then the call;
- gate, always allowed: the same for a changing tool on the dialogue's always-allowed list;
- kernel &fn (with --kernel N): `tools.run_tool` of a one-line function in a real ipykernel, the
  cost an approval check is set beside for the tools users write.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from dialogue.approvals import Gate
from dialogue.llm.base import ToolCall, ToolSpec
from dialogue.service import DialogueService
from dialogue.tools import Toolbox, run_tool


class Trivial:
    async def call(self, name: str, arguments: dict) -> tuple[str, bool]:
        return "ok", False


async def per_call(fn, n: int) -> float:
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            await fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


async def main(n: int, kernel_n: int) -> None:
    tmp = tempfile.mkdtemp(prefix="approvals-bench-")
    svc = DialogueService(os.path.join(tmp, "b.db"))
    svc.create("t")
    svc.allow_tool("t", "write")
    did = svc.dialogue_id("t")
    box = Toolbox()
    box.add(Trivial(), [ToolSpec("read", reads_only=True), ToolSpec("write")])
    gate = Gate(box, False, settings=lambda: svc.store.get_dialogue(did, with_messages=False).meta,
                remember=lambda name: None, event=lambda data: None)

    async def gated(name: str) -> None:
        assert await gate(ToolCall("1", name, {})) is True
        await box.call(name, {})

    base = await per_call(lambda: box.call("read", {}), n)
    rows = [("direct", base),
            ("gate, reading tool", await per_call(lambda: gated("read"), n)),
            ("gate, always allowed", await per_call(lambda: gated("write"), n))]
    if kernel_n:
        k = await svc.kernel("t")
        await k.run('def bump(n: int) -> int:\n    "Add one."\n    return n + 1')
        rows.append(("kernel &fn", await per_call(lambda: run_tool(k, "bump", {"n": 1}),
                                                  kernel_n)))
        await svc.shutdown_kernels()
    svc.close()
    print(f"{'':24} {'us/call':>10} {'x direct':>10}")
    for name, us in rows:
        print(f"{name:24} {us:10.1f} {us / base:10.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--kernel", type=int, default=200, help="kernel calls per batch (0: none)")
    a = ap.parse_args()
    asyncio.run(main(a.n, a.kernel))
