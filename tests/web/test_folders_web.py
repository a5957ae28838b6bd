"""Folders and modes in the web app (in process): the list grouped and filtered by folder, making,
renaming and deleting folders, their note and template, moving a dialogue, a new dialogue from a
folder's template, and a dialogue's mode in its settings."""
from __future__ import annotations

import json

from dialogue.service import MODES

from webutil import HX, Tags


def _group_order(html: str) -> list[str]:
    """The list's rows in order: a folder header as "#path" ("#" for the top level), a dialogue
    by its link's text."""
    out: list[str] = []
    t = Tags(html)
    rows = [a for tag, a in t.tags if tag == "tr" and ("folder-group" in (a.get("class") or "")
                                                       or (a.get("id") or "").startswith("row-"))]
    for a in rows:
        out.append("#" + (a.get("data-folder") or "") if a.get("data-folder") is not None
                   else a["id"])
    return out


def test_the_list_groups_filters_and_moves_by_folder(client, db):
    db.new_folder("work/ml")
    top = db.create("top")
    w = db.create("in work", folder="work")
    ml = db.create("in ml", folder="work/ml")
    page = client.get("/").text
    assert _group_order(page) == ["#", f"row-{top.id}", "#work", f"row-{w.id}", "#work/ml",
                                  f"row-{ml.id}"]
    assert 'id="folders"' in page and "work/ml" in page
    # filtered: the folder and the folders below it
    page = client.get("/?folder=work").text
    order = _group_order(page)
    assert f"row-{top.id}" not in order and order[0] == "#work" and f"row-{ml.id}" in order
    assert client.get("/?folder=nope").status_code == 404
    # the move form lists the folders; moving re-renders the list, grouped anew
    form = client.get(f"/d/{top.id}/move_to", headers=HX).text
    assert [o.get("value") for o in Tags(form).find("option")] == ["", "work", "work/ml"]
    r = client.post(f"/d/{top.id}/move_to", data={"folder": "work/ml", "shown": ""}, headers=HX)
    assert r.status_code == 200 and "Moved “top” to “work/ml”." in r.text
    assert db.open(top.id).folder == db.folder_id("work/ml")
    # most recently updated first within a folder: the dialogue just moved leads its group
    assert _group_order(r.text) == ["#work", f"row-{w.id}", "#work/ml", f"row-{top.id}",
                                    f"row-{ml.id}"]
    # a stale move is refused and moves nothing
    stale = client.post(f"/d/{top.id}/move_to", data={"folder": "", "dversion": "1"},
                        headers=HX)
    assert stale.status_code == 409 and db.open(top.id).folder == db.folder_id("work/ml")


