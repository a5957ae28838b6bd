"""`dialogue ...`: argument parsing, dispatch to the command modules, errors and exit statuses.

Every command calls the dialogue service; user mistakes (an unknown dialogue, a bad id, a
conflict) print one line to stderr and exit non-zero, never a traceback. Every string a user, a
notebook or a model wrote is printed through `dialogue.terminal` (control characters visible,
never parsed as rich markup).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from ..service import ConflictError, DialogueService, ProviderError, StoreError
from ..terminal import plain
from . import adapters, dialogues, io, messages, models, runs, serve, train
from .common import EXIT_CONFLICT, EXIT_ERROR, UserError, err

# (function, help, add_arguments) by command name, from each command group's module
_COMMANDS: dict[str, tuple[Callable, str, Callable | None]] = {
    **dialogues.COMMANDS, **messages.COMMANDS, **runs.COMMANDS, **io.COMMANDS, **models.COMMANDS,
    **serve.COMMANDS, **adapters.COMMANDS, **train.COMMANDS}

# the order `dialogue --help` lists them in
_ORDER = ("new", "list", "show", "add", "ask", "exec", "run", "import", "export", "edit", "rm",
          "mv", "history", "restore", "fork", "rename", "config", "search", "trash", "attach", "detach",
          "models", "cache", "serve", "adapters", "train")

# Commands with their own argument parser: everything after the command name is theirs, so that
# `dialogue train --help` shows the trainer's options rather than ours.
_DELEGATED = ("adapters", "train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dialogue", description="Dialogue engineering for Python.")
    p.add_argument("--db", help="database file (default: $DIALOGUE_DB or the user data dir)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _ORDER:
        fn, help, add_arguments = _COMMANDS[name]
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if add_arguments is not None:
            add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help"):
        i += 2 if argv[i] == "--db" else 1
    if i < len(argv) and argv[i] in _DELEGATED:
        db = argv[argv.index("--db") + 1] if "--db" in argv[:i] else None
        argv = (["--db", db] if db else []) + [argv[i], "--", *argv[i + 1:]]
    parser = build_parser()
    a = parser.parse_args(argv)
    if getattr(a, "args", None) and a.args[0] == "--":
        a.args = a.args[1:]
    try:
        svc = DialogueService(a.db or os.environ.get("DIALOGUE_DB") or None)
    except StoreError as e:  # errors are one line, however long: soft_wrap
        err.print(plain(f"error: {e}"), soft_wrap=True)
        return EXIT_ERROR
    try:
        return a.fn(svc, a) or 0
    except ConflictError as e:
        err.print(plain(f"error: {e}"), soft_wrap=True)
        return EXIT_CONFLICT
    except (StoreError, UserError, ProviderError, ValueError, OSError) as e:
        err.print(plain(f"error: {e}"), soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        svc.close()


if __name__ == "__main__":
    sys.exit(main())
