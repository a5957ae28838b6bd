"""`dialogue replay NAME MSG [--json]`: answer a prompt again under the settings its answer
recorded (model and file hash, adapter set, sampling, seed) and show how the new answer differs
from the stored one, storing nothing. Exit status 0 when they are the same, 1 when they differ
(like `diff`), so a script can check that an answer reproduces."""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ..service import DialogueService
from ..terminal import plain, visible
from .common import emit_json, err, out


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2:  # an adapter: (hash, scale)
        h, s = v
        return f"{(h or '?')[:12]} ×{s:g}" if s is not None else str(h)
    if isinstance(v, str) and len(v) == 64:  # a content hash
        return v[:12]
    return "none" if v is None else str(v)


def cmd_replay(svc: DialogueService, a: argparse.Namespace) -> int:
    live = not a.json and sys.stdout.isatty()

    def on_text(t: str) -> None:  # on a terminal the new answer streams as it comes
        if live:
            sys.stdout.write(visible(t))
            sys.stdout.flush()

    res = asyncio.run(svc.replay(a.name, a.msg, on_text=on_text if live else None))
    if a.json:
        emit_json(res)
        return 0 if res["same"] else 1
    if live:
        out.print()
    if res["error"]:
        err.print(plain(f"the replay ended with an error: {res['error']}", "red"))
    for c in res["changes"]:
        out.print(plain(f"changed since the answer: {c['what']}: {_show(c['then'])} -> "
                        f"{_show(c['now'])}", "yellow"))
    for n in res["notes"]:
        out.print(plain(f"note: {n}", "dim"))
    if res["same"]:
        out.print(plain(f"the replayed answer is the same as the stored one "
                        f"({len(res['stored']):,} characters)", "green"))
        return 0
    out.print(plain("the replayed answer differs from the stored one:", "bold"))
    for line in res["diff"].splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else \
            "cyan" if line.startswith("@@") else None
        out.print(plain(line, style) if style else plain(line))
    return 1


def _args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", help="dialogue name or id")
    sp.add_argument("msg", help="the prompt: message id or 1-based position")
    sp.add_argument("--json", action="store_true",
                    help="the verdict as JSON: same, diff, stored, replayed, changes, notes, usage")


COMMANDS = {
    "replay": (cmd_replay, "answer a prompt again under its recorded settings (model and file "
                           "hash, adapters, sampling, seed) and show the difference; stores "
                           "nothing", _args),
}
