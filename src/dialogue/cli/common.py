"""What every command module shares: the two consoles, exit statuses and the user-error type."""
from __future__ import annotations

import datetime as dt
import sys

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
