"""The settings panel attaches a path, a package's docs or a URL read on the server, lists each
item's tokens and cache state, and refreshes items from their sources."""
from __future__ import annotations

from pages import PageServer, page
from webutil import HX


def test_attach_sources_status_and_refresh(client, db, tmp_path):
    d = db.create("Sources", model="claude-sonnet-4-5")
    f = tmp_path / "notes.md"
    f.write_text("walrus: 3 m\n")
    post = lambda **data: client.post(f"/d/{d.id}/context", headers=HX,  # noqa: E731
                                      data={"action": "source",
                                            "dversion": db.open(d.id).version, **data})
    with PageServer({"/w.html": page("text/html", "<main><h1>Walrus</h1><p>Big.</p></main>")}) as srv:
        r = post(path=str(f))
        assert r.status_code == 200 and "Attached notes.md: 12 characters" in r.text
        r = post(package="markdownify", name="md docs")
        assert r.status_code == 200 and "2 modules documented" in r.text
        r = post(url=srv.url("/w.html"))
        assert r.status_code == 200
        assert [(c.name, c.kind) for c in db.open(d.id).context] == [
            ("notes.md", "file"), ("md docs", "package"), (srv.url("/w.html")[7:], "url")]
        # the panel comes back open, asking for the status
        assert 'id="ctx-status"' in r.text and 'hx-trigger="load"' in r.text
        two = post(path=str(f), url=srv.url("/w.html"))
        assert two.status_code == 400 and "Give one of" in two.text
        bad = post(url="ftp://example.org/x")
        assert bad.status_code >= 400 and "not an http(s) URL" in bad.text
        assert len(db.open(d.id).context) == 3

        status = client.get(f"/d/{d.id}/context/status", headers=HX).text
        assert status.count("<tr>") == 4  # the header and three items
        assert "~3" in status and "estimated" in status  # a hosted model: estimates
        assert status.count('aria-label="Refresh') == 3

        f.write_text("walrus: 3.5 m\n")
        r = client.post(f"/d/{d.id}/context", headers=HX,
                        data={"action": "refresh", "name": "notes.md",
                              "dversion": db.open(d.id).version})
        assert r.status_code == 200 and "Refreshed: notes.md changed." in r.text
        assert db.open(d.id).context[0].content == "walrus: 3.5 m\n"
        r = client.post(f"/d/{d.id}/context", headers=HX,
                        data={"action": "refresh", "dversion": db.open(d.id).version})
        assert "Refreshed: no changes." in r.text and srv.hits["/w.html"] == 2
