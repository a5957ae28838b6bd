"""Store speed against plain sqlite3 doing the same work, side by side in the same run.

    python bench/store_bench.py [--n 10000] [--search-n 100000] [--repeat 4]

Each row times one thing a user does, through `Store` and through Python's own `sqlite3` module
on a database of the same shape, and prints the ratio ours / plain. The figures are CPU time of
this process (user + system, which includes SQLite's writes to the OS): the two sides take turns
and the machine may be shared, and CPU time is what another process's load does not inflate.
The wall-clock ratio is printed beside it; on an idle machine the two agree but for fsync waits
at WAL checkpoints (synchronous=NORMAL does not fsync a commit).

The plain side is the baseline a careful application without history would write: the same
`messages` table (every column the store keeps, the unique id and the (dialogue, position)
index), random ids like ours (16 hex digits, so no collision to handle), an FTS5 index with the same tokenizer kept in step in
the same transaction, the dialogue's `updated` time kept, WAL with synchronous=NORMAL, one
`BEGIN IMMEDIATE` per change, executemany for a bulk insert, and rows returned as tuples. It does
not keep versions, check for conflicts, decode JSON or build objects: the ratio is the price of
history, of those checks and of getting `Message` objects back, which is what the store promises.
The two sides use different SQLite builds (the store's apsw bundles its own; Python's sqlite3
links the system's): both versions are printed.

What users get is measured, not a warm best case: rows marked "CLI" open a new connection as each
`dialogue` command does, so they include the store's opening (identifying the file, the schema
check, recovering interrupted streams) and, before its first write, the `PRAGMA quick_check` that
keeps a damaged file from being written to, unless the file is exactly as a Store of ours left it
after a check (its inode, size and modification time, and its WAL's, noted at close). The
one-message write is shown both ways: as our last close left the file, and after another program
wrote to it, against plain sqlite3 running `PRAGMA quick_check` too. The two checks are the same
check of the file's structure: every b-tree page and record, the free list, NOT NULL, the FTS5
index's own tables included. From SQLite 3.44 on, quick_check also re-tokenizes every indexed
text to compare it with the FTS5 index and evaluates CHECK constraints, which the baseline's
3.40 does not (nor has it a CHECK to evaluate); the store leaves those logical checks to its full
`integrity_check` (see `Store._structure_check`), and the last lines print what each costs.
Rows marked "app" use one long-lived connection, as the web app and the Python API do (they pay
that check once per process). Runs (streams) are not timed here: the owner lock a run takes is
one flock per Store, on its first run.

Sizes are of the database files after a checkpoint (the WAL folded in and truncated), so a large
last transaction does not count twice.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dialogue.document import Message  # noqa: E402
from dialogue.store import Store  # noqa: E402

WORDS = ("data frame series index column pandas numpy array plot figure axis model prompt answer "
         "kernel cell output error value token cache adapter train loss batch step schedule "
         "walrus giraffe zebra python module function class method import export notebook").split()
FIELDS = ("id, kind, source, outputs, execution_count, response, tool_calls, usage, attachments, "
          "meta, hidden, pinned, collapsed, exported, version, created, updated")


def new_id() -> str:
    return secrets.token_hex(8)


def text(rng: random.Random, n: int = 20) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Plain:
    """The baseline (see the module docstring)."""

    SCHEMA = """
        CREATE TABLE dialogues(id TEXT PRIMARY KEY, name TEXT NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages(
          n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, dialogue_id TEXT NOT NULL,
          pos REAL NOT NULL, kind TEXT NOT NULL, source TEXT NOT NULL DEFAULT '',
          outputs TEXT NOT NULL DEFAULT '[]', execution_count INTEGER,
          response TEXT NOT NULL DEFAULT '', tool_calls TEXT NOT NULL DEFAULT '[]',
          usage TEXT NOT NULL DEFAULT '{}', attachments TEXT NOT NULL DEFAULT '{}',
          meta TEXT NOT NULL DEFAULT '{}', hidden INTEGER NOT NULL DEFAULT 0,
          pinned INTEGER NOT NULL DEFAULT 0, collapsed INTEGER NOT NULL DEFAULT 0,
          exported INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 1,
          streaming INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL,
          deleted REAL, owner TEXT);
        CREATE INDEX messages_order ON messages(dialogue_id, pos);
        CREATE VIRTUAL TABLE search USING fts5(source, output,
          tokenize = 'unicode61 remove_diacritics 2');
    """
    INSERT = ("INSERT INTO messages(id, dialogue_id, pos, kind, source, created, updated) "
              "VALUES (?, ?, ?, 'code', ?, ?, ?)")

    def __init__(self, path: Path, create: bool = False):
        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute("PRAGMA busy_timeout = 10000")
        if self.con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self.con.execute("PRAGMA journal_mode = WAL")
        self.con.execute("PRAGMA synchronous = NORMAL")
        if create:
            self.con.executescript(self.SCHEMA)

    def new_dialogue(self, did: str) -> None:
        self.con.execute("INSERT INTO dialogues VALUES (?, ?, ?)", (did, did, time.time()))

    def add(self, did: str, src: str, tx: bool = True) -> None:
        """Append a message: its position after the dialogue's last, its search row."""
        now = time.time()
        if tx:
            self.con.execute("BEGIN IMMEDIATE")
        last = self.con.execute("SELECT max(pos) FROM messages WHERE dialogue_id = ?",
                                (did,)).fetchone()[0]
        cur = self.con.execute(self.INSERT, (new_id(), did, (last or 0) + 1, src, now, now))
        self.con.execute("INSERT INTO search(rowid, source, output) VALUES (?, ?, '')",
                         (cur.lastrowid, src))
        self.con.execute("UPDATE dialogues SET updated = ? WHERE id = ?", (now, did))
        if tx:
            self.con.execute("COMMIT")

    def add_many(self, did: str, srcs: list[str], ids: list[str]) -> None:
        now = time.time()
        self.con.execute("BEGIN IMMEDIATE")
        last = self.con.execute("SELECT max(pos) FROM messages WHERE dialogue_id = ?",
                                (did,)).fetchone()[0] or 0
        first = self.con.execute("SELECT coalesce(max(n), 0) + 1 FROM messages").fetchone()[0]
        self.con.executemany(
            self.INSERT.replace("(id,", "(n, id,").replace("VALUES (?,", "VALUES (?, ?,"),
            ((first + i, ids[i], did, last + 1 + i, s, now, now)
             for i, s in enumerate(srcs)))
        self.con.executemany("INSERT INTO search(rowid, source, output) VALUES (?, ?, '')",
                             ((first + i, s) for i, s in enumerate(srcs)))
        self.con.execute("UPDATE dialogues SET updated = ? WHERE id = ?", (now, did))
        self.con.execute("COMMIT")

    def edit(self, mid: str, src: str) -> None:
        """Change a message's source: the row, its search row, the dialogue's time."""
        now = time.time()
        self.con.execute("BEGIN IMMEDIATE")
        n, did = self.con.execute(
            "UPDATE messages SET source = ?, version = version + 1, updated = ? WHERE id = ? "
            "RETURNING n, dialogue_id", (src, now, mid)).fetchone()
        self.con.execute("DELETE FROM search WHERE rowid = ?", (n,))
        self.con.execute("INSERT INTO search(rowid, source, output) VALUES (?, ?, '')", (n, src))
        self.con.execute("UPDATE dialogues SET updated = ? WHERE id = ?", (now, did))
        self.con.execute("COMMIT")

    def move(self, did: str, mid: str, index: int) -> None:
        """Move a message to list index `index`: the midpoint of its new neighbours' positions
        (read through the (dialogue, position) index), the row, the dialogue's time."""
        now = time.time()
        self.con.execute("BEGIN IMMEDIATE")
        near = [p for (p,) in self.con.execute(
            "SELECT pos FROM messages WHERE dialogue_id = ? AND deleted IS NULL AND id != ? "
            "ORDER BY pos LIMIT 2 OFFSET ?", (did, mid, max(0, index - 1)))]
        pos = (near[0] - 1 if index == 0 else (near[0] + near[1]) / 2 if len(near) == 2
               else near[0] + 1)
        self.con.execute("UPDATE messages SET pos = ?, version = version + 1, updated = ? "
                         "WHERE id = ?", (pos, now, mid))
        self.con.execute("UPDATE dialogues SET updated = ? WHERE id = ?", (now, did))
        self.con.execute("COMMIT")

    def open(self, did: str) -> list[tuple]:
        return self.con.execute(f"SELECT {FIELDS} FROM messages WHERE dialogue_id = ? AND "
                                "deleted IS NULL ORDER BY pos", (did,)).fetchall()

    def ids(self, did: str) -> list[str]:
        return [r[0] for r in self.open(did)]

    def search(self, q: str) -> list[tuple]:
        return self.con.execute("SELECT m.dialogue_id, m.id, m.kind, "
                                "snippet(search, -1, '[', ']', '…', 12), rank FROM search "
                                "JOIN messages m ON m.n = search.rowid WHERE search MATCH ? "
                                "AND m.deleted IS NULL ORDER BY rank LIMIT 50", (q,)).fetchall()


def side_by_side(ours, plain, repeat: int = 1, total: bool = False) -> tuple[float, ...]:
    """(ours CPU, plain CPU, ours wall, plain wall) in seconds. The two take turns, so a change
    in the machine's load falls on both alike; each gets the round number. The figure is the
    median of the rounds, or with `total` their sum (for work split into rounds)."""
    times: list[list[float]] = [[], [], [], []]
    for r in range(repeat):
        for side, fn in enumerate((ours, plain)):
            c, w = time.process_time(), time.perf_counter()
            fn(r)
            times[side].append(time.process_time() - c)
            times[side + 2].append(time.perf_counter() - w)
    pick = sum if total else statistics.median
    return tuple(pick(t) for t in times)


def db_size(path: Path) -> int:
    """The file's size after folding the WAL in (the WAL is transient)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--search-n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=4)
    a = ap.parse_args()
    rng = random.Random(0)
    srcs = [text(rng) for _ in range(a.n)]
    rows: list[tuple[str, float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours_path, plain_path = Path(tmp) / "ours.db", Path(tmp) / "plain.db"
        ours, plain = Store(ours_path), Plain(plain_path, create=True)
        d = ours.create_dialogue("bench")
        plain.new_dialogue("bench")

        rounds = 10  # the per-transaction rows are timed in rounds, taking turns
        parts = [srcs[i::rounds] for i in range(rounds)]

        def add_ours(r):
            for s in parts[r]:
                ours.add_message(d.id, kind="code", source=s)

        def add_plain(r):
            for s in parts[r]:
                plain.add("bench", s)
        rows.append((f"app: add {a.n:,} messages, one transaction each",
                     *side_by_side(add_ours, add_plain, rounds, total=True)))

        ids = [m.id for m in ours.messages(d.id)][: max(rounds, a.n // 10)]
        plain_ids = plain.ids("bench")[: len(ids)]

        def edit_ours(r):
            for i in ids[r::rounds]:
                m = ours.get_message(i)
                ours.update_message(i, base_version=m.version, source=m.source + " edited")

        def edit_plain(r):
            for i in plain_ids[r::rounds]:
                plain.edit(i, "edited")
        rows.append((f"app: edit {len(ids):,} messages, one transaction each",
                     *side_by_side(edit_ours, edit_plain, rounds, total=True)))

        # a move is a version of the message in ours (who moved it, from where to where); the
        # same moves on both sides: message k of each round to place 10 * k + r
        moves = max(rounds, a.n // 100)
        move_ids = [m.id for m in ours.messages(d.id)][-moves:]
        plain_move_ids = plain.ids("bench")[-moves:]

        def move_ours(r):
            for k, i in enumerate(move_ids[r::rounds]):
                ours.move_message(i, 10 * k + r)

        def move_plain(r):
            for k, i in enumerate(plain_move_ids[r::rounds]):
                plain.move("bench", i, 10 * k + r)
        rows.append((f"app: move {moves:,} messages of {a.n:,}, one transaction each",
                     *side_by_side(move_ours, move_plain, rounds, total=True)))

        # An import as `dialogue import` does it: a new connection, then one transaction; then
        # the same through the open connections (the store's quick_check already done). The
        # input is made beforehand: messages for ours, random ids for plain.
        msgs = [[Message(source=s) for s in srcs] for _ in range(2 * a.repeat)]
        import_ids = [[new_id() for _ in srcs] for _ in range(2 * a.repeat)]
        for r in range(2 * a.repeat):
            ours.create_dialogue(f"bulk{r}")
            plain.new_dialogue(f"bulk{r}")

        def bulk_ours(r, store=None):
            with contextlib.nullcontext(store) if store else Store(ours_path) as s:
                s.add_messages(s.find_dialogue(f"bulk{r}"), msgs[r])

        def bulk_plain(r, p=None):
            q = p or Plain(plain_path)
            q.add_many(f"bulk{r}", srcs, import_ids[r])
            if not p:
                q.con.close()
        rows.append((f"CLI: import {a.n:,} messages (one transaction)",
                     *side_by_side(bulk_ours, bulk_plain, a.repeat)))
        rows.append(("  the same through an open connection",
                     *side_by_side(lambda r: bulk_ours(a.repeat + r, ours),
                                   lambda r: bulk_plain(a.repeat + r, plain), a.repeat)))

        assert len(ours.get_dialogue(d.id).messages) == a.n == len(plain.open("bench"))
        rows.append((f"app: read a {a.n:,}-message dialogue",
                     *side_by_side(lambda r: ours.get_dialogue(d.id),
                                   lambda r: plain.open("bench"), a.repeat)))

        def open_ours(r):
            with Store(ours_path) as s:
                s.get_dialogue(d.id)

        def open_plain(r):
            p = Plain(plain_path)
            p.open("bench")
            p.con.close()
        rows.append((f"CLI: open the database, read a {a.n:,}-message dialogue",
                     *side_by_side(open_ours, open_plain, a.repeat)))

        # grow both to search-n messages (bulk, untimed) if they have fewer, then search
        more = a.search_n - ours._one("SELECT count(*) FROM messages")[0]
        big = ours.create_dialogue("big")
        plain.new_dialogue("big")
        chunk = 10_000
        for start in range(0, more, chunk):
            batch = [text(rng) for _ in range(min(chunk, more - start))]
            ours.add_messages(big.id, [Message(source=s) for s in batch])
            plain.add_many("big", batch, [new_id() for _ in batch])
        total = ours._one("SELECT count(*) FROM messages")[0]
        assert plain.con.execute("SELECT count(*) FROM messages").fetchone()[0] == total
        for q in ("walrus giraffe", "pandas"):
            fts = " ".join(f'"{w}"' for w in q.split())
            n_ours, n_plain = len(ours.search(q)), len(plain.search(fts))
            assert n_ours == n_plain == 50, (n_ours, n_plain)
            rows.append((f"app: search {total:,} messages for {q!r} (top 50, snippets)",
                         *side_by_side(lambda r: ours.search(q), lambda r: plain.search(fts),
                                       a.repeat)))

        def add_one_ours(r, changed: bool = False):
            if changed:  # as if another program had written to the file since our last close
                (ours_path.with_name(ours_path.name + "-locks") / "checked").unlink(missing_ok=True)
            with Store(ours_path) as s:
                s.add_message(d.id, kind="code", source="one more")

        def add_one_plain(r, check: bool = False):
            p = Plain(plain_path)
            if check:
                assert p.con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            p.add("bench", "one more")
            p.con.close()
        # about a millisecond each: a median of 4 would be one scheduler hiccup away from
        # another figure on a shared machine, so this row takes 5 times the rounds
        rows.append((f"CLI: open a {total:,}-message database, add a message",
                     *side_by_side(add_one_ours, add_one_plain, 5 * a.repeat)))
        rows.append(("  the same after another program wrote to it (both run quick_check)",
                     *side_by_side(lambda r: add_one_ours(r, changed=True),
                                   lambda r: add_one_plain(r, check=True), a.repeat)))
        qc = side_by_side(lambda r: ours._x("PRAGMA quick_check"), lambda r: None, a.repeat)[0]
        qc_fts = side_by_side(lambda r: ours._x("PRAGMA quick_check(search)"), lambda r: None,
                              a.repeat)[0]
        qc_ours = side_by_side(lambda r: ours._structure_check(), lambda r: None, a.repeat)[0]
        ours.close()
        plain.con.close()
        size_ours, size_plain = db_size(ours_path), db_size(plain_path)

    w = max(len(r[0]) for r in rows)
    print(f"{'operation (CPU time)':<{w}}  {'dialogue':>10}  {'sqlite3':>10}  ratio  wall ratio")
    for name, o, p, ow, pw in rows:
        print(f"{name:<{w}}  {o * 1000:>8.1f}ms  {p * 1000:>8.1f}ms  {o / p:5.2f}x  {ow / pw:7.2f}x")
    print(f"{'database size (ours with every version)':<{w}}  {size_ours / 1e6:>8.1f}MB  "
          f"{size_plain / 1e6:>8.1f}MB  {size_ours / size_plain:5.2f}x")
    print(f"\nSQLite {apsw.sqlite_lib_version()} (dialogue, through apsw), {sqlite3.sqlite_version} "
          "(Python's sqlite3)")
    print(f"Checks of the {total:,}-message database, CPU: the store's check before a "
          f"connection's first write (unless the file is as a Store of ours left it after a "
          f"check) {qc_ours * 1000:.1f}ms; SQLite {apsw.sqlite_lib_version()}'s whole "
          f"quick_check {qc * 1000:.1f}ms, of which the FTS5 table {qc_fts * 1000:.1f}ms")


if __name__ == "__main__":
    main()
