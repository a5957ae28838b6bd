"""Text from users, notebooks and models, made safe to print on a terminal.

A terminal obeys the bytes it is given: ESC starts sequences that clear the screen, set the window
title (OSC 0), write the clipboard (OSC 52) or hide text; BEL, backspace and a bare carriage return
rewrite what the user sees. A dialogue name, a note, an output or a model's answer may come from
someone else (an imported notebook, a model told to), so the CLI prints every such string through
`visible`: control characters become their escape (`\\x1b`, `\\x07`), newlines and tabs stay.
Rich's own helpers are not enough: `rich.control.escape_control_codes` covers five characters and
lets ESC through, and a plain `str` given to rich is parsed as markup (`[/b]` in a name raises
`MarkupError`), so user text reaches rich only as `Text` (`plain`) or escaped (`markup`).
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from rich.markup import escape as _escape_markup
from rich.text import Text

__all__ = ["visible", "plain", "markup", "StreamWriter"]


def _escape_of(c: int) -> str:
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


# C0 controls but tab and newline, DEL, the C1 controls (0x9b is a one-byte CSI for some
# terminals), and the bidirectional overrides and isolates that reorder what is shown (the
# "Trojan Source" characters).
_CONTROLS = [c for c in range(0x20) if c not in (0x09, 0x0A)] + list(range(0x7F, 0xA0)) \
    + list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A))
_TABLE = {c: _escape_of(c) for c in _CONTROLS}


def visible(text: Any) -> str:
    """`text` with every control character shown as its escape; CRLF line ends become newlines
    (a bare CR, which would let the rest of a line overwrite its start, is shown as `\\x0d`)."""
    s = text if isinstance(text, str) else str(text)
    return s.replace("\r\n", "\n").translate(_TABLE)


def plain(text: Any, style: str = "") -> Text:
    """User text as a rich `Text`: never parsed as markup, control characters visible."""
    return Text(visible(text), style=style)


def markup(text: Any) -> str:
    """User text to embed in a rich markup string (`f"[b]{markup(name)}[/b]"`)."""
    return _escape_markup(visible(text))


class StreamWriter:
    """Writes text that arrives in pieces (a streamed answer, a cell's output) to a file, made
    visible as it comes. A CR at the end of a piece is held back until the next piece says
    whether it ends a CRLF line."""

    def __init__(self, file: TextIO | None = None):
        self._file = file
        self._cr = False

    @property
    def file(self) -> TextIO:
        return self._file or sys.stdout  # looked up late, so a captured stdout is honoured

    def write(self, text: str) -> None:
        if self._cr:
            text = "\r" + text
            self._cr = False
        if text.endswith("\r"):
            text, self._cr = text[:-1], True
        if text:
            self.file.write(visible(text))
            self.file.flush()

    def close(self) -> None:
        """Write a CR still held back (the stream ended on it)."""
        if self._cr:
            self._cr = False
            self.file.write(visible("\r"))
            self.file.flush()
