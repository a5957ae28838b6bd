"""The history panel shows steps (an edit with its run), each with a diff from the step before,
and Restore brings a step's source back with its own outputs."""
from webutil import HX, Tags


def _ran(db, mid, outputs):
    db.store.begin_stream(mid)
    db.store.finish_stream(mid, outputs=outputs, meta={"run": {"status": "ok"}})


def test_history_panel_groups_steps_and_shows_diffs(client, db):
    d = db.create("Steps")
    m = db.add(d.id, "code", "total = sum(range(10))\ntotal")
    _ran(db, m.id, [{"output_type": "execute_result", "data": {"text/plain": "45"},
                     "metadata": {}, "execution_count": 1}])
    db.edit(d.id, m.id, base_version=None, source="total = sum(range(10))\n  total")
    _ran(db, m.id, [{"output_type": "error", "ename": "IndentationError", "evalue": "x",
                     "traceback": []}])
    h = client.get(f"/d/{d.id}/m/{m.id}/history", headers=HX)
    t = Tags(h.text)
    assert "2 steps (5 versions)" in h.text
    heads = [x.strip() for x in t.text if x.strip().startswith("Step ")]
    assert heads == ["Step 2", "Step 1"]
    assert t.find("span", **{"class": "diff-del"}) and t.find("span", **{"class": "diff-add"})
    assert "-total\n" in h.text and "+  total\n" in h.text
    assert "edited · ran: ok" in h.text  # step 2 (status from meta.run)
    # Restore on step 1 sends its last version, and brings back its own outputs
    restore = [b for b in t.find("button", data_act="restore-version")]
    assert len(restore) == 1 and '"to": 2' in restore[0]["hx-vals"]
    r = client.post(f"/d/{d.id}/m/{m.id}/restore_version", data={"to": "2", "version": "5"},
                    headers=HX)
    assert r.status_code == 200
    got = db.message(d.id, m.id)
    assert got.source == "total = sum(range(10))\ntotal"
    assert got.outputs[0]["data"]["text/plain"] == "45"


def test_history_panel_shows_a_move_and_says_restore_keeps_the_place(client, db):
    d = db.create("Moves")
    a = db.add(d.id, "note", "a")
    db.add(d.id, "note", "b")
    r = client.post(f"/d/{d.id}/m/{a.id}/move", data={"by": "1"}, headers=HX)
    assert r.status_code == 200
    h = client.get(f"/d/{d.id}/m/{a.id}/history", headers=HX)
    assert "created · moved from 1 to 2" in h.text
    assert "v2 move:1:2 · user" in h.text
    assert Tags(h.text).find("p", **{"class": "hint move-note"})
    assert "brings back its content, not its place" in h.text
    # a message never moved gets no such note
    b = db.messages(d.id)[0]
    assert "move-note" not in client.get(f"/d/{d.id}/m/{b.id}/history", headers=HX).text
