"""Jupyter notebooks (.ipynb) in and out.

Reading turns a notebook into a Dialogue: code cells become code messages (outputs and execution
counts kept), markdown cells notes, raw cells raw messages; every cell's metadata, attachments
and id, and the notebook's metadata, are kept so that writing the dialogue back gives the same
notebook (semantically: `nbformat.read` of both is equal, apart from the `dialogue` key we add to
the notebook metadata and the 4.5 minor version with cell ids). Writing gives an nbformat 4.5
notebook that `nbformat.validate` accepts.

Reading is all-or-nothing: any problem raises NotebookError (or a subclass) with a message that
says what is wrong and where, and nothing partial is returned. A file over `max_bytes` is refused
from its size before it is read; a stream is read in chunks and refused as soon as it passes the
limit, so a 200 MB upload never sits in memory.

Conventions, and where each comes from
--------------------------------------
Flags live in cell metadata under the keys solveit uses, so our notebooks open in solveit and
solveit's open here. No formal specification of solveit's file format was found; these keys were
read from notebooks solveit itself wrote (public repositories) and from AnswerDotAI's
`dialoghelper` (the library solveit ships for editing dialogs):

- prompt: a markdown cell with `metadata.solveit_ai: true`, the prompt and the answer in one
  source separated by `\\n\\n##### 🤖Reply🤖<!-- SOLVEIT_SEPARATOR_7f3a9b2c -->\\n\\n` (solveit
  writes that exact line, id included, in files from its 2025-2026 versions: e.g.
  civvic/dutil explorer/ask/ask.ipynb). The older `##### Reply<!-- SOLVEIT_SEPARATOR_<hex> -->`
  form is read too (third-party readers of solveit files keep support for it as "legacy").
- pinned: `metadata.pinned: true` (seen in solveit-written files, civvic/dutil
  explorer/ask/linked_msg.ipynb).
- hidden: solveit calls it "skipped" ("Hide message from prompt?", dialoghelper `add_msg`'s
  `skipped` field). Stored as `metadata.skipped: true`: this one is inferred, not seen in a
  solveit-written file: the field name is dialoghelper's, pinned (same family of message
  fields) is stored under its own name, and a solveit user's dialog (civvic/dutil
  linked_msg.ipynb) lists "pin, collapse, skip" as what solveit keeps in cell metadata.
  Written as `true`; `1` is read too (dialoghelper reports flags as 0/1). If solveit turns out
  to use another key, only `_FLAG_KEYS` changes.
- collapsed: `metadata.collapsed: true`, Jupyter's own key for folded outputs, which solveit also
  writes on code cells. Other folding keys solveit writes (`hide_input`, `heading_collapsed`)
  are kept as metadata untouched.
- exported: solveit, like nbdev, marks exported code with the `#| export` directive in the source
  (nbdev's documented syntax; `#| exports` and `#| exporti` count too). A cell with such a
  directive reads as exported. When our flag disagrees with the source (flagged without a
  directive, or unflagged with one), `metadata.is_exported` (dialoghelper's field name; our
  choice of where to put it) records the flag and wins on reading.
- notebook metadata `solveit_dialog_mode`, `solveit_ver`, or the newer `solveit: {mode, ver, ...}`
  object (AnswerDotAI/dialoghelper nbs/example.ipynb) are kept as they are.
- tool calls inside a solveit answer (`<details class='tool-usage-details'>` blocks holding the
  call as JSON) stay part of the answer text: that is how solveit shows them and sends them back
  to the model.

Our own additions sit under one key, `metadata.dialogue`, which the reader consumes:
- on a cell: whatever the cell type cannot hold natively (a prompt's
  `tool_calls` and `usage`; anything unusual, such as attachments on a code message), so that a
  dialogue -> notebook -> dialogue round trip restores every message exactly;
- on the notebook: `{name, id, model, system, context}` of the dialogue.
When a prompt is edited in Jupyter, its source wins: it is split at the separator again.

A notebook is data. Ids in it are kept only when they have the shape of the ids we make
(`trust.is_local_id`: 8 lower-case hex digits, never all digits), so a cell id "1" never shadows a
position and `metadata.dialogue.id = "../d/<id>"` never becomes an id; other cells get fresh ids.
The model and system prompt are read as the file states them: whether a store adopts them is the
service's decision (`DialogueService.import_dialogue`, `trust.vet_import`), not the reader's.
A falsy flag key (`collapsed: false`, which classic Jupyter writes) is left in the metadata as it
was, so plain notebooks round-trip unchanged.
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from pathlib import Path
from typing import IO, Any

import nbformat
from nbformat import NotebookNode
from nbformat.validator import ValidationError, normalize

from dialogue.artifacts.module import export_directive
from dialogue.document import ContextItem, Dialogue, Kind, Message, new_id
from dialogue.kernel.outputs import collapse_stream
from dialogue.trust import is_local_id
from dialogue.progress import OnProgress, Steps

__all__ = ["read_notebook", "write_notebook", "to_ipynb_bytes", "NotebookError",
           "NotebookTooLarge", "NotebookVersionError", "DEFAULT_MAX_BYTES", "SEPARATOR",
           "split_prompt"]

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
"""Largest notebook read by default (100 MiB). Real notebooks with many plots reach tens of MB;
more than this is an upload mistake or an attack, and json.loads would need several times it."""

SEPARATOR = "\n\n##### 🤖Reply🤖<!-- SOLVEIT_SEPARATOR_7f3a9b2c -->\n\n"
_SEP_EXACT = re.compile(r"\n\n##### (?:🤖Reply🤖|Reply)<!-- SOLVEIT_SEPARATOR_[0-9a-fA-F]+ -->\n\n")
_SEP_LOOSE = re.compile(
    r"^[ \t]*##### (?:🤖Reply🤖|Reply)<!-- SOLVEIT_SEPARATOR_[0-9a-fA-F]+ -->[ \t]*$", re.M)
_CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")
_KEY = "dialogue"
_FLAG_KEYS = {"pinned": "pinned", "hidden": "skipped", "collapsed": "collapsed"}
"""Message flag -> the cell metadata key that stores it (solveit's and Jupyter's names)."""
_TRANSIENT_NB_META = ("orig_nbformat", "orig_nbformat_minor", "signature")


class NotebookError(ValueError):
    """The input is not a notebook we can read (or write). The message says what and where."""


class NotebookTooLarge(NotebookError):
    """The notebook is larger than the configured limit; it was not read."""


class NotebookVersionError(NotebookError):
    """The notebook's nbformat major version is not one we read (too new, or unknown)."""


