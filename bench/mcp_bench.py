"""What an MCP tool call costs: the same tool (tests/mcp_server.py's `add`) called directly as
Python, through the `mcp` SDK's own Client, and through our ToolSource (`MCPTools`, as an answer's
Toolbox calls it), over stdio and streamable HTTP, side by side in the same run.

    python bench/mcp_bench.py [--n 200] [--batches 5]

Rows (wall-clock microseconds per call, the median of the batches' means):

- direct: `add(2, 3)` as Python in this process, the baseline of the work itself;
- SDK stdio / SDK http: `Client.call_tool("add", ...)` on a connection kept open, the protocol's
  own price (JSON-RPC, a second process, pydantic models both sides);
- ours stdio / ours http: `MCPTools.call("s__add", ...)`, through the connection our pool keeps
  (the call timeout, error handling, result to text): the figure minus the SDK's is ours.

Start-up (process spawn, handshake, tools/list) is timed once per transport and printed apart.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dialogue import mcptools

SERVER = str(Path(__file__).resolve().parents[1] / "tests" / "mcp_server.py")


def add(a: int, b: int) -> str:
    return str(a + b)


async def timed(fn, n: int, batches: int) -> float:
    means = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        means.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(means)


def free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


async def main(n: int, batches: int) -> None:
    from mcp import Client, StdioServerParameters
    rows: list[tuple[str, float]] = []

    async def direct() -> None:
        add(2, 3)
    rows.append(("direct", await timed(direct, n * 10, batches)))

    port = free_port()
    web = subprocess.Popen([sys.executable, SERVER, "--http", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with socket.socket() as so:
                if so.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/mcp"
        targets = {"stdio": StdioServerParameters(command=sys.executable, args=[SERVER]),
                   "http": url}
        entries = {"stdio": {"command": sys.executable, "args": [SERVER]}, "http": {"url": url}}
        pool = mcptools.MCPPool()
        starts = []
        for kind, target in targets.items():
            cfg = mcptools.parse_entry("s", entries[kind])
            t0 = time.perf_counter()
            source, _ = await mcptools.specs_of(pool, [cfg])
            starts.append((kind, time.perf_counter() - t0))
            async with Client(target, cache=None) as c:
                async def sdk() -> None:
                    await c.call_tool("add", {"a": 2, "b": 3})

                async def ours() -> None:
                    text, err = await source.call("s__add", {"a": 2, "b": 3})
                    assert text == "5" and not err
                await sdk()
                # the two take turns, batch by batch, so a busy machine weighs on both alike
                got: dict[str, list[float]] = {"SDK": [], "ours": []}
                for _ in range(batches):
                    got["SDK"].append(await timed(sdk, n, 1))
                    got["ours"].append(await timed(ours, n, 1))
                rows += [(f"{who} {kind}", statistics.median(v)) for who, v in got.items()]
        await pool.close()
    finally:
        web.terminate()
        web.wait(10)
    base = rows[0][1]
    sdk = dict(rows)
    print(f"{'row':<12}{'µs/call':>12}{'x direct':>12}{'x SDK':>10}")
    for name, us in rows:
        ref = sdk.get("SDK " + name.split()[-1]) if name.startswith("ours") else None
        print(f"{name:<12}{us:>12,.1f}{us / base:>12,.0f}"
              + (f"{us / ref:>10.2f}" if ref else ""))
    for kind, s in starts:
        print(f"start-up {kind}: {s:.2f} s (spawn or connect, handshake, tools/list)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batches", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.n, a.batches))
