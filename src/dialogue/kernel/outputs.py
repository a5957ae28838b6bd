"""A run's outputs: capped as they arrive, and folded into a list as Jupyter front ends fold them.

`fold_output` is the one place that applies `clear_output` and `update_display_data` to a list of
outputs. The kernel folds into the list it will store, and whoever follows a run (the service's
run state, which feeds the store while the cell runs and every listener) folds the items the
kernel passes on, so all of them agree on what a cell shows.

`OutputCap` turns a run's IOPub messages into those items under a size cap, and gives the stored
form at the end. It imports only the standard library: importing it does not start jupyter_client.
"""
from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["DEFAULT_OUTPUT_CAP", "OUTPUT_TYPES", "fold_output", "stored_outputs", "OutputCap",
           "collapse_stream", "shown_stream"]

DEFAULT_OUTPUT_CAP = 1_000_000
"""Characters of output kept per run. Beyond it outputs are counted and dropped as they arrive,
so a cell that prints 100 MB costs the server the message in hand (ipykernel batches prints into
messages of a few MB), not 100 MB."""

OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})
"""Items that are outputs (kept in the list); `clear_output` and `update_display_data` are
controls that change the list and are never stored."""

Output = dict[str, Any]


# ---------------------------------------------------------------- carriage returns, backspaces

# A terminal control sequence: CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \\), or a
# two-character escape; or one of the two characters that move back on a line.
_CONTROL = re.compile(r"\x1b\[([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|[\r\b]")
_CSI_MOVE = re.compile(r"\x1b\[[0-?]*[ -/]*[KGCD]")


def _moves(text: str) -> bool:
    """Whether `text` moves back on a line (\\r, backspace, an erase or cursor code): only
    such text needs `_line`. Checked with `in` first, which is memchr-fast on a long output."""
    return "\r" in text or "\b" in text or ("\x1b[" in text and _CSI_MOVE.search(text) is not None)


def _line(text: str) -> tuple[list[str], int, str]:
    """One line (no newline) written to a terminal: its cells (each one visible character,
    preceded by the colour codes written just before it), where the cursor ends, and colour
    codes written after the last character. Jupyter's rules (JupyterLab's
    `removeOverwrittenChars`, which VS Code copies): a carriage return goes back to the start
    of the line and what follows overwrites it character by character (a shorter write leaves
    the end of the longer one, as a terminal does); a backspace deletes the character before
    it. As a terminal does, erase-line codes (ESC[K, ESC[2K: rich's and pip's progress bars)
    clear, and ESC[nG / ESC[nC / ESC[nD move the cursor on the line. Other codes (colours, and
    those no page applies: cursor shape, titles) are kept where they were written, as they are
    on lines with nothing to take back; `render` turns colours into HTML and strips the rest."""
    cells: list[str] = []
    cur = 0
    pending = ""  # codes waiting for the next character
    pos = 0
    for m in [*_CONTROL.finditer(text), None]:
        for ch in text[pos:m.start() if m else len(text)]:
            if cur == len(cells):
                cells.append(pending + ch)
            else:  # an overwritten character keeps its codes unless new ones come with it
                cells[cur] = (pending or cells[cur][:-1]) + ch
            pending = ""
            cur += 1
        if m is None:
            break
        pos = m.end()
        tok = m.group(0)
        if tok == "\r":
            cur = 0
        elif tok == "\b":
            if 0 < cur <= len(cells):
                del cells[cur - 1]
            cur = max(0, cur - 1)
        elif m.group(2) and m.group(2) in "KGCD":
            final, arg = m.group(2), m.group(1)
            n = int(arg) if arg.isdigit() else 0
            if final == "K":
                if n == 2:
                    cells.clear()
                elif n == 1:
                    cells[:cur] = " " * min(cur, len(cells))
                else:
                    del cells[cur:]
            elif final == "G":
                cur = max(1, n) - 1
            elif final == "C":
                cur += max(1, n)
            elif final == "D":
                cur = max(0, cur - max(1, n))
            # a move past the end leaves blanks, so the cursor stays where the text says
            cells.extend(" " * (cur - len(cells)))
        else:  # colours, and codes no page applies (stripped where text is shown)
            pending += tok
    return cells, cur, pending


_PARTIAL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*)?$")


def collapse_stream(text: str) -> str:
    """Stream text with what carriage returns, backspaces and erase-line codes take back applied
    (see `_line`): a progress bar redrawn 500 times is its last state. Lines without them are
    left as they are, colour codes included.

    The last line may still be written over by the next chunk of the stream (a `\\r` at the
    end of a chunk, the next chunk's `\\b`), so it keeps where its cursor is: `shown`, then
    `\\r` and the characters before the cursor when the cursor is not at the end (Jupyter
    front ends show that as `shown`), then colour codes after the last character and an escape
    sequence the chunk cut in two. That form collapses to itself, so collapsing the end of a
    stream again with the next chunk appended (`fold_output`) gives the same text as
    collapsing the whole stream at once, however it was split."""
    if not _moves(text):
        return text
    text = re.sub(r"\r+\n", "\n", text)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        cut = _PARTIAL.search(line) if last and "\x1b" in line else None
        rest = line[cut.start():] if cut else ""
        if cut:
            line = line[:cut.start()]
        if not _moves(line):
            lines[i] = line + rest
            continue
        cells, cur, tail = _line(line)
        shown = "".join(cells)
        if last and cur < len(cells):
            shown += "\r" + "".join(cells[:cur])
        lines[i] = shown + tail + rest
    return "\n".join(lines)


