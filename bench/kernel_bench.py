"""Round-trip latency of `1+1` through dialogue's Kernel, next to bare jupyter_client.

Both kernels are ipykernel over IPC sockets in a private directory, started in this process, so
the difference is what dialogue adds on the client side (output shaping, capping, liveness
polling, locking). Baselines, measured in the same run:

- bare: jupyter_client's AsyncKernelClient, `execute` then read IOPub until the kernel goes
  idle and read the shell reply; the least a client can do;
- execute_interactive: jupyter_client's own convenience call for the same round trip.

Run: .venv/bin/python bench/kernel_bench.py [runs]   (default 200 runs, after 20 warm-up runs)
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

from jupyter_client import AsyncKernelManager

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dialogue.kernel import Kernel  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def bare_round_trip(kc) -> None:
    msg_id = kc.execute("1+1")
    while True:
        msg = await kc.get_iopub_msg(timeout=10)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            break
    while True:
        reply = await kc.get_shell_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == msg_id:
            return


async def time_it(fn, runs: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def main(runs: int) -> None:
    d = tempfile.mkdtemp(prefix="bench-k-")
    km = AsyncKernelManager(transport="ipc", ip=os.path.join(d, "k"),
                            connection_file=os.path.join(d, "kernel.json"))
    await km.start_kernel(extra_arguments=["--HistoryManager.enabled=False"])
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    k = Kernel()
    await k.start()
    try:
        async def ours() -> None:
            res = await k.run("1+1")
            assert res.ok and res.outputs[0]["data"]["text/plain"] == "2"

        async def interactive() -> None:
            await kc.execute_interactive("1+1", output_hook=lambda msg: None, timeout=10)

        # Interleave the three in blocks so that drift on a shared machine hits all alike.
        results: dict[str, list[float]] = {"bare jupyter_client": [], "execute_interactive": [],
                                           "dialogue Kernel.run": []}
        fns = {"bare jupyter_client": lambda: bare_round_trip(kc), "execute_interactive": interactive,
               "dialogue Kernel.run": ours}
        block = max(1, runs // 10)
        for i in range(0, runs, block):
            for name, fn in fns.items():
                results[name] += await time_it(fn, min(block, runs - i), warmup=20 if i == 0 else 2)
    finally:
        await k.shutdown()
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        shutil.rmtree(d, ignore_errors=True)

    base50, base99 = pct(results["bare jupyter_client"], 50), pct(results["bare jupyter_client"], 99)
    print(f"round trip of `1+1`, {runs} runs each, ipykernel over IPC, {os.cpu_count()} CPUs")
    print(f"{'client':<24}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'p50 ratio':>11}{'p99 ratio':>11}")
    for name, xs in results.items():
        p50, p99 = pct(xs, 50), pct(xs, 99)
        print(f"{name:<24}{p50 * 1e3:>10.2f}{p99 * 1e3:>10.2f}{statistics.mean(xs) * 1e3:>10.2f}"
              f"{p50 / base50:>10.2f}x{p99 / base99:>10.2f}x")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
