"""Claude adapter, through the official `anthropic` SDK against a local server replaying recorded
Messages API streams (tests/servers.py): what we emit, and what the SDK actually sent."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import socket

import pytest

from dialogue.llm import (
    ContextTooLongError, Done, MissingKeyError, OverloadedError, Part, ProviderError,
    ProviderNetworkError, RateLimitError, Request, TextDelta, ToolCall, ToolCallReq, ToolSpec, Turn,
    UnknownModelError, Usage, get_provider,
)
from dialogue.llm.anthropic import AnthropicProvider
from servers import ReplayServer, anthropic_error, anthropic_events, recorded, sse

MODEL = "claude-sonnet-4-6"
CONTEXT = "# fastcore.L\n\n`L` is a drop-in list replacement... " * 40
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")).decode()


FAST = {"retry-after-ms": "20"}  # a short server-directed wait, so retries do not back off


@pytest.fixture
def srv(monkeypatch):
    with ReplayServer() as s:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.base_url)
        yield s


@pytest.fixture
async def provider():
    """Makes providers and closes their connections afterwards. Retries are the SDK's: a test that
    retries sends `retry-after-ms` (FAST) so it does not wait the SDK's 0.5-8 s backoff."""
    made: list[AnthropicProvider] = []

    def make(model: str = MODEL, **kw) -> AnthropicProvider:
        made.append(AnthropicProvider(model, **kw))
        return made[-1]

    yield make
    for p in made:
        await p.aclose()


def ask(text: str = "What is L?", **kw) -> Request:
    return Request(model=MODEL, system="You are a careful Python tutor.", context=CONTEXT,
                   messages=[Turn("user", text)], **kw)


async def collect(p, request) -> list:
    return [ev async for ev in p.stream(request)]


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def cache_marks(body) -> int:
    n = sum("cache_control" in b for b in body.get("system", []))
    for m in body["messages"]:
        if isinstance(m["content"], list):
            n += sum("cache_control" in b for b in m["content"])
    return n


# ---------------------------------------------------------------- streams

async def test_text_stream_usage_and_what_the_sdk_sent(srv, provider):
    srv.push(recorded("anthropic_text.sse"))
    p = get_provider(MODEL)
    assert isinstance(p, AnthropicProvider) and p.count_tokens("hi") is None
    try:
        events = await collect(p, ask(max_tokens=300, temperature=0.2, stop=["\n\nHuman:"]))
    finally:
        await p.aclose()
    assert text_of(events) == ("`fastcore.L` is a list subclass with extra methods such as `map` and `filter`; "
                               "indexing with a list of ints or bools selects items. 🙂")
    assert events[-2:] == [Usage(input=21, output=31, cache_read=0, cache_write=2188), Done("end")]
    assert all(isinstance(e, TextDelta) for e in events[:-2])

    req = srv.last
    assert req.method == "POST" and req.path == "/v1/messages"
    assert "sk-ant-test-key" in (req.headers.get("x-api-key", "") + req.headers.get("authorization", ""))
    assert req.headers["anthropic-version"]
    body = req.json
    assert body["model"] == MODEL and body["stream"] is True and body["max_tokens"] == 300
    assert body["temperature"] == 0.2 and body["stop_sequences"] == ["\n\nHuman:"]
    # system prompt, then the attached context as its own block ending in a cache breakpoint
    assert body["system"] == [{"type": "text", "text": "You are a careful Python tutor."},
                              {"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}}]
    # and a breakpoint on the last message
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is L?", "cache_control": {"type": "ephemeral"}}]}]
    assert "tools" not in body


async def test_cache_read_usage_and_prefill_not_repeated(srv, provider):
    srv.push(recorded("anthropic_text_cached.sse"))
    events = await collect(provider(), ask("Write add() in Python.", prefill="```python\n"))
    # the prefill goes as a trailing assistant turn, without the trailing whitespace the API rejects
    assert srv.last.json["messages"][-1] == {"role": "assistant", "content": "```python"}
    # the model writes the newline back; we drop it, so prefill + emitted text reads as written
    assert text_of(events) == "def add(a, b):\n    return a + b\n```"
    assert "```python\n" + text_of(events) == "```python\ndef add(a, b):\n    return a + b\n```"
    assert events[-2] == Usage(input=14, output=17, cache_read=2188, cache_write=52)
    # the prefill turn carries no breakpoint: the last *message* (the user's prompt) does
    assert srv.last.json["messages"][0]["content"][-1]["cache_control"] == {"type": "ephemeral"}


async def test_prefill_whitespace_that_the_model_does_not_repeat_is_kept(srv, provider):
    srv.push(sse(anthropic_events(["world", "!"])))
    events = await collect(provider(), ask("Say hello", prefill="Hello "))
    assert srv.last.json["messages"][-1]["content"] == "Hello"
    assert text_of(events) == "world!"


async def test_tool_use_streams_input_json_into_a_tool_call(srv, provider):
    srv.push(recorded("anthropic_tool_use.sse"))
    tools = [ToolSpec("run_python", "Run code in the dialogue's kernel.",
                      {"type": "object", "properties": {"code": {"type": "string"}, "timeout": {"type": "integer"}},
                       "required": ["code"]})]
    events = await collect(provider(), ask("How big is df?", tools=tools))
    assert text_of(events) == "I'll look at the dataframe's shape first."
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "run_python", {"code": "df.shape", "timeout": 10})]
    assert events[-1] == Done("tool_use") and events[-2] == Usage(472, 89, 0, 0)
    assert srv.last.json["tools"] == [{"name": "run_python", "description": "Run code in the dialogue's kernel.",
                                       "input_schema": tools[0].parameters}]


