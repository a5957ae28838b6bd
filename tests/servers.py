"""A real HTTP server on 127.0.0.1 that replays recorded model-API streams, for tests.

Paid APIs are tested through their official SDKs (``anthropic``, ``openai``) pointed at this
server, never at a mock object: the SDK really opens a socket, sends its JSON, parses the
Server-Sent Events and raises its own exceptions. Each request pops the next scripted `Reply`
from a FIFO queue, so a test scripts what the "API" does: a recorded stream, a 429 with
``retry-after`` then success, a 529 overload, a 400 "prompt is too long", a stream that breaks
halfway, a slow stream a client can cancel.

Why the standard library and not a framework: the cases worth testing live below what a
framework exposes (a chunked body cut without its terminating chunk, the moment a client hangs
up mid-stream), and ``http.server`` lets us write exactly those bytes.

API
---
``ReplayServer(port=0)`` -- a context manager; ``with ReplayServer() as srv:`` starts it on an
ephemeral port (or the given one: a test can start it late, after a client failed to connect) in a
daemon thread and stops it on exit.

- ``srv.base_url``        ``"http://127.0.0.1:PORT"`` (for Anthropic: ``AsyncAnthropic(base_url=...)``
                          or ``ANTHROPIC_BASE_URL``).
- ``srv.openai_base_url`` ``base_url + "/v1"`` (for ``AsyncOpenAI(base_url=...)``, ``OPENAI_BASE_URL``
                          or ``openai-compatible:<openai_base_url>/<model>``).
- ``srv.push(*replies)``  queue scripted replies; each request (any path) takes the next one. With
                          the queue empty the server answers 418 with a JSON body that says so,
                          so a test that made one call too many fails loudly instead of hanging.
- ``srv.requests``        list of `Recorded` (method, path, headers with lower-case names, raw
                          body bytes, ``json`` the parsed body or None, ``at`` monotonic time).
- ``srv.last``            the last `Recorded`; ``srv.replies_left`` how many are still queued.
- ``srv.served``          list of `Served` (one per request: status, events_sent, ``client_closed``
                          True when the client hung up before the reply was complete,
                          ``done`` a threading.Event set when the handler finished).

Replies (module functions, all return `Reply`):

- ``recorded(name, *, cut_after=None, delay=0.0)`` a stream from ``tests/data/recorded/<name>``
  (raw SSE as the API sent it: event blocks separated by blank lines).
- ``sse(blocks, ...)``    a stream from SSE blocks you build (``anthropic_events``/``openai_chunks``).
- ``anthropic_error(status, type, message, headers=None)`` the Messages API's error body
  (``{"type": "error", "error": {...}, "request_id": ...}``), e.g. ``anthropic_error(429,
  "rate_limit_error", "...", {"retry-after": "1"})``, ``anthropic_error(529, "overloaded_error",
  "Overloaded")``, ``anthropic_error(400, "invalid_request_error", "prompt is too long: 212085
  tokens > 200000 maximum")``, ``anthropic_error(404, "not_found_error", "model: claude-nope")``.
- ``openai_error(status, message, type, code, param=None, headers=None)`` OpenAI's error body
  (``{"error": {"message", "type", "param", "code"}}``), e.g. ``openai_error(400, "...",
  "invalid_request_error", "context_length_exceeded", "messages")``.
- ``json_reply(body, status=200, headers=None)`` any JSON body.

Stream options: ``cut_after=N`` sends the first N SSE blocks and then closes the socket without
finishing the chunked body (what a dropped connection looks like to the client); ``delay=s`` waits
s seconds before each block (a slow model, so a test can cancel mid-stream and then check
``srv.served[i].client_closed``).

Builders for streams of the real shapes, when a test needs content no recording has:

- ``anthropic_events(texts, *, tool_uses=(), usage=..., stop_reason=None)`` -> blocks: message_start
  (usage with cache_creation_input_tokens / cache_read_input_tokens), a text content block with one
  text_delta per item of ``texts``, one tool_use block per ``(id, name, input_dict)`` streamed as
  input_json_delta pieces, message_delta (stop_reason, cumulative usage), message_stop.
- ``openai_chunks(texts, *, tool_calls=(), usage=..., finish_reason=None)`` -> chat.completion.chunk
  blocks: role chunk, one content chunk per text, tool_calls deltas (id+name first, then argument
  pieces), the finish_reason chunk, the ``include_usage`` chunk (empty choices), ``[DONE]``.

Use from a test (pytest puts ``tests/`` on sys.path, so ``from servers import ...``)::

    from servers import ReplayServer, recorded, anthropic_error

    async def test_retry(monkeypatch):
        with ReplayServer() as srv:
            srv.push(anthropic_error(429, "rate_limit_error", "slow down", {"retry-after": "0"}),
                     recorded("anthropic_text.sse"))
            monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
            ...
            assert srv.requests[1].json["stream"] is True

The fixture ``replay_server`` (import it into a test module: ``from servers import replay_server``)
yields a started `ReplayServer`.
"""
from __future__ import annotations