def shown_stream(text: str) -> str:
    """What a stream shows: `collapse_stream`, without the cursor and the cut escape sequence
    its last line keeps for the next chunk."""
    text = collapse_stream(text)
    last = text.rfind("\n") + 1
    cr = text.find("\r", last)
    if cr >= 0:
        text = text[:cr]
    cut = _PARTIAL.search(text, last) if "\x1b" in text[last:] else None
    return text[:cut.start()] if cut else text


def _merge_stream(prev: str, chunk: str) -> str:
    """`collapse_stream(prev + chunk)` for a `prev` that is collapsed already: only its last
    line can change, and a chunk that moves nothing back is appended as it is."""
    last = prev.rfind("\n") + 1
    if "\r" not in prev[last:] and "\x1b" not in prev[last:] and not _moves(chunk):
        return prev + chunk
    return prev[:last] + collapse_stream(prev[last:] + chunk)


# ---------------------------------------------------------------- folding

def _display_id(o: Output) -> str | None:
    return (o.get("transient") or {}).get("display_id")


def fold_output(outputs: list[Output], item: Output, clear_pending: bool = False) -> bool:
    """Apply one item of a run's output stream to `outputs`, in place, as Jupyter front ends
    (JupyterLab's OutputArea) do; return whether a clear is now pending (pass it to the next call).

    - An output is appended; if a `clear_output(wait=True)` is pending, the list is emptied
      first. Waiting that way is what lets a loop that clears and redraws never show an empty
      cell.
    - A stream chunk that follows output of the same stream (stdout, stderr) is joined to it,
      and what its carriage returns and backspaces take back is applied (`collapse_stream`),
      as JupyterLab's output area does: `print('\\rstep', i, end='')` in a loop leaves one
      line, whatever the chunks the kernel sent. The joined output is a new dict.
    - `{"output_type": "clear_output"}` empties the list now; with `"wait": True`, when the
      next output arrives.
    - `update_display_data` (its display id in `"display_id"` or in its own `transient`) replaces
      the data and metadata of every output whose `transient.display_id` is that id. Only
      outputs shown with a display id can be updated: an update without one, or with an id no
      output has, changes nothing, and an update does not set off a pending clear.

    Updated outputs are replaced by new dicts, never changed in place: the same output dict may
    sit in several lists (the kernel's, a run's state, a snapshot taken for a late listener)."""
    t = item.get("output_type")
    if t == "clear_output":
        if item.get("wait"):
            return True
        outputs.clear()
        return False
    if t == "update_display_data":
        did = item.get("display_id") or _display_id(item)
        if did:
            data, meta = item.get("data", {}), item.get("metadata", {})
            for i, o in enumerate(outputs):
                if _display_id(o) == did:
                    outputs[i] = {**o, "data": data, "metadata": meta}
        return clear_pending
    if t not in OUTPUT_TYPES:
        return clear_pending
    if clear_pending:
        outputs.clear()
    if t == "stream":
        prev = outputs[-1] if outputs else None
        if prev is not None and prev.get("output_type") == "stream" and prev.get("name") == item.get("name"):
            outputs[-1] = {**prev, "text": _merge_stream(prev.get("text", ""), item.get("text", ""))}
            return False
        text = item.get("text", "")
        if _moves(text):
            item = {**item, "text": collapse_stream(text)}
    outputs.append(item)
    return False


def stored_outputs(outputs: list[Output]) -> list[Output]:
    """The nbformat form of a folded list: consecutive chunks of the same stream joined into one
    output, display ids dropped (nbformat has no place for them). New dicts where they differ."""
    out: list[Output] = []
    chunks: list[str] = []  # texts of the stream output at the end of `out`, joined once

    def close() -> None:
        if chunks:  # one chunk is one `fold_output` has collapsed already
            text = "".join(chunks)
            out[-1] = {**out[-1], "text": collapse_stream(text) if len(chunks) > 1 else text}
            chunks.clear()

    for o in outputs:
        if o.get("output_type") == "stream":
            prev = out[-1] if out and chunks else None
            if prev is not None and prev.get("name") == o.get("name"):
                chunks.append(o.get("text", ""))
                continue
            close()
            out.append(o)
            chunks.append(o.get("text", ""))
            continue
        close()
        out.append({k: v for k, v in o.items() if k != "transient"} if "transient" in o else o)
    close()
    return out


def size(v: Any) -> int:
    """Characters an output's payload costs against the cap."""
    if isinstance(v, str):
        return len(v)
    if isinstance(v, list):
        return sum(size(x) for x in v)
    if isinstance(v, dict):
        return len(json.dumps(v))
    return len(str(v))


