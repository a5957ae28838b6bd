"""The store: dialogues, messages and every version of every message, in one SQLite file.

This is the only module that writes the database. It is opened through fastlite (apsw), in WAL
mode with foreign keys on, and every mutation runs in one `BEGIN IMMEDIATE` transaction that also
appends to the `versions` table, so a state that was committed is always in the history and a
crash (even SIGKILL) loses at most the transaction in flight.

Design choices, and why:

- Order is a REAL `pos` per message. Inserting or moving takes the midpoint of the neighbours, so a
  move rewrites one row, not the dialogue; when the gap between two neighbours gets too small for
  a float to split, that one dialogue is renumbered (rare: about 50 moves into the same gap).
- `versions` is append-only (triggers refuse UPDATE and DELETE). A version holds the message's whole
  state as JSON, written as the fields that differ from a new message's (read back whole); large
  `outputs` are stored once in `blobs` by content hash, so toggling a flag on a cell with a 5 MB
  image does not copy the image. Versions are keyed by message first, so a history is a lookup.
- Concurrency is optimistic: a message and a dialogue each carry `version`; an edit names the
  version it was based on and is refused with `ConflictError` if another writer got there first.
  Nothing is overwritten silently.
- Streaming (a model's answer, a long-running cell's prints) appends to the message row without a
  version per token and marks it `streaming`; `finish_stream` writes the version. Text already
  streamed is therefore on disk at once, and `recover_interrupted` turns a stream cut by a crash
  into a version.
- A stream belongs to the Store that began it, and the Store proves it is alive with an OS lock
  (`flock`) on its own file in `<db>-locks/`: the kernel drops the lock when the process dies,
  however it dies, so another process can tell a dead writer from a live one without heartbeats,
  clocks or pid reuse. Every open recovers the streams of dead writers, never a live one's.
- The file is ours only if it says so (`PRAGMA application_id`): another application's SQLite
  file is refused before anything is written to it, and a damaged file is reported in one line
  and never written to (a `PRAGMA quick_check` of the file's structure before a connection's
  first write, unless the file is exactly as a checked Store of ours closed it).
- Full-text search is an FTS5 table keyed by the message's integer row number; it holds the source
  and the text of the output or answer, and is kept in step in the same transaction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import logging
import os
import secrets
import time
import urllib.parse
import zlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import apsw

# apswutils (under fastlite) forwards SQLite's own log to the "apsw" logger; unconfigured, Python
# prints those records to stderr ("SQLITE_LOG: database corruption at line ..."), around the one
# line we report a damaged file with. A library leaves that choice to the application: NullHandler.
logging.getLogger("apsw").addHandler(logging.NullHandler())

from .approvals import settle_pending
from .document import FLAGS, STATE_FIELDS, ContextItem, Dialogue, Kind, Message, new_id, output_text

__all__ = ["Store", "StoreError", "NotFoundError", "ConflictError", "NameTakenError",
           "SchemaError", "ForeignDatabaseError", "DamagedError", "ServerRunningError", "Version",
           "Folder",
           "SearchHit", "TrashItem", "default_db_path", "SCHEMA_VERSION", "APPLICATION_ID",
           "HIT_START", "HIT_END", "acting", "author_of", "AUTHORS"]

SCHEMA_VERSION = 7
# `PRAGMA application_id` of every dialogue database ("dlg1"): a file without it is another
# application's (or, with our tables and no id, one of ours from before ids were set).
APPLICATION_ID = 0x646C6731
_OUR_TABLES = {"dialogues", "messages", "versions", "blobs"}
_SQLITE_MAGIC = b"SQLite format 3\x00"
# What a recovered run says: the process writing it is gone, so nobody can finish it.
INTERRUPTED_RUN = ("The run was cut off: the process running it stopped (it was killed or "
                   "crashed) before the run finished; the outputs are what it produced until then.")
HIT_START, HIT_END = "\ue000", "\ue001"  # snippet highlight markers (private-use code points)
_BLOB_MIN = 2048  # outputs JSON at least this long is stored once, by hash
_BULK = 32  # from this many messages on, an insert makes search rows and versions in SQL


class StoreError(Exception):
    """A request the store cannot honour; the message says why and nothing was changed."""


class NotFoundError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class ConflictError(StoreError):
    """An edit was based on a version that is no longer current."""

    def __init__(self, what: str, based_on: int | None, current: int, detail: str = ""):
        self.based_on, self.current = based_on, current
        msg = (f"conflict: {what} was changed elsewhere (your edit is based on version {based_on}, "
               f"the current version is {current}); reload and apply your change again")
        super().__init__(msg + (f" ({detail})" if detail else ""))


class NameTakenError(StoreError):
    pass


class SchemaError(StoreError):
    pass


class ForeignDatabaseError(StoreError):
    """The file is another application's SQLite database; nothing was written to it."""


class DamagedError(StoreError):
    """The file is damaged (not SQLite, or a malformed one); nothing was written to it."""


class ServerRunningError(StoreError):
    """Another `dialogue serve` already serves this database."""


def default_db_path() -> Path:
    """`DIALOGUE_DB` if set, else `dialogue.db` in the user's data directory."""
    if env := os.environ.get("DIALOGUE_DB"):
        return Path(env).expanduser()
    import platformdirs
    return Path(platformdirs.user_data_dir("dialogue", appauthor=False)) / "dialogue.db"


@dataclass
class Version:
    message_id: str  # "" for the dialogue's own settings
    version: int
    op: str
    at: float
    state: dict[str, Any]
    # who made it (user, model, kernel, restore, import, fork, ...; `author_of`) and the message
    # whose answer or cell caused it ("" when a person did it by hand)
    author: str = "user"
    cause: str = ""


# The author of the versions the current task writes, and the message that caused them: set with
# `acting("model", answer_id)` around a change (a ContextVar, so concurrent answers on one event
# loop do not mix, and a run started inside inherits it as a task copies its context).
_ACTOR: ContextVar[tuple[str, str]] = ContextVar("dialogue_actor", default=("", ""))
AUTHORS = ("user", "model", "kernel", "restore", "import", "fork", "template", "system")


@contextmanager
def acting(author: str, cause: str = "") -> Iterator[None]:
    """Record every version written inside as made by `author` (one of AUTHORS), caused by
    message `cause` (the answer or cell that made the change)."""
    if author not in AUTHORS:
        raise ValueError(f"unknown author {author!r}; one of {', '.join(AUTHORS)}")
    token = _ACTOR.set((author, cause))
    try:
        yield
    finally:
        _ACTOR.reset(token)


def author_of(op: str, author: str) -> str:
    """Who made a version: its recorded author, else (a version written before authors were
    recorded, or by hand) what its op says: a restore, an import, a fork, or the user."""
    if author:
        return author
    if op.startswith("restore:"):
        return "restore"
    if op in ("import", "fork", "template"):
        return op
    if op == "recovered":
        return "system"
    return "user"


@dataclass
class Folder:
    """A folder as the surfaces show it: `path` is its names from the top joined by "/"."""

    id: str
    name: str
    parent: str  # the parent folder's id, "" at the top level
    path: str
    note: str = ""  # the context note every dialogue in it (and below it) sees first
    template: str = ""  # the id of the dialogue new dialogues in it start from, "" for none
    version: int = 1
    created: float = 0.0
    updated: float = 0.0
    dialogues: int = 0  # live dialogues directly in it

    def settings(self) -> dict[str, Any]:
        """The folder's versioned state."""
        return {"name": self.name, "parent": self.parent, "note": self.note,
                "template": self.template}


@dataclass
class SearchHit:
    dialogue_id: str
    dialogue_name: str
    message_id: str
    kind: str
    snippet: str  # with HIT_START/HIT_END around each match
    rank: float


@dataclass
class TrashItem:
    type: str  # "dialogue" | "message"
    id: str
    dialogue_id: str
    name: str  # dialogue name, or the first line of the message
    deleted: float
    dialogue_name: str = ""  # the dialogue's name (a message's dialogue, or the dialogue itself)
    position: int = 0  # a message: its 1-based place in its dialogue were it restored now


# ---------------------------------------------------------------- schema and migrations

def _m1(db) -> None:
    db.execute("""
    CREATE TABLE dialogues(
      id TEXT PRIMARY KEY,
      name TEXT NOT NULL,
      model TEXT NOT NULL DEFAULT '',
      system TEXT NOT NULL DEFAULT '',
      context TEXT NOT NULL DEFAULT '[]',
      meta TEXT NOT NULL DEFAULT '{}',
      version INTEGER NOT NULL DEFAULT 1,
      created REAL NOT NULL,
      updated REAL NOT NULL,
      deleted REAL
    );
    CREATE UNIQUE INDEX dialogues_live_name ON dialogues(name) WHERE deleted IS NULL;
    CREATE TABLE messages(
      n INTEGER PRIMARY KEY,
      id TEXT NOT NULL UNIQUE,
      dialogue_id TEXT NOT NULL REFERENCES dialogues(id),
      pos REAL NOT NULL,
      kind TEXT NOT NULL CHECK (kind IN ('code', 'note', 'prompt', 'raw')),
      source TEXT NOT NULL DEFAULT '',
      outputs TEXT NOT NULL DEFAULT '[]',
      execution_count INTEGER,
      response TEXT NOT NULL DEFAULT '',
      tool_calls TEXT NOT NULL DEFAULT '[]',
      usage TEXT NOT NULL DEFAULT '{}',
      attachments TEXT NOT NULL DEFAULT '{}',
      meta TEXT NOT NULL DEFAULT '{}',
      hidden INTEGER NOT NULL DEFAULT 0,
      pinned INTEGER NOT NULL DEFAULT 0,
      collapsed INTEGER NOT NULL DEFAULT 0,
      exported INTEGER NOT NULL DEFAULT 0,
      version INTEGER NOT NULL DEFAULT 1,
      streaming INTEGER NOT NULL DEFAULT 0,
      created REAL NOT NULL,
      updated REAL NOT NULL,
      deleted REAL
    );
    CREATE INDEX messages_order ON messages(dialogue_id, pos);
    CREATE TABLE versions(
      n INTEGER PRIMARY KEY,
      dialogue_id TEXT NOT NULL,
      message_id TEXT NOT NULL,
      version INTEGER NOT NULL,
      op TEXT NOT NULL,
      at REAL NOT NULL,
      state TEXT NOT NULL,
      UNIQUE (dialogue_id, message_id, version)
    );
    CREATE TABLE blobs(hash TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TRIGGER versions_no_update BEFORE UPDATE ON versions
      BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
    CREATE TRIGGER versions_no_delete BEFORE DELETE ON versions
      BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
    """)


def _m2(db) -> None:
    """Full-text search over sources and outputs, backfilled from the messages already stored."""
    db.execute("CREATE VIRTUAL TABLE search USING fts5(source, output, "
               "tokenize = 'unicode61 remove_diacritics 2')")
    rows = db.execute("SELECT n, kind, source, outputs, response FROM messages").fetchall()
    for n, kind, source, outputs, response in rows:
        db.execute("INSERT INTO search(rowid, source, output) VALUES (?, ?, ?)",
                   (n, source, _search_output(kind, json.loads(outputs), response)))


def _m3(db) -> None:
    """Streams name their writer (`owner`: the token of the Store that began them), so that any
    process can recover the streams of a writer that died and leave a live one's alone. The
    partial index makes that check, run on every open, a lookup instead of a scan."""
    db.execute("ALTER TABLE messages ADD COLUMN owner TEXT;"
               "CREATE INDEX messages_streaming ON messages(owner) WHERE streaming = 1;")