async def test_several_tool_calls_and_broken_arguments(srv, provider):
    srv.push(sse(anthropic_events(["Two things."], tool_uses=[("toolu_a", "ls", {"path": "."}),
                                                                 ("toolu_b", "cat", '{"path": ')])))
    calls = [e for e in await collect(provider(), ask()) if isinstance(e, ToolCall)]
    assert calls[0] == ToolCall("toolu_a", "ls", {"path": "."})
    assert calls[1].id == "toolu_b" and calls[1].arguments == {} and "not valid JSON" in calls[1].error


async def test_a_tool_loop_conversation_is_sent_in_the_api_shape(srv, provider):
    srv.push(recorded("anthropic_text.sse"))
    turns = [
        Turn("user", [Part(text="What is in this picture and in the folder?"), Part("image", mime="image/png", data=PNG)],
             cache=True),
        Turn("assistant", "Let me look.", tool_calls=[ToolCallReq("toolu_1", "ls", {"path": "."}),
                                                      ToolCallReq("toolu_2", "pwd", {})]),
        Turn("tool", "a.py\nb.py", tool_call_id="toolu_1", name="ls"),
        Turn("tool", "/work", tool_call_id="toolu_2", name="pwd"),
        Turn("user", "Thanks. Summarise."),
    ]
    await collect(provider(), Request(model=MODEL, system="sys", messages=turns))
    msgs = srv.last.json["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    eph = {"type": "ephemeral"}
    assert msgs[0]["content"] == [
        {"type": "text", "text": "What is in this picture and in the folder?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}, "cache_control": eph}]
    assert msgs[1]["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {"path": "."}},
        {"type": "tool_use", "id": "toolu_2", "name": "pwd", "input": {}}]
    # both results in the one user message after the calls, results first, then the new prompt
    assert msgs[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.py\nb.py"}]},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "/work"}]},
        {"type": "text", "text": "Thanks. Summarise.", "cache_control": eph}]
    assert srv.last.json["system"] == [{"type": "text", "text": "sys", "cache_control": eph}]


async def test_at_most_four_breakpoints_the_latest_marked_turns_win(srv, provider):
    srv.push(recorded("anthropic_text.sse"))
    turns = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i}", cache=True) for i in range(7)]
    await collect(provider(), Request(model=MODEL, system="s", context="c", messages=turns))
    body = srv.last.json
    assert cache_marks(body) == 4
    marked = [m["content"][0]["text"] for m in body["messages"] if "cache_control" in m["content"][-1]]
    assert marked == ["turn 4", "turn 5", "turn 6"]


async def test_bad_images_are_refused_before_any_request(srv, provider):
    with pytest.raises(ValueError, match="image/bmp"):
        await collect(provider(), Request(model=MODEL, messages=[Turn("user", [Part("image", mime="image/bmp", data="AA")])]))
    assert srv.requests == []


# ---------------------------------------------------------------- retries and errors

async def test_429_with_retry_after_then_success(srv, provider):
    srv.push(anthropic_error(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit",
                             {"retry-after": "1"}),
             recorded("anthropic_text.sse"))
    events = await collect(provider(), ask())
    assert text_of(events).startswith("`fastcore.L`") and events[-1] == Done("end")
    assert len(srv.requests) == 2
    assert srv.requests[1].at - srv.requests[0].at >= 0.95  # the server's retry-after was waited for
    assert srv.requests[1].json == srv.requests[0].json


async def test_529_overloaded_is_retried(srv, provider):
    srv.push(anthropic_error(529, "overloaded_error", "Overloaded", FAST),
             anthropic_error(529, "overloaded_error", "Overloaded", FAST),
             recorded("anthropic_text.sse"))
    events = await collect(provider(), ask())
    assert events[-1] == Done("end") and len(srv.requests) == 3


async def test_persistent_overload_gives_up_after_the_attempts(srv, provider):
    srv.push(*[anthropic_error(529, "overloaded_error", "Overloaded", FAST)] * 3, anthropic_error(500, "api_error", "boom"))
    with pytest.raises(OverloadedError, match="overloaded|500"):
        await collect(provider(attempts=4), ask())
    assert len(srv.requests) == 4 and srv.replies_left == 0


async def test_rate_limit_that_persists_surfaces_as_rate_limit_error(srv, provider):
    srv.push(*[anthropic_error(429, "rate_limit_error", "slow down", FAST)] * 2)
    with pytest.raises(RateLimitError, match="slow down"):
        await collect(provider(attempts=2), ask())


@pytest.mark.parametrize("config_dir", ["missing", "empty"])
async def test_missing_key_is_a_clear_error_and_sends_nothing(srv, monkeypatch, tmp_path, config_dir, provider):
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_PROFILE", "ANTHROPIC_IDENTITY_TOKEN",
                "ANTHROPIC_IDENTITY_TOKEN_FILE", "ANTHROPIC_FEDERATION_RULE_ID", "ANTHROPIC_ORGANIZATION_ID"):
        monkeypatch.delenv(var, raising=False)
    # no SDK profile either: a config directory that does not exist, or one with no profile in it
    # (the SDK then fails at request time, before sending anything)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "none" if config_dir == "missing" else tmp_path))
    with pytest.raises(MissingKeyError, match="ANTHROPIC_API_KEY"):
        await collect(provider(), ask())
    assert srv.requests == []


async def test_rejected_key(srv, provider):
    srv.push(anthropic_error(401, "authentication_error", "invalid x-api-key"))
    with pytest.raises(MissingKeyError, match="rejected.*invalid x-api-key"):
        await collect(provider(), ask())
    assert len(srv.requests) == 1


async def test_prompt_too_long_is_not_retried(srv, provider):
    srv.push(anthropic_error(400, "invalid_request_error", "prompt is too long: 212085 tokens > 200000 maximum"))
    with pytest.raises(ContextTooLongError, match="212085 tokens"):
        await collect(provider(), ask())
    assert len(srv.requests) == 1


async def test_unknown_model(srv, provider):
    srv.push(anthropic_error(404, "not_found_error", "model: claude-nope-1"))
    with pytest.raises(UnknownModelError, match="claude-nope-1"):
        await collect(provider("claude-nope-1"), Request(model="claude-nope-1", messages=[Turn("user", "hi")]))


async def test_other_bad_requests_say_what_the_api_said(srv, provider):
    srv.push(anthropic_error(400, "invalid_request_error", "messages.0.content: Field required"))
    with pytest.raises(ProviderError, match="Field required") as e:
        await collect(provider(), ask())
    assert type(e.value) is ProviderError


async def test_a_stream_cut_halfway_raises_after_the_text_that_arrived(srv, provider):
    srv.push(recorded("anthropic_text.sse", cut_after=5))  # start, block start, ping, two deltas
    got: list = []
    with pytest.raises(ProviderNetworkError, match="broke|cut|incomplete"):
        async for ev in provider().stream(ask()):
            got.append(ev)
    assert text_of(got) == "`fastcore.L` is a list subclass"
    assert not any(isinstance(e, Done) for e in got)
    assert len(srv.requests) == 1  # text had reached the caller: never retried


async def test_a_stream_that_ends_without_message_stop_is_an_error(srv, provider):
    srv.push(sse(anthropic_events(["partial"])[:-2]))  # clean end of body, but no message_delta/stop
    with pytest.raises(ProviderNetworkError, match="message_stop"):
        await collect(provider(), ask())


async def test_an_overload_error_event_mid_stream(srv, provider):
    blocks = anthropic_events(["Hel", "lo"])
    blocks.insert(4, 'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    srv.push(sse(blocks))
    with pytest.raises(OverloadedError, match="Overloaded"):
        await collect(provider(), ask())
    assert len(srv.requests) == 1


async def test_unreachable_server_is_a_network_error(monkeypatch, provider):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    p = provider(base_url=f"http://127.0.0.1:{port}", attempts=2)  # the retries: test_llm_retries.py
    with pytest.raises(ProviderNetworkError, match=f"127.0.0.1:{port}"):
        await collect(p, ask())


# ---------------------------------------------------------------- cancel

async def test_closing_the_stream_hangs_up_promptly(srv, provider):
    srv.push(sse(anthropic_events([f"tok{i} " for i in range(200)]), delay=0.05))
    agen = provider().stream(ask())
    got = [await agen.__anext__() for _ in range(3)]
    assert text_of(got) == "tok0 tok1 tok2 "
    await agen.aclose()
    # Wait with the event loop blocked: only a close made inside aclose()/cancel itself can have
    # hung up, not one left to the garbage collector's later finalizers.
    assert srv.served[0].done.wait(10)
    assert srv.served[0].client_closed and srv.served[0].events_sent < 60


async def test_cancelling_the_task_hangs_up_promptly(srv, provider):
    srv.push(sse(anthropic_events([f"tok{i} " for i in range(200)]), delay=0.05))
    seen = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(provider().stream(ask())) as agen:
            async for ev in agen:
                if isinstance(ev, TextDelta):
                    seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Wait with the event loop blocked: only a close made inside aclose()/cancel itself can have
    # hung up, not one left to the garbage collector's later finalizers.
    assert srv.served[0].done.wait(10)
    assert srv.served[0].client_closed and srv.served[0].events_sent < 60
