"""A persistent prefix KV cache for llama.cpp: compute a long, stable prefix once, on any later
prompt (in this process or after a restart) restore the longest cached prefix and evaluate only the
rest.

Layout: `<root>/<namespace>/<n>-<prefix hash>-<size>-<crc32>.kv`, one llama.cpp sequence-state
file (`llama_state_seq_save_file`) per cached prefix. The namespace hashes everything the KV values
depend on besides the tokens: the model file's content hash, the LoRA adapter set and scales, and
the llama.cpp version. The prefix hash covers the token ids; the file also stores the tokens and
they are compared on load, so a hash collision cannot restore the wrong prefix.

Crash safety: a state is written to a temporary file and renamed into place with `os.replace`, so a
name only ever points at a complete file; the size and CRC-32 in the name are checked before a
load, so a truncated or damaged file (a crash before the data reached the disk, a bad sector, a
hand edit) is detected, deleted and recomputed, never fatal. Putting the metadata in the name
makes publication a single atomic rename: there is no separate index that could disagree with the
files.

LRU: a restore bumps the file's mtime; when the total passes the cap, the least recently used
files go first. Pickling `Llama.save_state()` (what llama-cpp-python's own `LlamaDiskCache` does)
is avoided: it carries the logits buffer and the whole context, many times the size of one
sequence's KV.

The few private attributes of `llama_cpp.Llama` this needs (`input_ids`, `n_tokens`,
`_requires_eval`) are touched only by the functions in the "llama state" section below.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import json
import mmap
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = [
    "KVCache", "CacheEntry", "CacheStats", "CacheError", "default_cache_dir", "prefix_hash",
    "namespace_key", "evaluated_tokens", "set_evaluated_tokens", "truncate_to", "check_llama_internals",
]

DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB: ~45 prefixes of 4,000 tokens of SmolLM2 (23 KB per token)
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^(\d{7})-([0-9a-f]{32})-(\d+)-([0-9a-f]{8})\.kv$")
_STALE_TMP_S = 3600
COUNTERS = "counters.json"   # hits, misses, saves... of every process using this folder
_COUNTED = ("hits", "misses", "saves", "corrupt", "evicted")


class CacheError(RuntimeError):
    """The cache directory cannot be used at all (not writable, not a directory)."""


def default_cache_dir() -> Path:
    """`DIALOGUE_CACHE_DIR` if set (tests point it at a temporary directory), else `kv/` in the
    platform's user cache directory."""
    if env := os.environ.get("DIALOGUE_CACHE_DIR"):
        return Path(env).expanduser()
    import platformdirs
    return Path(platformdirs.user_cache_dir("dialogue", appauthor=False)) / "kv"


def prefix_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()[:32]


def namespace_key(model_hash: str, adapters: Iterable[tuple[str, float]] = (),
                  extra: Mapping[str, Any] | None = None) -> str:
    """The part of the cache key that is not the tokens. `adapters` are (adapter content hash,
    scale) pairs: a prefix computed under one adapter set is never restored under another."""
    import llama_cpp
    doc = {"format": FORMAT_VERSION, "model": model_hash, "llama_cpp": llama_cpp.__version__,
           "adapters": sorted([h, round(float(s), 6)] for h, s in adapters), "extra": extra or {}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- llama state
# The only code that reads or writes private attributes of `llama_cpp.Llama`. The wrapper keeps
# its own record of which tokens are in the context (`input_ids[:n_tokens]`) and `Llama.eval`
# appends after `n_tokens`; after restoring a state behind its back we must tell it, or it would
# evaluate the prefix again (or worse, append at the wrong position).

def check_llama_internals(llm: "Llama") -> None:
    """Fail loudly, with a message saying why, if an upgrade of llama-cpp-python changed the
    private attributes the cache relies on."""
    ids = getattr(llm, "input_ids", None)
    if not isinstance(ids, np.ndarray) or not isinstance(getattr(llm, "n_tokens", None), int):
        import llama_cpp
        raise CacheError(f"llama-cpp-python {llama_cpp.__version__} no longer exposes "
                         "Llama.input_ids / Llama.n_tokens as the KV cache expects; pin 0.3.36")


def evaluated_tokens(llm: "Llama") -> list[int]:
    """The tokens whose KV is in the context's sequence 0, in order."""
    return llm.input_ids[: llm.n_tokens].tolist()


def set_evaluated_tokens(llm: "Llama", tokens: Sequence[int]) -> None:
    """Record that the context now holds exactly `tokens` (after a state load)."""
    n = len(tokens)
    llm.input_ids[:n] = np.asarray(tokens, dtype=np.intc)
    llm.n_tokens = n
    if hasattr(llm, "_requires_eval"):
        # the logits of a restored state are not valid: Llama.generate must not sample from them
        llm._requires_eval = True


def truncate_to(llm: "Llama", n: int) -> int:
    """Drop the KV of every position >= n. Returns the number of tokens kept: `n`, or 0 when the
    memory cannot drop a partial range (sliding-window or recurrent models), in which case it is
    cleared entirely so that nothing stale survives."""
    import llama_cpp
    if n >= llm.n_tokens and n > 0:
        return llm.n_tokens
    mem = llama_cpp.llama_get_memory(llm.ctx)
    if n > 0 and mem is not None and llama_cpp.llama_memory_seq_rm(mem, -1, n, -1):
        llm.n_tokens = n
        return n
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)
    llm.n_tokens = 0
    if hasattr(llm, "_requires_eval"):
        llm._requires_eval = True
    return 0


