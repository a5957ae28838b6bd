"""Cells: add, edit, conflicts, kind, flags, move, delete and undo, history, and the dialogue's
settings (name, model, system prompt, attached context)."""
from __future__ import annotations

import html as htmllib
import json
import re

from webutil import HX, Tags


def _cell_ids(client, did: str) -> list[str]:
    t = Tags(client.get(f"/d/{did}").text)
    return [a["data-id"] for tag, a in t.tags if tag == "div" and "cell" in (a.get("class") or "").split()]


def test_add_cells_where_asked(client, db):
    d = db.create("Adds")
    r = client.post(f"/d/{d.id}/cells", data={"kind": "code"}, headers=HX)
    assert r.status_code == 200
    assert r.headers["hx-retarget"] == "#cells" and r.headers["hx-reswap"] == "beforeend"
    first = db.open(d.id).messages[0]
    assert 'data-new="1"' in r.text and "editing" in r.text and first.kind.value == "code"

    r = client.post(f"/d/{d.id}/cells", data={"kind": "note", "after": first.id}, headers=HX)
    assert (r.headers["hx-retarget"], r.headers["hx-reswap"]) == (f"#m-{first.id}", "afterend")
    r = client.post(f"/d/{d.id}/cells", data={"kind": "prompt", "before": first.id}, headers=HX)
    assert (r.headers["hx-retarget"], r.headers["hx-reswap"]) == (f"#m-{first.id}", "beforebegin")
    # a cell's own inputs (its editor, its kind) never leak into the new one
    r = client.post(f"/d/{d.id}/cells", data={"kind": "code", "after": first.id,
                                              "source": "not mine"}, headers=HX)
    kinds = [m.kind.value for m in db.open(d.id).messages]
    assert kinds == ["prompt", "code", "code", "note"]
    assert all(m.source == "" for m in db.open(d.id).messages)

    bad = client.post(f"/d/{d.id}/cells", data={"kind": "video"}, headers=HX)
    assert bad.status_code == 400 and "unknown message kind" in bad.text
    gone = client.post(f"/d/{d.id}/cells", data={"kind": "code", "after": "ffffffff"}, headers=HX)
    assert gone.status_code == 404 and len(db.open(d.id).messages) == 4


def test_save_source_and_answer(client, db):
    d = db.create("Edits")
    m = db.add(d.id, "prompt", "Question?", response="Old answer.")
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"source": "Better question?\r\nTwo lines.", "version": "1"}, headers=HX)
    assert r.status_code == 200
    got = db.message(d.id, m.id)
    assert got.source == "Better question?\nTwo lines." and got.version == 2
    assert 'value="2"' in r.text
    # editing the model's answer in place
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"response": "New *answer*.", "version": "2"}, headers=HX)
    assert r.status_code == 200 and "<em>answer</em>" in r.text
    assert db.message(d.id, m.id).response == "New *answer*."
    # saving what is already stored is not a change, whatever version the page had
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"source": "Better question?\nTwo lines.", "version": "1"}, headers=HX)
    assert r.status_code == 200 and db.message(d.id, m.id).version == 3


