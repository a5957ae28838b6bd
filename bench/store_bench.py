"""Store speed against plain sqlite3 doing the same work, in the same run.

    python bench/store_bench.py [--n 10000] [--search-n 100000]

For each operation the figure is the ratio ours / plain sqlite3. The plain version does the
minimum: one table with the same columns and an FTS5 index, no versions, no JSON decoding into
objects. Our store also writes a version row per change and keeps search in step, so a ratio
above 1 is the price of history and of returning Message objects.
"""
from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dialogue.document import Message  # noqa: E402
from dialogue.store import Store  # noqa: E402

WORDS = ("data frame series index column pandas numpy array plot figure axis model prompt answer "
         "kernel cell output error value token cache adapter train loss batch step schedule "
         "walrus giraffe zebra python module function class method import export notebook").split()


def text(rng: random.Random, n: int = 20) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Plain:
    """The baseline: stdlib sqlite3, WAL, one messages table with an FTS5 index."""

    def __init__(self, path: Path):
        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode = WAL")
        self.con.execute("PRAGMA synchronous = NORMAL")
        self.con.executescript("""
            CREATE TABLE messages(n INTEGER PRIMARY KEY, id TEXT UNIQUE, dialogue_id TEXT,
              pos REAL, kind TEXT, source TEXT, outputs TEXT);
            CREATE INDEX messages_order ON messages(dialogue_id, pos);
            CREATE VIRTUAL TABLE search USING fts5(source, output);
        """)

    def add(self, did: str, i: int, src: str, tx: bool = True) -> None:
        if tx:
            self.con.execute("BEGIN IMMEDIATE")
        cur = self.con.execute("INSERT INTO messages(id, dialogue_id, pos, kind, source, outputs) "
                               "VALUES (?, ?, ?, 'code', ?, '[]')", (f"{did}-{i}", did, i, src))
        self.con.execute("INSERT INTO search(rowid, source, output) VALUES (?, ?, '')",
                         (cur.lastrowid, src))
        if tx:
            self.con.execute("COMMIT")

    def open(self, did: str) -> list[tuple]:
        return self.con.execute("SELECT id, kind, source, outputs FROM messages WHERE "
                                "dialogue_id = ? ORDER BY pos", (did,)).fetchall()

    def search(self, q: str) -> list[tuple]:
        return self.con.execute("SELECT m.id, snippet(search, -1, '[', ']', '…', 12) FROM search "
                                "JOIN messages m ON m.n = search.rowid WHERE search MATCH ? "
                                "ORDER BY rank LIMIT 50", (q,)).fetchall()


def timed(fn, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--search-n", type=int, default=100_000)
    a = ap.parse_args()
    rng = random.Random(0)
    srcs = [text(rng) for _ in range(a.n)]
    with tempfile.TemporaryDirectory() as tmp:
        ours, plain = Store(Path(tmp) / "ours.db"), Plain(Path(tmp) / "plain.db")
        d = ours.create_dialogue("bench")
        rows = []

        def add_ours():
            for s in srcs:
                ours.add_message(d.id, kind="code", source=s)

        def add_plain():
            for i, s in enumerate(srcs):
                plain.add("bench", i, s)
        rows.append((f"add {a.n:,} messages, one transaction each", timed(add_ours), timed(add_plain)))

        d2 = ours.create_dialogue("bulk")
        t_ours = timed(lambda: ours.add_messages(d2.id, [Message(source=s) for s in srcs]))

        def bulk_plain():
            plain.con.execute("BEGIN IMMEDIATE")
            for i, s in enumerate(srcs):
                plain.add("bulk", i, s, tx=False)
            plain.con.execute("COMMIT")
        rows.append((f"add {a.n:,} messages in one transaction", t_ours, timed(bulk_plain)))

        n_open = len(ours.get_dialogue(d.id).messages)
        assert n_open == a.n and len(plain.open("bench")) == a.n
        rows.append((f"open a {a.n:,}-message dialogue", timed(lambda: ours.get_dialogue(d.id), 5),
                     timed(lambda: plain.open("bench"), 5)))

        # grow both to search-n messages (bulk, untimed), then search
        more = a.search_n - 2 * a.n
        big = ours.create_dialogue("big")
        chunk = 10_000
        for start in range(0, more, chunk):
            batch = [text(rng) for _ in range(min(chunk, more - start))]
            ours.add_messages(big.id, [Message(source=s) for s in batch])
            plain.con.execute("BEGIN")
            for i, s in enumerate(batch):
                plain.add("big", start + i, s, tx=False)
            plain.con.execute("COMMIT")
        for q in ("walrus giraffe", "pandas"):
            n_ours = len(ours.search(q))
            n_plain = len(plain.search(" ".join(f'"{w}"' for w in q.split())))
            assert n_ours == n_plain == 50, (n_ours, n_plain)
            rows.append((f"search {a.search_n:,} messages for {q!r} (top 50 with snippets)",
                         timed(lambda: ours.search(q), 5),
                         timed(lambda: plain.search(" ".join(f'"{w}"' for w in q.split())), 5)))
        size_ours = sum(f.stat().st_size for f in Path(tmp).glob("ours.db*"))
        size_plain = sum(f.stat().st_size for f in Path(tmp).glob("plain.db*"))
        ours.close()

    w = max(len(r[0]) for r in rows)
    print(f"{'operation':<{w}}  {'dialogue':>10}  {'sqlite3':>10}  ratio")
    for name, o, p in rows:
        print(f"{name:<{w}}  {o * 1000:>8.1f}ms  {p * 1000:>8.1f}ms  {o / p:5.2f}x")
    print(f"{'database size (with versions)':<{w}}  {size_ours / 1e6:>8.1f}MB  {size_plain / 1e6:>8.1f}MB  "
          f"{size_ours / size_plain:5.2f}x")


if __name__ == "__main__":
    main()
