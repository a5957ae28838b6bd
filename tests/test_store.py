"""The store, against real SQLite files."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from dialogue.document import ContextItem, Kind, Message, new_id
from dialogue.store import (HIT_END, HIT_START, SCHEMA_VERSION, ConflictError, MIGRATIONS,
                            NameTakenError, NotFoundError, SchemaError, Store, StoreError)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "d.db")
    yield s
    s.close()


def sources(store, did):
    return [m.source for m in store.messages(did)]


def test_open_sets_wal_foreign_keys_and_schema(store):
    assert store._one("PRAGMA journal_mode")[0] == "wal"
    assert store._one("PRAGMA foreign_keys")[0] == 1
    assert store.schema_version == SCHEMA_VERSION
    # the file is a plain SQLite database any tool can read
    con = sqlite3.connect(store.path)
    assert {"dialogues", "messages", "versions", "blobs"} <= {
        r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()


def test_every_change_writes_a_version_and_restore_works(store):
    d = store.create_dialogue("a")
    m = store.add_message(d.id, kind="code", source="x = 1")
    assert m.version == 1
    m = store.update_message(m.id, base_version=1, source="x = 2")
    m = store.set_flags(m.id, base_version=2, pinned=True, hidden=True)
    m = store.update_message(m.id, base_version=3, outputs=[{"output_type": "stream", "name": "stdout", "text": "2\n"}],
                             execution_count=4)
    m = store.update_message(m.id, base_version=4, kind="note")
    hist = store.history(m.id)
    assert [(v.version, v.op) for v in hist] == [(1, "create"), (2, "edit"), (3, "flags"),
                                                  (4, "edit"), (5, "edit")]
    assert hist[1].state["source"] == "x = 2" and not hist[1].state["pinned"]
    assert hist[2].state["pinned"] and hist[2].state["hidden"]
    assert hist[3].state["execution_count"] == 4
    # an edit that changes nothing writes nothing
    same = store.update_message(m.id, base_version=5, source="x = 2")
    assert same.version == 5 and len(store.history(m.id)) == 5
    # restore version 1: a new version with the old state; history is kept
    r = store.restore_version(m.id, 1, base_version=5)
    assert (r.version, r.source, r.kind, r.pinned, r.outputs) == (6, "x = 1", Kind.code, False, [])
    assert store.history(m.id)[-1].op == "restore:1"
    assert len(store.history(m.id)) == 6
    # the history really is append-only
    with pytest.raises(Exception, match="append-only"):
        store._x("UPDATE versions SET op = 'x'")
    with pytest.raises(Exception, match="append-only"):
        store._x("DELETE FROM versions")


def test_dialogue_settings_are_versioned(store):
    d = store.create_dialogue("a", system="be brief")
    d = store.update_dialogue(d.id, base_version=1, system="be thorough", model="local:default",
                              context=[ContextItem("docs", "all about pandas")])
    assert d.version == 2 and d.context[0].content == "all about pandas"
    with pytest.raises(ConflictError):
        store.update_dialogue(d.id, base_version=1, name="b")
    hist = store.history(d.id)
    assert [v.state["system"] for v in hist] == ["be brief", "be thorough"]
    again = store.get_dialogue(d.id)
    assert again.context == [ContextItem("docs", "all about pandas")]


def test_stale_edit_is_refused_and_changes_nothing(store):
    d = store.create_dialogue("a")
    m = store.add_message(d.id, kind="code", source="first")
    tab1 = store.get_message(m.id)
    tab2 = store.get_message(m.id)
    store.update_message(m.id, base_version=tab1.version, source="tab 1 wins")
    with pytest.raises(ConflictError) as e:
        store.update_message(m.id, base_version=tab2.version, source="tab 2 loses")
    assert "based on version 1" in str(e.value) and "current version is 2" in str(e.value)
    assert e.value.current == 2
    assert store.get_message(m.id).source == "tab 1 wins"
    assert len(store.history(m.id)) == 2
    with pytest.raises(ConflictError):
        store.set_flags(m.id, base_version=1, hidden=True)
    with pytest.raises(ConflictError):
        store.delete_message(m.id, base_version=1)
    assert not store.get_message(m.id).hidden


def test_insert_positions_and_moves_touch_one_row(store):
    d = store.create_dialogue("a")
    ids = [store.add_message(d.id, kind="note", source=str(i)).id for i in range(5)]
    store.add_message(d.id, kind="note", source="after 1", after=ids[1])
    store.add_message(d.id, kind="note", source="first", index=0)
    store.add_message(d.id, kind="note", source="before 4", before=ids[4])
    assert sources(store, d.id) == ["first", "0", "1", "after 1", "2", "3", "before 4", "4"]
    before = dict(store._x("SELECT id, pos FROM messages"))
    store.move_message(ids[4], 0)
    after = dict(store._x("SELECT id, pos FROM messages"))
    assert [k for k in before if before[k] != after[k]] == [ids[4]]
    assert sources(store, d.id)[0] == "4"
    store.move_by(ids[0], 2)
    assert sources(store, d.id) == ["4", "first", "1", "after 1", "0", "2", "3", "before 4"]
    store.move_message(ids[0], -1)
    assert sources(store, d.id)[-1] == "0"
    store.move_by(ids[0], 100)  # clamped, no error
    assert sources(store, d.id)[-1] == "0"


def test_repeated_moves_into_one_gap_renumber_without_breaking_order(store):
    d = store.create_dialogue("a")
    a = store.add_message(d.id, kind="note", source="a")
    b = store.add_message(d.id, kind="note", source="b")
    # insert 200 messages, each right after `a`: the gap after `a` halves each time until the
    # float can no longer split it and the dialogue is renumbered
    for i in range(200):
        store.add_message(d.id, kind="note", source=f"x{i}", after=a.id)
    s = sources(store, d.id)
    assert s[0] == "a" and s[-1] == "b" and s[1:-1] == [f"x{i}" for i in reversed(range(200))]


def test_fork_holds_messages_up_to_and_including(store):
    d = store.create_dialogue("a", system="sys", context=[ContextItem("c", "ctx")])
    ms = [store.add_message(d.id, kind=k, source=k) for k in ("note", "code", "prompt", "code")]
    store.update_message(ms[2].id, base_version=1, response="an answer")
    f = store.fork(d.id, ms[2].id)
    assert f.name == "a (fork)" and f.system == "sys" and f.context == d.context
    assert [m.source for m in f.messages] == ["note", "code", "prompt"]
    assert f.messages[2].response == "an answer"
    assert {m.id for m in f.messages}.isdisjoint({m.id for m in ms})
    assert f.messages[0].meta["forked_from"] == ms[0].id
    assert f.meta["forked_from"] == {"dialogue": d.id, "message": ms[2].id}
    # editing the fork leaves the original alone
    store.update_message(f.messages[1].id, base_version=1, source="changed")
    assert sources(store, d.id) == ["note", "code", "prompt", "code"]
    assert store.fork(d.id, ms[0].id).name == "a (fork) 2"
    with pytest.raises(NameTakenError):
        store.fork(d.id, ms[0].id, name="a")
    with pytest.raises(KeyError):
        store.fork(d.id, "nonexistent")


def test_search_sources_outputs_answers_across_dialogues(store):
    d1 = store.create_dialogue("one")
    d2 = store.create_dialogue("two")
    store.add_message(d1.id, kind="code", source="import pandas as pd",
                      outputs=[{"output_type": "stream", "name": "stdout", "text": "zebra stripes\n"}])
    p = store.add_message(d2.id, kind="prompt", source="tell me about giraffes")
    store.update_message(p.id, base_version=1, response="Giraffes have long necks; zebras don't.")
    store.add_message(d2.id, kind="note", source="Café crème")
    hits = store.search("zebra*")
    assert {(h.dialogue_name, h.kind) for h in hits} == {("one", "code"), ("two", "prompt")}
    hit = store.search("giraffes")[0]
    assert hit.dialogue_name == "two"
    assert f"{HIT_START}giraffes{HIT_END}" in hit.snippet.lower()
    assert store.search("cafe")[0].kind == "note"  # diacritics folded
    assert store.search("pandas", dialogue_id=d2.id) == []
    # user text with FTS syntax characters is a plain query, not an error
    assert store.search('"unbalanced (quote AND') == []
    with pytest.raises(StoreError, match="bad search query"):
        store.search('"unbalanced', raw=True)
    # edits re-index; trashed messages and dialogues drop out
    store.update_message(p.id, base_version=2, response="nothing here")
    assert [h.kind for h in store.search("giraffes")] == ["prompt"]  # still in the source
    store.delete_dialogue(d2.id)
    assert store.search("giraffes") == []
    store.restore_dialogue(d2.id)
    assert len(store.search("giraffes")) == 1


def test_trash_and_restore(store):
    d = store.create_dialogue("a")
    ms = [store.add_message(d.id, kind="note", source=s) for s in ("x", "y", "z")]
    store.delete_message(ms[1].id)
    assert sources(store, d.id) == ["x", "z"]
    with pytest.raises(NotFoundError, match="trash"):
        store.get_message(ms[1].id)
    assert [(t.type, t.id) for t in store.trash()] == [("message", ms[1].id)]
    store.restore_message(ms[1].id)
    assert sources(store, d.id) == ["x", "y", "z"]  # back in its place
    assert [v.op for v in store.history(ms[1].id)] == ["create", "delete", "restore"]
    store.delete_dialogue(d.id)
    assert store.list_dialogues() == []
    assert store.list_dialogues(deleted=True)[0]["name"] == "a"
    with pytest.raises(NotFoundError, match="trash"):
        store.find_dialogue("a")
    b = store.create_dialogue("a")  # the name is free again
    r = store.restore_dialogue(d.id)
    assert r.name == "a (restored)" and [m.source for m in r.messages] == ["x", "y", "z"]
    assert store.find_dialogue("a") == b.id
    with pytest.raises(StoreError, match="not in the trash"):
        store.restore_dialogue(d.id)


def test_names_ids_and_bad_input(store):
    store.create_dialogue("a")
    with pytest.raises(NameTakenError):
        store.create_dialogue("a")
    with pytest.raises(StoreError, match="non-empty"):
        store.create_dialogue("  ")
    with pytest.raises(NotFoundError):
        store.get_dialogue("nope")
    with pytest.raises(NotFoundError):
        store.get_message("nope")
    d = store.create_dialogue("b")
    with pytest.raises(ValueError, match="unknown message kind"):
        store.add_message(d.id, kind="poem", source="x")
    m = store.add_message(d.id, kind="code", source="x")
    with pytest.raises(ValueError, match="unknown message kind"):
        store.update_message(m.id, base_version=1, kind="poem")
    with pytest.raises(StoreError, match="cannot change"):
        store.update_message(m.id, base_version=1, dialogue_id="x")
    with pytest.raises(StoreError, match="unknown flag"):
        store.set_flags(m.id, base_version=1, shiny=True)
    assert store.get_message(m.id).version == 1


def test_large_outputs_are_stored_once_across_versions(store):
    d = store.create_dialogue("a")
    img = {"output_type": "display_data", "metadata": {},
           "data": {"image/png": "A" * 500_000, "text/plain": "<Figure>"}}
    m = store.add_message(d.id, kind="code", source="plot()", outputs=[img])
    for i in range(10):
        m = store.set_flags(m.id, base_version=m.version, collapsed=i % 2 == 0)
    size = store._one("SELECT sum(length(state)) FROM versions")[0]
    assert size < 50_000
    assert store._one("SELECT count(*) FROM blobs")[0] == 1
    assert store.history(m.id)[3].state["outputs"] == [img]


def test_streaming_appends_are_on_disk_at_once_and_finish_writes_a_version(tmp_path):
    path = tmp_path / "d.db"
    s = Store(path)
    d = s.create_dialogue("a")
    p = s.add_message(d.id, kind="prompt", source="hi")
    s.update_message(p.id, base_version=1, response="old answer")
    s.begin_stream(p.id)
    s.stream_append(p.id, text="Hel")
    s.stream_append(p.id, text="lo")
    # another connection (another tab, a crash) sees what was streamed so far
    other = Store(path)
    assert other.get_message(p.id).response == "Hello"
    with pytest.raises(ConflictError, match="being written"):
        other.update_message(p.id, base_version=other.get_message(p.id).version, response="x")
    done = s.finish_stream(p.id, response="Hello!", usage={"output": 3})
    assert done.response == "Hello!" and other.get_message(p.id).usage == {"output": 3}
    assert [v.state["response"] for v in s.history(p.id)] == ["", "old answer", "", "Hello!"]
    c = s.add_message(d.id, kind="code", source="print(1)")
    s.begin_stream(c.id)
    s.stream_append(c.id, output={"output_type": "stream", "name": "stdout", "text": "1\n"})
    s.stream_append(c.id, output={"output_type": "stream", "name": "stdout", "text": "2\n"})
    assert [o["text"] for o in other.get_message(c.id).outputs] == ["1\n", "2\n"]
    # its writer is alive: another Store leaves the stream alone, however often it recovers
    with Store(path) as third:  # (its open recovers too)
        assert other.recover_interrupted() == [] and third.recover_interrupted() == []
    assert not other.get_message(c.id).meta.get("interrupted")
    # a Store closed mid-stream can never finish it: the stream becomes an interrupted version
    # (a killed process is the same case: tests/test_store_safety.py)
    s.close()
    rec = other.get_message(c.id)
    assert rec.meta["interrupted"] and len(rec.outputs) == 2
    assert rec.meta["run"]["status"] == "interrupted" and "cut off" in rec.meta["run"]["message"]
    assert other.history(c.id)[-1].op == "recovered"
    assert other.recover_interrupted() == []
    other.close()


def test_migration_from_schema_1(tmp_path):
    path = tmp_path / "old.db"
    # a database as schema version 1 wrote it, with data in it
    con = Store(path, migrate=False)
    with con.tx():
        MIGRATIONS[0](con.conn)
        con._x("PRAGMA user_version = 1")
    con._x("INSERT INTO dialogues(id, name, created, updated) VALUES ('d1', 'old', 0, 0)")
    con._x("INSERT INTO messages(id, dialogue_id, pos, kind, source, outputs, created, updated) "
           "VALUES ('m1', 'd1', 1, 'code', 'import numpy', ?, 0, 0)",
           (json.dumps([{"output_type": "stream", "name": "stdout", "text": "walrus\n"}]),))
    con.close()
    s = Store(path)
    assert s.schema_version == SCHEMA_VERSION
    assert [h.message_id for h in s.search("walrus")] == ["m1"]
    assert [h.message_id for h in s.search("numpy")] == ["m1"]
    assert s.get_dialogue("d1").messages[0].source == "import numpy"
    s.close()


def test_migration_from_schema_3_indexes_history_and_reads_its_full_snapshots(tmp_path):
    path = tmp_path / "v3.db"
    # a database as schema version 3 wrote it: versions hold full snapshots
    con = Store(path, migrate=False)
    with con.tx():
        for mig in MIGRATIONS[:3]:
            mig(con.conn)
        con._x("PRAGMA user_version = 3")
    full = {"kind": "prompt", "source": "hi", "outputs": [], "execution_count": None,
            "response": "hello", "tool_calls": [], "usage": {"input_tokens": 3}, "attachments": {},
            "meta": {}, "hidden": False, "pinned": True, "collapsed": False, "exported": False}
    con._x("INSERT INTO dialogues(id, name, created, updated) VALUES ('d1', 'old', 0, 0)")
    con._x("INSERT INTO messages(id, dialogue_id, pos, kind, source, response, usage, pinned, "
           "created, updated) VALUES ('m1', 'd1', 1, 'prompt', 'hi', 'hello', ?, 1, 0, 0)",
           (json.dumps(full["usage"]),))
    settings = {"name": "old", "model": "", "system": "", "context": [], "meta": {}}
    con._x("INSERT INTO versions(dialogue_id, message_id, version, op, at, state) "
           "VALUES ('d1', '', 1, 'create', 0, ?), ('d1', 'm1', 1, 'create', 0, ?)",
           (json.dumps(settings), json.dumps(full)))
    before = con._x("SELECT * FROM versions ORDER BY n")
    con.close()
    s = Store(path)
    assert s.schema_version == SCHEMA_VERSION
    plan = " ".join(str(r) for r in s._x(
        "EXPLAIN QUERY PLAN SELECT state FROM versions WHERE message_id = ? ORDER BY version",
        ("m1",)))
    assert "SEARCH versions USING" in plan and "SCAN versions" not in plan
    assert [v.state for v in s.history("m1")] == [full]
    assert [v.state for v in s.history("d1")] == [settings]
    cols = "n, dialogue_id, message_id, version, op, at, state"
    assert s._x(f"SELECT {cols} FROM versions ORDER BY n") == before  # copied as it was
    # authorship came later (schema 7): old rows have none recorded and read as the user's
    assert s._x("SELECT DISTINCT author, cause FROM versions") == [("", "")]
    assert [v.author for v in s.history("m1")] == ["user"]
    with pytest.raises(Exception, match="append-only"):
        s._x("DELETE FROM versions")
    m = s.update_message("m1", base_version=1, source="hi there")  # a new, compact version
    assert [v.state for v in s.history("m1")] == [full, {**full, "source": "hi there"}]
    assert s.restore_version("m1", 1, base_version=m.version).source == "hi"
    s.close()


def test_versions_store_only_what_differs_and_read_back_whole(store):
    d = store.create_dialogue("a")
    m = store.add_message(d.id, kind="code", source="x")
    # values equal to a default but of another type are not defaults: 0 is not None or False
    m = store.update_message(m.id, base_version=1, execution_count=0, meta={"n": 0})
    m = store.update_message(m.id, base_version=2, kind="note", source="", meta={})
    stored = [json.loads(r[0]) for r in store._x(
        "SELECT state FROM versions WHERE message_id = ? ORDER BY version", (m.id,))]
    assert stored == [{"source": "x"}, {"source": "x", "execution_count": 0, "meta": {"n": 0}},
                      {"kind": "note", "execution_count": 0}]
    hist = store.history(m.id)
    assert hist[1].state == {**Message().state(), "source": "x", "execution_count": 0,
                             "meta": {"n": 0}}
    assert hist[2].state == {**Message().state(), "kind": "note", "execution_count": 0}
    # each read gets its own lists and dicts
    hist[0].state["outputs"].append(1)
    assert store.history(m.id)[0].state["outputs"] == []


@pytest.mark.parametrize("copies", [1, 3])  # fewer messages than _BULK, and more
def test_a_bulk_insert_writes_the_same_versions_as_the_general_path(store, copies):
    """Messages with only a kind and a source get their search row and first version made by
    SQLite from the inserted rows (the import's fast path): the same state as the general path
    (`_compact_state`) writes, and a search row with the source, mixed with messages that take
    the general path in one batch."""
    from dialogue.store import _BULK, _compact_state, _dumps
    d = store.create_dialogue("a")
    sources = ["", "x", 'a "quoted" \\ back\\slash', "line\nbreak\ttab\x01\x1f\x7f",
               "naïve café ✓ 🐍 \u2028\u2029", "</script>&<b>"]
    msgs = [Message(kind=k, source=src) for k in Kind for src in sources]
    out = [{"output_type": "stream", "name": "stdout", "text": "walrus\n"}]
    msgs[3:3] = [Message(source="print('walrus')", outputs=out), Message(source="y", hidden=True)]
    msgs += [m.copy(id=new_id()) for _ in range(copies - 1) for m in msgs[:26]]
    assert (len(msgs) >= _BULK) == (copies > 1)
    added = store.add_messages(d.id, msgs)
    for m in added:
        stored = store._one("SELECT state FROM versions WHERE message_id = ?", (m.id,))[0]
        assert json.loads(stored) == json.loads(_dumps(_compact_state(m.state()))), m
        assert store.history(m.id)[0].state == m.state()
    assert [m.source for m in store.messages(d.id)] == [m.source for m in msgs]
    assert store._one("SELECT count(*) FROM versions WHERE dialogue_id = ?", (d.id,))[0] == \
        len(msgs) + 1  # and the dialogue's own
    assert {h.message_id for h in store.search("walrus")} == {m.id for m in added if m.outputs}
    assert {h.message_id for h in store.search("naïve")} == {m.id for m in added
                                                               if "naïve" in m.source}
    assert {h.snippet for h in store.search("script")} == {"</\ue000script\ue001>&<b>"}


def test_messages_read_back_equal_to_what_was_written(store):
    d = store.create_dialogue("a")
    out = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    written = [Message(kind="code", source="a", outputs=out, execution_count=3, hidden=True),
               Message(kind="prompt", source="q", response="r", usage={"t": 1},
                       tool_calls=[{"name": "f"}], attachments={"a.png": "x"}, meta={"k": [1]},
                       pinned=True, collapsed=True, exported=True),
               Message(kind="raw", source="")]
    added = store.add_messages(d.id, written)
    read = store.messages(d.id)
    assert read == added and [store.get_message(m.id) for m in added] == added
    for m in read:  # real types, not what SQLite hands back (ints for flags, str for kind)
        assert type(m.kind) is Kind and all(type(v) is bool for v in m.flags.values())
        assert m == Message.from_dict(m.to_dict())
    read[0].outputs.append({})  # messages share no lists with each other or the store
    assert store.messages(d.id)[0].outputs == out and read[2].outputs == []
    # their first versions, stored compactly, read back whole
    assert [store.history(m.id)[0].state for m in added] == [m.state() for m in added]


def test_ids_already_taken_get_new_ones_in_a_batch(store):
    d = store.create_dialogue("a")
    first = store.add_message(d.id, source="one", id="abcdef01")
    batch = [Message(source="two", id="abcdef01"), Message(source="three", id="abcdef02"),
             Message(source="four", id="abcdef02")]
    added = store.add_messages(d.id, batch)
    ids = [first.id] + [m.id for m in added]
    assert len(set(ids)) == 4 and ids[2] == "abcdef02"
    assert sources(store, d.id) == ["one", "two", "three", "four"]
    assert [h.message_id for h in store.search("four")] == [ids[3]]
    assert [len(store.history(i)) for i in ids] == [1, 1, 1, 1]


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="newer"):
        Store(path)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        Store(path)


WRITER = textwrap.dedent("""
    import sys
    from dialogue.store import Store
    s = Store(sys.argv[1])
    d = s.create_dialogue("burst")
    print("dialogue", d.id, flush=True)
    i = 0
    while True:
        m = s.add_message(d.id, kind="code", source=f"x = {i}" + " " * 2000)
        m = s.update_message(m.id, base_version=1, source=f"x = {i} # edited",
                             outputs=[{"output_type": "stream", "name": "stdout", "text": "y" * 3000}])
        print("committed", m.id, i, flush=True)
        i += 1
""")


def test_sigkill_mid_burst_keeps_every_committed_write(tmp_path):
    path = tmp_path / "burst.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    committed = []
    deadline = time.time() + 60
    for line in proc.stdout:
        if line.startswith("committed"):
            committed.append(line.split()[1:])
            if len(committed) >= 150:
                break
        assert time.time() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # lines written after we stopped reading were committed too: read the rest of the pipe
    committed += [l.split()[1:] for l in proc.stdout.read().splitlines() if l.startswith("committed")]
    s = Store(path)
    assert s.integrity_check() == "ok"
    for mid, i in committed:
        m = s.get_message(mid)
        assert m.source == f"x = {i} # edited" and m.version == 2
        assert len(s.history(mid)) == 2
    s.close()


def test_two_processes_write_concurrently_without_losing_writes(tmp_path):
    path = tmp_path / "c.db"
    s = Store(path)
    d = s.create_dialogue("shared")
    code = textwrap.dedent(f"""
        import sys
        from dialogue.store import Store
        s = Store({str(path)!r})
        for i in range(100):
            s.add_message({d.id!r}, kind="note", source=f"{{sys.argv[1]}}-{{i}}")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, tag]) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    srcs = sources(s, d.id)
    assert len(srcs) == 200
    for tag in "ab":  # each writer's messages are all there, in its order
        mine = [x for x in srcs if x.startswith(tag)]
        assert mine == [f"{tag}-{i}" for i in range(100)]
    s.close()