class OutputCap:
    """One run's IOPub messages -> the items to pass on as they arrive (outputs and the two
    controls, for `fold_output`) and the outputs to store at the end, keeping at most `cap`
    characters of output in the list at any time (a clear frees its room).

    nbformat.v4.output_from_msg builds the same dicts but validates each one against the
    notebook JSON schema, which costs more than the rest of the path for a chatty cell; the
    shapes are fixed and small, so they are built here and validated once in the tests."""

    def __init__(self, cap: int):
        self.cap = cap
        self.kept = 0  # characters of the outputs in `outputs`
        self.cut = 0  # characters dropped by the cap, over the whole run
        self.outputs: list[Output] = []  # folded so far (stream chunks apart, display ids kept)
        self._clear_pending = False

    def _room(self) -> int:
        # A pending clear empties the list before the next output lands: that output has the
        # whole cap (an update, which never sets a clear off, only replaces what is kept).
        return self.cap if self._clear_pending else max(0, self.cap - self.kept)

    def add(self, msg_type: str, content: dict[str, Any]) -> list[Output]:
        """Record one IOPub message; return the items to pass on now. A `clear_output` with
        wait is passed on as a plain one just before the output that sets it off, so a follower
        needs no state of its own to agree with the stored list."""
        got = self._item(msg_type, content)
        if got is None:
            if self._clear_pending and msg_type in OUTPUT_TYPES:
                # an output the cap left out still replaces what the pending clear removes
                return self.add("clear_output", {})
            return []
        item, cost = got
        was_pending = self._clear_pending
        n = len(self.outputs)
        before = len(self.outputs[-1].get("text", "")) if msg_type == "stream" and n else 0
        self._clear_pending = fold_output(self.outputs, item, was_pending)
        if msg_type == "stream":
            # what the stream's carriage returns took back frees its room (a progress bar
            # redrawn all night costs one line); joined to the stream before it, the chunk
            # costs what it added
            joined = not was_pending and len(self.outputs) == n
            cost = len(self.outputs[-1].get("text", "")) - (before if joined else 0)
        if msg_type == "clear_output":
            if self._clear_pending:
                return []
            self.kept = 0
            return [item]
        if msg_type == "update_display_data":
            return [item]
        shown = [item]
        if was_pending and not self._clear_pending:  # this output set the pending clear off
            self.kept = 0
            shown.insert(0, {"output_type": "clear_output"})
        self.kept += cost
        return shown

    def _item(self, msg_type: str, content: dict[str, Any]) -> tuple[Output, int] | None:
        """The item for one message and the characters it adds to the list; None when it is not
        an output message or the cap leaves it out (counted in `cut`)."""
        if msg_type == "clear_output":
            item: Output = {"output_type": "clear_output"}
            if content.get("wait"):
                item["wait"] = True
            return item, 0
        room = self._room()
        if msg_type == "update_display_data":
            did = _display_id(content)
            data = content.get("data", {})
            if not did:
                return None
            if size(data) > room:
                self.cut += size(data)
                return None
            return {"output_type": "update_display_data", "display_id": did, "data": data,
                    "metadata": content.get("metadata", {})}, 0
        if msg_type == "stream":
            text = content.get("text", "")
            if len(text) > room:
                self.cut += len(text) - room
                text = text[:room]
            if not text:
                return None
            return {"output_type": "stream", "name": content.get("name", "stdout"), "text": text}, len(text)
        if msg_type == "error":
            # Always kept: the traceback is what tells the user what went wrong. Only an absurd
            # traceback is shortened, keeping its end (where the exception is).
            tb = list(content.get("traceback", []))
            while len(tb) > 1 and size(tb) > max(room, 100_000):
                self.cut += len(tb[0])
                tb.pop(0)
            return {"output_type": "error", "ename": content.get("ename", ""),
                    "evalue": content.get("evalue", ""), "traceback": tb}, size(tb)
        if msg_type not in ("display_data", "execute_result"):
            return None
        data = content.get("data", {})
        cost = size(data)
        if cost > room:
            self.cut += cost
            return None
        out: Output = {"output_type": msg_type, "data": data, "metadata": content.get("metadata", {})}
        if msg_type == "execute_result":
            out["execution_count"] = content.get("execution_count")
        did = _display_id(content)
        if did:  # passed on (and folded) with its display id, so later updates find it
            out["transient"] = {"display_id": did}
        return out, cost

    def finish(self) -> tuple[list[Output], list[Output]]:
        """(the outputs to store, the items still to pass on): when the cap cut anything, a
        note saying how much ends both."""
        last: list[Output] = []
        if self.cut:
            note = {"output_type": "stream", "name": "stderr",
                    "text": f"\n[output capped: kept {self.kept:,} characters, cut {self.cut:,}]\n"}
            # not passed the pending clear: the run is over, so a waiting clear that no output
            # set off never happens (the cell keeps showing what it showed), as in Jupyter
            fold_output(self.outputs, note)
            last.append(note)
        return stored_outputs(self.outputs), last
