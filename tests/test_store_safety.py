"""The database file is ours and stays sound: private modes, foreign and damaged files refused
through the CLI without a byte changed, and runs owned by the process writing them (real
processes killed with SIGKILL, a real `dialogue ask`, real `dialogue serve`s)."""
import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from dialogue.document import Message
from dialogue.service import DialogueService, RunError
from dialogue.store import (APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, DamagedError,
                            ForeignDatabaseError, Store, StoreError)

ENV = {"COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def cli(db, *args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "dialogue.cli", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **kw.pop("env", {})}, **kw)


def popen_cli(db, *args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "dialogue.cli", "--db", str(db), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV, **(env or {})}, **kw)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def one_line_error(r, *phrases):
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "SQLITE_LOG" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for p in phrases:
        assert p in lines[0], lines[0]
    return lines[0]


def wait_for(pred, what, timeout=60.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def umask022():
    old = os.umask(0o022)  # the usual umask, under which a plain open() makes 0644 files
    yield
    os.umask(old)


# ---------------------------------------------------------------- item 11: file modes

def test_a_new_database_and_its_wal_shm_and_lock_files_are_private(tmp_path, umask022):
    path = tmp_path / "new" / "d.db"
    s = Store(path)
    d = s.create_dialogue("a")
    m = s.add_message(d.id, kind="prompt", source="secret prompt")
    s.begin_stream(m.id)  # takes this Store's run lock
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.joinpath("new").iterdir()}
    locks = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "new" / "d.db-locks").iterdir()}
    s.close()
    assert modes == {"d.db": 0o600, "d.db-wal": 0o600, "d.db-shm": 0o600, "d.db-locks": 0o700}
    assert locks and set(locks.values()) == {0o600}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # the folder we created for it
    # the CLI creates its database the same way
    r = cli(tmp_path / "cli.db", "new", "x")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "cli.db").stat().st_mode) == 0o600


# ---------------------------------------------------------------- item 10: foreign and damaged

def _foreign_notes(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);"
                      "INSERT INTO notes(body) VALUES ('my shopping list');")
    con.close()


def _foreign_messages(path: Path) -> None:
    """An application with its own `messages` table (a chat app's history, say)."""
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE messages(id INTEGER PRIMARY KEY, sender TEXT, body TEXT);"
                      "INSERT INTO messages(sender, body) VALUES ('ann', 'hello');")
    con.close()


def _foreign_wal_with_app_id(path: Path) -> None:
    """Another application's WAL-mode file that marks itself with its own application id."""
    con = sqlite3.connect(path)
    con.executescript("PRAGMA journal_mode = wal; PRAGMA application_id = 1234567;"
                      "CREATE TABLE t(x); INSERT INTO t VALUES (1);")
    con.close()


@pytest.mark.parametrize("make", [_foreign_notes, _foreign_messages, _foreign_wal_with_app_id])
def test_another_applications_database_is_refused_unchanged(tmp_path, make):
    path = tmp_path / "other.db"
    make(path)
    before, files = digest(path), siblings(path)
    for args in (["list"], ["new", "mine"], ["show", "mine"], ["add", "mine", "--note", "x"],
                 ["search", "hello"]):
        r = cli(path, *args)
        one_line_error(r, "other.db is not a dialogue database", "another application",
                       "nothing was written")
        assert digest(path) == before and siblings(path) == files, args
    # still the other application's file, as it was
    con = sqlite3.connect(path)
    assert "dialogues" not in {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    con.close()
    with pytest.raises(ForeignDatabaseError):
        Store(path)


def _real_db(tmp_path: Path) -> Path:
    """A dialogue database with some content, written by the CLI and fully checkpointed."""
    path = tmp_path / "real.db"
    assert cli(path, "new", "demo").returncode == 0
    for i in range(20):
        assert cli(path, "add", "demo", "--code", f"x = {i}  # " + "y" * 400).returncode == 0
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def _pages_of(path: Path, table: str) -> list[int]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,))]
    finally:
        con.close()


def _overwrite(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes((i * 151 + 7) & 0xFF for i in range(n)))


