"""Stop in the web app, for a cell that swallows the interrupt: after the grace period the kernel
is restarted, the stream's last word and the page say so, and the next cell runs on the fresh
kernel. A real kernel."""
from __future__ import annotations

import time

from starlette.testclient import TestClient

from dialogue.service import DialogueService
from dialogue.web import create_app

from webutil import BASE, HX, Tags, sse_events

SWALLOWS = ("import time\nprint('looping', flush=True)\nwhile True:\n    try:\n        time.sleep(1)\n"
            "    except KeyboardInterrupt:\n        print('ignored', flush=True)\n")


def test_stop_restarts_the_kernel_of_a_cell_that_ignores_it_and_the_page_says_so(db_path, db):
    d = db.create("Stubborn")
    loop = db.add(d.id, "code", SWALLOWS)
    with TestClient(create_app(DialogueService(db_path, stop_grace=1.0)), base_url=BASE) as c:
        r = c.post(f"/d/{d.id}/m/{loop.id}/run", headers=HX)
        assert r.status_code == 200
        stop = Tags(r.text).find("button", **{"data-act": "stop"})[0]
        assert "restart" in stop["title"] and stop["hx-disabled-elt"] == "this"
        deadline = time.monotonic() + 60
        while "looping" not in db.message(d.id, loop.id).output_text():
            assert time.monotonic() < deadline, "the cell did not start"
            time.sleep(0.05)
        assert c.post(f"/d/{d.id}/m/{loop.id}/stop", headers=HX).status_code == 204
        stored = db.message(d.id, loop.id)
        assert stored.meta["run"]["status"] == "restarted"
        events = sse_events(c.get(f"/d/{d.id}/m/{loop.id}/stream").text)
        assert [e for e, _ in events][-2:] == ["done", "close"]  # the run is over
        done = dict(events)["done"]
        assert "restarted: Stop: the cell was still running 1 s after it was interrupted" in done
        page = c.get(f"/d/{d.id}").text
        assert "kernel was restarted; its variables are lost" in page and "sse-connect" not in page
        nxt = db.add(d.id, "code", "'time' in dir()")  # imported by the stopped cell: gone now
        c.post(f"/d/{d.id}/m/{nxt.id}/run", headers=HX)
        sse_events(c.get(f"/d/{d.id}/m/{nxt.id}/stream").text)
        assert db.message(d.id, nxt.id).outputs[0]["data"]["text/plain"] == "False"
