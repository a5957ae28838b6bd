"""Retries are the SDKs' own, against a local server speaking each API (tests/servers.py): a
connection refused, 408 and 409 are retried as 429 and 5xx are; `x-should-retry` is obeyed either
way; a Retry-After beyond our cap fails at once and says so. Both adapters, both SDKs."""
from __future__ import annotations

import logging
import socket
import time

import pytest

from dialogue.llm import Done, OverloadedError, ProviderError, RateLimitError, Request, TextDelta, Turn
from dialogue.llm.anthropic import AnthropicProvider
from dialogue.llm.hosted import MAX_RETRY_AFTER
from dialogue.llm.openai import OpenAIProvider
from servers import ReplayServer, anthropic_error, anthropic_events, openai_chunks, openai_error, sse


class Kind:
    """One adapter with what its API sends: an error body, a good stream, the env for a server."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def provider(self, base_url: str, **kw):
        if self.name == "anthropic":
            return AnthropicProvider("claude-sonnet-4-5", api_key="sk-ant-test", base_url=base_url, **kw)
        return OpenAIProvider("gpt-4.1-mini", api_key="sk-test", base_url=base_url + "/v1", **kw)

    def error(self, status: int, message: str, headers: dict[str, str] | None = None):
        if self.name == "anthropic":
            etype = {408: "timeout_error", 409: "conflict_error", 429: "rate_limit_error",
                     500: "api_error", 400: "invalid_request_error"}.get(status, "api_error")
            return anthropic_error(status, etype, message, headers)
        return openai_error(status, message, "server_error" if status >= 500 else "invalid_request_error",
                            headers=headers)

    def ok(self):
        return sse(anthropic_events(["It works."]) if self.name == "anthropic" else openai_chunks(["It works."]))

    @property
    def logger(self) -> str:
        return f"{self.name}._base_client"


@pytest.fixture(params=["anthropic", "openai"])
def kind(request) -> Kind:
    return Kind(request.param)


@pytest.fixture
async def made():
    providers: list = []
    yield providers
    for p in providers:
        await p.aclose()


REQUEST = Request(model="m", messages=[Turn("user", "Does it work?")], max_tokens=32)


async def answer(p) -> tuple[str, list]:
    events = [ev async for ev in p.stream(REQUEST)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_refused_connection_is_retried_until_the_server_is_up(kind, made, caplog):
    """The first attempt finds nothing listening. The server starts the moment the SDK announces
    its retry (its log record), so the retry, and only the retry, reaches it."""
    port = free_port()
    server = ReplayServer(port)

    class StartOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Retrying request") and server._httpd is None:
                server.start()
                server.push(kind.ok())

    handler = StartOnRetry()
    caplog.set_level(logging.INFO, logger=kind.logger)
    logging.getLogger(kind.logger).addHandler(handler)
    try:
        made.append(p := kind.provider(f"http://127.0.0.1:{port}"))
        text, events = await answer(p)
    finally:
        logging.getLogger(kind.logger).removeHandler(handler)
        server.stop()
    assert text == "It works." and events[-1] == Done("end")
    assert len(server.requests) == 1  # the refused attempt never arrived; the retry did


@pytest.mark.parametrize("status", [408, 409])
async def test_request_timeout_and_conflict_are_retried(kind, made, status):
    with ReplayServer() as srv:
        srv.push(kind.error(status, "try again"), kind.ok())  # no Retry-After: the SDK's backoff
        made.append(p := kind.provider(srv.base_url))
        text, _ = await answer(p)
        assert text == "It works." and len(srv.requests) == 2
        gap = srv.requests[1].at - srv.requests[0].at
        assert gap >= 0.3  # the SDK's first backoff is 0.5 s less up to 25% jitter


async def test_x_should_retry_is_obeyed_both_ways(kind, made):
    with ReplayServer() as srv:
        made.append(p := kind.provider(srv.base_url))
        # a 500 the server says not to retry: one request, the error at once
        srv.push(kind.error(500, "do not retry this", {"x-should-retry": "false"}))
        with pytest.raises(OverloadedError, match="do not retry this"):
            await answer(p)
        assert len(srv.requests) == 1
        # a 400 the server says to retry
        srv.push(kind.error(400, "retry this one", {"x-should-retry": "true", "retry-after-ms": "10"}), kind.ok())
        text, _ = await answer(p)
        assert text == "It works." and len(srv.requests) == 3


async def test_a_long_retry_after_fails_at_once_and_says_how_long(kind, made):
    with ReplayServer() as srv:
        srv.push(kind.error(429, "slow down", {"retry-after": "3600"}), kind.ok())
        made.append(p := kind.provider(srv.base_url))
        t0 = time.monotonic()
        with pytest.raises(RateLimitError, match="slow down.*asks to wait 3600 s") as e:
            await answer(p)
        assert time.monotonic() - t0 < MAX_RETRY_AFTER / 4 and len(srv.requests) == 1
        assert e.value.retry_after == MAX_RETRY_AFTER  # what a caller may wait, capped
        assert srv.replies_left == 1


async def test_attempts_bounds_the_tries(kind, made):
    with ReplayServer() as srv:
        srv.push(*[kind.error(503, "busy", {"retry-after-ms": "10"})] * 3, kind.ok())
        made.append(p := kind.provider(srv.base_url, attempts=2))
        with pytest.raises(OverloadedError, match="busy"):
            await answer(p)
        assert len(srv.requests) == 2
    with pytest.raises(ValueError, match="attempts"):
        kind.provider("http://127.0.0.1:9", attempts=0)


async def test_a_stream_that_breaks_after_text_is_not_retried(kind, made):
    """Retrying after text reached the caller would repeat it: the SDKs retry only the opening."""
    with ReplayServer() as srv:
        blocks = anthropic_events(["one ", "two ", "three"]) if kind.name == "anthropic" \
            else openai_chunks(["one ", "two ", "three"])
        srv.push(sse(blocks, cut_after=len(blocks) - 3), kind.ok())  # cut before the end
        made.append(p := kind.provider(srv.base_url))
        got = []
        with pytest.raises(ProviderError):
            async for ev in p.stream(REQUEST):
                got.append(ev)
        assert any(isinstance(e, TextDelta) for e in got) and len(srv.requests) == 1
