"""dialogue.runs: a run's event log from its first event, RunAll, and the one consumer of a
provider's event stream (Answer + follow). Runs use a real ipykernel and a real SQLite file."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from dialogue.document import Kind
from dialogue.llm.base import Done, ProviderError, TextDelta, ToolCall, Usage, cost
from dialogue.runs import Answer, LiveState, Run, RunEvent, follow
from dialogue.service import DialogueService, RunError
from dialogue.tools import ToolResult


@pytest.fixture
async def svc(tmp_path):
    s = DialogueService(tmp_path / "runs.db")
    yield s
    await s.aclose()


# ---------------------------------------------------------------- Answer + follow

async def _stream(*events, fail: BaseException | None = None):
    for ev in events:
        yield ev
        await asyncio.sleep(0)
    if fail is not None:
        raise fail


async def test_follow_totals_usage_and_folds_text_and_tool_calls():
    evs = [TextDelta("Hel"), ToolCall("t1", "add", {"a": 1}), Usage(100, 3, cache_read=40),
           ToolResult("t1", "add", {"a": 1}, "2"), TextDelta("lo"), Usage(20, 5), Done("max_tokens")]
    ans = Answer()
    passed = [ev async for ev in follow(_stream(*evs), ans)]
    assert passed == evs  # every event passes through, in order
    assert ans.text == "Hello" and ans.stop_reason == "max_tokens" and not ans.error
    assert ans.tool_calls == [{"id": "t1", "name": "add", "arguments": {"a": 1},
                               "result": "2", "error": False}]
    assert (ans.usage.input, ans.usage.output, ans.usage.cache_read) == (120, 8, 40)
    rec = ans.record("claude-sonnet-4-5")
    assert rec == {"input": 120, "output": 8, "cache_read": 40, "cache_write": 0,
                   "model": "claude-sonnet-4-5", "stop_reason": "max_tokens",
                   "cost": cost("claude-sonnet-4-5", Usage(120, 8, cache_read=40))}
    assert rec["cost"] > 0 and ans.seconds >= 0


async def test_follow_turns_a_users_error_into_the_answers_error_and_keeps_what_came():
    ans = Answer()
    got = [ev async for ev in follow(_stream(TextDelta("partial"),
                                             fail=ProviderError("the key is wrong")), ans)]
    assert len(got) == 1 and ans.text == "partial"
    assert ans.error == "the key is wrong" and ans.stop_reason == "error"
    assert ans.record("local:default")["cost"] == 0.0


async def test_follow_lets_a_bug_through_and_records_a_cancellation():
    with pytest.raises(ZeroDivisionError):  # not an error a user can act on: not swallowed
        async for _ in follow(_stream(TextDelta("x"), fail=ZeroDivisionError()), Answer()):
            pass
    ans = Answer()
    with pytest.raises(asyncio.CancelledError):
        async for _ in follow(_stream(TextDelta("x"), fail=asyncio.CancelledError()), ans):
            pass
    assert ans.stop_reason == "cancelled" and ans.text == "x"


async def test_follow_closes_the_providers_stream_when_the_reader_stops():
    closed = []

    async def provider():
        try:
            for i in range(100):
                yield TextDelta(str(i))
        finally:
            closed.append(True)

    ans = Answer()
    async with contextlib.aclosing(follow(provider(), ans)) as evs:
        async for _ in evs:
            break
    assert closed == [True] and ans.text == "0"


# ---------------------------------------------------------------- the event log

async def test_a_run_keeps_its_log_from_the_first_event_for_any_listener():
    run = Run("m1", "d1", Kind.code, LiveState(Kind.code))
    run.publish(RunEvent("output", "m1", {"output_type": "stream", "name": "stdout", "text": "a\n"}))
    run.publish(RunEvent("output", "m1", {"output_type": "display_data", "data": {"text/plain": "1"},
                                          "metadata": {}, "transient": {"display_id": "x"}}))
    early = run.snapshot()
    run.publish(RunEvent("output", "m1", {"output_type": "update_display_data", "display_id": "x",
                                          "data": {"text/plain": "2"}, "metadata": {}}))
    run.publish(RunEvent("done", "m1", None))
    # a listener that comes after every event, even after "done", hears them all, in order
    types = [ev.type async for ev in run.events_from(0)]
    assert types == ["output", "output", "output", "done"]
    # the state is folded as the events come; a snapshot is a copy that later events leave alone
    assert [o.get("data", {}).get("text/plain") for o in run.state.outputs] == [None, "2"]
    assert early.outputs[1]["data"]["text/plain"] == "1"


async def test_a_late_listener_hears_a_fast_cell_from_its_first_output(svc):
    """The reason web/relay.py existed: a listener that comes after a fast print still gets it."""
    svc.create("d")
    m = svc.add("d", "code", "print('fast', flush=True)\nimport time; time.sleep(1.5)\n'end'")
    mid = svc.start("d", m.id)
    while not (svc.live(mid) and svc.live(mid).outputs):  # the print is out: then subscribe
        await asyncio.sleep(0.05)
    events = [ev async for ev in svc.subscribe(mid)]
    outs = [ev.data for ev in events if ev.type == "output"]
    assert outs[0]["text"] == "fast\n" and events[-1].type == "done"
    # and a page's view: the folded state first, then only what came after it
    m2 = svc.add("d", "code", "print('one', flush=True)\nimport time; time.sleep(1)\nprint('two')")
    mid2 = svc.start("d", m2.id)
    while not (svc.live(mid2) and svc.live(mid2).outputs):
        await asyncio.sleep(0.05)
    seen = [x async for x in svc.watch(mid2)]
    assert seen[0][0] == "snapshot" and seen[0][1].outputs[0]["text"] == "one\n"
    later = [ev for what, ev in seen[1:]]
    assert [e.data["text"] for e in later if e.type == "output"] == ["two\n"]
    assert later[-1].type == "done" and svc.message("d", mid2).outputs[0]["text"] == "one\ntwo\n"


# ---------------------------------------------------------------- RunAll

async def test_run_all_in_the_background_reports_progress_and_refuses_a_second(svc):
    svc.create("d")
    a = svc.add("d", "code", "x = 1")
    svc.add("d", "note", "between")
    b = svc.add("d", "code", "import time; time.sleep(0.5); x += 1")
    c = svc.add("d", "code", "print(x)")
    job = svc.start_all("d")
    assert job.todo == [a.id, b.id, c.id] and job.progress()[1] == 3
    assert svc.run_all_of("d") is job
    with pytest.raises(RunError, match="already running"):
        svc.start_all("d")
    assert await job.wait() == []
    assert job.progress() == (3, 3) and not job.stopped and svc.run_all_of("d") is None
    assert svc.run_all_of("d", finished=True) is job
    assert [r.id for r in job.results] == [a.id, b.id, c.id]
    assert svc.message("d", c.id).outputs[0]["text"] == "2\n"
    empty = svc.create("empty")
    with pytest.raises(RunError, match="no code cell"):
        svc.start_all(empty.id)


async def test_stopping_a_run_all_stops_its_cell_and_runs_no_further(svc):
    svc.create("d")
    slow = svc.add("d", "code", "import time\nfor i in range(300): time.sleep(0.1)")
    after = svc.add("d", "code", "print('never')")
    job = svc.start_all("d")
    while not job.started or not svc.running(slow.id):
        await asyncio.sleep(0.05)
    await svc.stop_all("d")
    assert job.done and job.stopped == "Run all was stopped."
    assert svc.run_status(svc.message("d", slow.id)) == "interrupted"
    assert svc.message("d", after.id).execution_count is None


async def test_run_through_reports_each_message_and_stops_at_the_first_failure(svc):
    svc.create("d", model="local:default")
    svc.add("d", "code", "1/0")
    svc.add("d", "code", "print('not reached')")
    seen = []
    failures = await svc.run_through("d", on_start=lambda i, n, m: seen.append(("start", i, n)),
                                     on_done=lambda i, n, m: seen.append(("done", i, n)))
    assert seen == [("start", 0, 2), ("done", 0, 2)]
    assert len(failures) == 1 and failures[0].outputs[0]["ename"] == "ZeroDivisionError"
    failures = await svc.run_through("d", allow_errors=True)
    assert len(failures) == 1 and svc.message("d", "2").outputs[0]["text"] == "not reached\n"
    assert await svc.run_through(svc.create("nothing").id) == []
