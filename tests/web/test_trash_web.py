"""The dialogues page's trash holds deleted cells too, named by their dialogue, each restorable."""
from webutil import HX


def test_trash_lists_deleted_cells_and_restores_them(client, db):
    d = db.create("Notebook one")
    cells = [db.add(d.id, "code", f"x{i} = {i}") for i in range(4)]
    for m in cells:
        client.post(f"/d/{d.id}/m/{m.id}/delete", headers=HX)
    page = client.get("/").text
    assert "Trash (4)" in page and "The trash is empty" not in page
    assert page.count("Notebook one") >= 5  # the row and each trashed cell
    assert "x2 = 2" in page and f'hx-post="/d/{d.id}/m/{cells[2].id}/undelete?to=list"' in page
    r = client.post(f"/d/{d.id}/m/{cells[2].id}/undelete?to=list", headers=HX)
    assert r.status_code == 200 and 'hx-swap-oob="true"' in r.text and "Trash (3)" in r.text
    assert "Restored a code cell of “Notebook one”" in r.text
    assert [m.source for m in db.messages(d.id)] == ["x2 = 2"]
    gone = db.create("Gone")
    client.post(f"/d/{gone.id}/delete", headers=HX)
    page = client.get("/").text
    assert "Trash (4)" in page and "Gone" in page
