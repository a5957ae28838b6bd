"""What a note's pasted screenshot costs as it is edited: versions that keep attachments once in
the content-addressed `blobs` table (ours) against versions that copy them inline (the store
before, and what a history of full snapshots costs), side by side in one run.

    python bench/images_bench.py [--edits 20] [--mib 1]

A note holds one image of `--mib` MiB (random bytes behind a PNG signature: incompressible, as a
screenshot nearly is) and its text is edited `--edits` times, each edit a version. The baseline
is the same store with the blob threshold raised out of reach, so every version carries the
image inline. Printed: the database size after a checkpoint, the time of the edits (CPU time of
this process, then wall), and the ratios baseline / ours.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import dialogue.store as store_module  # noqa: E402
from dialogue.service import DialogueService  # noqa: E402


def run(folder: Path, edits: int, image: bytes, blob_min: int) -> tuple[int, float, float]:
    store_module._BLOB_MIN = blob_min
    db = folder / f"bench-{blob_min}.db"
    svc = DialogueService(db)
    d = svc.create("screens")
    n = svc.add(d.id, "note", "A screenshot:", images=[("screen.png", image)])
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(edits):
        n = svc.edit(d.id, n.id, base_version=n.version,
                     source=f"Edit {i}: ![screen.png](attachment:screen.png)")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert len(svc.history(d.id, n.id)) == edits + 1
    svc.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    svc.close()
    size = sum(p.stat().st_size for p in folder.glob(f"{db.name}*"))
    return size, cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--mib", type=float, default=1.0)
    a = ap.parse_args()
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(int(a.mib * 1024 * 1024))
    ours_min = store_module._BLOB_MIN
    with tempfile.TemporaryDirectory() as tmp:
        base = run(Path(tmp), a.edits, image, 1 << 62)
        ours = run(Path(tmp), a.edits, image, ours_min)
    print(f"{a.edits} edits of a note holding a {a.mib:g} MiB image")
    print(f"{'':24}{'file MB':>10}{'cpu s':>10}{'wall s':>10}")
    for label, (size, cpu, wall) in (("inline in each version", base), ("stored once (ours)", ours)):
        print(f"{label:24}{size / 1e6:10.1f}{cpu:10.2f}{wall:10.2f}")
    print(f"{'ratio baseline / ours':24}{base[0] / ours[0]:10.1f}x{base[1] / ours[1]:9.1f}x"
          f"{base[2] / ours[2]:9.1f}x")


if __name__ == "__main__":
    main()
