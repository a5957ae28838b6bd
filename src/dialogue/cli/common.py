"""What every command module shares: the two consoles, exit statuses, the user-error type and
`--json` output."""
from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

EXIT_ERROR, EXIT_CONFLICT = 1, 3

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 1."""


def when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""


def text_arg(v: str) -> str:
    """A TEXT argument; '-' reads standard input."""
    return sys.stdin.read() if v == "-" else v


def _jsonable(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, enum.Enum):  # a message's kind
        return o.value
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def emit_json(obj: Any) -> None:
    """What `--json` prints: one JSON document on stdout (dataclasses as objects, paths as
    strings), never through rich, so nothing is wrapped, highlighted or read as markup; non-ASCII
    is escaped, so no text from a model or a notebook reaches the terminal raw."""
    sys.stdout.write(json.dumps(obj, default=_jsonable) + "\n")
    sys.stdout.flush()