def test_a_damaged_database_is_reported_in_one_line_and_never_written(tmp_path):
    real = _real_db(tmp_path)
    page = sqlite3.connect(real).execute("PRAGMA page_size").fetchone()[0]
    pages = _pages_of(real, "versions")
    assert pages  # (dbstat is there to find them)

    # 1. one page of the history is garbage: reading dialogues still works, writing is refused
    hist = tmp_path / "hist.db"
    hist.write_bytes(real.read_bytes())
    _overwrite(hist, (max(pages) - 1) * page, page)
    before = digest(hist)
    assert cli(hist, "list").returncode == 0
    assert "x = 3" in cli(hist, "show", "demo").stdout
    for args in (["add", "demo", "--code", "z = 1"], ["new", "other"], ["rm", "demo", "1"]):
        one_line_error(cli(hist, *args), "hist.db is damaged", "nothing was written", ".recover")
        assert digest(hist) == before, args
    with Store(hist) as s, pytest.raises(DamagedError):
        s.create_dialogue("x")
    assert digest(hist) == before

    # 2. everything after the first page is garbage: every command says so, in one line
    wrecked = tmp_path / "wrecked.db"
    wrecked.write_bytes(real.read_bytes())
    _overwrite(wrecked, page, wrecked.stat().st_size - page)
    before = digest(wrecked)
    for args in (["list"], ["show", "demo"], ["add", "demo", "--code", "z = 1"], ["search", "x"]):
        one_line_error(cli(wrecked, *args), "wrecked.db is damaged")
        assert digest(wrecked) == before, args

    # 3. the header itself is overwritten: not recognisable as SQLite at all
    header = tmp_path / "header.db"
    header.write_bytes(real.read_bytes())
    _overwrite(header, 0, 64)
    before = digest(header)
    for args in (["list"], ["add", "demo", "--code", "z = 1"]):
        one_line_error(cli(header, *args), "cannot open database", "header.db: it is not an "
                       "SQLite file", "nothing was written")
        assert digest(header) == before and siblings(header) == ["header.db"]


def _small_db(path: Path) -> tuple[Path, str]:
    with Store(path) as s:
        d = s.create_dialogue("demo")
        s.add_messages(d.id, [Message(source=f"x = {i}  # " + "walrus " * 60) for i in range(40)])
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path, d.id


@pytest.mark.parametrize("table", ["messages", "messages_order", "versions",
                                   "sqlite_autoindex_versions_1", "search_data", "search_content",
                                   "search_docsize"])
def test_the_check_before_writing_finds_a_damaged_page_in_any_table(tmp_path, table):
    """The check before a first write leaves out what SQLite 3.44+ adds to quick_check beyond
    the file's structure (FTS5 re-tokenizing, CHECK expressions), not any of the file: a garbage
    page of a table, an index or the search index's own tables is refused, and stays refused."""
    path, did = _small_db(tmp_path / "d.db")
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    pages = _pages_of(path, table)
    assert pages, table
    _overwrite(path, (max(pages) - 1) * page, page)
    before = digest(path)
    with Store(path) as s:  # the check itself finds it (a problem listed, or SQLite's error)
        with contextlib.suppress(DamagedError):
            assert s._structure_check() != ["ok"]
    for _ in range(2):
        with Store(path) as s, pytest.raises(DamagedError, match="d.db is damaged"):
            s.add_message(did, kind="code", source="x = 4")
        assert digest(path) == before


def test_a_search_index_out_of_step_with_its_texts_is_found_by_the_full_check(tmp_path):
    """What the check before writing leaves to `integrity_check`: whether the search index
    agrees with the texts it indexes (a logical fault, not a damaged page; the index is derived
    from the messages, which stay as they were)."""
    path, did = _small_db(tmp_path / "d.db")
    con = sqlite3.connect(path)  # another program rewrites an indexed text behind FTS5's back
    con.execute("UPDATE search_content SET c0 = 'giraffe' WHERE id = 1")
    con.commit()
    con.close()
    with Store(path) as s:
        assert "fts5" in s.integrity_check().lower()
        assert s.quick_checks == 0
        s.add_message(did, kind="code", source="x = 41")  # the file's structure is sound
        assert s.quick_checks == 1
        assert len(s.messages(did)) == 41 and s.messages(did)[0].source.startswith("x = 0")


def test_our_databases_are_marked_and_old_ones_get_marked(tmp_path):
    def app_id(p):
        con = sqlite3.connect(p)
        try:
            return con.execute("PRAGMA application_id").fetchone()[0]
        finally:
            con.close()

    Store(tmp_path / "new.db").close()
    assert app_id(tmp_path / "new.db") == APPLICATION_ID
    # a database of ours from before files were marked (schema 2, application_id 0), with data
    old = tmp_path / "old.db"
    s = Store(old, migrate=False)
    with s.tx():
        MIGRATIONS[0](s.conn)
        MIGRATIONS[1](s.conn)
        s._x("PRAGMA user_version = 2")
    s._x("INSERT INTO dialogues(id, name, created, updated) VALUES ('d1', 'kept', 0, 0)")
    s.close()
    assert app_id(old) == 0
    s = Store(old)
    assert s.get_dialogue("d1").name == "kept" and s.schema_version == SCHEMA_VERSION
    s.close()
    assert app_id(old) == APPLICATION_ID
    # an empty file, and an empty SQLite database, are free to become ours
    (tmp_path / "empty.db").write_bytes(b"")
    con = sqlite3.connect(tmp_path / "blank.db")  # a header, no tables
    con.executescript("CREATE TABLE t(x); DROP TABLE t;")
    con.close()
    for name in ("empty.db", "blank.db"):
        Store(tmp_path / name).close()
        assert app_id(tmp_path / name) == APPLICATION_ID


