"""What keeping every answer's request costs on disk, and in time, on a long dialogue.

    python bench/request_bench.py [--prompts 200] [--note-chars 1500] [--output-lines 60]

A dialogue of N rounds (a note, a code cell with an output, a prompt with an answer) is built in
memory; for each prompt the request is built as a run builds it (`context.build`) and recorded
(`sent.record`), then stored three ways, side by side in the same run:

- ours: `Store.save_request` (texts of 256+ characters stored once in `blobs` by hash: the turns
  the earlier prompts sent repeat in every later request, and are kept once),
- inline: the same record as one JSON text per answer (no sharing), the naive way,
- none: the dialogue alone (the baseline the two are compared against).

It prints the database size of each (after a checkpoint), the bytes the records add per answer,
the ratio inline / ours, and the time to save and to read back a record. Sizes grow with the
square of the dialogue's length for the inline form (each request carries everything above it)
and about linearly for ours.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dialogue import sent  # noqa: E402
from dialogue.context import build  # noqa: E402
from dialogue.document import Kind, Message  # noqa: E402
from dialogue.store import Store  # noqa: E402


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def fill(db: Path, args: argparse.Namespace) -> tuple[Store, str, list[str]]:
    st = Store(db)
    d = st.create_dialogue("long", model="claude-sonnet-4-5", system="Be exact and brief.")
    msgs: list[Message] = []
    for i in range(args.prompts):
        out = "\n".join(f"step {i}.{j}: loss {1 / (j + 1):.5f}" for j in range(args.output_lines))
        msgs += [Message(kind=Kind.note, source=f"Round {i}. " + "Some notes on the data. " * (args.note_chars // 24)),
                 Message(kind=Kind.code, source=f"train(round={i})",
                         outputs=[{"output_type": "stream", "name": "stdout", "text": out}]),
                 Message(kind=Kind.prompt, source=f"What changed in round {i}?",
                         response=f"In round {i} the loss fell. " * 20)]
    st.add_messages(d.id, msgs)
    return st, d.id, [m.id for m in msgs if m.kind == Kind.prompt]


def checkpointed(st: Store) -> None:
    st._x("PRAGMA wal_checkpoint(TRUNCATE)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--note-chars", type=int, default=1500)
    ap.add_argument("--output-lines", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, ours, inline = (Path(tmp) / f"{k}.db" for k in ("none", "ours", "inline"))
        st0, _, _ = fill(base, args)
        checkpointed(st0)
        st1, did, prompts = fill(ours, args)
        st2, did2, prompts2 = fill(inline, args)
        st2._x("CREATE TABLE inline_requests(message_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        d = st1.get_dialogue(did)
        d2 = st2.get_dialogue(did2)
        t_build = t_save = t_inline = 0.0
        for pid, pid2 in zip(prompts, prompts2):
            t = time.perf_counter()
            rec = sent.record(build(d, pid))
            t_build += time.perf_counter() - t
            t = time.perf_counter()
            st1.save_request(pid, 2, rec)
            t_save += time.perf_counter() - t
            t = time.perf_counter()
            with st2.tx():
                st2._x("INSERT INTO inline_requests VALUES (?, ?)", (pid2, json.dumps(rec)))
            t_inline += time.perf_counter() - t
        t = time.perf_counter()
        for pid in prompts:
            st1.request_record(pid)
        t_read = time.perf_counter() - t
        for s in (st1, st2):
            checkpointed(s)
        n0, n1, n2 = size(base), size(ours), size(inline)
        n = len(prompts)
        print(f"dialogue: {n} rounds (note ~{args.note_chars} chars, output {args.output_lines} lines, "
              f"answer), {n * 3} messages")
        print(f"database without records        {n0 / 1e6:9.2f} MB")
        print(f"with records, ours (blobs)      {n1 / 1e6:9.2f} MB  (+{(n1 - n0) / n / 1e3:7.1f} kB per answer)")
        print(f"with records, inline JSON       {n2 / 1e6:9.2f} MB  (+{(n2 - n0) / n / 1e3:7.1f} kB per answer)")
        print(f"records' cost, inline / ours    {(n2 - n0) / max(1, n1 - n0):9.1f}x")
        print(f"per answer: build+record {1e3 * t_build / n:.2f} ms, save ours {1e3 * t_save / n:.2f} ms "
              f"(inline {1e3 * t_inline / n:.2f} ms), read back {1e3 * t_read / n:.2f} ms")
        for s in (st0, st1, st2):
            s.close()


if __name__ == "__main__":
    os.environ.setdefault("DIALOGUE_HOME", tempfile.mkdtemp())
    main()
