"""The CLI as a user runs it (a real process, a real database file), the service's reference
resolution, and the Python API."""
import json
import os
import subprocess
import sys

import pytest

from dialogue import ConflictError, Dialogue, Kind, NotFoundError
from dialogue.service import DialogueService


def run(db, *args, input=None, cwd=None):
    env = {**os.environ, "DIALOGUE_DB": str(db), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          text=True, env=env, input=input, timeout=60, cwd=cwd)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "cli.db"


def ok(db, *args, **kw):
    r = run(db, *args, **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cli_end_to_end(db):
    assert "created dialogue" in ok(db, "new", "demo", "--system", "be brief")
    ok(db, "add", "demo", "--code", "print('hello')")
    ok(db, "add", "demo", "--note", "# Notes\nabout *walruses*")
    ok(db, "add", "demo", "--prompt", "what is 2+2?", "--at", "1", "--pin")
    ok(db, "add", "demo", "--code", "-", input="x = 41\nx + 1\n")
    shown = ok(db, "show", "demo")
    assert shown.index("what is 2+2?") < shown.index("print('hello')") < shown.index("walruses")
    assert "pinned" in shown and "x + 1" in shown
    data = json.loads(ok(db, "show", "demo", "--json"))
    assert [m["kind"] for m in data["messages"]] == ["prompt", "code", "note", "code"]
    assert data["system"] == "be brief" and data["messages"][0]["pinned"]
    code_id = data["messages"][1]["id"]

    ok(db, "edit", "demo", code_id[:5], "--source", "print('bye')", "--hide")
    hist = json.loads(ok(db, "history", "demo", code_id, "--json"))
    assert [h["state"]["source"] for h in hist] == ["print('hello')", "print('bye')"]
    assert hist[1]["state"]["hidden"]
    # a stale edit is refused with its own exit status and changes nothing
    r = run(db, "edit", "demo", code_id, "--source", "late", "--base-version", "1")
    assert r.returncode == 3 and "conflict" in r.stderr and "Traceback" not in r.stderr
    ok(db, "restore", "demo", "2", "1")
    assert json.loads(ok(db, "show", "demo", "--json"))["messages"][1]["source"] == "print('hello')"

    ok(db, "mv", "demo", "1", "--to", "4")
    assert [m["kind"] for m in json.loads(ok(db, "show", "demo", "--json"))["messages"]] == \
        ["code", "note", "code", "prompt"]
    ok(db, "mv", "demo", "4", "--up")
    assert json.loads(ok(db, "show", "demo", "--json"))["messages"][2]["kind"] == "prompt"

    hits = json.loads(ok(db, "search", "walruses", "--json"))
    assert [(h["dialogue_name"], h["kind"]) for h in hits] == [("demo", "note")]
    assert "walruses" in ok(db, "search", "walrus*")

    assert "2 messages" in ok(db, "fork", "demo", "2", "--name", "branch")
    assert "branch" in ok(db, "list")

    ok(db, "rm", "demo", "1")
    assert "message" in ok(db, "trash")
    ok(db, "rm", "branch")
    assert "branch" in ok(db, "list", "--trash")
    ok(db, "restore", "branch")
    ok(db, "rename", "branch", "twig")
    assert "twig" in ok(db, "list")


@pytest.mark.parametrize("args, msg", [
    (("show", "nope"), "no dialogue named 'nope'"),
    (("edit", "demo", "99", "--source", "x"), "no message at position 99"),
    (("edit", "demo", "zzzzzzzz", "--source", "x"), "no message 'zzzzzzzz'"),
    (("edit", "demo", "1"), "nothing to change"),
    (("new", "demo"), "already exists"),
    (("restore", "nope"), "no dialogue 'nope' in the trash"),
    (("history", "demo", "7"), "no message at position 7"),
    (("search", "x", "--in", "nope"), "no dialogue named 'nope'"),
])
def test_cli_user_mistakes_are_one_line_errors(db, args, msg):
    ok(db, "new", "demo")
    ok(db, "add", "demo", "--code", "1")
    r = run(db, *args)
    assert r.returncode == 1
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ")


def test_cli_bad_database_file(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    r = run(bad, "list")
    assert r.returncode == 1 and "cannot open database" in r.stderr
    assert bad.read_bytes() == b"garbage" * 1000  # nothing written over it


def test_db_option_beats_environment(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    ok(a, "--db", str(b), "new", "in-b")
    assert "in-b" in ok(b, "list") and "in-b" not in ok(a, "list")


def test_default_db_lives_in_user_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DIALOGUE_DB"}
    env.update(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "data"))
    r = subprocess.run([sys.executable, "-m", "dialogue.cli", "new", "x"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "dialogue" / "dialogue.db").exists()


def test_service_message_references(tmp_path):
    svc = DialogueService(tmp_path / "s.db")
    d = svc.create("s")
    ms = [svc.add("s", "note", str(i)) for i in range(3)]
    assert svc.message_id("s", "1") == ms[0].id
    assert svc.message_id("s", "-1") == ms[2].id
    assert svc.message_id("s", ms[1].id[:4]) == ms[1].id or len(
        {m.id[:4] for m in ms}) < 3  # prefixes may collide; then it must say so
    with pytest.raises(NotFoundError):
        svc.message_id("s", "0")
    with pytest.raises(NotFoundError):
        svc.message_id("s", "abc")  # too short to be a prefix
    # ids are hex: an all-digit prefix that matches an id is that id, not a position
    digits = svc.add("s", "note", "digits", id="12345678")
    assert svc.message_id("s", "12345") == svc.message_id("s", "1234") == digits.id
    assert svc.message_id("s", "1") == ms[0].id and svc.message_id("s", "4") == digits.id
    with pytest.raises(NotFoundError, match="no message at position 99"):
        svc.message_id("s", "99")
    assert d.model == "local:default"
    svc.close()


def test_python_api_reads_naturally(tmp_path):
    db = tmp_path / "api.db"
    d = Dialogue.create("scratch", db=db)
    m = d.add_code("1+1")
    n = d.add_note("some *notes*")
    p = d.add_prompt("explain", pinned=True)
    assert [x.kind for x in d.messages] == [Kind.code, Kind.note, Kind.prompt]
    assert d[2].pinned and d[0].source == "1+1" and len(d) == 3
    m2 = d.edit(m, source="2+2")
    assert m2.version == 2
    with pytest.raises(ConflictError):
        d.edit(m, source="stale copy")  # `m` is version 1
    assert [v.source for v in [d[0]]] == ["2+2"]
    d.restore_version(m2, 1)
    assert d[0].source == "1+1"
    d.move(p, 0)
    assert d[0].id == p.id
    f = d.fork(d[1], name="fork")  # order is now p, m, n
    assert [x.source for x in f.messages] == ["explain", "1+1"]
    assert {x.id for x in f.messages}.isdisjoint({x.id for x in d.messages})
    md = d._repr_markdown_()
    assert "**scratch**" in md and "```python\n1+1\n```" in md and "(pinned)" in md
    assert Dialogue.open("scratch", db=db).id == d.id
    assert sorted(Dialogue.list(db=db)) == ["fork", "scratch"]
    d.model = "claude-sonnet-4-5"
    assert Dialogue.open("scratch", db=db).model == "claude-sonnet-4-5"
    assert d.search("explain")[0].message_id == p.id