import collections
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

RECORDED = Path(__file__).parent / "data" / "recorded"

__all__ = [
    "ReplayServer", "Reply", "Recorded", "Served", "replay_server", "RECORDED",
    "recorded", "sse", "anthropic_error", "openai_error", "json_reply",
    "anthropic_events", "openai_chunks", "sse_blocks",
]


# ---------------------------------------------------------------- replies

@dataclass
class Reply:
    """One scripted HTTP response. `blocks` set: an SSE stream (each block is one event, sent as
    one chunk); otherwise `body` (JSON-encoded) with `status`."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    blocks: list[str] | None = None
    cut_after: int | None = None
    delay: float = 0.0


def sse_blocks(text: str) -> list[str]:
    """Split raw SSE text into event blocks (each without its terminating blank line)."""
    return [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]


def recorded(name: str, *, cut_after: int | None = None, delay: float = 0.0,
             headers: dict[str, str] | None = None) -> Reply:
    """A recorded stream from tests/data/recorded/<name>."""
    return sse(sse_blocks((RECORDED / name).read_text(encoding="utf-8")),
               cut_after=cut_after, delay=delay, headers=headers)


def sse(blocks: Iterable[str], *, cut_after: int | None = None, delay: float = 0.0,
        headers: dict[str, str] | None = None) -> Reply:
    return Reply(200, dict(headers or {}), None, list(blocks), cut_after, delay)


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, dict(headers or {}), body)


def anthropic_error(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An error the way the Messages API sends it (also its `request-id` header)."""
    rid = "req_011CV" + uuid.uuid4().hex[:20]
    return Reply(status, {"request-id": rid, **(headers or {})},
                 {"type": "error", "error": {"type": type, "message": message}, "request_id": rid})


def openai_error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> Reply:
    """An error the way the OpenAI API sends it."""
    return Reply(status, {"x-request-id": "req_" + uuid.uuid4().hex, **(headers or {})},
                 {"error": {"message": message, "type": type, "param": param, "code": code}})


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}"


