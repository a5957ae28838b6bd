"""The answer's Request toggle and the prompt editor's estimate, in-process: the panel of an
answer by the bundled model, every text escaped; context entries (folder notes, attached docs,
retrieved chunks) as the record lists them; an answer with no record says so; the estimate is
JSON for the text being typed."""
from __future__ import annotations

import asyncio

from webutil import HX, Tags


def test_request_panel_lists_parts_and_retrieved_docs_escaped(client, db):
    d = db.create("w", model="local:default", system="Answer <b>briefly</b>.")
    db.update(d.id, meta={"max_tokens": 16})
    db.attach(d.id, "logbook", "Ship 7 came at dawn.")
    db.add(d.id, "note", "A note with <script>alert(1)</script>.")
    p = db.add(d.id, "prompt", "Which ship came at dawn in section 7?")
    asyncio.run(db.run(d.id, p.id))
    page = client.get(f"/d/{d.id}").text
    url = f"/d/{d.id}/m/{p.id}/request"
    assert any(t == "details" and a.get("hx-get") == url and a.get("hx-trigger") == "toggle once"
               for t, a in Tags(page).tags)
    r = client.get(url, headers=HX)
    assert r.status_code == 200, r.text
    html = r.text
    assert "local:default" in html and "max_tokens 16" in html and "(tokenizer)" in html
    assert "context: text logbook" in html
    assert "turn 1: user" in html and "llama.cpp prefix KV cache" in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>briefly</b>" not in html and "&lt;b&gt;briefly&lt;/b&gt;" in html
    # a prompt not answered yet: the panel says there is no record, not an error page
    q = db.add(d.id, "prompt", "And at dusk?")
    r = client.get(f"/d/{d.id}/m/{q.id}/request", headers=HX)
    assert r.status_code == 200 and "no request is recorded" in r.text
    # the estimate, for the text being typed
    e = client.post(f"/d/{d.id}/m/{q.id}/estimate", data={"source": "And at dusk? " * 50}, headers=HX)
    assert e.status_code == 200, e.text
    est = e.json()
    assert est["exact"] is True and est["tokens"] > 100 and est["cached"] > 0
    assert "KV cache on disk" in est["label"]
    c = db.add(d.id, "code", "1")
    assert "error" in client.post(f"/d/{d.id}/m/{c.id}/estimate", data={}, headers=HX).json()


def test_panel_flags_retrieved_documents():
    from fasthtml.common import to_xml
    from dialogue.web.routes.requests import panel
    rec = {"model": "claude-sonnet-4-5", "max_tokens": 100, "tokens": 50, "token_count": "estimate",
           "answer_version": 2, "system": {"text": "s", "tokens": 1}, "tools": [], "turns": [],
           "messages": [], "cache": {"about": "none", "breakpoints": [], "turns": []},
           "context": {"text": "<context>", "tokens": 40, "entries": [
               {"kind": "folder", "name": "team", "source": "", "tokens": 5},
               {"kind": "package", "name": "<pkg>", "source": "https://x.test/docs", "tokens": 35,
                "retrieved": [3, 9], "of": 40}]}}
    html = to_xml(panel(rec))
    assert "context: folder team" in html and "context: package &lt;pkg&gt;" in html
    assert "retrieved 2 of 40 chunks" in html and "https://x.test/docs" in html
    assert html.count('title="a document too large') == 1  # only the retrieved one is flagged
