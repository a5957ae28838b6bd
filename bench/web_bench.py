"""Web app speed, each figure against a baseline measured in the same run.

    python bench/web_bench.py [--messages 1000] [--tokens 64] [--repeat 3]

1. Rendering a long dialogue page: GET /d/<id> of a dialogue with `--messages` messages (code
   with outputs, notes, prompts with answers), through the whole app in process (routing, the
   security middleware, building the FT tree, HTML), against reading the same dialogue from the
   store (the floor: the page cannot be faster than loading what it shows). Printed: both times,
   the ratio, the page size.
2. The web path's own cost per token: an answer of `--sse-tokens` pieces from the OpenAI adapter
   reading a local OpenAI-protocol server (so fast that the web path is all there is to measure),
   as a browser gets it (POST run, then the Server-Sent Events stream from a real uvicorn on
   127.0.0.1: service, store flushes, relay, HTML escaping, SSE framing, HTTP) against the same
   stream read from the provider directly.
3. The same comparison with the bundled local model, where generation sets the pace: time per
   token both ways (greedy decoding, the same tokens), the difference, and the first token.
   On a shared machine the run-to-run spread of the raw stream is printed beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from dialogue import context  # noqa: E402
from dialogue.llm.base import TextDelta, get_provider  # noqa: E402
from dialogue.service import DialogueService  # noqa: E402
from dialogue.web import create_app  # noqa: E402

HX = {"HX-Request": "true"}


def fill(svc: DialogueService, n: int) -> str:
    d = svc.create(f"long {n}")
    for i in range(n):
        k = i % 4
        if k == 0:
            svc.add(d.id, "note", f"## Step {i}\nSome *markdown* with `code` and a [link](https://example.com).")
        elif k == 1:
            svc.add(d.id, "code", f"xs = [x * {i} for x in range(10)]\nprint(sum(xs))\nxs[:3]",
                    outputs=[{"output_type": "stream", "name": "stdout", "text": f"{45 * i}\n"},
                             {"output_type": "execute_result", "execution_count": i, "metadata": {},
                              "data": {"text/plain": f"[0, {i}, {2 * i}]"}}], execution_count=i)
        elif k == 2:
            svc.add(d.id, "prompt", f"What does step {i} compute?",
                    response=f"It sums **ten multiples** of {i}:\n\n```python\nsum(x * {i} for x in range(10))\n```",
                    usage={"input": 500 + i, "output": 40, "cache_read": 400, "cache_write": 0,
                           "model": "local:default", "stop_reason": "end", "cost": 0.0})
        else:
            svc.add(d.id, "code", f"def f{i}(a, b):\n    return a + b * {i}")
    return d.id


def bench_page(n: int, repeat: int, tmp: Path) -> None:
    db = tmp / "page.db"
    svc = DialogueService(db)
    did = fill(svc, n)
    store_t = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        svc.open(did)
        store_t.append(time.perf_counter() - t0)
    svc.close()
    page_t, size = [], 0
    with TestClient(create_app(DialogueService(db)), base_url="http://127.0.0.1:5001") as c:
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            r = c.get(f"/d/{did}")
            page_t.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.text.count('class="cell ') == n
            size = len(r.content)
    s, cold, warm = statistics.median(store_t[1:]), page_t[0], statistics.median(page_t[1:])
    print(f"page of {n} messages ({size / 1e6:.2f} MB of HTML), store read {s * 1000:.1f} ms:")
    print(f"  first open {cold * 1000:.0f} ms (x{cold / s:.0f} the store read, "
          f"{cold / n * 1e6:.0f} us per message: highlighting, markdown, HTML)")
    print(f"  reopen {warm * 1000:.1f} ms (x{warm / s:.1f} the store read: cells come from the "
          f"cache of rendered versions)")


async def raw_stream(did: str, mid: str, svc: DialogueService, max_tokens: int) -> list[float]:
    """Arrival times of the answer's pieces, from the provider directly (0 = request sent)."""
    d = svc.open(did)
    provider = get_provider(d.model)
    req = context.build(d, mid, max_tokens=max_tokens)
    t0 = time.perf_counter()
    times = []
    async for ev in provider.stream(req):
        if isinstance(ev, TextDelta):
            times.append(time.perf_counter() - t0)
    if hasattr(provider, "aclose"):  # an SDK's HTTP pool belongs to this (short-lived) loop
        await provider.aclose()
    return times


def web_stream(c: httpx.Client, did: str, mid: str) -> list[float]:
    """Arrival times of the answer's SSE text events at an HTTP client (0 = the POST run)."""
    t0 = time.perf_counter()
    assert c.post(f"/d/{did}/m/{mid}/run", headers=HX).status_code == 200
    times = []
    with c.stream("GET", f"/d/{did}/m/{mid}/stream", timeout=600) as r:
        for line in r.iter_lines():
            if line == "event: text":
                times.append(time.perf_counter() - t0)
            elif line == "event: close":
                break
    return times


