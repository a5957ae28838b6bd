"""Running cells from the web: the kernel routes, code and prompts streamed over Server-Sent
Events, Stop, and a closed tab that must not stop a run. Real kernels; the bundled model for the
prompt tests. Tests that need a connection to close mid-stream use a real uvicorn server in a
thread (the TestClient delivers a streamed body only once it is complete)."""
from __future__ import annotations

import os
import re
import threading
import time

import pytest

from dialogue.service import DialogueService
from dialogue.web import create_app

from webutil import BASE, HX, Tags, line_events, live_server, sse_events


def _stream(client, did: str, mid: str) -> list[tuple[str, str]]:
    r = client.get(f"/d/{did}/m/{mid}/stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    return sse_events(r.text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- kernel

def test_kernel_status_restart_interrupt(client, db):
    d = db.create("Kernel")
    r = client.get(f"/d/{d.id}/kernel", headers=HX)
    assert r.status_code == 200 and "no kernel" in r.text
    # the ⟳ button asks first, in the page's modal
    r = client.get(f"/d/{d.id}/kernel/restart", headers=HX)
    assert r.status_code == 200 and 'id="restart-confirm"' in r.text and "Restart the kernel?" in r.text
    # confirmed: the badge says "restarting…" at once and looks again often until it is idle
    r = client.post(f"/d/{d.id}/kernel/restart", headers=HX)
    assert r.status_code == 200 and "restarting…" in r.text and 'hx-trigger="every 0.5s"' in r.text
    deadline = time.monotonic() + 60
    while "kernel idle" not in (r := client.get(f"/d/{d.id}/kernel", headers=HX)).text:
        assert "restarting…" in r.text and time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert 'hx-trigger="every 3s"' in r.text
    # no cell waits for input: an answer is refused
    m = db.add(d.id, "code", "1")
    r = client.post(f"/d/{d.id}/m/{m.id}/input", data={"value": "x"}, headers=HX)
    assert r.status_code == 409 and "not waiting for input" in r.text
    r = client.post(f"/d/{d.id}/kernel/interrupt", headers=HX)
    assert r.status_code == 200 and "kernel idle" in r.text
    assert "kernel idle" in client.get(f"/d/{d.id}").text


# ---------------------------------------------------------------- code

def test_run_code_streams_outputs_and_ends_with_the_stored_state(client, db):
    d = db.create("Run")
    m = db.add(d.id, "code", "")
    r = client.post(f"/d/{d.id}/m/{m.id}/run",
                    data={"source": "print('hi')\nprint('<b>not bold</b>')\n6 * 7", "version": "1"},
                    headers=HX)
    assert r.status_code == 200
    t = Tags(r.text)
    res = t.find("div", id=f"r-{m.id}")[0]
    assert res["sse-connect"] == f"/d/{d.id}/m/{m.id}/stream" and res["sse-close"] == "close"
    assert res["hx-ext"] == "sse" and "[*]" in r.text
    events = _stream(client, d.id, m.id)
    names = [e for e, _ in events]
    assert names[-2:] == ["done", "close"]
    done = dict(events)["done"]
    assert "hi" in done and "&lt;b&gt;not bold&lt;/b&gt;" in done and "42" in done
    assert f'id="g-{m.id}"' in done and "[1]" in done and 'hx-swap-oob="true"' in done
    stored = db.message(d.id, m.id)
    assert stored.source.startswith("print('hi')") and stored.execution_count == 1
    assert f'value="{stored.version}"' in done  # the page's version moves on with the run
    # a stream opened after the end just reports the stored state
    again = _stream(client, d.id, m.id)
    assert [e for e, _ in again] == ["done", "close"]
    page = client.get(f"/d/{d.id}").text
    assert "sse-connect" not in page and "42" in page


def test_a_late_stream_gets_what_came_before_it(client, db, tmp_path):
    """The store is written only when the next output arrives (or at the end); the relay keeps
    the run's events, so a page that connects late still sees the early print at once."""
    d = db.create("Late")
    printed, go = tmp_path / "printed", tmp_path / "go"
    code = (f"import os, time\nprint('early', flush=True)\nopen({str(printed)!r}, 'w').close()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\nprint('late')")
    warm = db.add(d.id, "code", "1")
    client.post(f"/d/{d.id}/m/{warm.id}/run", headers=HX)
    _stream(client, d.id, warm.id)  # a started kernel answers within the store's flush interval
    m = db.add(d.id, "code", code)
    assert client.post(f"/d/{d.id}/m/{m.id}/run", headers=HX).status_code == 200
    deadline = time.monotonic() + 60
    while not printed.exists():
        assert time.monotonic() < deadline, "the kernel did not run the cell"
        time.sleep(0.02)
    time.sleep(0.3)
    threading.Timer(1.0, go.touch).start()
    events = _stream(client, d.id, m.id)
    snap = dict(events)["snapshot"]
    assert "early" in snap and "late" not in snap
    # the late print joins the early one's output (one stream, as Jupyter shows it): the page
    # is sent what follows the lines it has, to replace the output's open last line
    assert any(e == "output-tail" and "late" in data and "early" not in data
               and data.endswith('<span class="open-line"></span>') for e, data in events)
    assert "early" in dict(events)["done"] and "late" in dict(events)["done"]


def test_a_progress_bar_streams_as_one_line(client, db):
    """A loop printing `\\rstep i` (flushed, so the kernel sends one message each): every event
    after the first replaces the cell's last output with the line as it now stands, and the
    stored result is that one line, never one line per step."""
    d = db.create("Progress")
    code = ("import time, sys\nfor i in range(30):\n    print(f'\\rstep {i:2d}', end='', flush=True)\n"
            "    time.sleep(0.02)\nprint(' done')\nprint('\\x1b[31mred\\x1b[0m', file=sys.stderr)")
    m = db.add(d.id, "code", code)
    assert client.post(f"/d/{d.id}/m/{m.id}/run", headers=HX).status_code == 200
    events = _stream(client, d.id, m.id)
    swaps = [(e, data) for e, data in events if e.startswith("output")]
    tails = [data for e, data in swaps if e == "output-tail"]
    assert len(tails) > 3, events  # several messages: the test sees the joining at work
    for data in tails:  # each the progress line as it now stands, never two steps
        assert re.fullmatch(r'<span class="open-line">step +\d+( done)?</span>|'
                            r'step 29 done\n<span class="open-line"></span>', data), data
    assert [e for e, _ in swaps].count("output") == 2  # stdout's first chunk, stderr's
    assert "output-last" not in [e for e, _ in swaps]  # the page is never sent it all again
    done = dict(events)["done"]
    assert "step 29 done" in done and "step 28" not in done
    assert '<span class="ansi-red-fg">red</span>' in done
    stored = db.message(d.id, m.id)
    assert [o["text"] for o in stored.outputs] == ["step 29 done\n", "\x1b[31mred\x1b[0m\n"]


def test_what_does_not_run_is_refused(client, db):
    d = db.create("Refusals")
    note = db.add(d.id, "note", "# n")
    empty = db.add(d.id, "prompt", "   ")
    # "running" a note shows it: the text is saved and rendered
    r = client.post(f"/d/{d.id}/m/{note.id}/run", data={"source": "# N", "version": "1"},
                    headers=HX)
    assert r.status_code == 200 and "<h1>N</h1>" in r.text and "sse-connect" not in r.text
    assert db.message(d.id, note.id).source == "# N"
    r = client.post(f"/d/{d.id}/m/{empty.id}/run", headers=HX)
    assert r.status_code == 409 and "empty" in r.text
    slow = db.add(d.id, "code", "import time; time.sleep(1)")
    assert client.post(f"/d/{d.id}/m/{slow.id}/run", headers=HX).status_code == 200
    twice = client.post(f"/d/{d.id}/m/{slow.id}/run", headers=HX)
    assert twice.status_code == 409 and "already running" in twice.text
    busy = client.post(f"/d/{d.id}/m/{slow.id}/delete", data={"version": "9"}, headers=HX)
    assert busy.status_code == 409 and "running" in busy.text
    _stream(client, d.id, slow.id)  # wait for it


def test_a_prompt_whose_key_is_missing_says_so(client, db):
    d = db.create("Keyless", model="claude-sonnet-4-5")
    m = db.add(d.id, "prompt", "Hello?")
    assert client.post(f"/d/{d.id}/m/{m.id}/run", headers=HX).status_code == 200
    events = _stream(client, d.id, m.id)
    assert any(e == "run-error" and "ANTHROPIC_API_KEY" in data for e, data in events) or \
        "ANTHROPIC_API_KEY" in dict(events)["done"]
    assert "run-error" in dict(events)["done"]
    assert "ANTHROPIC_API_KEY" in db.message(d.id, m.id).meta["error"]


def test_shutdown_leaves_no_kernel_behind(db_path, db):
    from starlette.testclient import TestClient
    d = db.create("Pids")
    m = db.add(d.id, "code", "import os; print(os.getpid())")
    with TestClient(create_app(DialogueService(db_path)), base_url=BASE) as c:
        c.post(f"/d/{d.id}/m/{m.id}/run", headers=HX)
        _stream(c, d.id, m.id)
        pid = int(db.message(d.id, m.id).outputs[0]["text"].strip())
        assert _pid_alive(pid)
    deadline = time.monotonic() + 15
    while _pid_alive(pid):
        assert time.monotonic() < deadline, "the kernel outlived the app"
        time.sleep(0.1)


# ---------------------------------------------------------------- a live server

@pytest.fixture
def live(db_path):
    with live_server(db_path) as c:
        yield c



def test_a_closed_tab_does_not_stop_the_run(live, db):
    d = db.create("Closed tab")
    m = db.add(d.id, "code", "import time\nprint('started', flush=True)\ntime.sleep(1.5)\n"
                             "print('finished')")
    assert live.post(f"/d/{d.id}/m/{m.id}/run").status_code == 200
    with live.stream("GET", f"/d/{d.id}/m/{m.id}/stream") as r:
        first = next(line_events(r.iter_lines()))
        assert first[0] == "snapshot"
    # the tab is gone; reopening the page while it runs reconnects to the stream
    page = live.get(f"/d/{d.id}").text
    assert f'sse-connect="/d/{d.id}/m/{m.id}/stream"' in page
    deadline = time.monotonic() + 30
    while db.message(d.id, m.id).meta.get("run", {}).get("status") != "ok":
        assert time.monotonic() < deadline, "the run stopped with the tab"
        time.sleep(0.1)
    text = "".join(o.get("text", "") for o in db.message(d.id, m.id).outputs)
    assert text == "started\nfinished\n"
    assert "finished" in live.get(f"/d/{d.id}").text


@pytest.mark.slow
def test_a_prompt_streams_token_by_token_and_stops_on_request(live, db):
    """The bundled local model answers; the page hears the answer in many pieces; Stop ends a
    long one where it is and keeps what was streamed."""
    d = db.create("Local model")
    m = db.add(d.id, "prompt", "Say hello in one short sentence.")
    assert live.post(f"/d/{d.id}/m/{m.id}/run", data={"prefill": "Hello"}).status_code == 200
    texts = []
    with live.stream("GET", f"/d/{d.id}/m/{m.id}/stream", timeout=300) as r:
        events = []
        for ev in line_events(r.iter_lines()):
            events.append(ev)
            if ev[0] == "text":
                texts.append(ev[1])
            if ev[0] == "close":
                break
    assert events[0][0] == "snapshot" and "Hello" in events[0][1]  # the prefill
    assert len(texts) >= 3, texts
    stored = db.message(d.id, m.id)
    assert stored.response.startswith("Hello") and len(stored.response) > len("Hello")
    done = dict(events)["done"]
    assert "local:default" in done and f"{stored.usage['output']:,} out" in done
    assert stored.usage["output"] >= len(texts) - 1

    long = db.add(d.id, "prompt", "Write a very long story about a lighthouse keeper.")
    assert live.post(f"/d/{d.id}/m/{long.id}/run").status_code == 200
    n = 0
    with live.stream("GET", f"/d/{d.id}/m/{long.id}/stream", timeout=300) as r:
        for ev, data in line_events(r.iter_lines()):
            if ev == "text":
                n += 1
                if n == 5:
                    assert live.post(f"/d/{d.id}/m/{long.id}/stop").status_code == 204
            if ev == "done":
                assert "stopped" in data
            if ev == "close":
                break
    stopped = db.message(d.id, long.id)
    assert stopped.usage["stop_reason"] == "cancelled" and stopped.response
    assert n < 200  # it did stop
