"""A model reading a long prompt, as the page shows it, and the health check a page polls when it
loses the server.

The model is a stand-in (tests/reading_provider.py) that reports reading progress the way the local
model does and then waits for the test's go-ahead before answering, so the test can look at the
page while the prompt is being read. The server is a real uvicorn (a stream is read as it
arrives)."""
from __future__ import annotations

import asyncio
import re

import pytest
from starlette.testclient import TestClient

import reading_provider
from dialogue.service import DialogueService, RunEvent
from dialogue.document import Kind
from dialogue.web import create_app
from dialogue.runs import LiveState, Run

from webutil import BASE, HX, Tags, line_events, live_server


@pytest.fixture(autouse=True)
def reading_model():
    reading_provider.install()


def _text(html: str) -> str:
    return " ".join("".join(Tags(html).text).split())


def test_the_cell_shows_how_far_the_prompt_is_read_then_the_answer(db_path, db, tmp_path):
    gate = tmp_path / "go"
    d = db.create("Long prompt",
                  model=f"test-reading:total=1280,chunk=256,delay=0.2,rate=25,gate={gate}")
    m = db.add(d.id, "prompt", "What is 2+2?")
    with live_server(db_path) as live:
        assert live.post(f"/d/{d.id}/m/{m.id}/run").status_code == 200
        seen: list[str] = []
        with live.stream("GET", f"/d/{d.id}/m/{m.id}/stream") as r:
            events = line_events(r.iter_lines())
            first = next(events)
            assert first[0] == "snapshot"
            for ev, data in events:
                assert ev == "progress", (ev, data)
                seen.append(data)
                if "1,280 / 1,280" in data:
                    break
            # what the page swaps in: a bar and the words, replacing the cell's progress element
            t = Tags(seen[-1])
            assert t.find("div", id=f"p-{m.id}", role="status")
            assert t.find("progress", value="1280", max="1280")
            # Each report as the model made it (the first has no rate yet; then 25 tokens a
            # second), in order; one that came before the page connected is in its snapshot.
            expected = ["reading the prompt: 256 / 1,280 tokens",
                        "reading the prompt: 512 / 1,280 tokens · about 31 s left",
                        "reading the prompt: 768 / 1,280 tokens · about 20 s left",
                        "reading the prompt: 1,024 / 1,280 tokens · about 10 s left",
                        "reading the prompt: 1,280 / 1,280 tokens"]
            texts = [t for t in (_text(x) for x in [first[1], *seen]) if t]
            assert texts == expected[len(expected) - len(texts):] and len(texts) >= 3, texts

            # A page opened now (or reopened) gets the latest report once, through the relay,
            # not every step: in the page itself and in the snapshot its stream starts with.
            page = live.get(f"/d/{d.id}").text
            assert "reading the prompt: 1,280 / 1,280 tokens" in _text(page)
            assert "256 / 1,280" not in page and page.count("<progress") == 1
            assert Tags(page).find("div", sse_swap="progress", hx_target=f"#p-{m.id}")
            # no sink listens to EventSource's own events: a lost connection fires "error"
            swaps = {a.get("sse-swap") for _, a in Tags(page).tags} - {None}
            assert swaps and not swaps & {"error", "open", "message"}, swaps
            with live.stream("GET", f"/d/{d.id}/m/{m.id}/stream") as late:
                ev, snap = next(line_events(late.iter_lines()))
            assert ev == "snapshot" and snap.count("<progress") == 1
            assert "1,280 / 1,280 tokens" in snap and "512 / 1,280" not in snap

            gate.touch()  # the model starts answering
            rest = []
            for ev, data in events:
                rest.append((ev, data))
                if ev == "close":
                    break
        names = [e for e, _ in rest]
        # the first piece of the answer replaces the progress at once
        assert names[:2] == ["progress", "text"], names
        cleared = Tags(rest[0][1]).find("div", id=f"p-{m.id}")
        assert cleared and "hidden" in cleared[0] and "reading" not in rest[0][1]
        assert "".join(data for ev, data in rest if ev == "text").count("<span>") == 3
        done = dict(rest)["done"]
        assert "The answer is 4." in _text(done) and "reading the prompt" not in done
        # after the run, neither the page nor the store keep any trace of the progress
        assert "reading the prompt" not in live.get(f"/d/{d.id}").text
    stored = db.message(d.id, m.id)
    assert stored.response == "The answer is 4." and stored.usage["input"] == 1280