def test_a_stale_edit_shows_a_conflict_keeps_the_text_and_changes_nothing(client, db):
    d = db.create("Stale")
    m = db.add(d.id, "code", "a = 1")
    db.edit(d.id, m.id, base_version=1, source="a = 2  # the other tab")
    before = db.history(d.id, m.id)
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"source": "a = 3  # mine", "version": "1"}, headers=HX)
    assert r.status_code == 409
    t = Tags(r.text)
    assert "changed elsewhere" in r.text and "version 1" in r.text
    assert "a = 3  # mine" in r.text  # the user's text, in the editor
    assert "a = 2  # the other tab" in r.text  # what is stored, shown beside it
    cell = t.find("div", id=f"m-{m.id}")[0]
    assert "editing" in cell["class"]
    assert t.find("input", id=f"v-{m.id}")[0]["value"] == "2"  # "save mine" overwrites v2
    assert db.message(d.id, m.id).source == "a = 2  # the other tab"
    assert len(db.history(d.id, m.id)) == len(before)
    # the same conflict on run and on a flag toggle that carries the text
    run = client.post(f"/d/{d.id}/m/{m.id}/run", data={"source": "a = 4", "version": "1"},
                      headers=HX)
    assert run.status_code == 409 and "a = 4" in run.text
    flag = client.post(f"/d/{d.id}/m/{m.id}/flag",
                       data={"flag": "pinned", "source": "a = 5", "version": "1"}, headers=HX)
    assert flag.status_code == 409 and "a = 5" in flag.text
    m2 = db.message(d.id, m.id)
    assert (m2.source, m2.pinned, m2.version) == ("a = 2  # the other tab", False, 2)
    # "save mine over it" posts the kept text with the current version
    ok = client.post(f"/d/{d.id}/m/{m.id}/save", data={"source": "a = 3  # mine", "version": "2"},
                     headers=HX)
    assert ok.status_code == 200 and db.message(d.id, m.id).source == "a = 3  # mine"


def _conflict_parts(html: str, mid: str) -> dict:
    """The parts of a cell shown in conflict: its classes, the text of its source editor and of
    the answer kept in the conflict box, the version a "save mine" would be based on, and the
    action of that button."""
    t = Tags(html)
    cell = t.find("div", id=f"m-{mid}")[0]
    src = re.search(r'<textarea name="source"[^>]*>(.*?)</textarea>', html, re.S)
    box = re.search(rf'<div[^>]*class="conflict"[^>]*>(.*?)<div id="r-{mid}"', html, re.S)
    answer = re.search(r'<textarea name="response"[^>]*>(.*?)</textarea>', box.group(1), re.S) \
        if box else None
    keep = [a for tag, a in t.tags if tag == "button" and a.get("hx-post", "").endswith("/save")
            and a.get("data-act") in ("keep-mine", "save-answer")]
    return {"classes": cell["class"].split(), "source": htmllib.unescape(src.group(1)).lstrip("\n"),
            "answer": htmllib.unescape(answer.group(1)).lstrip("\n") if answer else None,
            "version": t.find("input", id=f"v-{mid}")[0]["value"],
            "keep": keep[0]["data-act"] if keep else None, "box": box.group(1) if box else ""}


def test_a_stale_answer_edit_keeps_the_typed_answer(client, db):
    """Edit answer in a stale tab, type, Save: the conflict once showed the prompt's source in
    its editor and lost the typed answer."""
    d = db.create("Stale answer")
    m = db.add(d.id, "prompt", "Question?", response="Old answer.")
    db.edit(d.id, m.id, base_version=1, response="The other tab's answer.")
    # the page sends the whole cell: its (untouched) source editor too
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"source": "Question?", "response": "My *typed* answer.", "version": "1"},
                    headers=HX)
    assert r.status_code == 409 and "changed elsewhere" in r.text
    got = _conflict_parts(r.text, m.id)
    assert got["answer"] == "My *typed* answer."
    assert got["source"] == "Question?" and "editing" not in got["classes"]
    assert "The other tab's answer." in htmllib.unescape(got["box"])  # what is stored
    assert got["version"] == "2" and got["keep"] == "save-answer"
    stored = db.message(d.id, m.id)
    assert (stored.response, stored.version) == ("The other tab's answer.", 2)
    # "save mine over it" posts what the conflict view holds
    ok = client.post(f"/d/{d.id}/m/{m.id}/save", headers=HX, data={
        "source": got["source"], "response": got["answer"], "version": got["version"]})
    assert ok.status_code == 200 and "<em>typed</em>" in ok.text
    assert db.message(d.id, m.id).response == "My *typed* answer."


