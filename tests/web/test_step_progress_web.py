"""A long step started from the page shows its progress: the import form names a job, its submit
fetches a box that follows the job's event stream, and the stream carries the import's steps (the
service's `Step`s, as the terminal shows them) and then ends. Real upload, real store."""
from __future__ import annotations

import nbformat

from dialogue.web.routes.progress import JOBS
from webutil import Tags, sse_events

HX = {"HX-Request": "true"}


def test_an_import_reports_its_steps_to_the_pages_progress_box(client, db):
    page = Tags(client.get("/").text)
    job = page.find("input", name="job")[0]["value"]
    box = page.find("div", id="import-progress")[0]
    assert box["hx-get"] == f"/progress/{job}" and box["hx-trigger"] == "submit from:#import-form"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = {i}") for i in range(120)])
    r = client.post("/import", files={"file": ("big.ipynb", nbformat.writes(nb).encode(), "application/json")},
                    data={"job": job}, headers=HX)
    assert r.status_code == 200 and r.headers["hx-redirect"].startswith("/d/")
    frag = Tags(client.get(f"/progress/{job}", headers=HX).text)
    follower = frag.find("div", **{"sse-connect": f"/progress/{job}/stream"})
    assert follower and follower[0]["hx-ext"] == "sse"
    events = sse_events(client.get(f"/progress/{job}/stream").text)
    assert [e for e, _ in events] == ["step", "done"]
    words = " ".join(t.strip() for t in Tags(events[0][1]).text if t.strip())
    for task in ("reading the notebook: done", "checking the notebook: done", "converting cells: done",
                 "storing 120 messages: done"):
        assert task in words, words
    assert len(Tags(events[0][1]).find("progress")) == 4
    assert len(db.open(r.headers["hx-redirect"].rsplit("/", 1)[1]).messages) == 120


def test_a_refused_import_ends_its_job_and_odd_ids_show_nothing(client, db):
    job = "retry-job-1234"
    r = client.post("/import", files={"file": ("x.ipynb", b"[1, 2]", "application/json")},
                    data={"job": job}, headers=HX)
    assert r.status_code == 400 and JOBS.get(job).ended
    events = sse_events(client.get(f"/progress/{job}/stream").text)
    assert events[-1][0] == "done"  # the stream ends: the box empties, the toast says why
    assert client.get("/progress/..%2Fx", headers=HX).status_code == 404
    assert JOBS.begin("<bad id>") is None and JOBS.reporter(None) is None
