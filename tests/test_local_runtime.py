"""The local runtime and the `local:` provider with the real bundled model: generation, prefill,
stop sequences, cancel mid-stream, an event loop that keeps running, one load per process, tool
calls by convention, usage, errors."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from dialogue.llm.base import (ContextTooLongError, Done, Part, Request, TextDelta, ToolCall, ToolCallReq,
                               ToolSpec, Turn, Usage, get_provider)
from dialogue.llm.local import LocalProvider, parse_tool_calls, request_messages, tools_system_text
from dialogue.local.kvcache import KVCache, evaluated_tokens
from dialogue.local.runtime import GenStats, Runtime, get_runtime, load_count

SYSTEM = "You are a helpful assistant. Answer briefly."


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return get_runtime("default")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch, rt):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    old, rt.cache = rt.cache, KVCache()
    rt.reset()
    yield
    rt.cache = old


def msgs(q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


async def collect(provider, request) -> list:
    return [e async for e in provider.stream(request)]


# ---------------------------------------------------------------- runtime

def test_generation_is_greedy_and_reproducible(rt):
    p = rt.build_prompt(msgs("What is the capital of France?"))
    assert p.text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    a = rt.generate(p, max_tokens=12)
    rt.reset()
    b = rt.generate(p, max_tokens=12, use_cache=False)
    assert a.tokens == b.tokens and a.generated > 0
    assert "Paris" in a.text
    assert a.text == rt.detokenize(a.tokens)


def test_template_prefix_is_stable_across_prompts(rt):
    p1 = rt.build_prompt(msgs("First question?"))
    p2 = rt.build_prompt(msgs("First question?") + [{"role": "assistant", "content": "An answer."},
                                                    {"role": "user", "content": "Second?"}])
    assert p2.tokens[: len(p1.tokens) - 3] == p1.tokens[: len(p1.tokens) - 3]
    assert set(p1.boundaries) <= set(p2.boundaries)
    # boundaries are the ends of turns, or the assistant header that follows one
    for b in p2.boundaries:
        head = rt.llm.detokenize(p2.tokens[:b], special=True).decode()
        assert head.endswith("<|im_end|>\n") or head.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert p1.boundaries[-1] < len(p1.tokens) and len(p1.tokens) in p2.boundaries  # p1 ends where p2 cuts


@pytest.mark.parametrize("fmt", ["chatml", "gemma"])
def test_built_in_chat_formats(rt, fmt):
    """The templates for GGUFs without one: rendered through the same path, prefix-stable, and
    (Gemma) with the system text opening the first user turn, as Google's template does."""
    history = msgs("First?") + [{"role": "assistant", "content": "One."}, {"role": "user", "content": "Second?"}]
    p1 = rt.build_prompt(msgs("First?"), chat_format=fmt)
    p2 = rt.build_prompt(history, chat_format=fmt)
    assert p2.tokens[: p1.boundaries[-1]] == p1.tokens[: p1.boundaries[-1]]
    assert len(p1.tokens) in p2.boundaries
    if fmt == "gemma":
        assert p2.text.startswith(rt._bos_text + "<start_of_turn>user\n" + SYSTEM + "\n\nFirst?<end_of_turn>\n")
        assert p2.text.endswith("<start_of_turn>user\nSecond?<end_of_turn>\n<start_of_turn>model\n")
    else:
        assert p2.text.startswith("<|im_start|>system\n" + SYSTEM + "<|im_end|>\n")
    from dialogue.llm.base import ProviderError
    with pytest.raises(ProviderError, match="unknown chat format 'vicuna'"):
        rt.build_prompt(msgs("x"), chat_format="vicuna")


def test_prefill_is_continued(rt):
    p = rt.build_prompt(msgs("What is the capital of France?"), "The capital of France is")
    assert p.text.endswith("<|im_start|>assistant\nThe capital of France is")
    st = rt.generate(p, max_tokens=6)
    assert st.text.lstrip().startswith("Paris")  # continues the sentence, does not restart it
    assert not st.text.startswith("The capital")


