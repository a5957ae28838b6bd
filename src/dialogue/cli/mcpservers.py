"""`dialogue mcp`: the MCP servers configured here, their tools, and which ones a dialogue uses."""
from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from rich.table import Table

from ..service import DialogueService
from ..terminal import markup, plain
from .common import UserError, emit_json, out

_ACTIONS = ("list", "enable", "disable", "add", "remove")


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    got: dict[str, str] = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise UserError(f"{what} takes KEY=VALUE, got {it!r}")
        got[k] = v
    return got


async def _listed(svc: DialogueService, dialogue: str | None, name: str | None) -> list[dict]:
    try:
        return await svc.mcp_list(dialogue, name)
    finally:
        await svc.mcp.close()  # a command's servers end with it


def _print_list(servers: list[dict[str, Any]], dialogue: str | None) -> None:
    if not servers:
        out.print("[dim]no MCP servers are configured: put them in the global file "
                  "(dialogue mcp list shows where) or add one to a dialogue (dialogue mcp add)[/dim]")
        return
    for s in servers:
        state = "[red]cannot start[/red]" if s["error"] else f"{len(s['tools'])} tools"
        on = ("; [green]enabled[/green]" if s["enabled"] else "; [dim]not enabled[/dim]") \
            if dialogue else ""
        where = ("configured nowhere" if s["origin"] == "missing" else
                 f"{s['origin']}, {s['transport']}: {markup(s['runs'])}")
        out.print(f"[b]{markup(s['name'])}[/b] ({where}): {state}{on}")
        if s["error"]:
            out.print(f"  {markup(s['error'])}", soft_wrap=True)
            continue
        t = Table("offered as", "reads only", "description", box=None, padding=(0, 2))
        for tool in s["tools"]:
            t.add_row(plain(tool["offered_as"]), "yes" if tool["reads_only"] else "",
                      plain(tool["description"].strip().splitlines()[0] if tool["description"]
                            else ""))
        out.print(t)


def cmd_mcp(svc: DialogueService, a: argparse.Namespace) -> None:
    """list [NAME] [--dialogue D]: the servers (started, to list their tools) | enable D NAME... |
    disable D NAME... | add D NAME (--command CMD [--arg A]... [--env K=V]... | --url URL
    [--header K=V]...) | remove D NAME..."""
    args = list(a.args)
    if a.action == "list":
        if len(args) > 1:
            raise UserError("dialogue mcp list [NAME] [--dialogue DIALOGUE]")
        servers = asyncio.run(_listed(svc, a.dialogue, args[0] if args else None))
        if a.json:
            emit_json({"config": svc.mcp_config_path(), "servers": servers})
        else:
            _print_list(servers, a.dialogue)
            out.print(f"[dim]global servers: {markup(str(svc.mcp_config_path()))}[/dim]")
        return
    if not args:
        raise UserError(f"name the dialogue: dialogue mcp {a.action} DIALOGUE NAME...")
    dialogue, names = args[0], args[1:]
    if not names:
        raise UserError(f"name the server(s): dialogue mcp {a.action} {dialogue} NAME...")
    if a.action == "add":
        if len(names) != 1:
            raise UserError("add one server at a time: dialogue mcp add DIALOGUE NAME ...")
        if bool(a.command) == bool(a.url):
            raise UserError("give --command CMD (with --arg, --env) or --url URL (with --header)")
        entry: dict[str, Any] = ({"url": a.url, "headers": _pairs(a.header, "--header")} if a.url
                                 else {"command": a.command, "args": list(a.arg or []),
                                       "env": _pairs(a.env, "--env")})
        d = svc.set_mcp(dialogue, servers={names[0]: entry},
                        enable=[] if a.no_enable else names)
    elif a.action == "remove":
        d = svc.set_mcp(dialogue, remove=names)
    else:
        d = svc.set_mcp(dialogue, **{a.action: names})
    on = [s["name"] for s in svc.mcp_servers(d) if s["enabled"]]
    if a.json:
        emit_json({"dialogue": d.name, "enabled": on, "version": d.version})
        return
    out.print(f"dialogue [b]{markup(d.name)}[/b] uses MCP servers: "
              + (", ".join(markup(n) for n in on) or "none"))


def _args_mcp(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", choices=_ACTIONS, metavar="ACTION",
                    help="list [NAME] | enable DIALOGUE NAME... | disable DIALOGUE NAME... | "
                         "add DIALOGUE NAME (--command CMD | --url URL) | remove DIALOGUE NAME...")
    sp.add_argument("args", nargs="*", metavar="ARG")
    sp.add_argument("--dialogue", help="list: also that dialogue's own servers, and which it "
                                       "enables")
    sp.add_argument("--command", help="add: the program that runs the server (stdio)")
    sp.add_argument("--arg", action="append", help="add: an argument of --command (repeat)")
    sp.add_argument("--env", action="append", metavar="KEY=VALUE",
                    help="add: an environment variable of the server (repeat)")
    sp.add_argument("--url", help="add: a streamable-HTTP server's endpoint")
    sp.add_argument("--header", action="append", metavar="KEY=VALUE",
                    help="add: an HTTP header sent to --url (repeat)")
    sp.add_argument("--no-enable", action="store_true", help="add: configure it, do not use it yet")
    sp.add_argument("--json", action="store_true")


COMMANDS = {
    "mcp": (cmd_mcp, "MCP servers: list them and their tools, enable or disable them in a "
                     "dialogue, add a dialogue's own", _args_mcp),
}