def _m4(db) -> None:
    """Versions are read by message (the history view, restoring a version), which the UNIQUE
    (dialogue_id, message_id, version) index could not serve: every history read scanned all the
    versions of the database. The constraint now leads with message_id, and a dialogue's own
    settings (message_id '') are found by (message_id, dialogue_id) as before. A table constraint
    cannot be altered in place, so the table is copied, row numbers and all, in this migration's
    transaction; its triggers go with the old table and are made again."""
    db.execute("""
    CREATE TABLE versions_new(
      n INTEGER PRIMARY KEY,
      dialogue_id TEXT NOT NULL,
      message_id TEXT NOT NULL,
      version INTEGER NOT NULL,
      op TEXT NOT NULL,
      at REAL NOT NULL,
      state TEXT NOT NULL,
      UNIQUE (message_id, dialogue_id, version)
    );
    INSERT INTO versions_new(n, dialogue_id, message_id, version, op, at, state)
      SELECT n, dialogue_id, message_id, version, op, at, state FROM versions ORDER BY n;
    DROP TABLE versions;
    ALTER TABLE versions_new RENAME TO versions;
    CREATE TRIGGER versions_no_update BEFORE UPDATE ON versions
      BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
    CREATE TRIGGER versions_no_delete BEFORE DELETE ON versions
      BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
    """)


def _m5(db) -> None:
    """Folders. A folder is a row with a parent (nesting: "a/b" is b under a; '' is the top
    level), so renaming or moving a folder writes one row however much it holds. Its settings (the
    context note its dialogues see first, the dialogue new ones start from) are versioned like a
    dialogue's, in an append-only table of their own. A dialogue names its folder in a column, and
    a move is a version of the dialogue's settings."""
    db.execute("""
    CREATE TABLE folders(
      id TEXT PRIMARY KEY,
      name TEXT NOT NULL,
      parent TEXT NOT NULL DEFAULT '',
      note TEXT NOT NULL DEFAULT '',
      template TEXT NOT NULL DEFAULT '',
      version INTEGER NOT NULL DEFAULT 1,
      created REAL NOT NULL,
      updated REAL NOT NULL,
      deleted REAL
    );
    CREATE UNIQUE INDEX folders_live_name ON folders(parent, name) WHERE deleted IS NULL;
    CREATE TABLE folder_versions(
      n INTEGER PRIMARY KEY,
      folder_id TEXT NOT NULL,
      version INTEGER NOT NULL,
      op TEXT NOT NULL,
      at REAL NOT NULL,
      state TEXT NOT NULL,
      UNIQUE (folder_id, version)
    );
    CREATE TRIGGER folder_versions_no_update BEFORE UPDATE ON folder_versions
      BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
    CREATE TRIGGER folder_versions_no_delete BEFORE DELETE ON folder_versions
      BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
    ALTER TABLE dialogues ADD COLUMN folder TEXT NOT NULL DEFAULT '';
    CREATE INDEX dialogues_folder ON dialogues(folder) WHERE deleted IS NULL;
    """)


def _m6(db) -> None:
    """The request each answer was sent with (`dialogue.sent.record`), one row per answer
    version, apart from the message: a record is not part of the message's state (its versions,
    an export, an import never carry it) and is written once, never edited. Long texts in it are
    stored once in `blobs` by content hash."""
    db.execute("""
    CREATE TABLE requests(
      message_id TEXT NOT NULL,
      version INTEGER NOT NULL,
      at REAL NOT NULL,
      record TEXT NOT NULL,
      PRIMARY KEY (message_id, version)
    ) WITHOUT ROWID;
    """)


def _m7(db) -> None:
    """Authorship: each version records who made it (`author`: user, model, kernel, ...) and the
    message whose answer or cell caused it (`cause`). Existing rows read '' and are named from
    their op (`author_of`): a restore, an import, a fork, else the user."""
    db.execute("""
    ALTER TABLE versions ADD COLUMN author TEXT NOT NULL DEFAULT '';
    ALTER TABLE versions ADD COLUMN cause TEXT NOT NULL DEFAULT '';
    """)


MIGRATIONS: list[Callable] = [_m1, _m2, _m3, _m4, _m5, _m6, _m7]  # MIGRATIONS[i]: schema version i -> i+1
assert len(MIGRATIONS) == SCHEMA_VERSION


def _search_output(kind: str, outputs: list, response: str) -> str:
    return response if kind == Kind.prompt else output_text(outputs) if outputs else ""


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # made once
# what _JSON writes for a str (the C encoder's own function): a JSON string literal, quotes and all
_json_string = json.encoder.encode_basestring


_REQUEST_BLOB_MIN = 256  # a request record's text at least this long is stored once, by hash
_CHAINED = ("turns", "messages")  # a request record's lists that the next request extends


def _texts_out(obj: Any, put: Callable[[str], dict[str, str]]) -> Any:
    """`obj` with each long string under a "text" key replaced by `put(string)`."""
    if isinstance(obj, dict):
        return {k: put(v) if k == "text" and isinstance(v, str) and len(v) >= _REQUEST_BLOB_MIN
                else _texts_out(v, put) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_texts_out(v, put) for v in obj]
    return obj


def _texts_in(obj: Any, get: Callable[[str], str]) -> Any:
    """The inverse of `_texts_out`."""
    if isinstance(obj, dict):
        return {k: get(v["$blob"]) if k == "text" and isinstance(v, dict) and "$blob" in v
                else _texts_in(v, get) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_texts_in(v, get) for v in obj]
    return obj


def _dumps(v: Any) -> str:
    # Most JSON columns of most messages hold an empty list or dict: skip the encoder for those.
    if not v and type(v) in (list, dict):
        return "[]" if type(v) is list else "{}"
    return _JSON(v)


# The message columns in the order `_messages_from_rows` reads them: the fields of a Message
# first, then what only the store needs.
_MSG_FIELDS = ("id", "kind", "source", "outputs", "execution_count", "response", "tool_calls",
               "usage", "attachments", "meta", *FLAGS, "version", "created", "updated")
_MSG_COLS = (*_MSG_FIELDS, "dialogue_id", "streaming", "deleted", "pos")
_KINDS = {k.value: k for k in Kind}
# _messages_from_rows fills a Message's __dict__ itself: it must know every field, in this order
assert FLAGS == ("hidden", "pinned", "collapsed", "exported")
assert {f.name for f in dataclasses.fields(Message)} == set(_MSG_FIELDS), \
    "Message's fields changed: update _MSG_FIELDS and _messages_from_rows"
# A message version stores only the fields that differ from a new message's (most cells have no
# tool calls, usage, attachments, meta or flags): about half the bytes of a full snapshot, with
# nothing lost, since reading a version fills the rest back in. Full snapshots written before
# this read the same way.
_STATE_DEFAULTS = Message().state()
assert [k for k, v in _STATE_DEFAULTS.items() if v] == ["kind"]  # as _compact_state assumes
# _insert_rows names the fields a bare message (kind and source only) leaves empty: a new field
# must be added there too, or an import would drop it
assert set(STATE_FIELDS) == {"kind", "source", "outputs", "execution_count", "response",
                             "tool_calls", "usage", "attachments", "meta", *FLAGS}
_STATE_TYPES = {k: type(v) for k, v in _STATE_DEFAULTS.items()}


def _compact_state(state: dict[str, Any]) -> dict[str, Any]:
    # Every default but the kind is empty, so a value is a default when it is empty and of the
    # default's type (0 is not None, nor False); written this way for the import of many messages.
    types = _STATE_TYPES
    return {k: v for k, v in state.items()
            if (v or type(v) is not types.get(k)) and (k != "kind" or v != "code")}


def _bare_state(kind: str, source: str) -> str:
    """`_dumps(_compact_state(...))` of a message with nothing but a kind and a source."""
    if kind == "code":
        return '{"source":' + _json_string(source) + "}" if source else "{}"
    return ('{"kind":"' + kind + '","source":' + _json_string(source) + "}" if source
            else '{"kind":"' + kind + '"}')


def _compact_message_state(m: Message) -> dict[str, Any]:
    """`_compact_state(m.state())` in one pass, for the import of many messages."""
    d, types = m.__dict__, _STATE_TYPES
    state = {k: d[k] for k in STATE_FIELDS if d[k] or type(d[k]) is not types[k]}
    if state["kind"] == "code":  # a Kind is never empty, so it is always there
        del state["kind"]
    else:
        state["kind"] = state["kind"].value
    return state


def _full_state(state: dict[str, Any]) -> dict[str, Any]:
    full = {k: (type(v)() if isinstance(v, (list, dict)) else v)
            for k, v in _STATE_DEFAULTS.items()}
    full.update(state)
    return full


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while tens of thousands of small lists, dicts and tuples
    are made (opening a long dialogue, an import): otherwise it walks the growing heap again and
    again, about a third of the time. Nothing made there forms a cycle; the collector resumes
    (if it was on) as soon as the block ends."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _messages_from_rows(rows: Iterable[tuple]) -> list[Message]:
    """Messages from rows of `_MSG_FIELDS`. The hot path of opening a long dialogue, so it skips
    the dataclass __init__ (whose only check, the kind, the CHECK constraint has already made)
    and builds each message's __dict__ as one literal."""
    new, loads, kinds, out = object.__new__, json.loads, _KINDS, []
    add = out.append
    with _gc_paused():
        for (id_, kind, source, outputs, count, response, tool_calls, usage, attachments, meta,
             hidden, pinned, collapsed, exported, version, created, updated) in rows:
            m = new(Message)
            m.__dict__ = {
                "kind": kinds[kind], "source": source, "id": id_,
                "outputs": [] if outputs == "[]" else loads(outputs), "execution_count": count,
                "response": response, "tool_calls": [] if tool_calls == "[]" else loads(tool_calls),
                "usage": {} if usage == "{}" else loads(usage),
                "attachments": {} if attachments == "{}" else loads(attachments),
                "meta": {} if meta == "{}" else loads(meta),
                "hidden": hidden != 0, "pinned": pinned != 0, "collapsed": collapsed != 0,
                "exported": exported != 0, "version": version, "created": created,
                "updated": updated}
            add(m)
    return out


def _copy_message(m: Message) -> Message:
    """A shallow copy, as dataclasses.replace makes, without running __init__ again."""
    c = object.__new__(Message)
    c.__dict__ = m.__dict__.copy()
    return c
_DLG_COLS = ("id", "name", "model", "system", "context", "meta", "version", "created", "updated",
             "folder", "deleted")  # deleted last: _dialogue_row reads row[-1]