def test_a_stale_answer_edit_does_not_undo_the_other_tabs_prompt(client, db):
    """The other tab changed the prompt; this one only its answer: keeping the typed answer must
    not write this page's stale copy of the prompt back."""
    d = db.create("Stale prompt")
    m = db.add(d.id, "prompt", "Question?", response="Old answer.")
    db.edit(d.id, m.id, base_version=1, source="A better question?")
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"source": "Question?", "response": "Mine.", "version": "1"}, headers=HX)
    assert r.status_code == 409
    got = _conflict_parts(r.text, m.id)
    assert got["answer"] == "Mine." and got["source"] == "A better question?"
    ok = client.post(f"/d/{d.id}/m/{m.id}/save", headers=HX, data={
        "source": got["source"], "response": got["answer"], "version": got["version"]})
    assert ok.status_code == 200
    stored = db.message(d.id, m.id)
    assert (stored.source, stored.response) == ("A better question?", "Mine.")


def test_a_stale_edit_of_prompt_and_answer_keeps_both(client, db):
    d = db.create("Both")
    m = db.add(d.id, "prompt", "Question?", response="Old answer.")
    db.edit(d.id, m.id, base_version=1, response="Theirs.")
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"source": "My question?", "response": "My answer.", "version": "1"},
                    headers=HX)
    assert r.status_code == 409
    got = _conflict_parts(r.text, m.id)
    assert (got["source"], got["answer"]) == ("My question?", "My answer.")
    assert "editing" in got["classes"]  # the source editor stays open on the typed prompt
    assert db.message(d.id, m.id).source == "Question?"
    # and a stale source-only save is shown as before: the typed source, no answer box
    r = client.post(f"/d/{d.id}/m/{m.id}/save",
                    data={"source": "Only the question?", "version": "1"}, headers=HX)
    got = _conflict_parts(r.text, m.id)
    assert r.status_code == 409 and got["answer"] is None and got["keep"] == "keep-mine"
    assert got["source"] == "Only the question?" and "editing" in got["classes"]


def test_kind_and_flags(client, db):
    d = db.create("Flags")
    m = db.add(d.id, "code", "# a heading")
    r = client.post(f"/d/{d.id}/m/{m.id}/kind", data={"kind": "note", "version": "1"}, headers=HX)
    assert r.status_code == 200 and "kind-note" in r.text and "<h1>a heading</h1>" in r.text
    assert db.message(d.id, m.id).kind.value == "note"
    bad = client.post(f"/d/{d.id}/m/{m.id}/kind", data={"kind": "gif", "version": "2"}, headers=HX)
    assert bad.status_code == 400 and db.message(d.id, m.id).kind.value == "note"

    for flag, cls in (("hidden", "is-hidden"), ("pinned", "is-pinned"),
                      ("collapsed", "is-collapsed"), ("exported", "is-exported")):
        v = db.message(d.id, m.id).version
        r = client.post(f"/d/{d.id}/m/{m.id}/flag", data={"flag": flag, "version": str(v)},
                        headers=HX)
        assert r.status_code == 200 and cls in r.text
        assert getattr(db.message(d.id, m.id), flag) is True
        assert cls in Tags(r.text).find("div", id=f"m-{m.id}")[0]["class"].split()
    v = db.message(d.id, m.id).version
    r = client.post(f"/d/{d.id}/m/{m.id}/flag", data={"flag": "hidden", "version": str(v)},
                    headers=HX)
    assert "is-hidden" not in r.text and db.message(d.id, m.id).hidden is False
    stale = client.post(f"/d/{d.id}/m/{m.id}/flag", data={"flag": "pinned", "version": str(v)},
                        headers=HX)
    assert stale.status_code == 409 and db.message(d.id, m.id).pinned is True
    unknown = client.post(f"/d/{d.id}/m/{m.id}/flag", data={"flag": "starred"}, headers=HX)
    assert unknown.status_code == 400 and "unknown flag" in unknown.text