# ---------------------------------------------------------------- the cache

_checker: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _checker
    if _checker is None:
        _checker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-crc")
    return _checker


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    namespace: str
    n_tokens: int
    prefix: str
    size: int
    crc: int

    @classmethod
    def parse(cls, path: Path) -> "CacheEntry | None":
        m = _NAME_RE.match(path.name)
        if not m:
            return None
        return cls(path, path.parent.name, int(m[1]), m[2], int(m[3]), int(m[4], 16))

    @property
    def last_used(self) -> float:
        return self.path.stat().st_mtime

    @property
    def note_path(self) -> Path:
        """The entry's note (`<name>.json`): what it was saved for (`save(origin=...)`)."""
        return self.path.with_name(self.path.name + ".json")

    def note(self) -> dict[str, Any]:
        try:
            got = json.loads(self.note_path.read_text("utf-8"))
            return got if isinstance(got, dict) else {}
        except (OSError, ValueError):
            return {}


@dataclass
class CacheStats:
    root: str
    entries: int
    bytes: int
    max_bytes: int
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    saves: int = 0
    corrupt: int = 0
    evicted: int = 0
    since: float | None = None  # when the counters started (the cache's first use or last clear)

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        """Hits per lookup (a prompt's search for a saved prefix), None before any lookup."""
        return self.hits / self.lookups if self.lookups else None