def test_folder_settings_note_template_rename_and_delete(client, db):
    r = client.post("/folders", data={"path": "reports"}, headers=HX)
    assert r.status_code == 200 and r.headers["HX-Redirect"] == "/?folder=reports"
    f = db.folder("reports")
    tpl = db.create("report template", folder="reports", system="Write reports.")
    db.add(tpl.id, "note", "# Monthly report")
    form = client.get(f"/folders/{f.id}", headers=HX).text
    assert 'name="note"' in form and "report template" in form
    r = client.post(f"/folders/{f.id}", data={
        "fversion": str(f.version), "path": "reports", "note": "Figures in EUR.\r\n",
        "template": tpl.id}, headers=HX)
    assert r.status_code == 200, r.text
    f = db.folder("reports")
    assert f.note == "Figures in EUR." and f.template == tpl.id
    # a new dialogue in the folder starts from its template
    r = client.post("/new", data={"name": "March", "folder": "reports"}, headers=HX)
    march = db.open("March")
    assert march.folder == f.id and [m.source for m in march.messages] == ["# Monthly report"]
    assert march.system == "Write reports."
    # its page says where it lives and shows the note every prompt of it sends first
    info = client.get(f"/d/{march.id}").text
    assert 'id="folder-info"' in info and "1 folder note sent first" in info
    assert 'href="/?folder=reports"' in info and "Figures in EUR." in info
    # renaming by path; a stale form is refused in the form, nothing changed
    r = client.post(f"/folders/{f.id}", data={"fversion": str(f.version), "path": "archive/reports",
                                              "note": f.note, "template": tpl.id}, headers=HX)
    assert r.headers["HX-Redirect"] == "/?folder=archive%2Freports"
    r = client.post(f"/folders/{f.id}", data={"fversion": str(f.version), "path": "x",
                                              "note": "stale", "template": ""}, headers=HX)
    assert r.status_code == 409 and 'class="error"' in r.text
    assert db.folder(f.id).path == "archive/reports" and db.folder(f.id).note == "Figures in EUR."
    # its history, newest first, offers an earlier note back, as a new version
    db.set_folder(f.id, note="Figures in USD.")
    form = client.get(f"/folders/{f.id}", headers=HX).text
    uses = Tags(form).find("button", data_act="folder-use-note")
    # (newest first: the rename, the edit that set it, the empty note it was made with)
    assert [json.loads(b["hx-vals"])["note"] for b in uses] == [
        "Figures in EUR.", "Figures in EUR.", ""]
    r = client.post(f"/folders/{f.id}", data={"fversion": str(db.folder(f.id).version),
                                              "note": "Figures in EUR."}, headers=HX)
    assert r.status_code == 200 and db.folder(f.id).note == "Figures in EUR."
    assert db.folder(f.id).path == "archive/reports" and db.folder(f.id).template == tpl.id
    assert [v.state["note"] for v in db.folder_history(f.id)][-3:] == [
        "Figures in EUR.", "Figures in USD.", "Figures in EUR."]
    # deleting: refused while it holds dialogues, then with its contents moved up
    r = client.post(f"/folders/{f.id}/delete", headers=HX)
    assert r.status_code == 400 and "holds 2 dialogues" in r.text
    r = client.post(f"/folders/{f.id}/delete?up=1", headers=HX)
    assert r.headers["HX-Redirect"] == "/?folder=archive"
    assert db.open("March").folder == db.folder_id("archive")
    assert [x.path for x in db.folders()] == ["archive"]


def test_the_mode_is_shown_and_edited_in_the_settings(client, db):
    d = db.create("m")
    page = client.get(f"/d/{d.id}").text
    sel = Tags(page).find("select", name="mode")
    assert sel and [o.get("value") for o in Tags(page).find("option")
                    if o.get("value") in MODES] == list(MODES)
    # another mode, text untouched: that mode's preset text
    r = client.post(f"/d/{d.id}/settings", data={"dversion": str(d.version), "mode": "learning",
                                                 "mode_prompt": ""}, headers=HX)
    assert r.status_code == 200
    d = db.open("m")
    assert d.meta["mode"] == {"name": "learning", "prompt": MODES["learning"]}
    assert MODES["learning"][:40] in r.text  # the settings panel shows the text sent
    # the text edited: kept as written
    r = client.post(f"/d/{d.id}/settings", data={"dversion": str(d.version), "mode": "learning",
                                                 "mode_prompt": "Tiny steps.\r\n"}, headers=HX)
    d = db.open("m")
    assert d.meta["mode"] == {"name": "learning", "prompt": "Tiny steps."}
    # back to standard: nothing is added to the system prompt
    client.post(f"/d/{d.id}/settings", data={"dversion": str(d.version), "mode": "standard",
                                             "mode_prompt": "Tiny steps."}, headers=HX)
    assert "mode" not in db.open("m").meta


def test_a_notebook_imported_from_a_folders_list_goes_into_it(client, db):
    import nbformat
    db.new_folder("inbox")
    page = client.get("/?folder=inbox").text
    hidden = [a for a in Tags(page).find("input", name="folder") if a.get("type") == "hidden"]
    assert [a.get("value") for a in hidden] == ["inbox"]  # the import form carries the folder
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Imported")]
    r = client.post("/import", files={"file": ("n.ipynb", nbformat.writes(nb).encode(),
                                               "application/x-ipynb+json")},
                    data={"folder": "inbox"}, headers=HX)
    assert r.status_code == 200, r.text
    did = r.headers["hx-redirect"].rsplit("/", 1)[1]
    assert db.open(did).folder == db.folder_id("inbox")
