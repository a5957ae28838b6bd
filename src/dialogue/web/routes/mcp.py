"""A dialogue's MCP servers in its settings panel: the servers configured (the global file's and
its own) with a switch each that enables it in this dialogue, and, when a server's "Tools" is
opened, its tools or the error it could not start with. Listing the servers starts none; opening
a server's tools starts it (it then stays up for the app's life, as its answers use it).

Server names, commands, URLs, tool descriptions and error messages are the user's or a server's
text: they go in as FT children and attribute values, which escape them."""
from __future__ import annotations

from typing import Any

from fasthtml.common import (APIRouter, Code, Details, Div, H3, Input, Label, Li, P, Small, Span,
                             Strong, Summary, Ul)
from starlette.requests import Request

from ...document import Dialogue
from .. import paths
from .. import views as V
from ..common import form, opt_int, site, text

rt = APIRouter()


def mcp_section(svc: Any, d: Dialogue) -> Any:
    """The MCP part of the settings panel (starts no server)."""
    try:
        servers, problem = svc.mcp_servers(d), None
    except ValueError as e:  # a global file that cannot be read: say so, offer nothing
        servers, problem = [], str(e)
    rows = []
    for s in servers:
        rows.append(Div(
            Label(Input(type="checkbox", name="on", checked=s["enabled"], role="switch",
                        hx_post=paths.mcp.to(did=d.id), hx_vals={"name": s["name"]},
                        hx_include="#dversion", hx_target="#mcp-settings", hx_swap="outerHTML",
                        aria_label=f"Use MCP server {s['name']} in this dialogue"),
                  Strong(s["name"]),
                  Small(" configured nowhere now: switch it off, or configure it again",
                        cls="error") if s["origin"] == "missing" else
                  Small(f" {s['origin']} · {s['transport']} · ", Code(s["runs"]))),
            Details(Summary("Tools"),
                    Div(P("Starting the server…", cls="hint"),
                        hx_get=paths.mcp_tools.to(did=d.id, name=s["name"]),
                        hx_trigger="toggle once from:closest details", hx_swap="outerHTML")),
            cls="mcp-server", data_server=s["name"]))
    hint = P("The tools of the servers switched on here are offered to the model (those that "
             "change anything ask first). Servers come from ", Code(str(svc.mcp_config_path())),
             " (the mcpServers JSON shape) and from this dialogue's own (dialogue mcp add).",
             cls="hint")
    body = [P(problem, cls="error")] if problem else \
        (rows or [P("No MCP servers are configured.", cls="hint")])
    return Div(H3("MCP servers"), hint, *body, id="mcp-settings", cls="mcp")


@rt(paths.mcp, methods=["get"])
async def mcp(did: str, req: Request) -> Any:
    svc = site(req).service
    return mcp_section(svc, svc.open(did, messages=False))


@rt(paths.mcp, methods=["post"])
async def mcp_switch(did: str, req: Request) -> Any:
    """Switch one server on or off in this dialogue (a versioned settings change)."""
    svc = site(req).service
    f = await form(req)
    name = (text(f.get("name")) or "").strip()
    on = bool(text(f.get("on")))
    d = svc.set_mcp(did, **{"enable" if on else "disable": [name]},
                    base_version=opt_int(f.get("dversion"), "dversion"))
    return (mcp_section(svc, d), V.dversion_input(d, oob=True),
            V.toast(f"MCP server {name} {'on' if on else 'off'} in this dialogue.", level="info"))


@rt(paths.mcp_tools, methods=["get"])
async def mcp_tools(did: str, name: str, req: Request) -> Any:
    """One server's tools (starting it), or why it cannot start."""
    svc = site(req).service
    (s,) = await svc.mcp_list(did, name)
    if s["error"]:
        return P(s["error"], cls="error mcp-error")
    return Ul(*[Li(Code(t["offered_as"]),
                   Span(" reads only", cls="badge") if t["reads_only"] else None,
                   Small(" ", t["description"].strip()) if t["description"] else None)
                for t in s["tools"]], cls="mcp-tools") if s["tools"] else \
        P("This server offers no tools.", cls="hint")
