"""A move is a version of the message: recorded with its author and cause, shown by the history
(CLI and service), not a conflict for an edit based on the version before it, and not undone by
a restore (a restore brings back content, not place). Real SQLite files; the CLI as a process."""
import asyncio

import pytest

from dialogue.history import MOVE_NOTE, op_words
from dialogue.service import ConflictError, DialogueService
from dialogue.store import Store, acting
from test_doc_tools import call


@pytest.fixture
def svc(tmp_path):
    s = DialogueService(tmp_path / "m.db")
    yield s
    asyncio.run(s.aclose())


def _places(store, did):
    return [m.source for m in store.messages(did)]


def test_a_move_is_a_version_with_its_author_and_places(tmp_path):
    store = Store(tmp_path / "s.db")
    d = store.create_dialogue("a")
    ms = [store.add_message(d.id, kind="code", source=f"x = {i}") for i in range(5)]
    store.update_message(ms[0].id, base_version=1, outputs=[{"output_type": "stream",
                                                              "name": "stdout", "text": "hi\n"}])
    before = dict(store._x("SELECT id, pos FROM messages"))
    versions_before = store._one("SELECT count(*) FROM versions")[0]
    with acting("model", ms[4].id):
        moved = store.move_message(ms[0].id, 2)
    after = dict(store._x("SELECT id, pos FROM messages"))
    assert [k for k in before if before[k] != after[k]] == [ms[0].id]  # one row moved
    assert store._one("SELECT count(*) FROM versions")[0] == versions_before + 1
    assert _places(store, d.id) == ["x = 1", "x = 2", "x = 0", "x = 3", "x = 4"]
    assert moved.version == 3
    h = store.history(ms[0].id)
    assert [v.op for v in h] == ["create", "edit", "move:1:3"]
    last = h[-1]
    assert (last.author, last.cause) == ("model", ms[4].id)
    assert last.state == h[1].state  # the content as it was, outputs included
    assert op_words(last.op) == "moved from 1 to 3"
    store.move_by(ms[0].id, -1)  # a user's move, outside `acting`
    assert store.history(ms[0].id)[-1].op == "move:3:2"
    assert store.history(ms[0].id)[-1].author == "user"
    store.move_message(ms[0].id, 1)  # where it is already: nothing written
    assert len(store.history(ms[0].id)) == 4
    store.close()


def test_a_move_does_not_make_an_edit_stale_but_an_edit_does(tmp_path):
    store = Store(tmp_path / "s.db")
    d = store.create_dialogue("a")
    a, b = (store.add_message(d.id, kind="note", source=s) for s in ("a", "b"))
    store.move_message(a.id, 1)  # a page showing version 1 of `a` still edits it
    assert store.get_message(a.id).version == 2
    edited = store.update_message(a.id, base_version=1, source="a, edited")
    assert edited.version == 3 and edited.source == "a, edited"
    store.move_message(a.id, 0)
    with pytest.raises(ConflictError):  # version 2 was before the edit (v3): stale
        store.update_message(a.id, base_version=2, source="lost")
    with pytest.raises(ConflictError):  # a version that does not exist yet
        store.update_message(a.id, base_version=9, source="lost")
    assert store.get_message(a.id).source == "a, edited"
    store.move_message(b.id, 0)
    store.delete_message(b.id, base_version=1)  # a delete based on the version before a move
    assert _places(store, d.id) == ["a, edited"]
    store.close()


def test_restoring_brings_back_content_not_place(svc):
    d = svc.create("r")
    a = svc.add(d.id, "note", "first text")
    svc.add(d.id, "note", "b")
    svc.add(d.id, "note", "c")
    svc.edit(d.id, a.id, base_version=None, source="second text")
    svc.move(d.id, a.id, to=2)
    assert [m.source for m in svc.messages(d.id)] == ["b", "c", "second text"]
    vs = svc.history(d.id, a.id)
    assert [v.op for v in vs] == ["create", "edit", "move:1:3"]
    assert svc.history_note(vs) == MOVE_NOTE and "not its place" in MOVE_NOTE
    assert svc.history_note(vs[:2]) == ""
    steps = svc.history_steps(d.id, a.id)
    assert [s.summary() for s in steps] == ["created", "edited · moved from 1 to 3"]
    # restoring the version before the move: its content; the message stays where it is now
    got = svc.restore_version(d.id, a.id, 1)
    assert got.source == "first text"
    assert [m.source for m in svc.messages(d.id)] == ["b", "c", "first text"]
    # restoring the move version itself brings back that version's content
    got = svc.restore_version(d.id, a.id, 3)
    assert got.source == "second text" and svc.message(d.id, a.id).id == a.id
    assert [m.source for m in svc.messages(d.id)] == ["b", "c", "second text"]