def _pieces(s: str, n: int = 3) -> list[str]:
    """Split a string into about n pieces, the way a model streams JSON arguments."""
    step = max(1, -(-len(s) // n))
    return [s[i:i + step] for i in range(0, len(s), step)]


def anthropic_events(texts: Iterable[str] = (), *, tool_uses: Iterable[tuple[str, str, dict[str, Any] | str]] = (),
                     usage: dict[str, int] | None = None, stop_reason: str | None = None,
                     model: str = "claude-sonnet-4-6") -> list[str]:
    """A Messages API stream with the exact event shapes the API sends (see module docstring).
    A tool use's input may be a dict (sent as JSON) or a raw string (to send broken JSON)."""
    texts, tool_uses = list(texts), list(tool_uses)
    u = {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 12,
         **(usage or {})}
    stop_reason = stop_reason or ("tool_use" if tool_uses else "end_turn")
    start_usage = {**u, "cache_creation": {"ephemeral_5m_input_tokens": u["cache_creation_input_tokens"],
                                           "ephemeral_1h_input_tokens": 0},
                   "output_tokens": 1, "service_tier": "standard"}
    out = [_event("message_start", {"type": "message_start", "message": {
        "model": model, "id": "msg_01" + uuid.uuid4().hex[:22], "type": "message", "role": "assistant",
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}})]
    idx = 0
    if texts:
        out.append(_event("content_block_start", {"type": "content_block_start", "index": idx,
                                                   "content_block": {"type": "text", "text": ""}}))
        out.append('event: ping\ndata: {"type": "ping"}')
        for t in texts:
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": idx,
                                                       "delta": {"type": "text_delta", "text": t}}))
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": idx}))
        idx += 1
    for tid, name, args in tool_uses:
        out.append(_event("content_block_start", {"type": "content_block_start", "index": idx, "content_block": {
            "type": "tool_use", "id": tid, "name": name, "input": {}}}))
        for piece in ["", *_pieces(args if isinstance(args, str) else json.dumps(args))]:
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": idx,
                                                       "delta": {"type": "input_json_delta", "partial_json": piece}}))
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": idx}))
        idx += 1
    out.append(_event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": u}))
    out.append(_event("message_stop", {"type": "message_stop"}))
    return out


def openai_chunks(texts: Iterable[str] = (), *, tool_calls: Iterable[tuple[str, str, dict[str, Any] | str]] = (),
                  usage: dict[str, int] | None = None, finish_reason: str | None = None,
                  model: str = "gpt-4.1-mini-2025-04-14") -> list[str]:
    """A Chat Completions stream with the exact chunk shapes the API sends (see module docstring).
    A tool call's arguments may be a dict (sent as JSON) or a raw string (to send broken JSON)."""
    texts, tool_calls = list(texts), list(tool_calls)
    u = {"prompt_tokens": 40, "completion_tokens": 12, "cached_tokens": 0, **(usage or {})}
    cid, created = "chatcmpl-" + uuid.uuid4().hex[:29], int(time.time())
    finish_reason = finish_reason or ("tool_calls" if tool_calls else "stop")

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        return "data: " + json.dumps({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "service_tier": "default", "system_fingerprint": "fp_4c2851f2c9", "choices": choices,
            "usage": usage, "obfuscation": "x"}, ensure_ascii=False, separators=(",", ":"))

    def choice(delta: dict[str, Any], fr: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fr}]

    out = [chunk(choice({"role": "assistant", "content": None if tool_calls and not texts else "",
                         "refusal": None}))]
    for t in texts:
        out.append(chunk(choice({"content": t})))
    for i, (tid, name, args) in enumerate(tool_calls):
        raw = args if isinstance(args, str) else json.dumps(args)
        out.append(chunk(choice({"tool_calls": [{"index": i, "id": tid, "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]})))
        for piece in _pieces(raw):
            out.append(chunk(choice({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})))
    out.append(chunk(choice({}, finish_reason)))
    pt, ct, cached = u["prompt_tokens"], u["completion_tokens"], u["cached_tokens"]
    out.append(chunk([], {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
                          "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                        "accepted_prediction_tokens": 0,
                                                        "rejected_prediction_tokens": 0}}))
    out.append("data: [DONE]")
    return out


# ---------------------------------------------------------------- server

@dataclass
class Recorded:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


@dataclass
class Served:
    """What the server did with one request."""

    status: int = 0
    events_sent: int = 0
    client_closed: bool = False
    cut: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like the real APIs
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        owner = self.server.owner
        body = self._read_body()
        rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                       time.monotonic())
        served = Served()
        with owner._lock:
            owner.requests.append(rec)
            owner.served.append(served)
            reply = owner._queue.popleft() if owner._queue else None
        if reply is None:
            reply = json_reply({"error": {"type": "replay_server_error", "message":
                                          f"replay server: no scripted reply left for {self.command} {self.path}"}},
                               status=418)
        served.status = reply.status
        try:
            if reply.blocks is None:
                self._send_json(reply)
            else:
                self._send_stream(reply, served)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            served.client_closed = True
            self.close_connection = True
        finally:
            served.done.set()

    do_POST = do_GET = _handle

    def _send_json(self, reply: Reply) -> None:
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_stream(self, reply: Reply, served: Served) -> None:
        self.send_response(reply.status)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()
        for i, block in enumerate(reply.blocks or []):
            if reply.cut_after is not None and i >= reply.cut_after:
                # Hang up mid-body: no terminating zero-length chunk, so the client sees an
                # incomplete message, exactly as when a connection drops.
                served.cut = True
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if reply.delay:
                if self.server.owner._stopping.wait(reply.delay):
                    return
            data = (block + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            served.events_sent += 1
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a keep-alive connection idling in a handler must not block stop()
    owner: "ReplayServer"


class ReplayServer:
    """See the module docstring."""

    def __init__(self, port: int = 0) -> None:
        self._port = port  # 0: any free port
        self._queue: collections.deque[Reply] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[Recorded] = []
        self.served: list[Served] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ReplayServer":
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="replay-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "ReplayServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    def push(self, *replies: Reply) -> "ReplayServer":
        with self._lock:
            self._queue.extend(replies)
        return self

    @property
    def replies_left(self) -> int:
        return len(self._queue)

    @property
    def last(self) -> Recorded:
        assert self.requests, "the server has received no request"
        return self.requests[-1]


@pytest.fixture
def replay_server() -> Iterator[ReplayServer]:
    """A started `ReplayServer`, stopped after the test."""
    with ReplayServer() as srv:
        yield srv
