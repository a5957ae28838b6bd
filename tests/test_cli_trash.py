"""The trash from the command line: messages restored by the place they had (the README's
`dialogue rm scratch 2 ; dialogue restore scratch 2`), and listed under their dialogue's name."""
import json

import pytest

from dialogue.service import DialogueService, NotFoundError

from test_cli import ok, run


@pytest.fixture
def db(tmp_path):
    return tmp_path / "trash.db"


def test_rm_then_restore_by_position_as_the_readme_says(db):
    ok(db, "new", "scratch")
    for src in ("a = 1", "b = 2", "c = 3"):
        ok(db, "add", "scratch", "--code", src)
    ok(db, "rm", "scratch", "2")
    listing = ok(db, "trash")
    assert "scratch" in listing and "b = 2" in listing and "2 (" in listing
    said = ok(db, "restore", "scratch", "2")
    assert "at position 2" in said
    srcs = [m["source"] for m in json.loads(ok(db, "show", "scratch", "--json"))["messages"]]
    assert srcs == ["a = 1", "b = 2", "c = 3"]
    assert "the trash is empty" in ok(db, "trash")


def test_restore_by_position_takes_the_last_deleted_there(db):
    ok(db, "new", "scratch")
    for src in ("a = 1", "b = 2", "c = 3", "d = 4"):
        ok(db, "add", "scratch", "--code", src)
    ok(db, "rm", "scratch", "2")  # b
    ok(db, "rm", "scratch", "2")  # c, now at 2: both would come back at 2
    ok(db, "restore", "scratch", "2")
    srcs = [m["source"] for m in json.loads(ok(db, "show", "scratch", "--json"))["messages"]]
    assert srcs == ["a = 1", "c = 3", "d = 4"]
    ok(db, "restore", "scratch", "2")
    srcs = [m["source"] for m in json.loads(ok(db, "show", "scratch", "--json"))["messages"]]
    assert srcs == ["a = 1", "b = 2", "c = 3", "d = 4"]


def test_restore_of_something_not_in_the_trash_names_what_is(db):
    ok(db, "new", "scratch")
    ok(db, "add", "scratch", "--code", "a = 1")
    ok(db, "add", "scratch", "--code", "b = 2")
    ok(db, "rm", "scratch", "1")
    r = run(db, "restore", "scratch", "5")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no single message '5'" in r.stderr and "by place: 1 (" in r.stderr


def test_trash_names_dialogues_not_ids(tmp_path):
    svc = DialogueService(tmp_path / "t.db")
    d = svc.create("my notes")
    m = svc.add(d.id, "note", "first line\nsecond")
    svc.add(d.id, "code", "x = 1")
    svc.delete_message(d.id, m.id)
    gone = svc.create("old one")
    svc.delete(gone.id)
    items = {t.type: t for t in svc.trash()}
    assert items["message"].dialogue_name == "my notes" and items["message"].position == 1
    assert items["message"].name == "first line"
    assert items["dialogue"].dialogue_name == "old one"
    assert svc.trashed_message("my notes", m.id[:5]).id == m.id
    with pytest.raises(NotFoundError):
        svc.trashed_message("my notes", "2")
    svc.close()
    out = ok(tmp_path / "t.db", "trash")
    assert "my notes" in out and "old one" in out and d.id not in out
    assert "dialogue restore 'old one'" in out and "dialogue restore 'my notes'" in out
