"""A kernel on a gateway: round-trip latency of `1+1` and the time to stream 20,000 printed lines,
through dialogue's RemoteKernel, next to baselines measured in the same run:

- bare websocket: the `websockets` package speaking the Jupyter protocol to the same gateway
  kernel (send execute_request, read until its idle and its reply): the least a client can do, so
  the difference is what RemoteKernel adds (output capping and folding, liveness, locking);
- local: dialogue's own Kernel on this machine (IPC sockets), for what the gateway hop costs.

The gateway is a real Jupyter Kernel Gateway on 127.0.0.1 (tests/gateways.py starts it).

Measured here (2 shared cores): a 1+1 round trip is ~48 ms for both clients, RemoteKernel and the
bare websocket alike, against ~6-13 ms for a local kernel; jupyter_server as the gateway gives the
same ~48 ms, and TCP_NODELAY forced on the gateway's sockets did not change it, so the cost is in
the gateway's relay (websocket <-> ZeroMQ), not in our client; its cause is not pinned down.

Run: .venv/bin/python bench/remote_kernel_bench.py [runs]   (default 200, after 20 warm-up runs)
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
import gateways  # noqa: E402
from kernel_bench import pct, time_it as timed  # noqa: E402  (bench/ is the script's dir)
from dialogue.kernel import Kernel  # noqa: E402
from dialogue.kernel.remote import Gateway, RemoteKernel  # noqa: E402
from dialogue.kernel.specs import Choice  # noqa: E402

STREAM = "for i in range(20_000): print(i)"


async def bare_round_trip(ws, session: str, code: str) -> None:
    msg_id = uuid.uuid4().hex
    await ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session,
                   "username": "bench", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": False}}))
    idle = replied = False
    while not (idle and replied):
        m = json.loads(await ws.recv())
        if m.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if m["channel"] == "shell":
            replied = True
        elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True


def line(name: str, xs: list[float]) -> str:
    return (f"{name:<22} median {statistics.median(xs) * 1e3:7.2f} ms   "
            f"p95 {pct(xs, 95) * 1e3:7.2f} ms")


async def main(runs: int) -> None:
    from websockets.asyncio.client import connect
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    url, proc = gateways.start(tmp)
    gw = Gateway(url, gateways.TOKEN)
    try:
        rk = RemoteKernel(gateway=gw, choice=Choice(gateway="python3"), cwd=tmp)
        lk = Kernel(cwd=tmp)
        await rk.start()
        await lk.start()
        kid = await gw.start_kernel("python3")
        async with connect(gw.ws_url(kid, "bench"), additional_headers=gw.headers,
                           max_size=None, compression=None) as ws:
            session = uuid.uuid4().hex
            end = time.monotonic() + 30  # until the gateway has the channels connected
            while True:
                try:
                    await asyncio.wait_for(bare_round_trip(ws, session, "1"), 2)
                    break
                except asyncio.TimeoutError:
                    if time.monotonic() > end:
                        raise
            bare = await timed(lambda: bare_round_trip(ws, session, "1+1"), runs)
            remote = await timed(lambda: rk.run("1+1"), runs)
            local = await timed(lambda: lk.run("1+1"), runs)
            print(f"round trip of 1+1, {runs} runs (Kernel Gateway on 127.0.0.1)")
            print(line("bare websocket", bare))
            print(line("RemoteKernel", remote))
            print(line("local Kernel", local))
            print(f"RemoteKernel / bare websocket: {statistics.median(remote) / statistics.median(bare):.2f}x; "
                  f"RemoteKernel / local: {statistics.median(remote) / statistics.median(local):.2f}x")
            n = max(3, runs // 40)
            sb = await timed(lambda: bare_round_trip(ws, session, STREAM), n, warmup=1)
            sr = await timed(lambda: rk.run(STREAM), n, warmup=1)
            sl = await timed(lambda: lk.run(STREAM), n, warmup=1)
            print(f"\nstreaming 20,000 printed lines, {n} runs")
            print(line("bare websocket", sb))
            print(line("RemoteKernel", sr))
            print(line("local Kernel", sl))
            print(f"RemoteKernel / bare websocket: {statistics.median(sr) / statistics.median(sb):.2f}x")
        await gw.delete(kid)
        await rk.shutdown()
        await lk.shutdown()
    finally:
        gateways.stop(proc)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