class _Locks:
    """OS-level locks beside a database, in `<db>-locks/` (mode 0700).

    `run-<token>`: held (flock, exclusive) by a Store for as long as it may be writing a stream;
    its streams carry `owner = <token>`. The kernel releases the lock when the holder's process
    dies, however it dies, so "can I take the lock?" is an exact test of "is the writer dead?":
    no heartbeat to miss, no clock, no reused pid. A file is created under a temporary name, locked,
    then renamed into place, so a sweeper never sees an unlocked `run-*` file of a live Store.
    `server`: held by the one `dialogue serve` of the database; it holds that server's pid and
    address for the refusal message of a second one.

    Why flock files and not SQLite itself: a lock in the database would need a heartbeat (a
    process killed with -9 cannot clear it), and SQLite's own POSIX locks are dropped when any
    descriptor of the file is closed in the process."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.dir = db_path.with_name(db_path.name + "-locks")
        self._note = str(self.dir / "checked")

    def hold_run(self) -> tuple[str, int]:
        """A new owner token and the descriptor that holds its lock."""
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            while True:
                token = secrets.token_hex(12)
                tmp = self.dir / f".new-{token}"
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                if not _try_lock(fd):  # a sweeper got hold of the new file: start again
                    os.close(fd)
                    continue
                os.write(fd, f"{os.getpid()}\n".encode())
                try:
                    os.rename(tmp, self.dir / f"run-{token}")
                except FileNotFoundError:  # swept between create and lock
                    os.close(fd)
                    continue
                return token, fd
        except OSError as e:
            raise StoreError(f"cannot create a lock file in {self.dir}: {e.strerror}") from e

    # The note is rewritten in place, at a fixed size, with the CRC of what it says: a rename or a
    # truncation makes ext4 flush the file's data (0.15-0.2 ms of CPU measured here, on a CLI
    # command that writes one message in under 1 ms), an overwrite of as many bytes does not. A
    # note read half-written (two Stores closing at once, a crash) fails its CRC and means
    # "not noted": the next writer runs the whole check, the safe way to be wrong.
    _NOTE_SIZE = 256

    def read_checked(self) -> str | None:
        """The fingerprint of the database as the last Store that checked it left it."""
        try:
            fd = os.open(self._note, os.O_RDONLY)
        except OSError:
            return None
        try:
            note = os.read(fd, self._NOTE_SIZE).decode("ascii", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)
        fingerprint, _, crc = note.rstrip(" \n").rpartition(" crc ")
        return fingerprint if crc == f"{zlib.crc32(fingerprint.encode()):08x}" else None

    def write_checked(self, fingerprint: str) -> None:
        note = f"{fingerprint} crc {zlib.crc32(fingerprint.encode()):08x}\n".encode()
        if len(note) > self._NOTE_SIZE:
            return  # (cannot happen: a fingerprint is four numbers and a dash, or eight numbers)
        with contextlib.suppress(OSError):  # no note: the next writer checks the whole file
            try:
                fd = os.open(self._note, os.O_WRONLY | os.O_CREAT, 0o600)
            except FileNotFoundError:
                self.dir.mkdir(mode=0o700, exist_ok=True)
                fd = os.open(self._note, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, note.ljust(self._NOTE_SIZE), 0)
            finally:
                os.close(fd)

    def release_run(self, token: str, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.dir / f"run-{token}")
        os.close(fd)

    def claim_dead(self, token: str | None) -> tuple[bool, int | None]:
        """(dead, fd): whether the writer `token` is gone, and if its lock file is still there, a
        descriptor now holding that lock (pass it to `forget`). A stream without an owner was
        written before owners were recorded: its writer is long gone."""
        if not token:
            return True, None
        try:
            fd = os.open(self.dir / f"run-{token}", os.O_RDONLY)
        except FileNotFoundError:
            return True, None
        except OSError:
            return False, None  # cannot tell: leave it alone
        if _try_lock(fd):
            return True, fd
        os.close(fd)
        return False, None

    def forget(self, token: str | None, fd: int | None) -> None:
        """Remove a dead writer's lock file (while holding its lock: nobody else can be using it)."""
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.dir / f"run-{token}")
        os.close(fd)

    def pid_of(self, token: str | None) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / f"run-{token}").read_text().split()[0])
        return None

    def sweep(self, keep: set[str]) -> None:
        """Remove the lock files of Stores that died without streaming (or whose streams were
        recovered already). Cheap: a directory listing and a lock attempt per file."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        now = time.time()
        for name in names:
            if name.startswith("run-") and name[4:] not in keep:
                dead, fd = self.claim_dead(name[4:])
                if dead:
                    self.forget(name[4:], fd)
            elif name.startswith(".new-"):  # a creator killed between create and rename
                p = self.dir / name
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > 3600:
                        fd = os.open(p, os.O_RDONLY)
                        if _try_lock(fd):
                            p.unlink()
                        os.close(fd)

    def hold_server(self, address: str) -> int:
        """Take the database's server lock, or raise ServerRunningError naming the holder."""
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.dir / "server", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot create a lock file in {self.dir}: {e.strerror}") from e
        if _try_lock(fd):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "address": address}).encode(), 0)
            return fd
        info: dict[str, Any] = {}
        for _ in range(20):  # the holder writes its details just after taking the lock
            with contextlib.suppress(ValueError, OSError):
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            if info:
                break
            time.sleep(0.05)
        os.close(fd)
        pid = info.get("pid", "unknown")
        where = f" at {info['address']}" if info.get("address") else ""
        raise ServerRunningError(
            f"another dialogue server (pid {pid}) is already serving {self.db_path}{where}; "
            "use that one, or stop it before starting another")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # EWOULDBLOCK: held by another open of the file, in this process or another
        return False


