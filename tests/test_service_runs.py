"""Running messages through the service: a real ipykernel, the store as the record."""
import asyncio
import time

import pytest


from dialogue.service import DialogueService, RunError
from dialogue.store import ConflictError


@pytest.fixture
async def svc(tmp_path):
    s = DialogueService(tmp_path / "runs.db")
    yield s
    await s.aclose()


async def test_code_run_streams_outputs_and_stores_them(svc):
    svc.create("d")
    m = svc.add("d", "code", "import time\nfor i in range(3):\n    print(i, flush=True)\n"
                "    time.sleep(0.3)\n'done'")
    mid = svc.start("d", m.id)
    seen = [ev async for ev in svc.subscribe(mid)]
    assert [e.type for e in seen][-1] == "done"
    texts = [e.data["text"] for e in seen if e.type == "output" and e.data["output_type"] == "stream"]
    assert "".join(texts) == "0\n1\n2\n" and len(texts) == 3  # one event per print: streamed
    final = seen[-1].data
    assert final.outputs[0]["text"] == "0\n1\n2\n"
    assert final.outputs[1]["data"]["text/plain"] == "'done'"
    assert final.execution_count == 1 and final.meta["run"]["status"] == "ok"
    assert svc.store.get_message(mid).outputs == final.outputs
    assert not svc.running(mid)


async def test_outputs_are_written_while_the_cell_runs(svc):
    svc.create("d")
    m = svc.add("d", "code", "import time\nprint('early', flush=True)\ntime.sleep(2)\nprint('late')")
    mid = svc.start("d", m.id)
    async for ev in svc.subscribe(mid):
        if ev.type == "output":
            break
    await asyncio.sleep(0.5)
    # another reader (a reloaded tab, a new process) sees the early output already
    assert svc.store.get_message(mid).outputs[0]["text"] == "early\n"
    with pytest.raises(ConflictError, match="being written"):
        svc.edit("d", mid, base_version=svc.store.get_message(mid).version, source="x")
    with pytest.raises(RunError, match="already running"):
        svc.start("d", mid)
    final = await svc.wait(mid)
    assert final.outputs[0]["text"] == "early\nlate\n"


async def test_errors_death_and_stop(svc):
    svc.create("d")
    bad = svc.add("d", "code", "1/0")
    r = await svc.run("d", bad.id)
    assert r.outputs[0]["ename"] == "ZeroDivisionError" and r.meta["run"]["status"] == "error"

    svc.add("d", "code", "x = 41")
    await svc.run("d", "2")
    die = svc.add("d", "code", "import os; os._exit(1)")
    r = await svc.run("d", die.id)
    assert r.meta["run"]["status"] == "died" and "fresh kernel" in r.meta["run"]["message"]
    assert svc.kernel_status("d") == "dead"
    # the dialogue is untouched and the next run gets a fresh kernel
    assert svc.message("d", bad.id).outputs[0]["ename"] == "ZeroDivisionError"
    again = svc.add("d", "code", "'x' in dir()")
    r = await svc.run("d", again.id)
    assert r.outputs[0]["data"]["text/plain"] == "False" and svc.kernel_status("d") == "idle"

    slow = svc.add("d", "code", "import time\nprint('before', flush=True)\ntime.sleep(60)")
    mid = svc.start("d", slow.id)
    async for ev in svc.subscribe(mid):
        if ev.type == "output":
            break
    t = time.monotonic()
    await svc.stop(mid)
    assert time.monotonic() - t < 5
    r = svc.message("d", mid)
    assert r.meta["run"]["status"] == "interrupted" and r.outputs[0]["text"] == "before\n"


async def test_notes_do_not_run_and_run_all_stops_at_first_error(svc):
    svc.create("d")
    note = svc.add("d", "note", "hello")
    with pytest.raises(RunError, match="does not run"):
        svc.start("d", note.id)
    svc.add("d", "code", "a = 1")
    svc.add("d", "code", "raise ValueError('stop here')")
    last = svc.add("d", "code", "b = 2")
    done = await svc.run_all("d")
    assert [m.meta["run"]["status"] for m in done] == ["ok", "error"]
    assert svc.message("d", last.id).outputs == []
    done = await svc.run_all("d", above=last.id, stop_on_error=False)
    assert len(done) == 2
    with pytest.raises(RunError, match="empty"):
        svc.start("d", svc.add("d", "prompt", "  ").id)