# ---------------------------------------------------------------- items 5 and 6: run ownership

WRITER = textwrap.dedent("""
    import sys, time
    from dialogue.store import Store
    s = Store(sys.argv[1])
    d = s.create_dialogue("live")
    p = s.add_message(d.id, kind="prompt", source="tell me")
    s.update_message(p.id, base_version=1, response="an old answer")
    c = s.add_message(d.id, kind="code", source="print(1)",
                      meta={"run": {"status": "ok", "message": "", "duration": 0.1}})
    s.begin_stream(p.id)
    s.stream_append(p.id, text="Half an ans")
    s.begin_stream(c.id)
    s.stream_append(c.id, output={"output_type": "stream", "name": "stdout", "text": "1\\n"})
    print(p.id, c.id, flush=True)
    time.sleep(600)
""")


def test_a_live_writers_streams_are_left_alone_and_a_killed_ones_recovered(tmp_path):
    path = tmp_path / "own.db"
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        pid, cid = w.stdout.readline().split()
        # the writer is alive: opening the database (here, and in a CLI process) touches nothing
        for _ in range(2):
            with Store(path) as s:
                assert s.recover_interrupted() == []
                p = s.get_message(pid)
                assert p.response == "Half an ans" and "interrupted" not in p.meta
                assert s.get_message(cid).meta["run"]["status"] == "ok"
            assert cli(path, "show", "live").returncode == 0
        # nobody else may start writing it either
        with Store(path) as s:
            with pytest.raises(StoreError, match=rf"being written by another process \(pid {w.pid}\)"):
                s.begin_stream(pid)
        svc = DialogueService(path)
        with pytest.raises(RunError, match=f"pid {w.pid}"):
            svc.start("live", pid)
        svc.close()
        locks = tmp_path / "own.db-locks"
        assert [f for f in os.listdir(locks) if f.startswith("run-")]
    finally:
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
    # killed: the next open (any process, here a CLI one) recovers what it was writing
    shown = cli(path, "show", "live")
    assert shown.returncode == 0, shown.stderr
    assert "interrupted" in shown.stdout and "cut off" in shown.stdout
    with Store(path) as s:
        p, c = s.get_message(pid), s.get_message(cid)
        assert p.meta["interrupted"] and p.response == "Half an ans"
        assert c.meta["run"]["status"] == "interrupted" and c.outputs[0]["text"] == "1\n"
        assert [v.op for v in s.history(pid)][-1] == "recovered"
        assert [v.state["response"] for v in s.history(pid)][-2:] == ["", "Half an ans"]
        assert s.recover_interrupted() == []
    assert not [f for f in os.listdir(locks) if f.startswith("run-")]  # the dead one's lock is gone


def test_dialogue_ask_killed_mid_answer_is_marked_interrupted_by_the_next_command(tmp_path):
    from servers import ReplayServer, openai_chunks, sse
    db = tmp_path / "ask.db"
    with ReplayServer() as srv:
        srv.push(sse(openai_chunks(["The first ", "part ", "of it"] + ["and more "] * 50),
                     delay=0.4))
        assert cli(db, "new", "chat", "--model",
                   f"openai-compatible:{srv.openai_base_url}/m").returncode == 0
        ask = popen_cli(db, "ask", "chat", "Tell me everything")
        try:
            def streamed() -> bool:
                with Store(db) as s:  # another process's open, while the answer streams
                    msgs = s.get_dialogue(s.find_dialogue("chat")).messages
                    assert not any("interrupted" in m.meta for m in msgs)
                    return bool(msgs) and msgs[-1].response.startswith("The first part")
            wait_for(streamed, "the answer to reach the database", proc=ask)
        finally:
            os.kill(ask.pid, signal.SIGKILL)
            ask.wait()
    shown = cli(db, "show", "chat")
    assert shown.returncode == 0, shown.stderr
    assert "The first part" in shown.stdout and "interrupted: the answer was cut off" in shown.stdout
    with Store(db) as s:
        m = s.get_dialogue(s.find_dialogue("chat")).messages[-1]
        assert m.meta["interrupted"] and m.response.startswith("The first part")
        assert DialogueService.run_status(m) == "interrupted"


