"""The settings' document tools checkboxes (off by default, a save stores only what changed) and
the history panel naming the model as the author of its edit."""
from webutil import HX, Tags

from dialogue.store import acting


def checked(page: Tags) -> list[str]:
    return [a["value"] for a in page.find("input", name="doc_tool") if "checked" in a]


def test_settings_turn_document_tools_on_and_choose(client, db):
    d = db.create("Tools")
    page = Tags(client.get(f"/d/{d.id}").text)
    boxes = page.find("input", name="doc_tool")
    assert [b["value"] for b in boxes] == [n for n, _, _ in db.document_tools()]
    assert checked(page) == []  # off by default
    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/settings", data={"doc_tools_form": "1", "dversion": v},
                    headers=HX)
    assert r.status_code == 200 and db.open(d.id).version == v  # nothing changed, nothing stored
    r = client.post(f"/d/{d.id}/settings", headers=HX,
                    data={"doc_tools_form": "1", "doc_tool": ["read_message", "replace_text"],
                          "dversion": v})
    assert r.status_code == 200
    assert db.open(d.id).meta["doc_tools"] == ["read_message", "replace_text"]
    assert checked(Tags(client.get(f"/d/{d.id}").text)) == ["read_message", "replace_text"]
    # with another setting in the same save: both stored, one after the other
    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/settings", headers=HX,
                    data={"doc_tools_form": "1", "system": "Be brief.", "dversion": v})
    assert r.status_code == 200
    got = db.open(d.id)
    assert got.system == "Be brief." and "doc_tools" not in got.meta  # all unchecked: off


def test_history_names_the_model_and_its_answer(client, db):
    d = db.create("Who")
    m = db.add(d.id, "code", "prnt(1)")
    with acting("model", "a1b2c3d4"):
        db.edit(d.id, m.id, base_version=None, source="print(1)")
    h = client.get(f"/d/{d.id}/m/{m.id}/history", headers=HX)
    assert "edited by model, in answer a1b2c3d4" in h.text
    assert "v2 edit · model, in answer a1b2c3d4" in h.text and "v1 create · user" in h.text