def test_stop_sequence_and_max_tokens(rt):
    p = rt.build_prompt(msgs("Count from 1 to 20, separated by commas."))
    full = rt.generate(p, max_tokens=30)
    assert "5" in full.text
    cut = rt.generate(p, max_tokens=30, stop=["5"])
    assert cut.stop_reason == "stop" and cut.stop_sequence == "5"
    assert cut.text == full.text[: full.text.index("5")]
    short = rt.generate(p, max_tokens=3)
    assert short.stop_reason == "max_tokens" and short.generated == 3 and short.tokens == full.tokens[:3]


async def test_stream_yields_pieces_then_stats(rt):
    p = rt.build_prompt(msgs("Name two fruits."))
    items = [x async for x in rt.stream(p, max_tokens=10)]
    assert isinstance(items[-1], GenStats)
    assert "".join(items[:-1]) == items[-1].text and len(items) > 2


async def test_closing_the_stream_stops_generation_promptly(rt):
    story = rt.build_prompt(msgs("Write a very long story about a dragon and a knight."))
    ref = rt.generate(rt.build_prompt(msgs("Say hello.")), max_tokens=8)
    gen = rt.stream(story, max_tokens=400)
    seen = 0
    async for piece in gen:
        seen += 1
        if seen == 3:
            break
    await gen.aclose()  # returns once the worker has let go of the model
    generated = len(evaluated_tokens(rt.llm)) - len(story.tokens)
    assert 0 < generated <= seen + 3, generated
    # the model is free and consistent: the next answer is what it was before
    assert rt.generate(rt.build_prompt(msgs("Say hello.")), max_tokens=8).tokens == ref.tokens


async def test_cancelling_the_task_stops_generation(rt):
    prov = get_provider("local:default")
    story = Request(model="local:default", system=SYSTEM, max_tokens=400,
                    messages=[Turn("user", "Write a very long story about a castle.")])
    prompt_len = len(prov.build(story).tokens)
    got: list[str] = []

    async def consume():
        async for e in prov.stream(story):
            if isinstance(e, TextDelta):
                got.append(e.text)

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.005)
        assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    generated = len(evaluated_tokens(rt.llm)) - prompt_len
    assert generated <= len(got) + 3, (generated, len(got))
    events = await collect(prov, Request(model="local:default", messages=[Turn("user", "Hi")], max_tokens=4))
    assert isinstance(events[-1], Done)


async def test_cancel_event_gives_a_cancelled_stop(rt):
    import threading
    ev = threading.Event()
    p = rt.build_prompt(msgs("Write a long poem."))
    pieces = []
    async for x in rt.stream(p, max_tokens=300, cancel=ev):
        if isinstance(x, GenStats):
            stats = x
            break
        pieces.append(x)
        if len(pieces) == 2:
            ev.set()
    assert stats.stop_reason == "cancelled" and stats.generated <= 4


async def test_event_loop_is_never_blocked(rt):
    """A ticker keeps ticking while the model evaluates a prompt of several hundred tokens and
    generates: a runtime that decoded on the loop's thread would leave one gap as long as the
    whole generation."""
    long_q = "Summarise this text: " + " ".join(f"Sentence number {i} is about the weather." for i in range(40))
    p = rt.build_prompt(msgs(long_q))
    assert len(p.tokens) > 300
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    t = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    items = [x async for x in rt.stream(p, max_tokens=8, use_cache=False)]
    elapsed = time.perf_counter() - t0
    done.set()
    await t
    assert isinstance(items[-1], GenStats) and items[-1].prefill_s > 0
    gaps = np.diff(ticks)
    assert len(ticks) >= 20
    assert gaps.max() < elapsed / 3, (gaps.max(), elapsed)


async def test_concurrent_streams_take_turns(rt):
    pa, pb = rt.build_prompt(msgs("Name a colour.")), rt.build_prompt(msgs("Name an animal."))
    ra = rt.generate(pa, max_tokens=6)
    rb = rt.generate(pb, max_tokens=6)

    async def run(p):
        return [x async for x in rt.stream(p, max_tokens=6)][-1]

    a, b = await asyncio.gather(run(pa), run(pb))
    assert a.tokens == ra.tokens and b.tokens == rb.tokens


def test_context_too_long(rt):
    p = rt.build_prompt(msgs("word " * (rt.n_ctx + 10)))
    assert len(p.tokens) >= rt.n_ctx
    with pytest.raises(ContextTooLongError, match=f"context of {rt.n_ctx}"):
        rt.generate(p, max_tokens=4)