def test_move_delete_undo(client, db):
    d = db.create("Order")
    a, b, c = (db.add(d.id, "code", s) for s in ("a", "b", "c"))
    r = client.post(f"/d/{d.id}/m/{c.id}/move", data={"by": "-1"}, headers=HX)
    assert r.status_code == 200
    assert json.loads(r.headers["hx-trigger"]) == {"dlgMoved": {"id": c.id, "after": a.id}}
    assert [m.id for m in db.open(d.id).messages] == [a.id, c.id, b.id]
    r = client.post(f"/d/{d.id}/m/{c.id}/move", data={"by": "-5"}, headers=HX)
    assert json.loads(r.headers["hx-trigger"])["dlgMoved"] == {"id": c.id, "after": ""}
    assert _cell_ids(client, d.id) == [c.id, a.id, b.id]
    assert client.post(f"/d/{d.id}/m/{c.id}/move", data={"by": "up"}, headers=HX).status_code == 400

    r = client.post(f"/d/{d.id}/m/{a.id}/delete", data={"version": "1"}, headers=HX)
    assert r.status_code == 200 and "Deleted code cell" in r.text
    assert f'hx-post="/d/{d.id}/m/{a.id}/undelete"' in r.text
    assert [m.id for m in db.open(d.id).messages] == [c.id, b.id]
    r = client.post(f"/d/{d.id}/m/{a.id}/undelete", headers=HX)
    assert r.status_code == 200
    assert (r.headers["hx-retarget"], r.headers["hx-reswap"]) == (f"#m-{c.id}", "afterend")
    assert [m.id for m in db.open(d.id).messages] == [c.id, a.id, b.id]
    again = client.post(f"/d/{d.id}/m/{a.id}/undelete", headers=HX)
    assert again.status_code == 404
    stale = client.post(f"/d/{d.id}/m/{b.id}/delete", data={"version": "0"}, headers=HX)
    assert stale.status_code == 409 and len(db.open(d.id).messages) == 3


def test_history_and_restore_a_version(client, db):
    d = db.create("History")
    m = db.add(d.id, "code", "v1 text")
    db.edit(d.id, m.id, base_version=1, source="v2 text")
    db.edit(d.id, m.id, base_version=2, source="v3 text")
    h = client.get(f"/d/{d.id}/m/{m.id}/history", headers=HX)
    assert h.status_code == 200
    t = Tags(h.text)
    assert t.find("dialog", id="history")
    assert [x.strip() for x in t.text if x.strip().startswith("v") and x.strip()[1:].isdigit()] \
        == ["v3", "v2", "v1"]
    assert "v1 text" in h.text and "current" in h.text
    r = client.post(f"/d/{d.id}/m/{m.id}/restore_version", data={"to": "1", "version": "3"},
                    headers=HX)
    assert r.status_code == 200 and 'id="modal"' in r.text and 'hx-swap-oob="true"' in r.text
    got = db.message(d.id, m.id)
    assert got.source == "v1 text" and got.version == 4
    stale = client.post(f"/d/{d.id}/m/{m.id}/restore_version", data={"to": "2", "version": "3"},
                        headers=HX)
    assert stale.status_code == 409 and db.message(d.id, m.id).source == "v1 text"
    missing = client.post(f"/d/{d.id}/m/{m.id}/restore_version", data={"to": "99", "version": "4"},
                          headers=HX)
    assert missing.status_code == 404


def test_a_message_of_another_dialogue_is_not_found(client, db):
    d1, d2 = db.create("One"), db.create("Two")
    m = db.add(d1.id, "code", "secret = 1")
    assert client.get(f"/d/{d2.id}/m/{m.id}", headers=HX).status_code == 404
    r = client.post(f"/d/{d2.id}/m/{m.id}/save", data={"source": "x", "version": "1"}, headers=HX)
    assert r.status_code == 404 and db.message(d1.id, m.id).source == "secret = 1"


# ---------------------------------------------------------------- dialogue settings

