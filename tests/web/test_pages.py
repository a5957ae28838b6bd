"""Pages, fragments, static files, and the dialogues page: list, create, rename, delete, restore,
search, import by upload, export."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nbformat
import pytest

from dialogue.store import Store
from dialogue.web.app import STATIC_DIR

from webutil import HX, Tags

NOTEBOOKS = Path(__file__).parent.parent / "data" / "notebooks"


# ---------------------------------------------------------------- full page vs fragment

def test_index_is_a_full_page_or_a_fragment(client, db):
    db.create("First")
    full = client.get("/")
    assert full.status_code == 200
    assert full.text.lstrip().lower().startswith("<!doctype html>")
    assert "<html" in full.text and "/static/vendor/htmx/htmx.min.js" in full.text
    assert 'id="dialogue-list"' in full.text and ">First</a>" in full.text

    frag = client.get("/", headers=HX)
    assert frag.status_code == 200
    assert "<html" not in frag.text and not re.search(r"<head[\s>]", frag.text)
    assert 'id="dialogue-list"' in frag.text
    assert "HX-Request" in full.headers["vary"]


def test_dialogue_page_full_and_fragment_and_cell(client, db):
    d = db.create("Page")
    m = db.add(d.id, "code", "x = 1")
    full = client.get(f"/d/{d.id}")
    assert full.status_code == 200 and "<html" in full.text
    t = Tags(full.text)
    assert t.find("div", id="cells")
    assert t.find("div", id=f"m-{m.id}")
    assert t.find("input", id=f"v-{m.id}")[0]["value"] == "1"
    assert "<title>Page · dialogue</title>" in full.text

    frag = client.get(f"/d/{d.id}", headers=HX)
    assert "<html" not in frag.text and f'id="m-{m.id}"' in frag.text

    cell = client.get(f"/d/{d.id}/m/{m.id}", headers=HX)
    assert cell.status_code == 200
    assert cell.text.lstrip().startswith("<div") and f'id="m-{m.id}"' in cell.text
    # the same dialogue by name works too; an unknown one is a 404 page, not a traceback
    assert client.get("/d/Page").status_code == 200
    missing = client.get("/d/nope")
    assert missing.status_code == 404 and "no dialogue named" in missing.text
    assert "<html" in missing.text
    missing_hx = client.get("/d/nope", headers=HX)
    assert missing_hx.status_code == 404 and missing_hx.headers["hx-reswap"] == "none"
    assert 'id="toast"' in missing_hx.text


# ---------------------------------------------------------------- static files

def test_every_asset_is_served_from_static_and_vendored_with_its_license(client, db):
    d = db.create("Assets")
    page = client.get(f"/d/{d.id}").text
    t = Tags(page)
    urls = [a["src"] for _, a in t.tags if a.get("src")] + \
        [a["href"] for tag, a in t.tags if tag == "link" and a.get("href")]
    assert urls, "the page loads no assets?"
    for u in urls:
        assert u.startswith("/static/"), f"{u} is not served by the app"
        r = client.get(u)
        assert r.status_code == 200, u
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css",
                                                           "image/svg+xml"), u
    # nothing in the page or the app's own assets names another host
    for text in (page, (STATIC_DIR / "app.js").read_text(), (STATIC_DIR / "app.css").read_text()):
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text)
        assert "cdn." not in text

    vendored = (STATIC_DIR / "VENDORED.md").read_text()
    for f in sorted((STATIC_DIR / "vendor").rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(STATIC_DIR).as_posix()
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert f"| `{rel}` | `{digest}` |" in vendored, f"{rel} is not listed (or changed)"
    for pkg in (STATIC_DIR / "vendor").iterdir():
        assert list(pkg.glob("LICENSE*")), f"{pkg.name} has no license file"


def test_static_files_cannot_escape_their_folder(client):
    for path in ("/static/../app.py", "/static/..%2fapp.py", "/static/vendor/../../app.py",
                 "/static/%2e%2e/%2e%2e/service.py", "/static/VENDORED.md", "/static/nope.js"):
        r = client.get(path)
        assert r.status_code == 404, path
    assert "htmx" in client.get("/static/vendor/htmx/htmx.min.js").text
    assert ".highlight" in client.get("/static/highlight.css").text


# ---------------------------------------------------------------- dialogues

def test_create_rename_delete_restore(client, db):
    r = client.post("/new", data={"name": "  Alpha  "}, headers=HX)
    assert r.status_code == 200
    did = r.headers["hx-redirect"].rsplit("/", 1)[1]
    assert db.open(did).name == "Alpha"

    taken = client.post("/new", data={"name": "Alpha"}, headers=HX)
    assert taken.status_code == 409 and "already exists" in taken.text
    assert taken.headers["hx-reswap"] == "none"
    empty = client.post("/new", data={"name": "  "}, headers=HX)
    assert empty.status_code == 400 and "non-empty name" in empty.text
    assert [x["name"] for x in db.list()] == ["Alpha"]

    form = client.get(f"/d/{did}/row?edit=1", headers=HX)
    assert 'name="name"' in form.text and 'value="Alpha"' in form.text
    v = db.open(did).version
    renamed = client.post(f"/d/{did}/rename", data={"name": "Beta", "dversion": v}, headers=HX)
    assert renamed.status_code == 200 and ">Beta</a>" in renamed.text
    stale = client.post(f"/d/{did}/rename", data={"name": "Gamma", "dversion": v}, headers=HX)
    assert stale.status_code == 409 and "changed elsewhere" in stale.text
    assert 'value="Gamma"' not in stale.text or "Beta" in stale.text
    assert db.open(did).name == "Beta"

    deleted = client.post(f"/d/{did}/delete", headers=HX)
    assert deleted.status_code == 200 and "trash" in deleted.text
    assert f'hx-post="/d/{did}/restore"' in deleted.text  # the undo button
    assert db.list() == [] and [x["name"] for x in db.list(deleted=True)] == ["Beta"]
    assert "Trash (1)" in client.get("/").text

    restored = client.post(f"/d/{did}/restore", headers=HX)
    assert restored.status_code == 200 and 'hx-swap-oob="true"' in restored.text
    assert ">Beta</a>" in restored.text and [x["name"] for x in db.list()] == ["Beta"]


def test_search_highlights_hits_and_escapes_the_rest(client, db):
    d = db.create("Searchable")
    m = db.add(d.id, "note", "the <b>needle</b> is here, <script>alert(1)</script>")
    frag = client.get("/search", params={"q": "needle"}, headers=HX)
    assert frag.status_code == 200 and "<html" not in frag.text
    assert "<mark>needle</mark>" in frag.text
    assert "<script>" not in frag.text and "&lt;script&gt;" in frag.text
    assert f'href="/d/{d.id}#m-{m.id}"' in frag.text
    assert "Nothing matches" in client.get("/search", params={"q": "zebra"}, headers=HX).text
    full = client.get("/search", params={"q": "needle"})
    assert "<html" in full.text and "<mark>needle</mark>" in full.text
    assert "<mark>needle</mark>" in client.get("/", params={"q": "needle"}).text


# ---------------------------------------------------------------- import and export

def _upload(client, name: str, data: bytes):
    return client.post("/import", files={"file": (name, data, "application/x-ipynb+json")},
                       headers=HX)


def test_import_a_notebook_by_upload(client, db):
    raw = (NOTEBOOKS / "nbformat_test4.5.ipynb").read_bytes()
    n_cells = len(json.loads(raw)["cells"])
    r = _upload(client, "analysis.ipynb", raw)
    assert r.status_code == 200, r.text
    did = r.headers["hx-redirect"].rsplit("/", 1)[1]
    d = db.open(did)
    assert len(d.messages) == n_cells
    # the same file again gets a free name instead of failing
    r2 = _upload(client, "analysis.ipynb", raw)
    assert r2.status_code == 200
    names = sorted(x["name"] for x in db.list())
    assert len(names) == 2 and names[0] != names[1]


@pytest.mark.parametrize("name,data,expect", [
    ("broken.ipynb", b'{"cells": [', "truncated JSON"),
    ("list.ipynb", b"[1, 2, 3]", "not a notebook"),
    ("invalid.ipynb", (NOTEBOOKS / "nbformat_invalid.ipynb").read_bytes(), ""),
    ("empty.ipynb", b"", ""),
    ("binary.ipynb", bytes(range(256)) * 4, ""),
])
def test_a_broken_notebook_is_refused_clearly_and_creates_nothing(client, db, name, data, expect):
    r = _upload(client, name, data)
    assert r.status_code == 400, r.text
    assert r.headers["hx-reswap"] == "none" and 'id="toast"' in r.text
    text = Tags(r.text).text
    msg = " ".join(t.strip() for t in text if t.strip())
    assert msg.startswith(f"Cannot import {name}: "), msg
    if expect:
        assert expect in msg, msg
    assert db.list() == [] and db.list(deleted=True) == []


def test_import_without_a_file(client, db):
    r = client.post("/import", data={}, headers=HX)
    assert r.status_code == 400 and "Choose an .ipynb file" in r.text
    assert db.list() == []


def test_export_every_format(client, db):
    d = db.create("Report: 2026/Q4")
    db.add(d.id, "note", "# Title\nSome text.")
    db.add(d.id, "code", "def f():\n    return 1", exported=True)
    db.add(d.id, "prompt", "Why?", response="Because.")
    r = client.get(f"/d/{d.id}/export/ipynb")
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="Report__2026_Q4.ipynb"'
    nb = nbformat.reads(r.text, as_version=4)
    nbformat.validate(nb)
    assert len(nb.cells) == 3
    py = client.get(f"/d/{d.id}/export/py")
    assert py.status_code == 200 and "def f():" in py.text
    md = client.get(f"/d/{d.id}/export/md")
    assert "# Title" in md.text and "Because." not in md.text
    assert "Because." in client.get(f"/d/{d.id}/export/md?ai=1").text
    html = client.get(f"/d/{d.id}/export/html")
    assert html.status_code == 200 and "<h1" in html.text
    assert html.headers["content-security-policy"] == "sandbox"
    assert client.get(f"/d/{d.id}/export/exe").status_code == 404


def test_fork_from_a_cell(client, db):
    d = db.create("Source")
    a = db.add(d.id, "code", "a = 1")
    db.add(d.id, "code", "b = 2")
    r = client.post(f"/d/{d.id}/m/{a.id}/fork", headers=HX)
    new_id = r.headers["hx-redirect"].rsplit("/", 1)[1]
    assert [m.source for m in db.open(new_id).messages] == ["a = 1"]
    assert db.open(new_id).name == "Source (fork)"


def test_a_crash_mid_answer_is_shown_as_cut_off_after_restart(db_path, env):
    """A stream cut by a crash is on disk (the store writes as it goes); the next server start
    turns it into a version, and the page says the answer was cut off."""
    from starlette.testclient import TestClient
    from dialogue.service import DialogueService
    from dialogue.web import create_app
    s = Store(db_path)
    d = s.create_dialogue("Crashed", model="local:default")
    from dialogue.document import Message
    m = s.add_message(d.id, Message(kind="prompt", source="Tell me"))
    s.begin_stream(m.id)
    s.stream_append(m.id, text="Half an ans")
    s.close()
    with TestClient(create_app(DialogueService(db_path)), base_url="http://127.0.0.1") as c:
        page = c.get(f"/d/{d.id}").text
    assert "Half an ans" in page and "cut off: the process writing it stopped" in page
    s = Store(db_path)
    assert s.get_message(m.id).meta["interrupted"] is True
    s.close()