def test_one_model_process_shared_by_every_provider():
    from dialogue.local.process import get_model_process
    a, b, c = LocalProvider("local:default"), LocalProvider("local:smollm2"), get_provider("local:default")
    mp = get_model_process("default")
    assert a.runtime is b.runtime is c.runtime is mp
    starts = mp.starts
    assert a.count_tokens("hello") == b.count_tokens("hello") > 0
    assert mp.starts == max(starts, 1)  # one process for all of them, started once


def test_count_tokens(rt):
    prov = get_provider("local:default")
    text = "Hello there, how are you today?"
    assert prov.count_tokens(text) == len(rt.tokenize(text)) > 3
    assert prov.count_tokens("") == 0
    # control-token text in user input is counted (and sent) as plain text
    assert prov.count_tokens("<|im_start|>") > 1


# ---------------------------------------------------------------- provider

async def test_provider_streams_text_usage_done(rt):
    prov = get_provider("local:default")
    req = Request(model="local:default", system=SYSTEM, messages=[Turn("user", "What is the capital of France?")],
                  max_tokens=12)
    events = await collect(prov, req)
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    usage = [e for e in events if isinstance(e, Usage)]
    assert isinstance(events[-1], Done) and events[-1].stop_reason in ("end", "max_tokens")
    assert len(usage) == 1 and isinstance(events[-2], Usage)
    u = usage[0]
    n_prompt = len(prov.build(req).tokens)
    assert u.input + u.cache_read + u.cache_write == n_prompt
    assert u.cache_write > 0 and 0 < u.output <= 12 and texts
    prov.runtime.reset()  # a new dialogue turn after a restart: the system prefix comes from disk
    again = await collect(prov, req)
    u2 = next(e for e in again if isinstance(e, Usage))
    assert u2.cache_read == u.cache_write and u2.cache_write == 0
    assert [e.text for e in again if isinstance(e, TextDelta)] == texts


async def test_provider_prefill_is_not_repeated(rt):
    prov = get_provider("local:default")
    req = Request(model="local:default", system=SYSTEM, prefill="The capital of France is",
                  messages=[Turn("user", "What is the capital of France?")], max_tokens=6)
    text = "".join(e.text for e in await collect(prov, req) if isinstance(e, TextDelta))
    assert "Paris" in text and "The capital of France is" not in text
    # a trailing assistant turn is the same as a prefill
    req2 = Request(model="local:default", system=SYSTEM, max_tokens=6,
                   messages=[Turn("user", "What is the capital of France?"),
                             Turn("assistant", "The capital of France is")])
    assert prov.build(req2).tokens == prov.build(req).tokens
    with pytest.raises(ValueError, match="prefill"):
        request_messages(Request(model="local:default", prefill="x",
                                 messages=[Turn("user", "q"), Turn("assistant", "a")]))


async def test_provider_stop_sequences(rt):
    prov = get_provider("local:default")
    req = Request(model="local:default", system=SYSTEM, messages=[Turn("user", "Count from 1 to 20, separated by commas.")],
                  max_tokens=30, stop=["5"])
    events = await collect(prov, req)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "5" not in text and "4" in text
    assert events[-1].stop_reason == "stop"


async def test_context_too_long_from_the_provider():
    prov = get_provider("local:default")
    req = Request(model="local:default", context="word " * 9000, messages=[Turn("user", "Summarise.")])
    with pytest.raises(ContextTooLongError):
        await collect(prov, req)


def test_request_messages_layout():
    req = Request(
        model="local:default", system="SYS", context="CTX",
        tools=[ToolSpec("add", "Add two numbers.", {"type": "object", "properties": {"a": {"type": "number"}}})],
        messages=[
            Turn("user", [Part(text="look: "), Part(type="image", mime="image/png", data="AAAA")]),
            Turn("assistant", "Let me add.", tool_calls=[ToolCallReq("c1", "add", {"a": 1})]),
            Turn("tool", "2", tool_call_id="c1", name="add"),
            Turn("user", "Thanks"),
        ])
    m, prefill = request_messages(req)
    assert prefill == ""
    assert m[0]["role"] == "system" and m[0]["content"].startswith("SYS\n\nCTX\n\n# Tools")
    assert '"name": "add"' in m[0]["content"]
    assert m[1] == {"role": "user", "content": "look: [image omitted: this local model reads text only]"}
    assert m[2]["content"] == 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert m[3] == {"role": "user", "content": '<tool_response>\n{"name": "add", "content": "2"}\n</tool_response>'}
    assert m[4] == {"role": "user", "content": "Thanks"}