def test_model_picker_offers_what_is_usable(db_path, db, monkeypatch):
    from starlette.testclient import TestClient
    from dialogue.service import DialogueService
    from dialogue.web import create_app
    d = db.create("Models")
    with TestClient(create_app(DialogueService(db_path)), base_url="http://127.0.0.1") as c:
        opts = [a["value"] for a in Tags(c.get(f"/d/{d.id}").text).find("option")
                if a.get("value", "").startswith(("local:", "claude", "gpt"))]
    assert "local:default" in opts and not any(o.startswith(("claude", "gpt")) for o in opts)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with TestClient(create_app(DialogueService(db_path)), base_url="http://127.0.0.1") as c:
        opts = [a["value"] for a in Tags(c.get(f"/d/{d.id}").text).find("option")]
    assert any(o.startswith("claude-") for o in opts) and any(o.startswith("gpt-") for o in opts)


def test_settings_model_system_name(client, db):
    d = db.create("Settings")
    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/settings", data={"model": "no-such-model", "dversion": v},
                    headers=HX)
    assert r.status_code == 400 and "unknown model" in r.text
    assert db.open(d.id).model == "local:default"
    r = client.post(f"/d/{d.id}/settings", data={"model": "local:nope", "dversion": v}, headers=HX)
    assert r.status_code == 400 and "unknown local model" in r.text
    r = client.post(f"/d/{d.id}/settings",
                    data={"system": "Be brief.\r\nUse Python.", "dversion": v}, headers=HX)
    assert r.status_code == 200 and r.headers["hx-reswap"] == "none"
    assert db.open(d.id).system == "Be brief.\nUse Python."
    assert f'value="{v + 1}"' in r.text and 'id="dversion"' in r.text  # out of band
    stale = client.post(f"/d/{d.id}/settings", data={"name": "Renamed", "dversion": v},
                        headers=HX)
    assert stale.status_code == 409 and db.open(d.id).name == "Settings"
    r = client.post(f"/d/{d.id}/settings", data={"name": "Renamed", "dversion": v + 1},
                    headers=HX)
    assert r.status_code == 200 and db.open(d.id).name == "Renamed"
    nothing = client.post(f"/d/{d.id}/settings", data={"name": "Renamed", "dversion": v + 2},
                          headers=HX)
    assert nothing.status_code == 200 and db.open(d.id).version == v + 2


def test_attached_context_editor(client, db):
    d = db.create("Context")
    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/context", data={"action": "add", "name": "docs",
                                                "content": "How to use it.", "dversion": v},
                    headers=HX)
    assert r.status_code == 200
    assert [(c.name, c.content, c.kind) for c in db.open(d.id).context] == \
        [("docs", "How to use it.", "text")]
    r = client.post(f"/d/{d.id}/context", data={"action": "add", "name": "file", "dversion": v + 1},
                    files={"file": ("notes.txt", "line 1\nline 2\n".encode(), "text/plain")},
                    headers=HX)
    assert r.status_code == 200
    ctx = {c.name: c for c in db.open(d.id).context}
    assert ctx["file"].content == "line 1\nline 2\n" and ctx["file"].source == "notes.txt"
    dup = client.post(f"/d/{d.id}/context", data={"action": "add", "name": "docs",
                                                  "content": "x", "dversion": v + 2}, headers=HX)
    assert dup.status_code == 409
    binary = client.post(f"/d/{d.id}/context", data={"action": "add", "name": "bin",
                                                     "dversion": v + 2},
                         files={"file": ("a.bin", bytes([0xff, 0xfe, 0x00]), "x/y")}, headers=HX)
    assert binary.status_code == 400 and "not UTF-8 text" in binary.text
    r = client.post(f"/d/{d.id}/context", data={"action": "save", "name": "docs",
                                                "content": "Updated.", "dversion": v + 2},
                    headers=HX)
    assert {c.name: c.content for c in db.open(d.id).context}["docs"] == "Updated."
    r = client.post(f"/d/{d.id}/context", data={"action": "remove", "name": "file",
                                                "dversion": v + 3}, headers=HX)
    assert [c.name for c in db.open(d.id).context] == ["docs"]
    stale = client.post(f"/d/{d.id}/context", data={"action": "remove", "name": "docs",
                                                    "dversion": v}, headers=HX)
    assert stale.status_code == 409 and [c.name for c in db.open(d.id).context] == ["docs"]
    page = client.get(f"/d/{d.id}").text
    assert "1 attached" in page and "Updated." in page


