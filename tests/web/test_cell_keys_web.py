"""The routes behind Jupyter's cell keys: paste (v), merge (Shift+M), split at the cursor."""
import pytest

from dialogue.service import StoreError

from webutil import HX


def test_paste_adds_a_cell_with_the_copied_source_and_no_editor(client, db):
    d = db.create("Paste")
    a = db.add(d.id, "code", "a = 1")
    r = client.post(f"/d/{d.id}/cells", data={"kind": "note", "paste": "# copied", "after": a.id},
                    headers=HX)
    assert r.status_code == 200 and r.headers["hx-retarget"] == f"#m-{a.id}"
    assert "editing" not in r.text.split(">", 1)[0] and "data-new" not in r.text
    assert [(m.kind.value, m.source) for m in db.messages(d.id)] == [("code", "a = 1"),
                                                                      ("note", "# copied")]


def test_merge_with_the_cell_below(client, db):
    d = db.create("Merge")
    a = db.add(d.id, "code", "a = 1\n", outputs=[{"output_type": "stream", "name": "stdout",
                                                   "text": "old\n"}])
    b = db.add(d.id, "code", "b = 2")
    c = db.add(d.id, "code", "c = 3")
    r = client.post(f"/d/{d.id}/m/{a.id}/merge", data={"version": a.version}, headers=HX)
    assert r.status_code == 200 and f'<div hx-swap-oob="delete" id="m-{b.id}">' in r.text
    msgs = db.messages(d.id)
    assert [m.source for m in msgs] == ["a = 1\nb = 2", "c = 3"] and msgs[0].outputs == []
    assert any(t.id == b.id for t in db.trash())
    assert [v.op for v in db.history(d.id, a.id)][-1] == "merge"
    last = client.post(f"/d/{d.id}/m/{c.id}/merge", headers=HX)
    assert last.status_code == 400 and "no message below" in last.text
    p = db.add(d.id, "prompt", "hi", response="hello")
    with pytest.raises(StoreError, match="prompts are not merged"):
        db.merge_below(d.id, c.id)
    assert db.message(d.id, p.id).response == "hello"


def test_split_at_the_cursor_with_the_editors_text(client, db):
    d = db.create("Split")
    a = db.add(d.id, "code", "x = 1\ny = 2")
    typed = "x = 1\nprint(x)\ny = 2"
    r = client.post(f"/d/{d.id}/m/{a.id}/split",
                    data={"at": typed.index("y"), "source": typed, "version": a.version},
                    headers=HX)
    assert r.status_code == 200 and r.text.count('data-kind="code" data-url=') == 2
    assert [m.source for m in db.messages(d.id)] == ["x = 1\nprint(x)", "y = 2"]
    stale = client.post(f"/d/{d.id}/m/{a.id}/split", data={"at": 1, "version": a.version},
                        headers=HX)
    assert stale.status_code == 409
    bad = client.post(f"/d/{d.id}/m/{a.id}/split", data={"at": 999}, headers=HX)
    assert bad.status_code == 400 and "outside the cell" in bad.text
    assert len(db.messages(d.id)) == 2