def test_parse_tool_calls():
    assert parse_tool_calls("no call here") is None
    before, [c] = parse_tool_calls('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert before == "Sure.\n" and c.name == "add" and c.arguments == {"a": 1, "b": 2} and not c.error
    _, [c] = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 3}"}')  # args as a JSON string
    assert c.arguments == {"x": 3}
    _, [c] = parse_tool_calls('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>')
    assert c.arguments == {} and "not a JSON object" in c.error
    _, calls = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b"}</tool_call>')
    assert [c.name for c in calls] == ["a", "b"]
    assert parse_tool_calls("<tool_call>{broken") is None
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>') is None  # no name


async def test_tool_call_from_the_model(rt):
    """The model writes the call (here its start is prefilled, as a user can) and the provider
    turns the block into a ToolCall instead of text."""
    prov = get_provider("local:default")
    tools = [ToolSpec("get_weather", "Weather for a city.",
                      {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})]
    req = Request(model="local:default", system=SYSTEM, tools=tools, max_tokens=24,
                  messages=[Turn("user", "What is the weather in Paris?")],
                  prefill='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert tools_system_text(tools) in prov.build(req).text
    events = await collect(prov, req)
    calls = [e for e in events if isinstance(e, ToolCall)]
    texts = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert texts == ""  # all of the answer was the call
    assert events[-1] == Done("tool_use")


async def test_tools_offered_but_not_called_stream_as_text(rt):
    prov = get_provider("local:default")
    req = Request(model="local:default", system=SYSTEM, max_tokens=8,
                  tools=[ToolSpec("get_weather", "Weather for a city.")],
                  messages=[Turn("user", "Say hello.")], prefill="Hello")
    events = await collect(prov, req)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text and not any(isinstance(e, ToolCall) for e in events)
    assert events[-1].stop_reason in ("end", "max_tokens")


# ---------------------------------------------------------------- loops (the bundled model's `({}) ({}) ...`)

LOOP = [{"role": "user", "content": "Write the text '({})' one hundred times."}]
LOOP_PREFILL = "({}) ({}) ({}) ({}) ({})"


def test_dry_and_the_loop_stop_end_the_loop_the_bundled_model_fell_into(rt):
    from dialogue.local.runtime import Sampling
    p = rt.build_prompt(LOOP, prefill=LOOP_PREFILL)
    run = lambda s: rt.generate(p, max_tokens=200, sampling=s, use_cache=False)  # noqa: E731
    looping = run(Sampling(dry_multiplier=0, loop_stop=False))     # what it did before
    assert looping.stop_reason == "max_tokens" and looping.text.count("({})") > 40
    stopped = run(Sampling(dry_multiplier=0))                       # the loop stop alone
    assert stopped.stop_reason == "repetition" and stopped.generated < 100
    assert looping.tokens[:stopped.generated] == stopped.tokens     # the same text, cut short
    default = run(Sampling())                                       # DRY: it never loops
    assert default.stop_reason == "end" and default.text.count("({})") < 10


def test_repeating_tail():
    from dialogue.local.runtime import repeating_tail
    assert repeating_tail([1, 2, 3] * 16) == 3
    assert repeating_tail([7] * 48) == 1
    assert repeating_tail([7] * 47) == 0                   # not long enough to call it a loop
    assert repeating_tail(list(range(100))) == 0
    assert repeating_tail(list(range(60)) * 3) == 60       # a long block, three times
    assert repeating_tail(list(range(60)) * 2) == 0        # twice is not a loop
    assert repeating_tail([1, 2, 3] * 16 + [4]) == 0


def test_sampling_settings_are_checked():
    from dialogue.local.runtime import Sampling
    assert Sampling.from_dict({"dry_multiplier": "0.5"}).dry_multiplier == 0.5
    with pytest.raises(ValueError, match="unknown sampling setting"):
        Sampling.from_dict({"temperature": 1})
    with pytest.raises(ValueError, match="loop_stop must be a bool"):
        Sampling.from_dict({"loop_stop": "yes"})
    with pytest.raises(ValueError, match="out of range"):
        Sampling.from_dict({"repeat_penalty": 0})