async def test_prompt_on_unknown_model_is_a_stored_error_not_a_crash(svc):
    svc.create("d", model="nonsense-model")
    p = svc.add("d", "prompt", "hello?")
    mid = svc.start("d", p.id)
    await asyncio.sleep(0.5)  # the run fails at once, before anyone listens
    assert not svc.running(mid)
    assert [ev async for ev in svc.subscribe(mid)] == []  # a late listener does not hang
    r = svc.message("d", mid)
    assert "unknown model" in r.meta["error"]
    assert r.usage["stop_reason"] == "error" and r.response == ""


async def test_a_listener_hears_done_even_when_the_run_fails_to_begin(svc):
    svc.create("d")
    m = svc.add("d", "code", "1")
    mid = svc.start("d", m.id)
    svc.delete_message("d", m.id)  # (another tab) before the run's first step: it cannot begin
    events = [ev async for ev in svc.subscribe(mid)]
    assert [e.type for e in events] == ["done"] and not svc.running(mid)
    assert events[0].data.id == mid


async def test_prompt_streams_the_bundled_models_answer_into_the_store(svc, tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    svc.create("chat", model="local:default", system="Answer briefly.")
    svc.add("chat", "code", "x = 1")
    p = svc.add("chat", "prompt", "What is the capital of France?")
    mid = svc.start("chat", p.id)
    texts = []
    async for ev in svc.subscribe(mid):
        if ev.type == "text":
            texts.append(ev.data)
        elif ev.type == "done":
            final = ev.data
    assert len(texts) > 1  # streamed token by token, not in one piece
    assert "Paris" in final.response and final.response == "".join(texts)
    assert final.usage["model"] == "local:default" and final.usage["output"] > 0
    assert final.usage["cost"] == 0.0 and final.usage["stop_reason"] in ("end", "stop")
    assert svc.store.get_message(mid).response == final.response
    # prefill: the answer continues what the user wrote
    q = svc.add("chat", "prompt", "And of Italy?")
    r = await svc.run("chat", q.id, prefill="The capital of Italy is")
    assert r.response.startswith("The capital of Italy is") and "Rome" in r.response
    # the earlier answer was sent as context: the second request reused the cached prefix
    assert r.usage["cache_read"] > 0


async def test_stopping_an_answer_keeps_what_was_streamed(svc, tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    svc.create("long", model="local:default")
    svc.update("long", meta={"max_tokens": 400})
    p = svc.add("long", "prompt", "Write a long story about a lighthouse keeper, in detail.")
    mid = svc.start("long", p.id)
    n = 0
    async for ev in svc.subscribe(mid):
        if ev.type == "text":
            n += 1
            if n == 5:
                await svc.stop(mid)
                break
    final = await svc.wait(mid)
    assert final.usage["stop_reason"] == "cancelled"
    assert final.response and len(final.response) < 2000
    # the provider never reported usage for a stopped stream: we counted it ourselves
    assert final.usage["estimated"] and final.usage["output"] >= 5 and final.usage["input"] > 0
    assert not svc.running(mid)
    assert svc.store.get_message(mid).response == final.response
    # the model is usable again right away
    q = svc.add("long", "prompt", "Say hello.")
    assert (await svc.run("long", q.id)).response


async def test_a_dialogues_adapter_set_is_checked_before_anything_streams(svc, tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    svc.create("a", model="local:default")
    svc.update("a", meta={"adapters": {"no-such-adapter": 1.0}})
    r = await svc.run("a", svc.add("a", "prompt", "hi").id)
    assert "unknown adapter 'no-such-adapter'" in r.meta["error"] and r.response == ""
    svc.create("b", model="gpt-4.1-mini")
    svc.update("b", meta={"adapters": {"x": 1.0}})
    r = await svc.run("b", svc.add("b", "prompt", "hi").id)
    assert "local models only" in r.meta["error"]