# ---------------------------------------------------------------- reading

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | IO[str] | dict


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _read_limited(src: Any, max_bytes: int) -> tuple[bytes | str, str]:
    """The raw content of a path, bytes or stream, refusing anything over max_bytes without
    reading more than max_bytes + one chunk. Returns (content, a label for error messages)."""
    if isinstance(src, str) and src.lstrip().startswith("{"):
        # notebook JSON passed as text (no notebook file name starts with "{")
        if len(src) > max_bytes:
            raise NotebookTooLarge(f"the notebook text is {_mb(len(src))}, larger than the "
                                   f"{_mb(max_bytes)} limit; nothing was imported")
        return src, "notebook"
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        label = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotebookError(f"{label}: no such file") from None
        except (OSError, ValueError) as e:
            raise NotebookError(f"{label}: cannot read: {getattr(e, 'strerror', None) or e}") \
                from None
        if path.is_dir():
            raise NotebookError(f"{label}: is a directory, not a notebook file")
        if size > max_bytes:
            raise NotebookTooLarge(f"{label}: {_mb(size)} is larger than the {_mb(max_bytes)} "
                                   "limit for a notebook; nothing was imported")
        with path.open("rb") as f:
            return _read_stream(f, max_bytes, label), label
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) > max_bytes:
            raise NotebookTooLarge(f"the upload is {_mb(len(src))}, larger than the "
                                   f"{_mb(max_bytes)} limit for a notebook; nothing was imported")
        return bytes(src), "notebook"
    if hasattr(src, "read"):
        label = str(getattr(src, "name", "") or "notebook")
        return _read_stream(src, max_bytes, label), label
    raise TypeError(f"read_notebook takes a path, bytes, a binary stream or a dict, not "
                    f"{type(src).__name__}")