async def test_a_listener_that_falls_behind_gets_only_the_latest_progress():
    """Progress reports can come faster than a slow page reads them: it skips to the latest."""
    run = Run("m1", "d1", Kind.prompt, LiveState(Kind.prompt))
    run.publish(RunEvent("progress", "m1", {"read": 128, "total": 640, "eta_s": None}))
    got = []

    async def listen():
        async for what, item in run.watch():
            got.append((what, item))

    task = asyncio.create_task(listen())
    await asyncio.sleep(0.05)
    assert [w for w, _ in got] == ["snapshot"] and got[0][1].progress["read"] == 128
    for n in (256, 384, 512):  # arrive while the listener is not reading
        run.publish(RunEvent("progress", "m1", {"read": n, "total": 640, "eta_s": 1.0}))
    snap = run.snapshot()
    run.publish(RunEvent("text", "m1", "Hi"))
    run.publish(RunEvent("progress", "m1", {"read": 640, "total": 640, "eta_s": 0.0}))
    run.publish(RunEvent("done", "m1", None))
    await asyncio.wait_for(task, 5)
    evs = [item for what, item in got[1:]]
    assert [(e.type, e.data if e.type == "text" else e.data and e.data["read"]) for e in evs] == \
        [("progress", 512), ("text", "Hi"), ("progress", 640), ("done", None)]
    # the state folds the same way: text clears the progress, a later report sets it again
    assert snap.progress["read"] == 512 and snap.text == ""
    late = run.snapshot()
    assert late.progress["read"] == 640 and late.text == "Hi"
    # a listener that comes after the run ended still hears all of it, from the first event
    everything = [ev async for ev in run.events_from(0)]
    assert [e.type for e in everything] == ["progress"] * 4 + ["text", "progress", "done"]


def test_health_answers_and_stays_behind_the_token(db_path):
    with TestClient(create_app(DialogueService(db_path)), base_url=BASE) as c:
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["ok"] is True
        assert re.fullmatch(r"[0-9a-f]{16}", r.json()["instance"])
        assert r.headers["cache-control"] == "no-store"
        assert c.get("/health").json()["instance"] == r.json()["instance"]
    with TestClient(create_app(DialogueService(db_path), token="s3cret"), base_url=BASE) as c:
        refused = c.get("/health")
        assert refused.status_code == 401 and "token" in refused.text
        ok = c.get("/health", headers={"Authorization": "token s3cret", **HX})
        assert ok.status_code == 200 and ok.json()["ok"] is True
        # a new server is a new instance: the page knows its runs are gone
        assert ok.json()["instance"] != r.json()["instance"]


@pytest.mark.parametrize("read,total,eta,words", [
    (0, 5354, None, "reading the prompt: 0 / 5,354 tokens"),
    (1024, 5354, 40.4, "reading the prompt: 1,024 / 5,354 tokens · about 40 s left"),
    (1024, 5354, 3.0, "reading the prompt: 1,024 / 5,354 tokens · a few seconds left"),
    (1024, 5354, 150.0, "reading the prompt: 1,024 / 5,354 tokens · about 2 min left"),
    (5354, 5354, 0.0, "reading the prompt: 5,354 / 5,354 tokens"),
])
def test_progress_in_words(read, total, eta, words):
    from dialogue.llm.base import Progress
    assert Progress(read, total, eta).describe() == words
