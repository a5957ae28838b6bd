"""Exports from the page: a refusal answers the page's fetch with a toast (told in place), and
hidden cells are named in a note or kept on request."""
from urllib.parse import unquote

from webutil import HX


def test_module_export_without_exported_cell_is_refused_in_a_toast(client, db):
    d = db.create("No module")
    db.add(d.id, "code", "x = 1")
    r = client.get(f"/d/{d.id}/export/py", headers=HX)
    assert r.status_code == 400 and r.headers["hx-reswap"] == "none"
    assert 'class="toast-text"' in r.text and "has no exported code messages" in r.text


def test_hidden_cells_are_noted_or_kept(client, db):
    d = db.create("Post")
    db.add(d.id, "note", "# Post\n\nprose")
    db.add(d.id, "code", "hidden_thing = 1", hidden=True)
    for fmt in ("md", "html"):
        r = client.get(f"/d/{d.id}/export/{fmt}")
        assert r.status_code == 200 and "hidden_thing" not in r.text
        note = unquote(r.headers["x-dialogue-note"])
        assert note.startswith(f"1 hidden cell left out of Post.{fmt}: tick “Keep hidden cells”")
        kept = client.get(f"/d/{d.id}/export/{fmt}?hidden=1")
        assert "hidden_thing" in kept.text and "x-dialogue-note" not in kept.headers
    assert "x-dialogue-note" not in client.get(f"/d/{d.id}/export/ipynb").headers
    page = client.get(f"/d/{d.id}").text
    assert 'data-export-hidden="1"' in page and 'data-export="py"' in page
