"""`dialogue tools NAME`: the document tools a dialogue's model may use (off by default)."""
from __future__ import annotations

import argparse

from rich.table import Table

from ..service import DialogueService
from ..terminal import plain
from .common import UserError, emit_json, out


def cmd_tools(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.on or a.off or a.only is not None:
        choice = "all" if a.on else None if a.off else a.only
        try:
            svc.set_doc_tools(a.name, choice)
        except ValueError as e:  # an unknown tool or group name: nothing changed
            raise UserError(str(e)) from None
    on = set(svc.doc_tools(a.name))
    tools = svc.document_tools()
    if a.json:
        emit_json([{"name": n, "on": n in on, "reads_only": ro, "description": desc}
                   for n, desc, ro in tools])
        return
    if not on:
        out.print(plain("document tools are off: the model only answers "
                        "(turn them on with --on, or --only read,edit,run or tool names)"))
    t = Table("tool", "on", "kind", "what it does", box=None)
    for n, desc, ro in tools:
        t.add_row(plain(n), "yes" if n in on else "", "reads" if ro else "changes",
                  plain(desc.split(". ")[0].split(":")[0].split(" (")[0].rstrip(".")))
    out.print(t)
    groups = svc.doc_tool_groups()
    out.print(plain("groups: " + "; ".join(f"{g} = {', '.join(v)}" for g, v in groups.items()
                                           if g != "all"), style="dim"))


def _args_tools(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", help="the dialogue")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--on", action="store_true", help="offer the model every document tool")
    g.add_argument("--off", action="store_true", help="offer none (the default)")
    g.add_argument("--only", metavar="LIST",
                   help="offer only these: tool names and groups (read, edit, run), "
                        "comma-separated, e.g. read,replace_text")
    sp.add_argument("--json", action="store_true", help="print the tools as JSON")


COMMANDS = {
    "tools": (cmd_tools, "the document tools a dialogue's model may use to read and edit the "
                         "dialogue (off by default): list, --on, --off, --only", _args_tools),
}
