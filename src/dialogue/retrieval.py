"""Attached context too large for the model's context: split it into chunks, rank them against the
prompt with SQLite FTS5's BM25 and keep the best that fit.

`fit(items, allowance, query, count)` decides, for a dialogue's attached items in order, which are
sent whole and which are cut down to their best chunks: when everything fits in `allowance`
tokens, all are whole (the usual case, and the one the prefix caches like: the text does not
depend on the prompt). Otherwise the smaller items stay whole while each fits its fair share of
what is left, and every larger one gets an equal share, filled with its chunks in rank order and
sent in document order, each chunk marked with its number. No embedding model ships in a package
here; BM25 over an in-memory FTS5 table (apsw bundles SQLite with FTS5 always) needs nothing more.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["Fit", "fit", "split", "rank", "CHUNK_CHARS"]

CHUNK_CHARS = 1_600   # about 400 tokens: a section of docs, small enough to rank finely
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Fit:
    """One attached item as sent: its text, tokens, and for a retrieved item the chunk numbers
    kept (1-based, document order) out of `of`."""

    name: str
    text: str
    tokens: int
    retrieved: list[int] | None = None
    of: int | None = None


def split(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Chunks of at most about `size` characters, cut at headings and blank lines where possible
    (then at line ends, then anywhere), never losing a character but surrounding blank lines."""
    blocks = [b for b in re.split(r"\n\s*\n|\n(?=#{1,6} |==> )", text) if b.strip()]
    pieces: list[str] = []
    for b in blocks:
        while len(b) > size:
            cut = b.rfind("\n", 0, size)
            cut = cut if cut > size // 4 else size
            pieces.append(b[:cut])
            b = b[cut:].lstrip("\n")
        if b.strip():
            pieces.append(b)
    chunks: list[str] = []
    for p in pieces:
        # a heading starts a new chunk; small paragraphs are packed together up to `size`
        if chunks and len(chunks[-1]) + len(p) + 2 <= size and not re.match(r"#{1,6} |==> ", p):
            chunks[-1] += "\n\n" + p
        else:
            chunks.append(p)
    return chunks


def rank(chunks: Sequence[str], query: str) -> list[int]:
    """Indices of `chunks`, best match for `query` first (BM25, Porter-stemmed words); chunks with
    no word of the query follow in document order. A query without words keeps document order."""
    import apsw
    terms = sorted({w.lower() for w in _WORD.findall(query) if len(w) > 1})
    if not terms or not chunks:
        return list(range(len(chunks)))
    db = apsw.Connection(":memory:")
    try:
        db.execute("CREATE VIRTUAL TABLE c USING fts5(body, tokenize='porter unicode61')")
        with db:
            db.executemany("INSERT INTO c(rowid, body) VALUES (?, ?)",
                           ((i, c) for i, c in enumerate(chunks)))
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        hits = [r[0] for r in db.execute("SELECT rowid FROM c WHERE c MATCH ? ORDER BY bm25(c)",
                                         (match,))]
    finally:
        db.close()
    seen = set(hits)
    return hits + [i for i in range(len(chunks)) if i not in seen]


def fit(items: Sequence[tuple[str, str]], allowance: int | None, query: str,
        count: Callable[[str], int]) -> list[Fit]:
    """`items` as (name, content) pairs, in order; see the module docstring."""
    sizes = [count(c) for _, c in items]
    if allowance is None or sum(sizes) <= allowance:
        return [Fit(n, c, t) for (n, c), t in zip(items, sizes)]
    order = sorted(range(len(items)), key=lambda i: sizes[i])
    left, whole = max(0, allowance), set()
    for k, i in enumerate(order):
        if sizes[i] <= left // (len(order) - k):
            whole.add(i)
            left -= sizes[i]
        else:
            break
    share = left // max(1, len(items) - len(whole))
    out = []
    for i, (name, content) in enumerate(items):
        if i in whole:
            out.append(Fit(name, content, sizes[i]))
            continue
        chunks = split(content)
        keep: list[int] = []
        used = 0
        for j in rank(chunks, query):
            t = count(chunks[j]) + 8  # and its marker line
            if used + t <= share:
                keep.append(j)
                used += t
        keep.sort()
        text = "\n\n".join(f"[chunk {j + 1} of {len(chunks)}]\n{chunks[j]}" for j in keep)
        out.append(Fit(name, text, count(text) if keep else 0, [j + 1 for j in keep], len(chunks)))
    return out