async def test_the_models_move_is_attributed_to_its_answer(svc):
    d = svc.create("t")
    note = svc.add(d.id, "note", "intro")
    code = svc.add(d.id, "code", "x = 1")
    prompt = svc.add(d.id, "prompt", "tidy up")
    t = svc.doc_tools_for("t", author="model", cause=prompt.id)
    text, err = await call(t, "read_message", id=code.id)
    assert not err and "version 1" in text
    text, err = await call(t, "move_message", id=code.id, to=1)
    assert not err and "position 1" in text
    step = svc.history_steps("t", code.id)[-1]
    assert step.summary() == f"created · moved from 2 to 1 by model, in answer {prompt.id}"
    # the model's own move does not make its next edit of what it read stale
    text, err = await call(t, "replace_text", id=code.id, old="x = 1", new="x = 2")
    assert not err and "replaced" in text
    assert [m.id for m in svc.messages("t")] == [code.id, note.id, prompt.id]


def test_cli_mv_then_history_shows_the_move_and_what_restore_does(tmp_path):
    from test_cli import ok
    db = tmp_path / "c.db"
    ok(db, "new", "s")
    for src in ("a = 1", "b = 2", "c = 3"):
        ok(db, "add", "s", "--code", src)
    assert "is now at position 3" in ok(db, "mv", "s", "1", "--to", "3")
    shown = ok(db, "history", "s", "3")
    lines = [ln.rstrip() for ln in shown.splitlines()]
    assert any(ln.startswith("step 1  v1–v2") and ln.endswith("created · moved from 1 to 3")
               for ln in lines), shown
    assert "restoring a version brings back its content, not its" in " ".join(shown.split())
    raw = ok(db, "history", "s", "3", "--versions")
    assert "move:1:3" in raw and "user" in raw


async def test_a_cells_move_through_dialogue_here_is_the_kernels_and_reaches_the_page(svc):
    """A real kernel cell moves a message with dialogue.here: the move version is the kernel's,
    caused by the cell; the run tells its listeners it was a move (so the page re-places the
    cell); and an edit the cell bases on what it read before the user moved the message again is
    not refused as stale."""
    d = svc.create("k")
    note = svc.add(d.id, "note", "# Title")
    code = svc.add(d.id, "code", "x = 1")
    first = svc.add(d.id, "code", f"from dialogue.here import move, read, replace\n"
                                  f"m = read({note.id!r})\nmove(m.id, 3)")
    svc.start(d.id, first.id)
    events = [ev async for ev in svc.subscribe(first.id)]
    ran = svc.message(d.id, first.id)
    assert ran.meta["run"]["status"] == "ok", ran.outputs
    assert [m.id for m in svc.messages(d.id)] == [code.id, first.id, note.id]
    v = svc.history(d.id, note.id)[-1]
    assert (v.op, v.author, v.cause) == ("move:1:3", "kernel", first.id)
    assert svc.history_steps(d.id, note.id)[-1].summary() == \
        f"created · moved from 1 to 3 by kernel, in cell {first.id}"
    assert [ev.data for ev in events if ev.type == "doc"] == [{"op": "move", "id": note.id}]
    svc.move(d.id, note.id, to=0)  # the user moves it back: not a change of its content
    second = svc.add(d.id, "code", 'replace(m.id, "Title", "Moved title")')
    ran = await svc.run(d.id, second.id)
    assert ran.meta["run"]["status"] == "ok", ran.outputs
    assert svc.message(d.id, note.id).source == "# Moved title"
    await svc.shutdown_kernels()