class KVCache:
    """Prefix states on disk. `root` and `max_bytes` default to `DIALOGUE_CACHE_DIR` /
    `DIALOGUE_KV_CACHE_MAX_BYTES` (read at each use, so a long-lived runtime follows the
    environment), else the user cache dir and 4 GiB."""

    def __init__(self, root: str | os.PathLike[str] | None = None, max_bytes: int | None = None):
        self._root = Path(root) if root is not None else None
        self._max = max_bytes
        self.hits = self.misses = self.saves = self.corrupt = self.evicted = 0

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else default_cache_dir()

    @property
    def max_bytes(self) -> int:
        if self._max is not None:
            return self._max
        env = os.environ.get("DIALOGUE_KV_CACHE_MAX_BYTES")
        return int(env) if env else DEFAULT_MAX_BYTES

    def _ns_dir(self, namespace: str, create: bool = False) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,64}", namespace):
            raise ValueError(f"bad cache namespace {namespace!r}")
        d = self.root / namespace
        if create:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CacheError(f"cannot create the KV cache directory {d}: {e}") from e
        return d

    def describe(self, namespace: str, info: Mapping[str, Any]) -> None:
        """Write what a namespace is (model, adapters) beside its files, for `stats()` only."""
        d = self._ns_dir(namespace, create=True)
        p = d / "meta.json"
        if not p.exists():
            tmp = d / f".tmp-meta-{os.getpid()}-{time.monotonic_ns()}"
            tmp.write_text(json.dumps(dict(info), indent=2, default=str), "utf-8")
            os.replace(tmp, p)

    def entries(self, namespace: str | None = None) -> list[CacheEntry]:
        root = self.root
        if not root.is_dir():
            return []
        dirs = [self._ns_dir(namespace)] if namespace else [d for d in root.iterdir() if d.is_dir()]
        out = []
        for d in dirs:
            if not d.is_dir():
                continue
            for p in d.iterdir():
                e = CacheEntry.parse(p)
                if e is not None:
                    out.append(e)
        return out

    def find(self, namespace: str, tokens: Sequence[int], lengths: Iterable[int] | None = None,
             min_len: int = 1) -> list[CacheEntry]:
        """Entries whose token prefix is a prefix of `tokens`, longest first. `lengths` limits the
        candidates to those prefix lengths (the prompt's segment boundaries)."""
        allowed = set(lengths) if lengths is not None else None
        by_len: dict[int, list[CacheEntry]] = {}
        for e in self.entries(namespace):
            if min_len <= e.n_tokens <= len(tokens) and (allowed is None or e.n_tokens in allowed):
                by_len.setdefault(e.n_tokens, []).append(e)
        out = []
        for n in sorted(by_len, reverse=True):
            h = prefix_hash(tokens[:n])
            out.extend(e for e in by_len[n] if e.prefix == h)
        return out

    def has(self, namespace: str, tokens: Sequence[int]) -> bool:
        h, n = prefix_hash(tokens), len(tokens)
        return any(e.n_tokens == n and e.prefix == h for e in self.entries(namespace))

    def _valid(self, e: CacheEntry) -> bool:
        """Size and CRC-32 as the name records them. Through mmap: no copy of a file that can be
        hundreds of MB, and zlib releases the GIL while it runs (restore overlaps it with the load)."""
        try:
            with e.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size != e.size:
                    return False
                if e.size == 0:
                    return e.crc == 0
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    return zlib.crc32(m) == e.crc
        except (OSError, ValueError):
            return False

    def _count(self, **inc: int) -> None:
        """Add to this object's counters and to the folder's (`counters.json`), which every
        process using the folder adds to under a file lock: the model runs in its own process,
        and `dialogue cache stats` or the web app read the totals from another. A folder that
        cannot be written counts in memory only (a cache that cannot count is not an error)."""
        import fcntl
        for k, n in inc.items():
            setattr(self, k, getattr(self, k) + n)
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            with open(root / ".counters.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                got = self._read_counters()
                got.setdefault("since", time.time())
                for k, n in inc.items():
                    got[k] = int(got.get(k, 0)) + n
                tmp = root / f".tmp-counters-{os.getpid()}-{time.monotonic_ns()}"
                tmp.write_text(json.dumps(got), "utf-8")
                os.replace(tmp, root / COUNTERS)
        except OSError:
            pass

    def missed(self) -> None:
        """Count a lookup that found no saved prefix (the runtime looked with `find`)."""
        self._count(misses=1)

    def _read_counters(self) -> dict[str, Any]:
        try:
            got = json.loads((self.root / COUNTERS).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(got, dict):
            return {}
        out: dict[str, Any] = {k: int(v) for k, v in got.items()
                               if k in _COUNTED and isinstance(v, int) and v >= 0}
        if isinstance(got.get("since"), (int, float)):
            out["since"] = float(got["since"])
        return out

    def _discard(self, e: CacheEntry) -> None:
        self._count(corrupt=1)
        e.path.unlink(missing_ok=True)
        e.note_path.unlink(missing_ok=True)

    def restore(self, llm: "Llama", namespace: str, tokens: Sequence[int],
                lengths: Iterable[int] | None = None, min_len: int = 1) -> int:
        """Load the longest valid cached prefix of `tokens` into the context's sequence 0 and tell
        the wrapper about it. Returns its length, 0 when none is usable (the context is then
        empty). Damaged files met on the way are deleted."""
        import llama_cpp
        cands = self.find(namespace, tokens, lengths, min_len)
        if not cands:
            self._count(misses=1)
            return 0
        cap = len(tokens)
        buf = (llama_cpp.llama_token * max(1, cap))()
        n_out = ctypes.c_size_t(0)
        for e in cands:
            # The checksum runs in a second thread while llama.cpp loads the file (both release
            # the GIL); a bad checksum throws the loaded state away before anything uses it.
            check = _pool().submit(self._valid, e)
            truncate_to(llm, 0)
            got = llama_cpp.llama_state_seq_load_file(llm.ctx, str(e.path).encode(), 0, buf, cap,
                                                      ctypes.byref(n_out))
            if not check.result():
                truncate_to(llm, 0)
                self._discard(e)
                continue
            # 0 means refused (another model, a context too small) even though n_out is filled
            if got > 0 and n_out.value == e.n_tokens and list(buf[: e.n_tokens]) == list(tokens[: e.n_tokens]):
                set_evaluated_tokens(llm, tokens[: e.n_tokens])
                now = time.time()
                try:
                    os.utime(e.path, (now, now))
                except OSError:
                    pass
                self._count(hits=1)
                return e.n_tokens
            truncate_to(llm, 0)
            self._discard(e)
        self._count(misses=1)
        return 0

    def save(self, llm: "Llama", namespace: str, tokens: Sequence[int], *,
             origin: str = "") -> CacheEntry | None:
        """Persist the context's sequence 0, which must hold exactly `tokens` (the caller evaluates
        up to a boundary, saves, then goes on). Returns the entry, or None if llama.cpp refused or
        the disk is full (a cache that cannot write is a slower cache, not an error). `origin`
        (the message whose prompt this prefix starts) goes in the entry's note, for stats."""
        import llama_cpp
        n = len(tokens)
        if n == 0 or llm.n_tokens != n or evaluated_tokens(llm) != list(tokens):
            raise ValueError("save(): the context does not hold exactly the given tokens")
        d = self._ns_dir(namespace, create=True)
        tmp = d / f".tmp-{os.getpid()}-{time.monotonic_ns()}.kv"
        arr = (llama_cpp.llama_token * n)(*tokens)
        try:
            written = llama_cpp.llama_state_seq_save_file(llm.ctx, str(tmp).encode(), 0, arr, n)
            if written <= 0:
                tmp.unlink(missing_ok=True)
                return None
            with tmp.open("rb") as f:
                data = f.read()
            name = f"{n:07d}-{prefix_hash(tokens)}-{len(data)}-{zlib.crc32(data):08x}.kv"
            final = d / name
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            return None
        self._count(saves=1)
        entry = CacheEntry.parse(final)
        if origin and entry is not None:
            try:
                entry.note_path.write_text(json.dumps({"origin": origin, "saved": time.time()}),
                                           "utf-8")
            except OSError:
                pass
        self.evict()
        return entry

    def evict(self, max_bytes: int | None = None) -> int:
        """Delete least recently used entries until the total fits the cap; also sweep temporary
        files left by a crashed writer. Returns how many entries were deleted."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        self._sweep_tmp()
        items = []
        for e in self.entries():
            try:
                st = e.path.stat()
            except OSError:
                continue
            items.append((st.st_mtime, st.st_size, e))
        total = sum(s for _, s, _ in items)
        removed = 0
        for _, size, e in sorted(items, key=lambda t: t[0]):
            if total <= cap:
                break
            e.path.unlink(missing_ok=True)
            e.note_path.unlink(missing_ok=True)
            total -= size
            removed += 1
        if removed:
            self._count(evicted=removed)
        return removed

    def _sweep_tmp(self) -> None:
        root = self.root
        if not root.is_dir():
            return
        now = time.time()
        for p in root.glob("*/.tmp-*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    p.unlink(missing_ok=True)
            except OSError:
                pass

    def stats(self) -> CacheStats:
        """Totals per namespace (with what each namespace is), for `dialogue cache stats`; the
        counters are the folder's (every process's since its first use or last clear)."""
        by_ns: dict[str, dict[str, Any]] = {}
        total = 0
        for e in self.entries():
            try:
                size = e.path.stat().st_size
            except OSError:
                continue
            total += size
            ns = by_ns.setdefault(e.namespace, {"namespace": e.namespace, "entries": 0, "bytes": 0,
                                                 "longest": 0})
            ns["entries"] += 1
            ns["bytes"] += size
            ns["longest"] = max(ns["longest"], e.n_tokens)
            try:
                used = e.last_used
            except OSError:
                continue
            # each prefix: its length, when a prompt last used it, what it was saved for
            ns.setdefault("prefixes", []).append({"tokens": e.n_tokens, "bytes": size,
                                                  "last_used": used,
                                                  "origin": e.note().get("origin", "")})
        for ns in by_ns.values():
            ns.setdefault("prefixes", []).sort(key=lambda p: -p["last_used"])
            meta = self.root / ns["namespace"] / "meta.json"
            try:
                ns["info"] = json.loads(meta.read_text("utf-8"))
            except (OSError, ValueError):
                ns["info"] = {}
        counted = self._read_counters()
        return CacheStats(str(self.root), sum(n["entries"] for n in by_ns.values()), total,
                          self.max_bytes, sorted(by_ns.values(), key=lambda n: -n["bytes"]),
                          *(int(counted.get(k, 0)) for k in _COUNTED), since=counted.get("since"))

    def clear(self, namespace: str | None = None) -> int:
        """Delete every cached state (or those of one namespace). Returns how many were deleted.
        Clearing the whole cache starts its counters over."""
        n = 0
        for e in self.entries(namespace):
            e.path.unlink(missing_ok=True)
            e.note_path.unlink(missing_ok=True)
            n += 1
        root = self.root
        if root.is_dir():
            for d in ([self._ns_dir(namespace)] if namespace else [d for d in root.iterdir() if d.is_dir()]):
                for p in d.glob(".tmp-*"):
                    p.unlink(missing_ok=True)
                (d / "meta.json").unlink(missing_ok=True)
                try:
                    d.rmdir()
                except OSError:
                    pass
            if namespace is None:
                (root / COUNTERS).unlink(missing_ok=True)
        return n