class Store:
    """A dialogue database. Open one per process (or per thread that needs its own connection);
    several processes may open the same file: WAL lets readers run beside one writer, and writers
    wait for each other (busy timeout) instead of failing."""

    def __init__(self, path: str | os.PathLike | None = None, *, busy_timeout_ms: int = 10_000,
                 migrate: bool = True):
        self.path = Path(path) if path is not None else default_db_path()
        self._depth = 0
        self._checked = False  # quick_check passed on this connection (done before its first write)
        self.quick_checks = 0  # how many it ran (0 when the file was as a clean close left it)
        self._damaged = False
        self._locks = _Locks(self.path)
        self._token: str | None = None  # owner token of the streams this Store writes
        self._token_fd: int | None = None
        self._server_fd: int | None = None
        self._closed = False
        self._wal = str(self.path) + "-wal"
        self._busy_timeout_ms = int(busy_timeout_ms)
        # taken before the connection opens: opening one writes to the WAL by itself
        self._as_left = self._locks.read_checked() == self._fingerprint()
        if not self._as_left:
            # A file exactly as a checked Store of ours closed it is ours: identifying it again
            # would open it a second time (its schema parsed twice) to learn what we know.
            self._identify(busy_timeout_ms)
        try:
            # apsw directly: the store needs a connection, not fastlite's table helpers. SQLite
            # itself creates nothing until the first statement; WAL is set below, once the file
            # is known to be ours.
            self.conn = apsw.Connection(str(self.path))
            self.conn.set_busy_timeout(self._busy_timeout_ms)
            # NORMAL in WAL mode is safe against process crashes (what SIGKILL is); only a power
            # loss can roll back the last commits. FULL would fsync every edit.
            version, app, mode = self._one(
                "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; "
                "SELECT (SELECT user_version FROM pragma_user_version), "
                "(SELECT application_id FROM pragma_application_id), "
                "(SELECT journal_mode FROM pragma_journal_mode)")
        except apsw.Error as e:
            raise self._bad_file(e) from None
        if mode != "wal":
            self._x("PRAGMA journal_mode = wal")
        if migrate:
            version = self._migrate(version, app)
        if version == SCHEMA_VERSION:
            self.recover_interrupted()

    def _identify(self, busy_timeout_ms: int) -> None:
        """Create the file (mode 0600: it holds prompts, code and answers), or make sure the one
        there is a dialogue database, before anything writes to it: another application's SQLite
        file is refused (ForeignDatabaseError), a file that is not SQLite or is damaged is reported
        (DamagedError). Nothing is written in either case. SQLite gives the -wal and -shm files
        the database file's mode."""
        p = self.path
        try:
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            return  # new and empty: ours
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create database {p}: {e.strerror}") from e
        try:
            with open(p, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as e:
            raise StoreError(f"cannot open database {p}: {e.strerror}") from e
        if not head:
            return  # empty (another process is creating it right now, or an empty file)
        if head != _SQLITE_MAGIC:
            raise DamagedError(f"cannot open database {p}: it is not an SQLite file (not a "
                               "dialogue database, or one whose header is damaged); nothing was "
                               "written to it")
        # Read-only, so a foreign file is not touched. Without a WAL beside it the file is all
        # there is: `immutable` reads it without creating -wal/-shm files next to someone else's
        # database. With one, SQLite must read it too: a database of ours that another process
        # has just created may have its application id only in its WAL so far.
        wal = p.with_name(p.name + "-wal")
        mode = "mode=ro" if wal.exists() and wal.stat().st_size else "immutable=1"
        try:
            ro = apsw.Connection(f"file:{urllib.parse.quote(str(p.absolute()))}?{mode}",
                                 flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        except apsw.Error as e:
            raise self._bad_file(e) from None
        try:
            ro.set_busy_timeout(int(busy_timeout_ms))
            app = ro.execute("PRAGMA application_id").fetchall()[0][0]
            version = ro.execute("PRAGMA user_version").fetchall()[0][0]
            tables = sorted(r[0] for r in ro.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"))
        except apsw.Error as e:
            raise self._bad_file(e) from None
        finally:
            ro.close()
        if app == APPLICATION_ID:
            return
        if app == 0 and version == 0 and not tables:
            return  # an empty SQLite database: nothing of anyone's to harm
        if app == 0 and version >= 1 and _OUR_TABLES <= set(tables):
            return  # ours, from before application ids: migrate() sets it
        if app:
            what = f"application id {app:#010x}"
        elif tables:
            what = "tables " + ", ".join(repr(t) for t in tables[:6]) + (
                f" and {len(tables) - 6} more" if len(tables) > 6 else "")
        else:
            what = f"user_version {version}"
        raise ForeignDatabaseError(
            f"{p} is not a dialogue database: it belongs to another application ({what}); "
            "nothing was written to it. Choose another file for dialogue's database")

    def _bad_file(self, e: Exception) -> StoreError:
        """One line for what SQLite said about a file it could not read."""
        if isinstance(e, (apsw.CorruptError, apsw.NotADBError)):
            self._damaged = True  # never note such a file as checked
            return DamagedError(
                f"{self.path} is damaged ({_sqlite_says(e)}); nothing was written to it. Restore "
                f"it from a backup, or salvage what is readable with: sqlite3 {self.path} .recover")
        return StoreError(f"cannot open database {self.path}: {_sqlite_says(e)}")

    # ------------------------------------------------------------ plumbing

    def _x(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        try:
            return list(self.conn.execute(sql, tuple(params)))
        except (apsw.CorruptError, apsw.NotADBError) as e:
            raise self._bad_file(e) from None

    def _many(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        try:
            self.conn.executemany(sql, rows)
        except (apsw.CorruptError, apsw.NotADBError) as e:
            raise self._bad_file(e) from None

    def _one(self, sql: str, params: Iterable[Any] = ()) -> tuple | None:
        try:
            for row in self.conn.execute(sql, tuple(params)):
                return row
        except (apsw.CorruptError, apsw.NotADBError) as e:
            raise self._bad_file(e) from None
        return None

    def _check_before_writing(self) -> None:
        """Refuse to write to a damaged file. SQLite notices damage only on the pages a statement
        reads, so a write that misses them would succeed and bury good data deeper in a broken
        file. The check (`_structure_check`) reads every page once, once per connection."""
        if self._checked:
            return
        if self._as_left:
            # The file is exactly as a Store of ours left it after a check: nothing has written
            # to it since (its size and modification time would have moved), so a whole-file
            # check (about 0.1 s on a 100,000-message database) would only repeat the last one.
            # A CLI command writing one message pays it only when something else touched the
            # file.
            self._checked = True
            return
        self.quick_checks += 1
        problems = self._structure_check()
        if problems != ["ok"]:
            self._damaged = True
            raise DamagedError(
                f"{self.path} is damaged ({'; '.join(problems)[:300]}); nothing was written to it. "
                f"Restore it from a backup, or salvage what is readable with: "
                f"sqlite3 {self.path} .recover")
        self._checked = True

    def _structure_check(self) -> list[str]:
        """`PRAGMA quick_check` of every b-tree in the file (every page, every record, the free
        list, NOT NULL), on a read-only connection of its own without the FTS5 module and with
        CHECK constraints off. Since SQLite 3.44 quick_check also asks FTS5 to re-tokenize every
        indexed text and compare it with the index, and evaluates each row's CHECK expressions:
        on 100,000 messages those two are more than half of the check, and they look for
        logical mistakes, not damage. The search index's own pages are still read and checked
        here (its shadow tables are ordinary tables); what is left to `integrity_check` is
        whether its contents agree with the texts, and that index is derived data (`_m2`
        rebuilds it from the messages), whose damage FTS5 reports as SQLITE_CORRUPT_VTAB (a
        DamagedError) when it reads it. Writes go through the main connection, where the CHECK
        constraints hold."""
        try:
            con = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
        except apsw.Error as e:
            raise self._bad_file(e) from None
        try:
            con.set_busy_timeout(self._busy_timeout_ms)
            # an FTS5 table whose module is not registered is skipped by the check: sqlite's
            # pragma.c, "if( sqlite3HashFind(&db->aModule, zMod)==0 ) continue;"
            con.drop_modules(None)
            return [r[0] for r in con.execute("PRAGMA ignore_check_constraints = ON; "
                                              "PRAGMA quick_check(3)")]
        except (apsw.CorruptError, apsw.NotADBError) as e:
            raise self._bad_file(e) from None
        finally:
            con.close()

    @contextmanager
    def tx(self) -> Iterator[None]:
        """One write transaction. Nested calls join the outer one. IMMEDIATE takes the write lock
        up front, so two writers queue instead of deadlocking on a read-to-write upgrade."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._check_before_writing()
        self._x("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._x("ROLLBACK")
            raise
        self._depth = 0
        self._x("COMMIT")

    @property
    def schema_version(self) -> int:
        return self._one("PRAGMA user_version")[0]

    def migrate(self, to: int = SCHEMA_VERSION) -> None:
        """Bring the schema up to `to`, one migration per transaction, and mark the file as a
        dialogue database (application_id) if it was made before files were marked."""
        self._migrate(self.schema_version, self._one("PRAGMA application_id")[0], to)

    def _migrate(self, v: int, app: int, to: int = SCHEMA_VERSION) -> int:
        """`migrate` from schema version `v` and application id `app` as just read; returns the
        schema version now."""
        if v > SCHEMA_VERSION:
            raise SchemaError(f"{self.path} has schema version {v}, newer than this dialogue "
                              f"({SCHEMA_VERSION}); upgrade the dialogue package to open it")
        while v < to:
            with self.tx():
                v = self.schema_version  # another process may have migrated while we waited
                if v >= to:
                    break
                try:
                    MIGRATIONS[v](self.conn)
                except (apsw.CorruptError, apsw.NotADBError) as e:
                    raise self._bad_file(e) from None
                self._x(f"PRAGMA user_version = {v + 1}")
                self._x(f"PRAGMA application_id = {APPLICATION_ID}")
                app = APPLICATION_ID
            v += 1
        if app != APPLICATION_ID:
            with self.tx():
                if self._one("PRAGMA application_id")[0] != APPLICATION_ID:
                    self._x(f"PRAGMA application_id = {APPLICATION_ID}")
        return v

    def close(self) -> None:
        """Close the connection. Streams this Store began and never finished cannot be finished
        by anyone now: they are recovered (marked interrupted) first."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._token_fd is not None:
                with contextlib.suppress(StoreError, apsw.Error):
                    for (mid,) in self._x("SELECT id FROM messages WHERE streaming = 1 AND "
                                          "owner = ?", (self._token,)):
                        self._recover_one(mid, self._token)
                self._locks.release_run(self._token, self._token_fd)
                self._token_fd = None
            if self._server_fd is not None:
                os.close(self._server_fd)
                self._server_fd = None
        finally:
            self.conn.close()
        if self._checked and not self._damaged:
            # checked (or trusted) and written only by us since: the next open may trust it
            self._locks.write_checked(self._fingerprint())

    def _fingerprint(self) -> str:
        """The database file and its WAL as the file system sees them (inode, size, modification
        time): any write to either, by anything, changes it. An empty WAL counts as none: opening
        a connection creates one, and it holds nothing."""
        parts = []
        for f in (self.path, self._wal):
            try:
                st = os.stat(f)
                parts.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
                             if st.st_size or f is self.path else "-")
            except OSError:
                parts.append("-")
        return " ".join(parts)

    def claim_server(self, address: str) -> None:
        """Be the one server of this database until close(); raise ServerRunningError naming the
        one that already is. Two servers would each run their own kernels for the same dialogues
        (a variable defined in one tab missing in another) and neither would see the other's
        live runs: one server per database is the clear answer."""
        if self._server_fd is None:
            self._server_fd = self._locks.hold_server(address)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()

    def integrity_check(self) -> str:
        """The full check, "ok" or the first problem: what the check before writing does, and
        also every index against its table, the CHECK constraints, and the search index
        against the texts it indexes (FTS5 re-tokenizes them all)."""
        return self._one("PRAGMA integrity_check")[0]

    # ------------------------------------------------------------ rows <-> objects

    def _msg_from_row(self, row: tuple) -> Message:
        """A Message from a row of `_MSG_COLS` (the store's own columns after its fields)."""
        return _messages_from_rows((row[:len(_MSG_FIELDS)],))[0]

    def _dlg_from_row(self, row: tuple) -> Dialogue:
        d = dict(zip(_DLG_COLS, row))
        d["context"] = [ContextItem.from_dict(c) for c in json.loads(d["context"])]
        d["meta"] = json.loads(d["meta"])
        return Dialogue(**d)

    def _put_blob(self, text: str, h: str | None = None) -> str:
        """Store `text` once in `blobs` (keyed by its sha256, `h` where already computed);
        returns the key."""
        h = h or hashlib.sha256(text.encode()).hexdigest()
        self._x("INSERT OR IGNORE INTO blobs(hash, data) VALUES (?, ?)", (h, text))
        return h

    def _state_json(self, state: dict[str, Any]) -> str:
        """A version's state as stored, with a large `outputs` list, and large `attachments` (a
        note's pasted images), stored once in `blobs`: an edit of a note holding a screenshot
        does not copy the screenshot. Attachments are a dict, so their marker is a list
        (["$blob", hash]), which no attachments value can be."""
        out = _dumps(state["outputs"]) if "outputs" in state else ""
        if len(out) >= _BLOB_MIN:
            state = {**state, "outputs": {"$blob": self._put_blob(out)}}
        atts = _dumps(state["attachments"]) if state.get("attachments") else ""
        if len(atts) >= _BLOB_MIN:
            state = {**state, "attachments": ["$blob", self._put_blob(atts)]}
        return _dumps(state)

    def _state_load(self, s: str, message: bool = True) -> dict[str, Any]:
        state = json.loads(s)
        if isinstance(state.get("outputs"), dict) and "$blob" in state["outputs"]:
            state["outputs"] = json.loads(self._one("SELECT data FROM blobs WHERE hash = ?",
                                                    (state["outputs"]["$blob"],))[0])
        atts = state.get("attachments")
        if isinstance(atts, list) and len(atts) == 2 and atts[0] == "$blob":
            state["attachments"] = json.loads(self._one("SELECT data FROM blobs WHERE hash = ?",
                                                        (atts[1],))[0])
        return _full_state(state) if message else state

    def _write_version(self, dialogue_id: str, message_id: str, version: int, op: str,
                       state: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO versions(dialogue_id, message_id, version, op, at, state, author, "
                "cause) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (dialogue_id, message_id, version, op, at,
                 self._state_json(_compact_state(state) if message_id else state), *_ACTOR.get()))

    def _index(self, n: int, kind: str, source: str, outputs: list, response: str,
               replace: bool = True) -> None:
        if replace:
            self._x("DELETE FROM search WHERE rowid = ?", (n,))
        self._x("INSERT INTO search(rowid, source, output) VALUES (?, ?, ?)",
                (n, source, _search_output(kind, outputs, response)))

    # ------------------------------------------------------------ dialogues

    def create_dialogue(self, name: str, *, model: str = "", system: str = "",
                        context: list[ContextItem] | None = None, meta: dict | None = None,
                        id: str | None = None, folder: str = "") -> Dialogue:
        name = _check_name(name)
        now = time.time()
        d = Dialogue(name=name, id=id or new_id(), model=model, system=system,
                     context=list(context or []), meta=dict(meta or {}), version=1,
                     created=now, updated=now, folder=folder)
        with self.tx():
            if folder:
                self._folder_row(folder)  # a live folder, or NotFoundError
            if self._one("SELECT 1 FROM dialogues WHERE name = ? AND deleted IS NULL", (name,)):
                raise NameTakenError(f"a dialogue named {name!r} already exists")
            while self._one("SELECT 1 FROM dialogues WHERE id = ?", (d.id,)):
                if id:
                    raise NameTakenError(f"a dialogue with id {id!r} already exists")
                d.id = new_id()
            self._x("INSERT INTO dialogues(id, name, model, system, context, meta, version, "
                    "created, updated, folder) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                    (d.id, name, model, system, _dumps([c.to_dict() for c in d.context]),
                     _dumps(d.meta), now, now, folder))
            self._write_version(d.id, "", 1, "create", d.settings(), now)
        return d

    def _dialogue_row(self, dialogue_id: str, *, deleted_ok: bool = False) -> tuple:
        row = self._one(f"SELECT {', '.join(_DLG_COLS)} FROM dialogues WHERE id = ?",
                        (dialogue_id,))
        if row is None or (row[-1] is not None and not deleted_ok):
            raise NotFoundError(f"no dialogue with id {dialogue_id!r}"
                                + (" (it is in the trash)" if row else ""))
        return row

    def find_dialogue(self, ref: str) -> str:
        """A dialogue's id from its name or id (live dialogues only)."""
        row = (self._one("SELECT id FROM dialogues WHERE name = ? AND deleted IS NULL", (ref,))
               or self._one("SELECT id FROM dialogues WHERE id = ? AND deleted IS NULL", (ref,)))
        if row is None:
            trashed = self._one("SELECT id FROM dialogues WHERE (name = ? OR id = ?) "
                                "AND deleted IS NOT NULL", (ref, ref))
            raise NotFoundError(f"no dialogue named {ref!r}"
                                + (" (it is in the trash: `dialogue trash`)" if trashed else ""))
        return row[0]

    def get_dialogue(self, dialogue_id: str, *, with_messages: bool = True,
                     deleted_ok: bool = False) -> Dialogue:
        d = self._dlg_from_row(self._dialogue_row(dialogue_id, deleted_ok=deleted_ok))
        if with_messages:
            d.messages = self.messages(dialogue_id)
        return d

    def message_places(self, msg_ids: list[str]) -> dict[str, tuple[str, str, bool]]:
        """{message id: (dialogue id, dialogue name, whether either is in the trash)} for the
        ids that exist: what a note that names a message (a cached prefix's) belongs to."""
        out: dict[str, tuple[str, str, bool]] = {}
        for i in range(0, len(msg_ids), 500):
            chunk = msg_ids[i:i + 500]
            for mid, did, name, gone in self._x(
                    "SELECT m.id, d.id, d.name, m.deleted IS NOT NULL OR d.deleted IS NOT NULL "
                    "FROM messages m JOIN dialogues d ON d.id = m.dialogue_id WHERE m.id IN "
                    f"({', '.join('?' * len(chunk))})", tuple(chunk)):
                out[mid] = (did, name, bool(gone))
        return out

    def messages(self, dialogue_id: str) -> list[Message]:
        # Each row becomes its Message as SQLite hands it over, rather than after a list of them
        # all: a third faster on 10,000 messages (each row tuple is freed at once and its memory
        # reused while still in the CPU's cache).
        try:
            return _messages_from_rows(self.conn.execute(
                f"SELECT {', '.join(_MSG_FIELDS)} FROM messages WHERE dialogue_id = ? AND "
                "deleted IS NULL ORDER BY pos", (dialogue_id,)))
        except (apsw.CorruptError, apsw.NotADBError) as e:
            raise self._bad_file(e) from None

    def list_dialogues(self, *, deleted: bool = False) -> list[dict[str, Any]]:
        """Summaries (id, name, model, counts, times, the adapter set {name: scale}), most
        recently updated first."""
        rows = self._x(
            "SELECT d.id, d.name, d.model, d.created, d.updated, d.deleted, "
            "(SELECT count(*) FROM messages m WHERE m.dialogue_id = d.id AND m.deleted IS NULL), "
            "json_extract(d.meta, '$.adapters'), d.folder "
            f"FROM dialogues d WHERE d.deleted IS {'NOT ' if deleted else ''}NULL "
            "ORDER BY d.updated DESC")
        keys = ("id", "name", "model", "created", "updated", "deleted", "messages")
        paths = self._folder_paths()
        out = []
        for r in rows:
            item = dict(zip(keys, r))
            try:
                ad = json.loads(r[7]) if r[7] else {}
            except ValueError:
                ad = {}
            item["adapters"] = ad if isinstance(ad, dict) else {}
            item["folder"] = r[8] if r[8] in paths else ""
            item["folder_path"] = paths.get(r[8], "")
            out.append(item)
        return out

    def update_dialogue(self, dialogue_id: str, *, base_version: int | None, op: str = "edit",
                        **changes: Any) -> Dialogue:
        """Change name, model, system, context, meta or folder (an id, "" for the top level).
        `base_version` None skips the conflict check (for system writers, never for a user's
        edit)."""
        bad = set(changes) - {"name", "model", "system", "context", "meta", "folder"}
        if bad:
            raise StoreError(f"cannot change {', '.join(sorted(bad))} of a dialogue")
        if "name" in changes:
            changes["name"] = _check_name(changes["name"])
        with self.tx():
            d = self._dlg_from_row(self._dialogue_row(dialogue_id))
            if base_version is not None and base_version != d.version:
                raise ConflictError(f"dialogue {d.name!r}", base_version, d.version)
            if "name" in changes and changes["name"] != d.name and self._one(
                    "SELECT 1 FROM dialogues WHERE name = ? AND deleted IS NULL",
                    (changes["name"],)):
                raise NameTakenError(f"a dialogue named {changes['name']!r} already exists")
            if changes.get("folder"):
                self._folder_row(changes["folder"])  # a live folder, or NotFoundError
            if "context" in changes:
                changes["context"] = [c if isinstance(c, ContextItem) else ContextItem.from_dict(c)
                                      for c in changes["context"]]
            new = {k: v for k, v in changes.items() if getattr(d, k) != v}
            if not new:
                return d
            for k, v in new.items():
                setattr(d, k, v)
            d.version += 1
            d.updated = time.time()
            self._x("UPDATE dialogues SET name = ?, model = ?, system = ?, context = ?, meta = ?, "
                    "version = ?, updated = ?, folder = ? WHERE id = ?",
                    (d.name, d.model, d.system, _dumps([c.to_dict() for c in d.context]),
                     _dumps(d.meta), d.version, d.updated, d.folder, d.id))
            self._write_version(d.id, "", d.version, op, d.settings(), d.updated)
        d.messages = self.messages(dialogue_id)
        return d

    def delete_dialogue(self, dialogue_id: str) -> None:
        """Move a dialogue to the trash; its messages and history stay."""
        with self.tx():
            d = self._dlg_from_row(self._dialogue_row(dialogue_id))
            now = time.time()
            self._x("UPDATE dialogues SET deleted = ?, version = ?, updated = ? WHERE id = ?",
                    (now, d.version + 1, now, dialogue_id))
            self._write_version(dialogue_id, "", d.version + 1, "delete", d.settings(), now)

    def restore_dialogue(self, dialogue_id: str) -> Dialogue:
        """Bring a dialogue back from the trash. If its name was taken meanwhile, it comes back as
        "name (restored)" (then "(restored 2)", ...) rather than failing."""
        with self.tx():
            d = self._dlg_from_row(self._dialogue_row(dialogue_id, deleted_ok=True))
            if d.deleted is None:
                raise StoreError(f"dialogue {d.name!r} is not in the trash")
            name, i = d.name, 1
            while self._one("SELECT 1 FROM dialogues WHERE name = ? AND deleted IS NULL", (name,)):
                name = f"{d.name} (restored{'' if i == 1 else f' {i}'})"
                i += 1
            d.name, d.deleted, d.version, d.updated = name, None, d.version + 1, time.time()
            d.folder = self.live_folder(d.folder)  # its folder may have gone meanwhile
            self._x("UPDATE dialogues SET name = ?, deleted = NULL, version = ?, updated = ?, "
                    "folder = ? WHERE id = ?", (name, d.version, d.updated, d.folder, d.id))
            self._write_version(d.id, "", d.version, "restore", d.settings(), d.updated)
        return self.get_dialogue(d.id)

    def _touch(self, dialogue_id: str, now: float) -> None:
        self._x("UPDATE dialogues SET updated = ? WHERE id = ?", (now, dialogue_id))

    # ------------------------------------------------------------ folders

    _FOLDER_COLS = ("id", "name", "parent", "note", "template", "version", "created", "updated")

    def _folder_row(self, folder_id: str) -> tuple:
        row = self._one(f"SELECT {', '.join(self._FOLDER_COLS)} FROM folders "
                        "WHERE id = ? AND deleted IS NULL", (folder_id,))
        if row is None:
            raise NotFoundError(f"no folder with id {folder_id!r}")
        return row

    def _folder_paths(self) -> dict[str, str]:
        """{id: path} of every live folder (a folder whose parent is gone has none)."""
        rows = {i: (n, p) for i, n, p in self._x(
            "SELECT id, name, parent FROM folders WHERE deleted IS NULL")}
        paths: dict[str, str] = {}

        def path(i: str, depth: int = 0) -> str | None:
            if i in paths:
                return paths[i]
            if i not in rows or depth > len(rows):  # a gone parent, or a cycle
                return None
            name, parent = rows[i]
            up = path(parent, depth + 1) if parent else ""
            if up is None:
                return None
            paths[i] = f"{up}/{name}" if up else name
            return paths[i]

        for i in rows:
            path(i)
        return paths

    def folders(self) -> list[Folder]:
        """Every live folder, in path order, with its count of live dialogues."""
        paths = self._folder_paths()
        counts = dict(self._x("SELECT folder, count(*) FROM dialogues WHERE deleted IS NULL "
                              "AND folder != '' GROUP BY folder"))
        out = [Folder(*row[:3], paths[row[0]], *row[3:], dialogues=counts.get(row[0], 0))
               for row in self._x(f"SELECT {', '.join(self._FOLDER_COLS)} FROM folders "
                                  "WHERE deleted IS NULL") if row[0] in paths]
        return sorted(out, key=lambda f: f.path.split("/"))

    def get_folder(self, folder_id: str) -> Folder:
        row = self._folder_row(folder_id)
        count = self._one("SELECT count(*) FROM dialogues WHERE deleted IS NULL AND folder = ?",
                          (folder_id,))[0]
        return Folder(*row[:3], self._folder_paths().get(folder_id, row[1]), *row[3:],
                      dialogues=count)

    def find_folder(self, ref: str) -> str:
        """A live folder's id from its path ("a/b") or id; "" (or "/") is the top level."""
        path = _folder_path(ref, allow_top=True)
        if not path:
            return ""
        for i, p in self._folder_paths().items():
            if p == path:
                return i
        if self._one("SELECT 1 FROM folders WHERE id = ? AND deleted IS NULL", (ref.strip(),)):
            return ref.strip()
        raise NotFoundError(f"no folder {path!r} (`dialogue folder list` shows them)")

    def folder_chain(self, folder_id: str) -> list[Folder]:
        """The folder and the folders above it, outermost first ([] for the top level); their
        `dialogues` counts are left at 0 (read on every prompt build: get_folder counts)."""
        chain: list[Folder] = []
        paths = self._folder_paths() if folder_id else {}
        while folder_id and len(chain) < 1000:
            row = self._folder_row(folder_id)
            chain.append(Folder(*row[:3], paths.get(folder_id, row[1]), *row[3:]))
            folder_id = row[2]
        return chain[::-1]

    def create_folder(self, path: str, *, exist_ok: bool = False) -> Folder:
        """Make the folder at `path` and any missing folders above it ("a/b/c")."""
        names = _folder_path(path).split("/")
        with self.tx():
            parent, made = "", False
            for name in names:
                row = self._one("SELECT id FROM folders WHERE parent = ? AND name = ? AND "
                                "deleted IS NULL", (parent, name))
                if row is None:
                    now, fid = time.time(), new_id()
                    while self._one("SELECT 1 FROM folders WHERE id = ?", (fid,)):
                        fid = new_id()
                    self._x("INSERT INTO folders(id, name, parent, created, updated) "
                            "VALUES (?, ?, ?, ?, ?)", (fid, name, parent, now, now))
                    self._write_folder_version(fid, 1, "create",
                                               Folder(fid, name, parent, "").settings(), now)
                    row, made = (fid,), True
                parent = row[0]
            if not made and not exist_ok:
                raise NameTakenError(f"a folder {'/'.join(names)!r} already exists")
            return self.get_folder(parent)

    def _write_folder_version(self, folder_id: str, version: int, op: str,
                              state: dict[str, Any], at: float) -> None:
        self._x("INSERT INTO folder_versions(folder_id, version, op, at, state) "
                "VALUES (?, ?, ?, ?, ?)", (folder_id, version, op, at, _dumps(state)))

    def update_folder(self, folder_id: str, *, base_version: int | None, op: str = "edit",
                      **changes: Any) -> Folder:
        """Change a folder's name, parent (an id, "" for the top level: a move), note or
        template (a dialogue id, "" for none), as a new version. A stale `base_version` raises
        ConflictError; a name its new parent already holds, NameTakenError."""
        bad = set(changes) - {"name", "parent", "note", "template"}
        if bad:
            raise StoreError(f"cannot change {', '.join(sorted(bad))} of a folder")
        if "name" in changes:
            changes["name"] = _folder_path(changes["name"])
            if "/" in changes["name"]:
                raise StoreError("a folder's name cannot hold '/' (a path is names joined by '/')")
        with self.tx():
            f = self.get_folder(folder_id)
            if base_version is not None and base_version != f.version:
                raise ConflictError(f"folder {f.path!r}", base_version, f.version)
            new = {k: v for k, v in changes.items() if getattr(f, k) != v}
            if not new:
                return f
            parent = new.get("parent", f.parent)
            if "parent" in new and parent:
                up = parent
                while up:  # the new parent must be live and not the folder itself or below it
                    if up == folder_id:
                        raise StoreError(f"cannot move folder {f.path!r} into itself")
                    up = self._folder_row(up)[2]
            name = new.get("name", f.name)
            if ("name" in new or "parent" in new) and self._one(
                    "SELECT 1 FROM folders WHERE parent = ? AND name = ? AND deleted IS NULL "
                    "AND id != ?", (parent, name, folder_id)):
                where = self._folder_paths().get(parent, "") if parent else ""
                raise NameTakenError(f"a folder {(where + '/' if where else '') + name!r} "
                                     "already exists")
            if new.get("template"):
                self._dialogue_row(new["template"])  # a live dialogue, or NotFoundError
            for k, v in new.items():
                setattr(f, k, v)
            f.version += 1
            f.updated = time.time()
            self._x("UPDATE folders SET name = ?, parent = ?, note = ?, template = ?, version = ?, "
                    "updated = ? WHERE id = ?",
                    (f.name, f.parent, f.note, f.template, f.version, f.updated, f.id))
            self._write_folder_version(f.id, f.version, op, f.settings(), f.updated)
        return self.get_folder(folder_id)

    def delete_folder(self, folder_id: str, *, move_up: bool = False) -> Folder:
        """Delete a folder. One that holds dialogues or folders is refused unless `move_up`,
        which first moves what it holds into its parent (each dialogue's move a version). The
        folder's row and history stay (a dialogue restored from the trash into it goes to the
        nearest folder above it that is still there)."""
        with self.tx():
            f = self.get_folder(folder_id)
            subs = self._x("SELECT id, name FROM folders WHERE parent = ? AND deleted IS NULL",
                           (folder_id,))
            dialogues = [r[0] for r in self._x(
                "SELECT id FROM dialogues WHERE folder = ? AND deleted IS NULL", (folder_id,))]
            if (subs or dialogues) and not move_up:
                held = [f"{len(dialogues)} dialogue{'s' * (len(dialogues) != 1)}"] * bool(dialogues)
                held += [f"{len(subs)} folder{'s' * (len(subs) != 1)}"] * bool(subs)
                raise StoreError(f"folder {f.path!r} holds {' and '.join(held)}: move them out "
                                 "first, or delete it with its contents moved up a level")
            for sub_id, _ in subs:
                self.update_folder(sub_id, base_version=None, op="move up", parent=f.parent)
            for did in dialogues:
                self.update_dialogue(did, base_version=None, op="move up", folder=f.parent)
            now = time.time()
            self._x("UPDATE folders SET deleted = ?, version = ?, updated = ? WHERE id = ?",
                    (now, f.version + 1, now, folder_id))
            self._write_folder_version(folder_id, f.version + 1, "delete", f.settings(), now)
        return f

    def live_folder(self, folder_id: str) -> str:
        """`folder_id` if it is live, else the nearest live folder above it ("" for none)."""
        for _ in range(1000):
            if not folder_id:
                return ""
            row = self._one("SELECT parent, deleted FROM folders WHERE id = ?", (folder_id,))
            if row is None:
                return ""
            if row[1] is None:
                return folder_id
            folder_id = row[0]
        return ""

    def folder_history(self, folder_id: str) -> list[Version]:
        """Every version of a folder's settings (name, parent, note, template), oldest first."""
        rows = self._x("SELECT version, op, at, state FROM folder_versions WHERE folder_id = ? "
                       "ORDER BY version", (folder_id,))
        if not rows:
            raise NotFoundError(f"no folder with id {folder_id!r}")
        return [Version("", v, op, at, json.loads(st)) for v, op, at, st in rows]

    # ------------------------------------------------------------ messages

    def _msg_row(self, msg_id: str, *, deleted_ok: bool = False) -> tuple:
        row = self._one(f"SELECT {', '.join(_MSG_COLS)}, n FROM messages WHERE id = ?", (msg_id,))
        if row is None:
            raise NotFoundError(f"no message with id {msg_id!r}")
        if row[_MSG_COLS.index("deleted")] is not None and not deleted_ok:
            raise NotFoundError(f"message {msg_id!r} is in the trash")
        return row

    def get_message(self, msg_id: str, *, deleted_ok: bool = False) -> Message:
        return self._msg_from_row(self._msg_row(msg_id, deleted_ok=deleted_ok)[:-1])

    def message_dialogue(self, msg_id: str) -> str:
        return self._msg_row(msg_id, deleted_ok=True)[_MSG_COLS.index("dialogue_id")]

    def _positions(self, dialogue_id: str) -> list[tuple[str, float]]:
        return self._x("SELECT id, pos FROM messages WHERE dialogue_id = ? AND deleted IS NULL "
                       "ORDER BY pos", (dialogue_id,))

    def _pos_at(self, dialogue_id: str, index: int, exclude: str | None = None) -> float:
        """A position that puts a message at list index `index` (0 = first, len = last; more is
        last). Only the two neighbours are read (through the (dialogue, position) index), not
        the whole dialogue."""
        index = max(0, index)
        live = "FROM messages WHERE dialogue_id = ? AND deleted IS NULL AND id != ?"
        near = [p for (p,) in self._x(f"SELECT pos {live} ORDER BY pos LIMIT 2 OFFSET ?",
                                      (dialogue_id, exclude or "", max(0, index - 1)))]
        if index == 0:
            return near[0] - 1.0 if near else 1.0
        if len(near) < 2:  # at or past the end
            last = near[-1] if near else self._one(f"SELECT max(pos) {live}",
                                                   (dialogue_id, exclude or ""))[0]
            return 1.0 if last is None else last + 1.0
        lo, hi = near
        mid = (lo + hi) / 2
        if not lo < mid < hi or hi - lo < 1e-9:
            self._renumber(dialogue_id)
            return self._pos_at(dialogue_id, index, exclude)
        return mid

    def _renumber(self, dialogue_id: str) -> None:
        # Renumbering every live and deleted message keeps a deleted message's place meaningful
        # for its restore.
        rows = self._x("SELECT n FROM messages WHERE dialogue_id = ? ORDER BY pos", (dialogue_id,))
        for i, (n,) in enumerate(rows):
            self._x("UPDATE messages SET pos = ? WHERE n = ?", (float(i + 1), n))

    def position(self, msg_id: str) -> int:
        """A live message's 1-based place in its dialogue (ids and positions only: no message
        is decoded)."""
        return self._index_of(self.message_dialogue(msg_id), msg_id) + 1

    def _index_of(self, dialogue_id: str, msg_id: str) -> int:
        for i, (mid, _) in enumerate(self._positions(dialogue_id)):
            if mid == msg_id:
                return i
        raise NotFoundError(f"message {msg_id!r} is not in dialogue {dialogue_id!r}")

    def add_message(self, dialogue_id: str, msg: Message | None = None, *,
                    after: str | None = None, before: str | None = None,
                    index: int | None = None, op: str = "create", **fields: Any) -> Message:
        """Insert a message (at the end unless `after`, `before` or `index` says where)."""
        return self.add_messages(dialogue_id, [msg or Message(**fields)], after=after,
                                 before=before, index=index, op=op)[0]

    def add_messages(self, dialogue_id: str, msgs: list[Message], *, after: str | None = None,
                     before: str | None = None, index: int | None = None,
                     op: str = "create") -> list[Message]:
        """Insert several messages in order, in one transaction (an import, a fork)."""
        with self.tx(), _gc_paused():
            now = time.time()
            if after is None and before is None and index is None:
                # append, the common case: the dialogue, its last position and the next row
                # number in one query, no need to list positions
                row = self._one("SELECT deleted, (SELECT max(pos) FROM messages WHERE "
                                "dialogue_id = ?1), (SELECT coalesce(max(n), 0) + 1 FROM messages) "
                                "FROM dialogues WHERE id = ?1", (dialogue_id,))
                if row is None or row[0] is not None:
                    self._dialogue_row(dialogue_id)  # raises the NotFoundError that says which
                last = row[1] or 0.0
                self._insert(dialogue_id, msgs, [last + 1.0 + i for i in range(len(msgs))], now,
                             op, first=row[2])
            else:
                self._dialogue_row(dialogue_id)
                if after is not None:
                    index = self._index_of(dialogue_id, after) + 1
                elif before is not None:
                    index = self._index_of(dialogue_id, before)
                for i, m in enumerate(msgs):
                    # _pos_at needs the row to exist to place the next one after it
                    self._insert(dialogue_id, [m], [self._pos_at(dialogue_id, index + i)], now, op)
            self._touch(dialogue_id, now)
            return [_copy_message(m) for m in msgs]  # (10,000 dicts: still with the GC paused)

    def _insert(self, dialogue_id: str, msgs: list[Message], positions: list[float], now: float,
                op: str, first: int | None = None) -> None:
        """Insert messages, their search rows and first versions with one statement per table
        (executemany): an import of 10,000 messages is then bound by SQLite, not by Python
        calls. Row numbers are given, not taken from SQLite, so the search rows can name them;
        the write lock of the transaction keeps max(n) ours. An id already stored (or twice in
        `msgs`) is replaced by a new one, as ids are random and short: the rows go in under a
        savepoint, and only if the UNIQUE id constraint refuses them are the ids looked up
        (rather than looking up every id of every import first)."""
        if first is None:
            first = self._one("SELECT coalesce(max(n), 0) + 1 FROM messages")[0]
        self._x("SAVEPOINT insert_messages")
        try:
            self._insert_rows(dialogue_id, msgs, positions, now, op, first)
        except apsw.ConstraintError:
            self._x("ROLLBACK TO insert_messages")
            self._fresh_ids(msgs)
            self._insert_rows(dialogue_id, msgs, positions, now, op, first)
        self._x("RELEASE insert_messages")

    def _fresh_ids(self, msgs: list[Message]) -> None:
        """Give a new id to each message whose id is stored already or came earlier in `msgs`."""
        ids = [m.id for m in msgs]
        taken: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            taken.update(r[0] for r in self._x(
                f"SELECT id FROM messages WHERE id IN ({', '.join('?' * len(chunk))})", chunk))
        seen: set[str] = set()
        for m in msgs:
            if m.id in taken or m.id in seen:
                m.id = new_id()
                while m.id in seen or self._one("SELECT 1 FROM messages WHERE id = ?", (m.id,)):
                    m.id = new_id()
            seen.add(m.id)

    def _insert_rows(self, dialogue_id: str, msgs: list[Message], positions: list[float],
                     now: float, op: str, first: int) -> None:
        # In a batch (an import), a message with nothing but a kind and a source (most of them)
        # leaves every other column to its default; its search row and first version are then
        # made by SQLite from the row just inserted (one INSERT ... SELECT each, no Python per
        # message), its state {"kind": ..., "source": ...} without a code kind or an empty
        # source, as _compact_state writes it. Only the other messages' rows are made here. A
        # few messages (a CLI command adding one) take the plain statements: on a new connection
        # preparing those INSERT ... SELECTs would cost more than they save.
        bulk = len(msgs) >= _BULK
        bare_rows, msg_rows, search_rows, version_rows, full = [], [], [], [], []
        bare = bare_rows.append
        for n, m, pos in zip(range(first, first + len(msgs)), msgs, positions):
            d = m.__dict__
            d["version"], d["created"], d["updated"] = 1, now, now
            kind = d["kind"].value
            if (d["execution_count"] is None and not (
                    d["outputs"] or d["response"] or d["tool_calls"] or d["usage"]
                    or d["attachments"] or d["meta"] or d["hidden"] or d["pinned"]
                    or d["collapsed"] or d["exported"])):
                source = d["source"]
                bare((n, d["id"], dialogue_id, pos, kind, source, now, now))
                if not bulk:  # the same rows as the INSERT ... SELECTs below make
                    search_rows.append((n, source, ""))
                    version_rows.append((dialogue_id, d["id"], op, now, _bare_state(kind, source)))
                continue
            full.append(n)
            msg_rows.append((n, m.id, dialogue_id, pos, kind, m.source, _dumps(m.outputs),
                             m.execution_count, m.response, _dumps(m.tool_calls), _dumps(m.usage),
                             _dumps(m.attachments), _dumps(m.meta), int(m.hidden), int(m.pinned),
                             int(m.collapsed), int(m.exported), now, now))
            search_rows.append((n, m.source, _search_output(kind, m.outputs, m.response)))
            version_rows.append((dialogue_id, m.id, op, now,
                                 self._state_json(_compact_message_state(m))))
        self._many("INSERT INTO messages(n, id, dialogue_id, pos, kind, source, created, updated) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", bare_rows)
        self._many(
            "INSERT INTO messages(n, id, dialogue_id, pos, kind, source, outputs, execution_count, "
            "response, tool_calls, usage, attachments, meta, hidden, pinned, collapsed, exported, "
            "version, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "1, ?, ?)", msg_rows)
        if bare_rows and bulk:
            # the bare rows are the new row numbers but those of the others
            where = ("FROM messages WHERE n BETWEEN ?1 AND ?2 AND n NOT IN "
                     "(SELECT value FROM json_each(?3)) ORDER BY n")
            args = (first, first + len(msgs) - 1, _dumps(full))
            self._x(f"INSERT INTO search(rowid, source, output) SELECT n, source, '' {where}", args)
            self._x("INSERT INTO versions(dialogue_id, message_id, version, op, at, author, "
                    "cause, state) SELECT dialogue_id, id, 1, ?4, ?5, ?6, ?7, CASE "  # _bare_state
                    "WHEN kind = 'code' AND source = '' THEN '{}' "
                    "WHEN kind = 'code' THEN json_object('source', source) "
                    "WHEN source = '' THEN json_object('kind', kind) "
                    f"ELSE json_object('kind', kind, 'source', source) END {where}",
                    (*args, op, now, *_ACTOR.get()))
        self._many("INSERT INTO search(rowid, source, output) VALUES (?, ?, ?)", search_rows)
        actor = _ACTOR.get()
        self._many("INSERT INTO versions(dialogue_id, message_id, version, op, at, state, author, "
                   "cause) VALUES (?, ?, 1, ?, ?, ?, ?, ?)", [(*r, *actor) for r in version_rows])

    def update_message(self, msg_id: str, *, base_version: int | None, op: str = "edit",
                       **changes: Any) -> Message:
        """Change any of a message's versioned fields (source, kind, outputs, response, flags, ...)
        and write a version, in one transaction. Refused with ConflictError if `base_version` is
        not the current version; `base_version=None` skips that check and is meant for system
        writers (a kernel run storing outputs), never for a person's edit. A change that changes
        nothing writes nothing."""
        bad = set(changes) - set(STATE_FIELDS)
        if bad:
            raise StoreError(f"cannot change {', '.join(sorted(bad))} of a message")
        if "kind" in changes:
            changes["kind"] = Kind(changes["kind"]) if changes["kind"] in Kind._value2member_map_ \
                else Message(kind=changes["kind"]).kind  # raises the clear ValueError
        with self.tx():
            row = self._msg_row(msg_id)
            m = self._msg_from_row(row[:-1])
            n, dialogue_id = row[-1], row[_MSG_COLS.index("dialogue_id")]
            if base_version is not None:
                if base_version != m.version and self.changed_since(msg_id, base_version):
                    raise ConflictError(f"message {msg_id}", base_version, m.version)
                if row[_MSG_COLS.index("streaming")]:
                    raise ConflictError(f"message {msg_id}", base_version, m.version,
                                        "it is being written by a running cell or model")
            new = {k: v for k, v in changes.items() if getattr(m, k) != v}
            if not new:
                return m
            for k, v in new.items():
                setattr(m, k, v)
            self._save_state(m, n, dialogue_id, op, streaming=False)
        return m

    def _save_state(self, m: Message, n: int, dialogue_id: str, op: str, *, streaming: bool) -> None:
        m.version += 1
        m.updated = time.time()
        s = m.state()
        self._x(
            "UPDATE messages SET kind = ?, source = ?, outputs = ?, execution_count = ?, "
            "response = ?, tool_calls = ?, usage = ?, attachments = ?, meta = ?, hidden = ?, "
            "pinned = ?, collapsed = ?, exported = ?, version = ?, streaming = ?, updated = ?, "
            "owner = NULL WHERE n = ?",
            (s["kind"], m.source, _dumps(m.outputs), m.execution_count, m.response,
             _dumps(m.tool_calls), _dumps(m.usage), _dumps(m.attachments), _dumps(m.meta),
             *(int(getattr(m, f)) for f in FLAGS), m.version, int(streaming), m.updated, n))
        self._index(n, s["kind"], m.source, m.outputs, m.response)
        self._write_version(dialogue_id, m.id, m.version, op, s, m.updated)
        self._touch(dialogue_id, m.updated)

    def set_flags(self, msg_id: str, *, base_version: int | None, **flags: bool) -> Message:
        bad = set(flags) - set(FLAGS)
        if bad:
            raise StoreError(f"unknown flag(s) {', '.join(sorted(bad))}; flags are "
                             f"{', '.join(FLAGS)}")
        return self.update_message(msg_id, base_version=base_version, op="flags",
                                   **{k: bool(v) for k, v in flags.items()})

    # ------------------------------------------------------------ streaming

    def begin_stream(self, msg_id: str, *, clear: bool = True, base_version: int | None = None,
                     **changes: Any) -> Message:
        """Mark a message as being written by this Store (a model answering, a cell running). With
        `clear`, the previous answer or outputs are cleared first, as a version, so they stay in
        history. A message another live process is writing is refused; one whose writer died is
        recovered first, so what it wrote stays in history too."""
        with self.tx():
            row = self._one("SELECT streaming, owner FROM messages WHERE id = ?", (msg_id,))
            if row and row[0] and row[1] != self._token:
                dead, fd = self._locks.claim_dead(row[1])
                if not dead:
                    pid = self._locks.pid_of(row[1])
                    raise StoreError(f"message {msg_id} is being written by another process"
                                     + (f" (pid {pid})" if pid else "") + "; wait for it to "
                                     "finish, or stop it there")
                self._recover_one(msg_id, row[1])
                self._locks.forget(row[1], fd)
            m = self.get_message(msg_id)
            if clear:
                changes.setdefault("response" if m.kind == Kind.prompt else "outputs",
                                   "" if m.kind == Kind.prompt else [])
                if m.kind == Kind.prompt:
                    changes.setdefault("tool_calls", [])
                    changes.setdefault("usage", {})
            m = self.update_message(msg_id, base_version=base_version, op="run", **changes)
            self._x("UPDATE messages SET streaming = 1, owner = ? WHERE id = ?",
                    (self._owner_token(), msg_id))
        return m

    def _owner_token(self) -> str:
        """This Store's owner token, its lock taken the first time it begins a stream."""
        if self._token is None:
            # Lock files are made only here, so this is where the ones of Stores that died
            # without a stream to recover are cleared: a command that never streams (most of
            # them) does no lock-file work at all.
            self._locks.sweep(keep=set())
            self._token, self._token_fd = self._locks.hold_run()
        return self._token

    def stream_append(self, msg_id: str, *, text: str = "", output: dict | None = None,
                      outputs: list | None = None, tool_calls: list | None = None,
                      meta: dict | None = None) -> None:
        """Append streamed text to a prompt's answer, or one output (or replace all outputs) of a
        code message; replace an answer's tool calls so far, or its meta (a pending approval:
        approvals.py). Committed at once, without a version: `finish_stream` writes that."""
        with self.tx():
            if tool_calls is not None:
                self._x("UPDATE messages SET tool_calls = ?, updated = ? WHERE id = ?",
                        (_dumps(tool_calls), time.time(), msg_id))
            if meta is not None:
                self._x("UPDATE messages SET meta = ?, updated = ? WHERE id = ?",
                        (_dumps(meta), time.time(), msg_id))
            if text:
                self._x("UPDATE messages SET response = response || ?, updated = ? WHERE id = ?",
                        (text, time.time(), msg_id))
            if output is not None:
                self._x("UPDATE messages SET outputs = json_insert(outputs, '$[#]', json(?)), "
                        "updated = ? WHERE id = ?", (_dumps(output), time.time(), msg_id))
            if outputs is not None:
                self._x("UPDATE messages SET outputs = ?, updated = ? WHERE id = ?",
                        (_dumps(outputs), time.time(), msg_id))

    def finish_stream(self, msg_id: str, *, op: str = "result", **changes: Any) -> Message:
        """End a stream: store the final fields, write one version, clear the streaming mark."""
        with self.tx():
            row = self._msg_row(msg_id, deleted_ok=True)
            m = self._msg_from_row(row[:-1])
            for k, v in changes.items():
                if k not in STATE_FIELDS:
                    raise StoreError(f"cannot change {k} of a message")
                setattr(m, k, v)
            self._save_state(m, row[-1], row[_MSG_COLS.index("dialogue_id")], op, streaming=False)
        return m

    def recover_interrupted(self) -> list[str]:
        """Turn streams whose writer is gone (its process was killed or crashed, or its Store was
        closed mid-stream) into versions marked interrupted: `meta.interrupted`, and for code
        `meta.run` status "interrupted". A stream whose writer is alive, in this process or
        another, is never touched, so this is safe from any process at any time; every open
        calls it. Returns the ids recovered."""
        rows = self._x("SELECT id, owner FROM messages WHERE streaming = 1")
        verdicts: dict[str | None, tuple[bool, int | None]] = {}
        done = []
        try:
            for mid, owner in rows:
                if owner is not None and owner == self._token:
                    continue  # ours, and we are alive
                if owner not in verdicts:
                    verdicts[owner] = self._locks.claim_dead(owner)
                if verdicts[owner][0] and self._recover_one(mid, owner):
                    done.append(mid)
        finally:
            for owner, (_, fd) in verdicts.items():
                self._locks.forget(owner, fd)
        return done

    def _recover_one(self, msg_id: str, owner: str | None) -> bool:
        with self.tx():
            row = self._one("SELECT streaming, owner FROM messages WHERE id = ?", (msg_id,))
            if not row or not row[0] or row[1] != owner:
                return False  # finished, or recovered by another process meanwhile
            m = self.get_message(msg_id, deleted_ok=True)
            # a tool call still waiting for the user's approval is stored as denied
            meta, calls = settle_pending({**m.meta, "interrupted": True}, m.tool_calls)
            if m.kind == Kind.code:
                meta["run"] = {"status": "interrupted", "message": INTERRUPTED_RUN}
            self.finish_stream(msg_id, op="recovered", meta=meta, tool_calls=calls)
        return True

    def stream_writer(self, msg_id: str) -> str | None:
        """Who else is writing `msg_id` right now ("another process (pid 123)"), or None: not
        streaming, streaming by this Store, or by a writer that is gone."""
        row = self._one("SELECT streaming, owner FROM messages WHERE id = ?", (msg_id,))
        if not row or not row[0] or (row[1] is not None and row[1] == self._token):
            return None
        dead, fd = self._locks.claim_dead(row[1])
        if dead:
            if fd is not None:
                os.close(fd)
            return None
        pid = self._locks.pid_of(row[1])
        return "another process" + (f" (pid {pid})" if pid else "")

    # ------------------------------------------------------------ order, delete, restore

    def move_message(self, msg_id: str, index: int, *, relative: bool = False) -> Message:
        """Move a message to list index `index` among its dialogue's live messages (negative counts
        from the end). One message row changes, and the move is a version of the message (op
        "move:FROM:TO", 1-based places), recorded with its author and cause (`acting`) like any
        change. Its state is the previous version's, copied as stored (a move changes no content,
        and copying encodes nothing); a move does not make an edit based on the version before
        it stale (`changed_since`). `relative`: `index` is a number of places to move by
        (negative: up; see `move_by`)."""
        with self.tx():
            row = self._msg_row(msg_id)
            dialogue_id = row[_MSG_COLS.index("dialogue_id")]
            count, old = self._one("SELECT count(*), sum(pos < ?) FROM messages WHERE "
                                   "dialogue_id = ? AND deleted IS NULL",
                                   (row[_MSG_COLS.index("pos")], dialogue_id))
            if relative:
                index = max(0, old + index)
            elif index < 0:
                index += count
            index = max(0, min(index, count - 1))
            if index == old:
                return self.get_message(msg_id)
            pos = self._pos_at(dialogue_id, index, exclude=msg_id)
            v, now = row[_MSG_COLS.index("version")], time.time()
            self._x("UPDATE messages SET pos = ?, version = ?, updated = ? WHERE n = ?",
                    (pos, v + 1, now, row[-1]))
            op = f"move:{old + 1}:{index + 1}"
            self._x("INSERT INTO versions(dialogue_id, message_id, version, op, at, state, author, "
                    "cause) SELECT dialogue_id, message_id, ?, ?, ?, state, ?, ? FROM versions "
                    "WHERE message_id = ? AND version = ?", (v + 1, op, now, *_ACTOR.get(),
                                                             msg_id, v))
            if not self.conn.changes():  # no stored version to copy (not written by us)
                m = self._msg_from_row(row[:-1])
                self._write_version(dialogue_id, msg_id, v + 1, op, m.state(), now)
            self._touch(dialogue_id, now)
        return self.get_message(msg_id)

    def changed_since(self, msg_id: str, version: int) -> bool:
        """Whether message `msg_id` has a version after `version` that is not a move: a move
        changes only the message's place, so an edit (or delete) based on the version before
        it is not stale. A version from the future counts as changed."""
        cur = self._one("SELECT version FROM messages WHERE id = ?", (msg_id,))
        if cur is None or version > cur[0]:
            return True
        return self._one("SELECT 1 FROM versions WHERE message_id = ? AND version > ? AND "
                         "op NOT LIKE 'move:%' LIMIT 1", (msg_id, version)) is not None

    def move_by(self, msg_id: str, delta: int) -> Message:
        """Move up (negative) or down (positive) by `delta` places."""
        return self.move_message(msg_id, delta, relative=True)

    def delete_message(self, msg_id: str, *, base_version: int | None = None) -> None:
        """Move a message to the trash (it keeps its place for a restore)."""
        with self.tx():
            row = self._msg_row(msg_id)
            m = self._msg_from_row(row[:-1])
            if base_version is not None and base_version != m.version and \
                    self.changed_since(msg_id, base_version):
                raise ConflictError(f"message {msg_id}", base_version, m.version)
            now = time.time()
            dialogue_id = row[_MSG_COLS.index("dialogue_id")]
            self._x("UPDATE messages SET deleted = ?, version = ?, updated = ? WHERE id = ?",
                    (now, m.version + 1, now, msg_id))
            self._write_version(dialogue_id, msg_id, m.version + 1, "delete", m.state(), now)
            self._touch(dialogue_id, now)

    def restore_message(self, msg_id: str) -> Message:
        with self.tx():
            row = self._msg_row(msg_id, deleted_ok=True)
            m = self._msg_from_row(row[:-1])
            dialogue_id = row[_MSG_COLS.index("dialogue_id")]
            if row[_MSG_COLS.index("deleted")] is None:
                raise StoreError(f"message {msg_id} is not in the trash")
            self._dialogue_row(dialogue_id)  # its dialogue must be live
            now = time.time()
            self._x("UPDATE messages SET deleted = NULL, version = ?, updated = ? WHERE id = ?",
                    (m.version + 1, now, msg_id))
            self._write_version(dialogue_id, msg_id, m.version + 1, "restore", m.state(), now)
            self._touch(dialogue_id, now)
        return self.get_message(msg_id)

    def trash(self) -> list[TrashItem]:
        """Deleted dialogues, and deleted messages of live dialogues, newest first."""
        items = [TrashItem("dialogue", i, i, n, t, n) for i, n, t in self._x(
            "SELECT id, name, deleted FROM dialogues WHERE deleted IS NOT NULL")]
        items += [TrashItem("message", i, d, (src.strip().splitlines() or [""])[0][:80], t, dn,
                            pos)
                  for i, d, src, t, dn, pos in self._x(
                      "SELECT m.id, m.dialogue_id, m.source, m.deleted, d.name, 1 + (SELECT "
                      "COUNT(*) FROM messages x WHERE x.dialogue_id = m.dialogue_id AND "
                      "x.deleted IS NULL AND x.pos < m.pos) FROM messages m JOIN "
                      "dialogues d ON d.id = m.dialogue_id WHERE m.deleted IS NOT NULL AND "
                      "d.deleted IS NULL")]
        return sorted(items, key=lambda t: -t.deleted)

    # ------------------------------------------------------------ history

    # ------------------------------------------------------------ what was sent

    def save_request(self, msg_id: str, version: int, record: dict[str, Any]) -> None:
        """Keep the request answer `version` of message `msg_id` was sent with.

        A dialogue's requests grow by appending: the next prompt sends every turn the last one
        sent, then the answer and itself. So the record's `turns` and `messages` lists are
        stored as chains in `blobs`, one node per item ({"prev": the node before, "item"}) keyed
        by its hash, and the record holds the last node's hash: a later request shares every node
        of the prefix it repeats and adds only its new ones (bench/request_bench.py: the cost per
        answer stays flat however long the dialogue, where one JSON per request grows with it).
        Every string of at least `_REQUEST_BLOB_MIN` characters under a "text" key is a blob of
        its own too, so a turn edited and sent again still shares its unchanged texts."""
        def put(text: str) -> dict[str, str]:
            return {"$blob": self._put_blob(text)}

        def chain(items: list[Any]) -> str:
            nodes, prev = [], ""
            for item in items:
                node = _dumps({"prev": prev, "item": _texts_out(item, put)})
                prev = hashlib.sha256(node.encode()).hexdigest()
                nodes.append((prev, node))
            # a chain's nodes are written in order, so a stored node has its prefix stored too:
            # only the nodes after the last one stored are new
            i = len(nodes)
            while i and self._one("SELECT 1 FROM blobs WHERE hash = ?", (nodes[i - 1][0],)) is None:
                i -= 1
            for h, node in nodes[i:]:
                self._put_blob(node, h)
            return prev

        with self.tx():
            rec = _texts_out({k: v for k, v in record.items() if k not in _CHAINED}, put)
            for k in _CHAINED:
                if isinstance(record.get(k), list):
                    rec[k] = {"$chain": chain(record[k])}
            self._x("INSERT OR REPLACE INTO requests(message_id, version, at, record) "
                    "VALUES (?, ?, ?, ?)",
                    (msg_id, int(version), float(record.get("at") or time.time()), _dumps(rec)))

    def request_record(self, msg_id: str, version: int | None = None, *,
                       before: float | None = None) -> dict[str, Any] | None:
        """The request kept for answer `version` of `msg_id` (the latest one kept when None, or
        the latest kept by time `before`), read back whole from `blobs`; None when none was kept
        (an answer from before requests were recorded, an imported one, or one whose request was
        never built)."""
        if version is None:
            row = self._one("SELECT version, record FROM requests WHERE message_id = ? AND at <= ? "
                            "ORDER BY version DESC LIMIT 1",
                            (msg_id, float("inf") if before is None else float(before)))
        else:
            row = self._one("SELECT version, record FROM requests WHERE message_id = ? AND version = ?",
                            (msg_id, int(version)))
        if row is None:
            return None

        def get(h: str) -> str:
            got = self._one("SELECT data FROM blobs WHERE hash = ?", (h,))
            if got is None:
                raise DamagedError(f"{self.path}: the request of message {msg_id} names a part "
                                   "that is not in the database")
            return got[0]

        rec = _texts_in(json.loads(row[1]), get)
        for k in _CHAINED:
            if isinstance(rec.get(k), dict) and "$chain" in rec[k]:
                items, h = [], rec[k]["$chain"]
                while h:
                    node = json.loads(get(h))
                    items.append(_texts_in(node["item"], get))
                    h = node["prev"]
                rec[k] = items[::-1]
        return {**rec, "answer_version": row[0]}

    def last_version_row(self) -> int:
        """The row number of the newest version (0: none): `caused_since` reads from there."""
        return self._one("SELECT max(n) FROM versions")[0] or 0

    def caused_since(self, n: int, cause: str) -> list[tuple[str, int, bool, bool]]:
        """The messages changed by versions after row `n` whose cause is message `cause` (a cell
        scripting its dialogue through dialogue.here, in whatever process): (message id, the
        first such version, deleted now, moved), oldest change first. A range of the row
        numbers, so only the versions written since are read."""
        rows = self._x("SELECT v.message_id, min(v.version), m.deleted IS NOT NULL, min(v.n), "
                       "max(v.op LIKE 'move:%') FROM versions v JOIN messages m "
                       "ON m.id = v.message_id WHERE v.n > ? AND v.cause = ? AND "
                       "v.message_id != '' GROUP BY v.message_id ORDER BY 4", (n, cause))
        return [(mid, first, bool(gone), bool(mv)) for mid, first, gone, _, mv in rows]

    def history(self, msg_id: str) -> list[Version]:
        """Every version of a message, oldest first (a dialogue id lists the dialogue's own
        settings history)."""
        cols = "message_id, version, op, at, state, author, cause"
        rows = self._x(f"SELECT {cols} FROM versions WHERE message_id = ? ORDER BY version",
                       (msg_id,))
        if not rows:
            rows = self._x(f"SELECT {cols} FROM versions WHERE dialogue_id = ? AND "
                           "message_id = '' ORDER BY version", (msg_id,))
        if not rows:
            raise NotFoundError(f"no message or dialogue with id {msg_id!r}")
        return [Version(m, v, op, at, self._state_load(s, message=bool(m)), author_of(op, who),
                        cause) for m, v, op, at, s, who, cause in rows]

    def restore_version(self, msg_id: str, version: int, *, base_version: int | None) -> Message:
        """Make an earlier version current again, as a new version (history is never rewritten)."""
        row = self._one("SELECT state FROM versions WHERE message_id = ? AND version = ?",
                        (msg_id, version))
        if row is None:
            raise NotFoundError(f"message {msg_id!r} has no version {version}")
        state = self._state_load(row[0])
        state["kind"] = Kind(state["kind"])
        return self.update_message(msg_id, base_version=base_version, op=f"restore:{version}",
                                   **state)

    # ------------------------------------------------------------ fork

    def fork(self, dialogue_id: str, at: str, *, name: str | None = None) -> Dialogue:
        """A new dialogue holding copies of the messages up to and including `at` (with new ids),
        and the same settings. The copies record where they came from in meta."""
        src = self.get_dialogue(dialogue_id)
        upto = src.index(at) + 1
        if name is None:  # pick a free name: "x (fork)", "x (fork) 2", ...
            base = name = f"{src.name} (fork)"
            i = 2
            while self._one("SELECT 1 FROM dialogues WHERE name = ? AND deleted IS NULL", (name,)):
                name, i = f"{base} {i}", i + 1
        return self._copy(src, src.messages[:upto], name, folder=src.folder, op="fork",
                          mark="forked_from", origin={"dialogue": src.id, "message": at})

    def from_template(self, template_id: str, name: str, *, folder: str) -> Dialogue:
        """A new dialogue in `folder` starting from dialogue `template_id`: its messages (copies
        with new ids), model, system prompt, attached context and settings."""
        src = self.get_dialogue(template_id)
        return self._copy(src, src.messages, name, folder=folder, op="template",
                          mark="from_template", origin={"dialogue": src.id, "name": src.name})

    def _copy(self, src: Dialogue, msgs: list[Message], name: str, *, folder: str, op: str,
              mark: str, origin: dict[str, Any]) -> Dialogue:
        """A new dialogue holding copies of `msgs` and `src`'s settings, in one transaction; the
        dialogue's meta[mark] says where it came from and each copy's meta[mark] its original.
        A template's or fork's own origin marks are not passed on."""
        meta = {k: v for k, v in src.meta.items() if k not in ("forked_from", "from_template")}
        with self.tx():
            d = self.create_dialogue(name, model=src.model, system=src.system,
                                     context=src.context, meta={**meta, mark: origin},
                                     folder=folder)
            copies = [m.copy(id=new_id(), meta={**m.meta, mark: m.id}) for m in msgs]
            self.add_messages(d.id, copies, op=op)
        return self.get_dialogue(d.id)

    # ------------------------------------------------------------ search

    def search(self, query: str, *, limit: int = 50, raw: bool = False,
               dialogue_id: str | None = None) -> list[SearchHit]:
        """Full-text search over live messages' sources, outputs and answers, best first.

        By default every word must match (words ending in `*` match as prefixes) and FTS5's own
        syntax is escaped, so any text a user types is a valid query; `raw=True` passes FTS5
        syntax through (AND/OR/NEAR, column filters)."""
        q = query if raw else _fts_query(query)
        if not q:
            return []
        sql = ("SELECT m.dialogue_id, d.name, m.id, m.kind, "
               f"snippet(search, -1, '{HIT_START}', '{HIT_END}', '…', 12), rank "
               "FROM search JOIN messages m ON m.n = search.rowid "
               "JOIN dialogues d ON d.id = m.dialogue_id "
               "WHERE search MATCH ? AND m.deleted IS NULL AND d.deleted IS NULL "
               + ("AND m.dialogue_id = ? " if dialogue_id else "")
               + "ORDER BY rank LIMIT ?")
        params = (q, dialogue_id, limit) if dialogue_id else (q, limit)
        try:
            rows = self._x(sql, params)
        except Exception as e:  # apsw.SQLError for a malformed raw query
            raise StoreError(f"bad search query {query!r}: {e}") from e
        return [SearchHit(*r) for r in rows]


def _sqlite_says(e: Exception) -> str:
    """apsw's message without its class name ("CorruptError: database disk image is malformed"),
    on one line."""
    msg = str(e).removeprefix(f"{type(e).__name__}: ")
    return " ".join(msg.split()) or type(e).__name__


def _fts_query(text: str) -> str:
    terms = []
    for w in text.split():
        prefix = w.endswith("*")
        w = w.rstrip("*").replace('"', '""')
        if w:
            terms.append(f'"{w}"' + ("*" if prefix else ""))
    return " ".join(terms)


def _folder_path(path: str, *, allow_top: bool = False) -> str:
    """A folder path as stored: names joined by "/", each stripped, none empty ("a / b/" is
    "a/b"). "" or "/" is the top level where `allow_top`, else refused."""
    if not isinstance(path, str):
        raise StoreError("a folder path must be text")
    names = [n.strip() for n in path.strip().strip("/").split("/")]
    if names == [""]:
        if allow_top:
            return ""
        raise StoreError("a folder needs a non-empty name")
    if any(not n for n in names):
        raise StoreError(f"folder path {path!r} has an empty name between slashes")
    if any(len(n) > 200 for n in names):
        raise StoreError("a folder name is at most 200 characters")
    return "/".join(names)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StoreError("a dialogue needs a non-empty name")
    if len(name) > 200:
        raise StoreError("a dialogue name is at most 200 characters")
    return name.strip()