def test_an_answer_says_what_the_model_did_not_see_in_full_and_why_it_stopped(client, db):
    """The request's cuts (long code outputs shortened, earlier messages left out) and a loop
    stop are stored on the answer; its cell says so under the answer."""
    d = db.create("Cuts")
    p = db.add(d.id, "prompt", "What went wrong with the install?")
    db.store.begin_stream(p.id, response="")
    db.store.finish_stream(p.id, response="It failed.", tool_calls=[],
                           usage={"input": 900, "output": 3, "model": "local:default",
                                  "stop_reason": "repetition"},
                           meta={"cut": [{"message": "m1", "cut_lines": 47, "cut_chars": 3210},
                                         {"message": "m2", "cut_lines": 3, "cut_chars": 100}],
                                 "dropped": 2})
    r = client.get(f"/d/{d.id}/m/{p.id}", headers=HX)
    text = " ".join(Tags(r.text).text)
    assert "long output of 2 code cells shortened for the model (50 lines cut)" in text
    assert "2 earlier message(s) left out to fit the context" in text
    assert "stopped: it repeated itself" in text


def test_settings_answer_length_output_limit_and_repetition_guards(client, db):
    """The settings form's "Answers" fields: what the page shows, what a save stores (only what
    changed), what it refuses (nothing stored), and that unchecked switches are read as off."""
    d = db.create("Answers")
    page = Tags(client.get(f"/d/{d.id}").text)
    assert page.find("input", name="max_tokens", value="") and page.find("input", name="output_limit", value="")
    assert [a for a in page.find("input", name="dry") if "checked" in a]
    v = db.open(d.id).version
    same = {"generation": "1", "max_tokens": "", "output_limit": "", "dry": "1", "loop_stop": "1"}
    r = client.post(f"/d/{d.id}/settings", data={**same, "dversion": v}, headers=HX)
    assert r.status_code == 200 and db.open(d.id).version == v  # nothing changed, nothing stored
    r = client.post(f"/d/{d.id}/settings", headers=HX,
                    data={"generation": "1", "max_tokens": "64", "output_limit": "5,5,500",
                          "loop_stop": "1", "dversion": v})  # DRY unchecked: sends nothing
    assert r.status_code == 200
    meta = db.open(d.id).meta
    assert meta["max_tokens"] == 64 and meta["output_limit"] == {"head": 5, "tail": 5, "chars": 500}
    assert meta["sampling"] == {"dry_multiplier": 0.0}
    page = Tags(client.get(f"/d/{d.id}").text)
    assert page.find("input", name="max_tokens", value="64") and page.find("input", name="output_limit", value="5,5,500")
    assert not [a for a in page.find("input", name="dry") if "checked" in a]
    v = db.open(d.id).version
    for bad in ({"max_tokens": "0"}, {"output_limit": "lots"}):
        r = client.post(f"/d/{d.id}/settings", headers=HX,
                        data={**same, "max_tokens": "64", "output_limit": "5,5,500", **bad, "dversion": v})
        assert r.status_code == 400 and db.open(d.id).version == v
    r = client.post(f"/d/{d.id}/settings", data={**same, "dversion": v}, headers=HX)
    assert r.status_code == 200
    meta = db.open(d.id).meta
    assert "max_tokens" not in meta and "output_limit" not in meta and "sampling" not in meta
