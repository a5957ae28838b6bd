"""`dialogue ...`: argument parsing, dispatch to the command modules, errors and exit statuses.

Every command calls the dialogue service; user mistakes (an unknown dialogue, a bad id, a
conflict) print one line to stderr and exit non-zero, never a traceback. Every string a user, a
notebook or a model wrote is printed through `dialogue.terminal` (control characters visible,
never parsed as rich markup).

Options every command takes, before or after its name: `--db`, `-v` / `--log-level`. Settings
come from the environment, then the config file (`dialogue.config`), then defaults.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .. import config
from ..service import ConflictError, DialogueService, ProviderError, StoreError
from ..terminal import plain
from . import adapters, dialogues, doctools, folders, io, kernels, mcpservers, messages, models, replay, requests, runs, serve, train
from .common import EXIT_CONFLICT, EXIT_ERROR, UserError, err

# (function, help, add_arguments) by command name, from each command group's module
_COMMANDS: dict[str, tuple[Callable, str, Callable | None]] = {
    **dialogues.COMMANDS, **folders.COMMANDS, **messages.COMMANDS, **runs.COMMANDS, **io.COMMANDS, **models.COMMANDS,
    **serve.COMMANDS, **adapters.COMMANDS, **train.COMMANDS, **kernels.COMMANDS,
    **requests.COMMANDS, **replay.COMMANDS, **mcpservers.COMMANDS, **doctools.COMMANDS}

# the order `dialogue --help` lists them in
_ORDER = ("new", "list", "folder", "move", "mode", "show", "add", "ask", "exec", "run", "import", "export", "edit", "rm",
          "mv", "history", "request", "replay", "restore", "fork", "rename", "config", "kernel", "tools", "mcp", "search", "trash", "attach", "detach",
          "models", "cache", "serve", "adapters", "train")

# Commands with their own argument parser: everything after the command name is theirs, so that
# `dialogue train --help` shows the trainer's options rather than ours.
_DELEGATED = ("adapters", "train")


LOG_LEVELS = ("debug", "info", "warning", "error")
# top-level options that take a value (main skips them to find the command's name)
_VALUED = ("--db", "--log-level")


def _common_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """--db, -v, --log-level: on the top parser with their defaults, and on each command's parser
    with none (SUPPRESS), so `dialogue list --db X` sets it and `dialogue --db X list` is not
    undone by the command's parser."""
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--db", default=d(None),
                   help="database file (default: $DIALOGUE_DB, the config file's db, or the user "
                        "data dir)")
    p.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="log what the service, kernels and models do on stderr (-v info, -vv debug)")
    p.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower, default=d(None),
                   help="log level of the dialogue.* loggers (default: $DIALOGUE_LOG_LEVEL, the "
                        "config file's log_level, or warning)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dialogue", description="Dialogue engineering for Python.",
        epilog=f"Settings: DIALOGUE_* environment variables, then {config.config_path()}, then "
               "defaults (README: Settings).")
    p.add_argument("--version", action="version", version=f"dialogue {config.version()}")
    _common_options(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, top=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _ORDER:
        fn, help, add_arguments = _COMMANDS[name]
        delegated = name in _DELEGATED  # its own parser reads everything after its name
        sp = sub.add_parser(name, help=help, description=help, parents=[] if delegated else [common])
        sp.set_defaults(fn=fn)
        if add_arguments is not None:
            add_arguments(sp)
    return p


def setup_logging(verbose: int = 0, level: str | None = None) -> int:
    """The `dialogue.*` loggers to stderr at `--log-level`, else -v (info) / -vv (debug), else
    the log_level setting, else warning. A level given on the command line goes into
    DIALOGUE_LOG_LEVEL too, so the processes we start (the local model's) log at the same level.
    Returns the level."""
    name = level or {0: None, 1: "info"}.get(verbose, "debug") or config.get("log_level") or "warning"
    lv = logging.getLevelName(name.upper())
    if not isinstance(lv, int):
        raise UserError(f"unknown log level {name!r}: use one of {', '.join(LOG_LEVELS)}")
    log = logging.getLogger("dialogue")
    if not any(getattr(h, "dialogue_cli", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h.dialogue_cli = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.setLevel(lv)
    if level or verbose:
        os.environ["DIALOGUE_LOG_LEVEL"] = name.lower()
    return lv


def _hoist_common(tail: list[str]) -> tuple[list[str], list[str]]:
    """A delegated command's arguments split into our common options (--db, -v, --log-level, as
    every other command takes them after its name) and the rest, its own. A literal `--` ends
    the search: what follows it is the command's, whatever it looks like."""
    common: list[str] = []
    rest: list[str] = []
    j = 0
    while j < len(tail):
        t = tail[j]
        if t == "--":
            rest += tail[j:]
            break
        if t in _VALUED and j + 1 < len(tail):
            common += tail[j:j + 2]
            j += 2
            continue
        if t.split("=", 1)[0] in _VALUED or t == "--verbose" or (
                len(t) > 1 and t[0] == "-" and set(t[1:]) == {"v"}):
            common.append(t)
        else:
            rest.append(t)
        j += 1
    return common, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help"):
        i += 2 if argv[i] in _VALUED else 1
    if i < len(argv) and argv[i] in _DELEGATED:
        common, rest = _hoist_common(argv[i + 1:])
        argv = [*argv[:i], *common, argv[i], "--", *rest]
    parser = build_parser()
    a = parser.parse_args(argv)
    if getattr(a, "args", None) and a.args[0] == "--":
        a.args = a.args[1:]
    try:
        config.apply()  # the config file fills what the environment does not set
        setup_logging(a.verbose, a.log_level)
        svc = DialogueService(a.db or os.environ.get("DIALOGUE_DB") or None)
    except (StoreError, UserError, config.ConfigError) as e:  # one line, however long: soft_wrap
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