def _read_stream(f: IO[Any], max_bytes: int, label: str) -> bytes | str:
    chunks: list[Any] = []
    total = 0
    while True:
        chunk = f.read(min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise NotebookTooLarge(f"{label}: larger than the {_mb(max_bytes)} limit for a "
                                   "notebook (stopped reading there); nothing was imported")
    if chunks and isinstance(chunks[0], str):
        return "".join(chunks)
    return b"".join(chunks)


def _parse_json(raw: bytes | str, label: str) -> Any:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise NotebookError(f"{label}: not a notebook: the file is not UTF-8 text "
                                f"(byte {e.start})") from None
    if not raw.strip():
        raise NotebookError(f"{label}: not a notebook: the file is empty")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        what = "truncated JSON (it ends before the notebook does)" if _looks_truncated(raw) \
            else "invalid JSON"
        raise NotebookError(f"{label}: not a notebook: {what}: {e.msg} at line {e.lineno}, "
                            f"column {e.colno}") from None
    except RecursionError:
        raise NotebookError(f"{label}: not a notebook: JSON nested too deeply") from None


def _looks_truncated(raw: str) -> bool:
    """Whether broken JSON is a cut-off document (an upload that stopped, a disk that filled)
    rather than a malformed one: outside strings, more brackets open than close, or a string
    left open at the end. Only run on the error path."""
    body = re.sub(r'"(?:[^"\\]|\\.)*"', "", raw)
    if body.count('"') % 2:
        return True
    return body.count("{") + body.count("[") > body.count("}") + body.count("]")


def _check_structure(d: Any, label: str) -> tuple[int, int]:
    """Refuse what nbformat would fail on obscurely (or accept wrongly); return (major, minor)."""
    if not isinstance(d, dict):
        raise NotebookError(f"{label}: not a notebook: the JSON top level is a "
                            f"{type(d).__name__}, not an object with 'cells'")
    if "nbformat" not in d:
        raise NotebookError(f"{label}: not a notebook: no 'nbformat' version key")
    major, minor = d.get("nbformat"), d.get("nbformat_minor", 0)
    if not isinstance(major, int) or isinstance(major, bool) or not isinstance(minor, int):
        raise NotebookError(f"{label}: not a notebook: 'nbformat' must be an integer, "
                            f"got {major!r}")
    if major > nbformat.current_nbformat:
        raise NotebookVersionError(
            f"{label}: nbformat {major}.{minor} is newer than this version of dialogue reads "
            f"(up to {nbformat.current_nbformat}.x); open and save it with the Jupyter that wrote "
            "it as an nbformat 4 notebook, or upgrade dialogue")
    if major not in nbformat.versions:
        raise NotebookVersionError(f"{label}: nbformat {major}.{minor} is not a known notebook "
                                   "format version")
    if major == 4:
        if "cells" not in d:
            raise NotebookError(f"{label}: not a valid notebook: the 'cells' list is missing")
        if not isinstance(d["cells"], list):
            raise NotebookError(f"{label}: not a valid notebook: 'cells' is a "
                                f"{type(d['cells']).__name__}, not a list")
        for i, c in enumerate(d["cells"]):
            if not isinstance(c, dict):
                raise NotebookError(f"{label}: cell {i + 1} is a {type(c).__name__}, not an object")
            ct = c.get("cell_type")
            if ct not in ("code", "markdown", "raw"):
                raise NotebookError(f"{label}: cell {i + 1} has cell_type {ct!r}; only code, "
                                    "markdown and raw cells can be read")
    elif major == 3:
        if not isinstance(d.get("worksheets"), list):
            raise NotebookError(f"{label}: not a valid nbformat 3 notebook: 'worksheets' is "
                                "missing")
        for i, ws in enumerate(d["worksheets"]):
            if not isinstance(ws, dict) or not isinstance(ws.get("cells"), list):
                raise NotebookError(f"{label}: not a valid nbformat 3 notebook: worksheet "
                                    f"{i + 1} has no 'cells' list")
    return major, minor


def _validation_message(e: Exception) -> str:
    path = list(getattr(e, "absolute_path", None) or getattr(e, "path", None) or [])
    where = ""
    if len(path) >= 2 and path[0] == "cells" and isinstance(path[1], int):
        where = f"cell {path[1] + 1}" + "".join(f"[{p!r}]" for p in path[2:]) + ": "
    elif path:
        where = "".join(f"[{p!r}]" for p in path) + ": "
    msg = getattr(e, "message", None) or str(e).splitlines()[0]
    return where + msg


def _to_v4(d: dict[str, Any], major: int, minor: int, label: str) -> NotebookNode:
    """A validated nbformat 4.5 NotebookNode (strings rejoined, transient keys dropped)."""
    try:
        # to_notebook_json builds new containers (from_dict), so the caller's dict is untouched
        nb = nbformat.versions[major].to_notebook_json(d, minor=minor)
        if major < 4:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nb = nbformat.convert(nb, 4)
            for k in _TRANSIENT_NB_META:
                nb.metadata.pop(k, None)
            for c in nb.cells:
                if c.cell_type not in ("code", "markdown", "raw"):
                    raise NotebookError(f"{label}: a cell of type {c.cell_type!r} cannot be read")
        if nb.get("nbformat_minor", 0) < 5:
            # 4.5 added cell ids; keep ids a 4.x writer already put there, add the missing ones
            # (`normalize` below), and keep no `orig_nbformat_minor` trace (nbformat drops it on
            # read anyway).
            nb.nbformat_minor = 5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "missing id" / "duplicate id" repairs are expected
            _, nb = normalize(nb)
        nb = nbformat.from_dict(nb)
        nbformat.validate(nb)
    except NotebookError:
        raise
    except ValidationError as e:
        raise NotebookError(f"{label}: not a valid notebook: {_validation_message(e)}") from None
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise NotebookError(f"{label}: not a valid notebook: {type(e).__name__}: {e}") from None
    return nb


def _plain(x: Any) -> Any:
    """NotebookNode -> plain dicts and lists (Message/Dialogue hold plain JSON data)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _outputs(outputs: Any) -> Any:
    """A code cell's outputs as plain data, each stream's text as Jupyter shows it: a notebook
    saved with the raw text of a progress bar (one redraw a line once its \\r are lost) is
    stored as its last state, as JupyterLab keeps it once it has opened the file."""
    out = _plain(outputs)
    if isinstance(out, list):
        out = [{**o, "text": collapse_stream(o["text"])}
               if isinstance(o, dict) and o.get("output_type") == "stream"
               and isinstance(o.get("text"), str) else o for o in out]
    return out


def _truthy_flag(meta: dict[str, Any], key: str) -> bool:
    """Pop `key` when it is set (true or 1) and say so; leave a falsy value in place."""
    v = meta.get(key)
    if v is True or (isinstance(v, int) and not isinstance(v, bool) and v != 0):
        del meta[key]
        return True
    return False


def split_prompt(source: str) -> tuple[str, str]:
    """A solveit prompt cell's source -> (prompt, answer). Exact for sources we (or solveit)
    wrote with the standard separator; a hand-edited separator line still splits, stripped."""
    m = _SEP_EXACT.search(source)
    if m:
        return source[:m.start()], source[m.end():]
    m = _SEP_LOOSE.search(source)
    if m:
        return source[:m.start()].strip(), source[m.end():].strip()
    return source, ""


def _render_prompt(prompt: str, response: str) -> str:
    return prompt + SEPARATOR + response if response else prompt


def _check_type(label: str, i: int, name: str, v: Any, typ: type | tuple[type, ...]) -> Any:
    if not isinstance(v, typ):
        want = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise NotebookError(f"{label}: cell {i + 1}: metadata.dialogue.{name} must be {want}, "
                            f"not {type(v).__name__}")
    return v


_EXTRA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "outputs": list, "execution_count": (int, type(None)), "response": str, "tool_calls": list,
    "usage": dict, "attachments": dict}


def _cell_to_message(cell: NotebookNode, i: int, label: str, keep_ids: bool,
                     seen: set[str]) -> Message:
    meta = _plain(cell.get("metadata", {}))
    ours = meta.pop(_KEY, None)
    if ours is not None and not isinstance(ours, dict):
        raise NotebookError(f"{label}: cell {i + 1}: metadata.dialogue must be an object")
    ours = ours or {}
    source = cell.get("source", "")
    ct = cell.cell_type
    fields: dict[str, Any] = {"meta": meta, "source": source}
    if ct == "code":
        fields.update(kind=Kind.code, outputs=_outputs(cell.get("outputs", [])),
                      execution_count=cell.get("execution_count"))
    elif ct == "raw":
        fields["kind"] = Kind.raw
    else:
        is_prompt = _truthy_flag(meta, "solveit_ai") or ours.get("kind") == "prompt"
        fields["kind"] = Kind.prompt if is_prompt else Kind.note
        if is_prompt:
            prompt, response = split_prompt(source)
            p, r = ours.get("prompt"), ours.get("response")
            if isinstance(p, str) and isinstance(r, str) and _render_prompt(p, r) == source:
                prompt, response = p, r  # a prompt that itself contains a separator line
            fields.update(source=prompt, response=response)
    if "attachments" in cell:
        fields["attachments"] = _plain(cell["attachments"])
    for name, typ in _EXTRA_FIELDS.items():
        if name in ours:
            fields[name] = _check_type(label, i, name, ours[name], typ)
    for flag, key in _FLAG_KEYS.items():
        fields[flag] = _truthy_flag(meta, key)
    if "is_exported" in meta and isinstance(meta["is_exported"], (bool, int)):
        fields["exported"] = bool(meta.pop("is_exported"))
    else:
        fields["exported"] = ct == "code" and export_directive(source) is not None
    cid = cell.get("id")
    if keep_ids and is_local_id(cid) and cid not in seen:
        fields["id"] = cid
    else:
        fields["id"] = new_id()
        while fields["id"] in seen:
            fields["id"] = new_id()
    seen.add(fields["id"])
    return Message(**fields)


def read_notebook(src: Source, *, name: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                  keep_ids: bool = True, on_progress: OnProgress | None = None) -> Dialogue:
    """Read a notebook (a path, notebook JSON as bytes or text, a binary or text stream, or an
    already-parsed dict) into a Dialogue.

    `name` defaults to the name our export recorded, else the file's stem, else "notebook".
    `keep_ids` keeps cell ids that have the shape of our ids as message ids (and such a dialogue
    id as the dialogue's), so re-importing what we exported keeps message identity; any other
    cell gets a fresh id. Pass False to get fresh ids throughout. Raises NotebookError; returns
    nothing partial. `on_progress` hears the reading and parsing, then the cells converted."""
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    if isinstance(src, dict):
        label, d = "notebook", src
    else:
        with Steps(on_progress, "reading the notebook", total=None):
            raw, label = _read_limited(src, max_bytes)
            d = _parse_json(raw, label)
    with Steps(on_progress, "checking the notebook", total=None):
        major, minor = _check_structure(d, label)
        nb = _to_v4(d, major, minor, label)

    nb_meta = _plain(nb.metadata)
    ours = nb_meta.pop(_KEY, None)
    if ours is not None and not isinstance(ours, dict):
        raise NotebookError(f"{label}: metadata.dialogue must be an object")
    ours = ours or {}
    seen: set[str] = set()
    steps = Steps(on_progress, "converting cells", total=len(nb.cells), unit="cells")
    messages = []
    for i, c in enumerate(nb.cells):
        messages.append(_cell_to_message(c, i, label, keep_ids, seen))
        steps.advance()
    steps.finish()

    default_name = "notebook"
    if isinstance(src, os.PathLike) or (isinstance(src, str) and label != "notebook"):
        default_name = Path(src).stem
    else:
        stream_name = getattr(src, "name", None)
        if isinstance(stream_name, str) and stream_name:
            default_name = Path(stream_name).stem
    dname = name or (ours.get("name") if isinstance(ours.get("name"), str) else None) \
        or default_name
    kw: dict[str, Any] = {}
    if keep_ids and is_local_id(ours.get("id")):
        kw["id"] = ours["id"]
    try:
        context = [ContextItem.from_dict(c) for c in ours.get("context", [])]
    except (TypeError, AttributeError):
        raise NotebookError(f"{label}: metadata.dialogue.context must be a list of objects "
                            "with name and content") from None
    return Dialogue(name=dname, model=str(ours.get("model", "") or ""),
                    system=str(ours.get("system", "") or ""), context=context,
                    messages=messages, meta=nb_meta, **kw)


# ---------------------------------------------------------------- writing

def _native_fields(kind: Kind) -> set[str]:
    return {Kind.code: {"outputs", "execution_count"}, Kind.note: {"attachments"},
            Kind.raw: {"attachments"}, Kind.prompt: {"attachments", "response"}}[kind]


def _message_to_cell(m: Message) -> NotebookNode:
    meta = copy.deepcopy(m.meta)
    if _KEY in meta:
        raise NotebookError(f"message {m.id}: metadata key {_KEY!r} is reserved for dialogue's "
                            "own notebook fields")
    ours: dict[str, Any] = {}
    native = _native_fields(m.kind)
    defaults = Message()
    for name in _EXTRA_FIELDS:
        value = getattr(m, name)
        if name not in native and value != getattr(defaults, name):
            ours[name] = copy.deepcopy(value)
    for flag, key in _FLAG_KEYS.items():
        if getattr(m, flag):
            meta[key] = True
    if m.kind == Kind.code:
        if m.exported != (export_directive(m.source) is not None):
            meta["is_exported"] = m.exported
    elif m.exported:
        meta["is_exported"] = True
    cid = m.id if _CELL_ID.match(m.id or "") else None
    attachments = copy.deepcopy(m.attachments) if m.attachments and "attachments" in native \
        else None
    # Cells are built as plain dicts and the notebook validated once in write_notebook:
    # nbformat's new_*_cell helpers validate every cell (2000 cells: 4 s instead of 1 s).
    cell: dict[str, Any] = {"id": cid or nbformat.v4.nbbase.random_cell_id()}
    if m.kind == Kind.code:
        cell.update(cell_type="code", source=m.source, execution_count=m.execution_count,
                    outputs=copy.deepcopy(m.outputs))
    elif m.kind == Kind.raw:
        cell.update(cell_type="raw", source=m.source)
    else:
        source = m.source
        if m.kind == Kind.prompt:
            meta["solveit_ai"] = True  # the prompt marker; solveit reads it too
            source = _render_prompt(m.source, m.response)
            if split_prompt(source) != (m.source, m.response):
                ours.update(prompt=m.source, response=m.response)
        cell.update(cell_type="markdown", source=source)
    if attachments:
        cell["attachments"] = attachments
    if ours:
        meta[_KEY] = ours
    cell["metadata"] = meta
    return nbformat.from_dict(cell)


def write_notebook(dialogue: Dialogue) -> NotebookNode:
    """The dialogue as an nbformat 4.5 notebook (validated). Raises NotebookError when a message
    holds something a notebook cannot (an output that is not nbformat-shaped)."""
    meta = copy.deepcopy(dialogue.meta)
    if _KEY in meta:
        raise NotebookError(f"dialogue {dialogue.name!r}: notebook metadata key {_KEY!r} is "
                            "reserved for dialogue's own fields")
    ours: dict[str, Any] = {"name": dialogue.name, "id": dialogue.id}
    if dialogue.model:
        ours["model"] = dialogue.model
    if dialogue.system:
        ours["system"] = dialogue.system
    if dialogue.context:
        ours["context"] = [c.to_dict() for c in dialogue.context]
    meta[_KEY] = ours
    nb = nbformat.v4.new_notebook(metadata=nbformat.from_dict(meta))
    seen: set[str] = set()
    for m in dialogue.messages:
        cell = _message_to_cell(m)
        while cell.id in seen:
            cell.id = nbformat.v4.nbbase.random_cell_id()
        seen.add(cell.id)
        nb.cells.append(cell)
    try:
        nbformat.validate(nb)
    except ValidationError as e:
        msg = _validation_message(e)
        where = re.match(r"cell (\d+)", msg)
        if where and int(where.group(1)) <= len(dialogue.messages):
            i = int(where.group(1))
            msg = f"message {i} ({dialogue.messages[i - 1].id}){msg[len(where.group(0)):]}"
        raise NotebookError(f"dialogue {dialogue.name!r} cannot be written as a notebook: "
                            f"{msg}") from None
    return nb


def to_ipynb_bytes(dialogue: Dialogue) -> bytes:
    """The .ipynb file content (UTF-8 JSON, the layout Jupyter writes). write_notebook has
    validated it; nbformat.writes would validate again."""
    return nbformat.v4.writes(write_notebook(dialogue)).encode("utf-8") + b"\n"