def test_a_cell_cut_by_a_killed_process_says_interrupted_in_show_and_on_the_page(tmp_path):
    db = tmp_path / "cell.db"
    assert cli(db, "new", "nb").returncode == 0
    code = ("import os, time\nprint('before', flush=True)\n"
            "time.sleep(float(os.environ.get('CELL_SLEEP', '0')))")
    assert cli(db, "add", "nb", "--code", code).returncode == 0
    r = cli(db, "exec", "nb", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    with Store(db) as s:
        assert s.get_dialogue(s.find_dialogue("nb")).messages[0].meta["run"]["status"] == "ok"
    # run it again, and kill the CLI (and its kernel: its own session) while the cell sleeps
    run = popen_cli(db, "exec", "nb", "1", env={"CELL_SLEEP": "120"})
    kernel = []
    try:
        def printed() -> bool:
            with Store(db) as s:
                m = s.get_dialogue(s.find_dialogue("nb")).messages[0]
                return m.version >= 3 and [o.get("text") for o in m.outputs] == ["before\n"]
        wait_for(printed, "the second run's output", timeout=120, proc=run)
    finally:
        kernel = psutil.Process(run.pid).children(recursive=True)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        for k in kernel:  # the kernel would sleep on: this test is not about orphans
            with contextlib.suppress(psutil.NoSuchProcess):
                k.kill()
    shown = cli(db, "show", "nb")
    assert shown.returncode == 0, shown.stderr
    assert "before" in shown.stdout and "interrupted: The run was cut off" in shown.stdout
    from starlette.testclient import TestClient
    from dialogue.web import create_app
    svc = DialogueService(db)
    did = svc.store.find_dialogue("nb")
    with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
        page = c.get(f"/d/{did}").text
    assert "before" in page and "interrupted: The run was cut off" in page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(db: Path, port: int) -> subprocess.Popen:
    return popen_cli(db, "serve", "--no-browser", "--port", str(port),
                     env={"DIALOGUE_HOME": str(db.parent / "home")})


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait_for(up, "the server to listen", proc=proc)


def test_a_second_server_on_one_database_is_refused_naming_the_first(tmp_path):
    db = tmp_path / "srv.db"
    p1, p2 = _free_port(), _free_port()
    first = _serve(db, p1)
    try:
        _wait_listening(p1, first)
        r = subprocess.run([sys.executable, "-m", "dialogue.cli", "--db", str(db), "serve",
                            "--no-browser", "--port", str(p2)], capture_output=True, text=True,
                           timeout=60, env={**os.environ, **ENV})
        assert r.returncode != 0 and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert f"pid {first.pid}" in lines[0] and f"127.0.0.1:{p1}" in lines[0], lines[0]
        assert "already serving" in lines[0]
        # the first one goes on serving, untouched
        assert httpx.get(f"http://127.0.0.1:{p1}/").status_code == 200
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
    # once it has stopped, another may start
    second = _serve(db, p2)
    try:
        _wait_listening(p2, second)
    finally:
        second.send_signal(signal.SIGINT)
        try:
            assert second.wait(30) == 0
        finally:
            if second.poll() is None:
                second.kill()


def test_a_file_as_our_last_clean_close_left_it_is_not_checked_again(tmp_path):
    """The whole-file check before a connection's first write is skipped when the file is exactly
    as a Store of ours left it after a check (inode, size and time of the file and its WAL);
    anything else that writes to it, or damages it in place, brings the check back."""
    path = tmp_path / "d.db"
    with Store(path) as s:
        d = s.create_dialogue("one")
        assert s.quick_checks == 1
    with Store(path) as s:
        s.add_message(d.id, kind="code", source="x = 1")
        assert s.quick_checks == 0  # nothing touched it since
    con = sqlite3.connect(path)  # another program writes to the file
    con.execute("CREATE TABLE other_app (x)")
    con.commit()
    con.close()
    with Store(path) as s:
        s.add_message(d.id, kind="code", source="x = 2")
        assert s.quick_checks == 1
    # damaged in place, after a clean close: the check runs and refuses to write
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    with Store(path) as s:
        s.add_message(d.id, kind="code", source="x = 3")  # a clean close of ours: noted as checked again
    pages = _pages_of(path, "versions")
    _overwrite(path, (max(pages) - 1) * page, page)
    before = digest(path)
    for _ in range(2):  # refused, and it stays refused
        with pytest.raises(DamagedError):
            with Store(path) as s:
                s.add_message(d.id, kind="code", source="x = 4")
        assert digest(path) == before
