"""The answer's Replay button: the bundled model answers again under the recorded settings and
the page shows the verdict under the answer (the same, or an escaped diff). Nothing is stored."""
from __future__ import annotations

import asyncio

from webutil import HX, Tags


def test_replay_shows_the_same_answer_then_the_difference_from_an_edited_one(client, db):
    d = db.create("r", model="local:default")
    db.update(d.id, meta={"max_tokens": 16})
    p = db.add(d.id, "prompt", "What is the capital of France?")
    answered = asyncio.run(db.run(d.id, p.id))
    page = client.get(f"/d/{d.id}").text
    url = f"/d/{d.id}/m/{p.id}/replay"
    assert any(t == "button" and a.get("hx-post") == url and a.get("hx-target") == f"#rp-{p.id}"
               for t, a in Tags(page).tags)
    r = client.post(url, headers=HX)
    assert r.status_code == 200, r.text
    assert 'data-same="1"' in r.text and "the same answer" in r.text
    # the user edits the answer (a model may also have written markup): the replay differs,
    # and the diff shows the stored text escaped, never as markup
    db.edit(d.id, p.id, base_version=None, response="<script>alert(1)</script>\n" + answered.response)
    versions = len(db.history(d.id, p.id))
    r = client.post(url, headers=HX)
    assert 'data-same="0"' in r.text and "differs from the stored one" in r.text
    assert "<script>alert" not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert 'class="diff-del"' in r.text
    assert len(db.history(d.id, p.id)) == versions  # a replay stores nothing
    # a code cell has no answer to replay: said in the box, not an error page
    c = db.add(d.id, "code", "1")
    r = client.post(f"/d/{d.id}/m/{c.id}/replay", headers=HX)
    assert r.status_code == 200 and "Cannot replay" in r.text
