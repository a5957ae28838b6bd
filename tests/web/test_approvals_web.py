"""The settings' Approvals fields: reading tools asking too, and the tools always allowed in a
dialogue listed with a box to take each back; a save stores only what changed, as a version."""
from webutil import HX, Tags


def test_approvals_in_the_settings(client, db):
    d = db.create("Tools")
    page = Tags(client.get(f"/d/{d.id}").text)
    assert page.find("input", name="always_tool") == []
    assert "checked" not in page.find("input", name="ask_reads")[0]
    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/settings", data={"approvals_form": "1", "dversion": v}, headers=HX)
    assert r.status_code == 200 and db.open(d.id).version == v  # nothing changed, nothing stored

    db.allow_tool(d.id, "bump")  # what an answer's "Always allow" does
    db.allow_tool(d.id, "fetch")
    page = Tags(client.get(f"/d/{d.id}").text)
    assert [b["value"] for b in page.find("input", name="always_tool")] == ["bump", "fetch"]
    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/settings", headers=HX,
                    data={"approvals_form": "1", "always_tool": ["fetch"], "ask_reads": "1",
                          "dversion": v})
    assert r.status_code == 200
    got = db.open(d.id)
    assert got.meta["approvals"] == {"always": ["fetch"], "ask_reads": True}
    assert got.version == v + 1
    page = Tags(client.get(f"/d/{d.id}").text)
    assert "checked" in page.find("input", name="ask_reads")[0]
    # a stale form is refused, nothing changes
    r = client.post(f"/d/{d.id}/settings", headers=HX,
                    data={"approvals_form": "1", "dversion": v})
    assert r.status_code == 409
    assert db.open(d.id).meta["approvals"]["always"] == ["fetch"]


def test_answering_a_call_that_is_not_waiting_is_refused(client, db):
    d = db.create("Idle")
    p = db.add(d.id, "prompt", "hi")
    r = client.post(f"/d/{d.id}/m/{p.id}/approve", headers=HX,
                    data={"call": "toolu_1", "decision": "once"})
    assert r.status_code == 400 and "not running any more" in r.text
