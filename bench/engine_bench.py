"""What the llama-server path costs per token: one answer streamed through our provider
(`llama-server:<url>`, with an adapter set: the /lora-adapters check, the hashes, the OpenAI SDK)
against the same request streamed straight from the server with httpx, in turns, on one server.

    python bench/engine_bench.py [--rounds 6] [--tokens 96] [--server PATH]

Needs the llama-server that scripts/build-llama-server builds (it builds it when missing). Prints
the median wall time per generated token of each and their ratio (ours / direct)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "Write a long story about a lighthouse keeper and the sea, in detail."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--server", default=os.environ.get("DIALOGUE_LLAMA_SERVER"))
    a = ap.parse_args()
    binary = a.server or subprocess.run([str(ROOT / "scripts" / "build-llama-server"), sys.executable],
                                        check=True, capture_output=True, text=True).stdout.split()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DIALOGUE_HOME"] = str(Path(tmp) / "home")
        from dialogue.local import adapters as A
        from loras import strong_lora
        from test_llama_server import serving
        lora = Path(A.add(strong_lora(Path(tmp) / "a.gguf", 1), "a").path)
        with serving(binary, [lora]) as url:
            asyncio.run(_bench(url, lora, a.rounds, a.tokens))


async def _bench(url: str, lora: Path, rounds: int, tokens: int) -> None:
    from dialogue.llm.base import Request, TextDelta, Turn, Usage
    from dialogue.llm.engines import LlamaServerProvider

    prov = LlamaServerProvider(f"llama-server:{url}")
    req = Request(model=prov.full_name, messages=[Turn("user", PROMPT)], max_tokens=tokens,
                  temperature=0.0, meta={"adapters": {str(lora): 1.0}})
    body = {"model": "x", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": tokens, "temperature": 0.0, "cache_prompt": True,
            "stream_options": {"include_usage": True}, "lora": [{"id": 0, "scale": 1.0}]}

    async def ours() -> tuple[float, int]:
        t0, n = time.perf_counter(), 0
        async for ev in prov.stream(req):
            if isinstance(ev, Usage):
                n = ev.output
            elif isinstance(ev, TextDelta):
                pass
        return time.perf_counter() - t0, n

    async def direct(c: httpx.AsyncClient) -> tuple[float, int]:
        t0, n = time.perf_counter(), 0
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    u = json.loads(line[6:]).get("usage")
                    if u:
                        n = u["completion_tokens"]
        return time.perf_counter() - t0, n

    per: dict[str, list[float]] = {"ours": [], "direct": []}
    async with httpx.AsyncClient(timeout=300) as c:
        await direct(c)
        await ours()  # warm: the prompt is cached on the server for both from here on
        for _ in range(rounds):
            for name, f in (("direct", lambda: direct(c)), ("ours", ours)):
                dt, n = await f()
                per[name].append(dt / max(n, 1))
    await prov.aclose()
    d, o = statistics.median(per["direct"]), statistics.median(per["ours"])
    print(f"llama-server, {tokens} tokens, {rounds} rounds in turns (median wall time per token)")
    print(f"  direct (httpx)        {d * 1000:8.2f} ms/token")
    print(f"  ours (llama-server:)  {o * 1000:8.2f} ms/token")
    print(f"  ratio ours/direct     {o / d:8.3f}x")


if __name__ == "__main__":
    main()