def bench_stream(max_tokens: int, repeat: int, tmp: Path) -> None:
    db = tmp / "stream.db"
    setup = DialogueService(db)
    d = setup.create("stream", model="local:default", meta={"max_tokens": max_tokens})
    m = setup.add(d.id, "prompt", "Write a long story about a lighthouse keeper and the sea.")
    setup.close()

    svc = DialogueService(db)
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    reader = DialogueService(db)  # the raw path reads the dialogue on its own connection
    raw, web = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
        for i in range(repeat + 1):  # round 0 loads the model and fills the KV cache
            pair = [("raw", lambda: asyncio.run(raw_stream(d.id, m.id, reader, max_tokens))),
                    ("web", lambda: web_stream(c, d.id, m.id))]
            for name, fn in (pair if i % 2 else pair[::-1]):  # alternate who goes first
                times = fn()
                if i:
                    (raw if name == "raw" else web).append(times)
    server.should_exit = True
    th.join(10)
    reader.close()

    def decode(ts: list[float]) -> float:  # seconds per piece after the first
        return (ts[-1] - ts[0]) / max(1, len(ts) - 1)

    n_raw, n_web = len(raw[0]), len(web[0])
    per_raw = statistics.median(decode(t) for t in raw)
    per_web = statistics.median(decode(t) for t in web)
    spread = statistics.pstdev([decode(t) for t in raw]) if len(raw) > 1 else 0.0
    ttft_raw = statistics.median(t[0] for t in raw)
    ttft_web = statistics.median(t[0] for t in web)
    print(f"answer of {n_raw} pieces from the provider, {n_web} SSE text events at the client "
          f"(median of {repeat} runs each, alternating):")
    print(f"  per token: raw provider stream {per_raw * 1000:.2f} ms, through the web app "
          f"{per_web * 1000:.2f} ms: overhead {(per_web - per_raw) * 1000:+.2f} ms/token "
          f"(x{per_web / per_raw:.3f}; run-to-run spread of the raw stream "
          f"{spread * 1000:.2f} ms)")
    print(f"  first token: raw {ttft_raw * 1000:.0f} ms, web {ttft_web * 1000:.0f} ms "
          f"(web includes the POST, the page's fragment and opening the stream)")


def bench_sse_overhead(n_tokens: int, repeat: int, tmp: Path) -> None:
    """The web path's own cost per token, with a provider far faster than any model: the OpenAI
    adapter reading a Chat Completions stream of `n_tokens` chunks from a local HTTP server (the
    test suite's replay server), directly and through the web app."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from servers import ReplayServer, openai_chunks, sse

    words = [f" w{i}" for i in range(n_tokens)]
    db = tmp / "sse.db"
    with ReplayServer() as srv:
        model = f"openai-compatible:{srv.openai_base_url}/bench"
        setup = DialogueService(db)
        d = setup.create("sse", model=model)
        m = setup.add(d.id, "prompt", "Count.")
        setup.close()
        svc = DialogueService(db)
        server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=0,
                                               log_level="warning", lifespan="on"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        reader = DialogueService(db)
        raw, web = [], []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            for i in range(repeat + 1):
                for which in (("raw", "web") if i % 2 else ("web", "raw")):
                    srv.push(sse(openai_chunks(words)))
                    if which == "raw":
                        ts = asyncio.run(raw_stream(d.id, m.id, reader, 4096))
                    else:
                        ts = web_stream(c, d.id, m.id)
                    assert len(ts) == n_tokens, (which, len(ts))
                    if i:
                        (raw if which == "raw" else web).append(ts[-1])
        server.should_exit = True
        th.join(10)
        reader.close()
    r, w = statistics.median(raw) / n_tokens, statistics.median(web) / n_tokens
    print(f"SSE path cost, {n_tokens} tokens from a local OpenAI-protocol server (median of "
          f"{repeat}): raw provider stream {r * 1e6:.0f} us/token, through the web app "
          f"{w * 1e6:.0f} us/token: overhead {(w - r) * 1e6:+.0f} us/token (x{w / r:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sse-tokens", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-stream", action="store_true", help="only the page benchmark")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DIALOGUE_HOME", str(Path(tmp) / "home"))
        os.environ.setdefault("DIALOGUE_CACHE_DIR", str(Path(tmp) / "kv"))
        bench_page(a.messages, a.repeat, Path(tmp))
        if not a.skip_stream:
            bench_sse_overhead(a.sse_tokens, a.repeat, Path(tmp))
            bench_stream(a.tokens, a.repeat, Path(tmp))


if __name__ == "__main__":
    main()
