"""A small MCP server for the tests (the `mcp` package's MCPServer, formerly FastMCP).

    python tests/mcp_server.py                       # stdio (what a test's mcpServers entry runs)
    python tests/mcp_server.py --http PORT           # streamable HTTP on 127.0.0.1:PORT/mcp

Tools: `add` (read-only), `echo`, `big` (n characters), `picture`, `doc` (resources) (text and an image), `env` (a variable of its
environment), `header` (a header of the HTTP request that called it), `crash` (the process
exits), `hang` (never answers), `fail` (the tool raises). `--name NAME` renames the server;
`--instructions TEXT` gives it instructions (its initialize result's, for the model).
"""
from __future__ import annotations

import argparse
import base64
import os
import time

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.utilities.types import Image
from mcp.types import EmbeddedResource, ResourceLink, TextResourceContents, ToolAnnotations

ap = argparse.ArgumentParser()
ap.add_argument("--http", type=int, default=0)
ap.add_argument("--name", default="testserver")
ap.add_argument("--instructions", default=None, help="what its initialize result tells clients")
opts = ap.parse_args()

app = MCPServer(opts.name, instructions=opts.instructions)

# a 1x1 transparent PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
                       "60e6kgAAAABJRU5ErkJggg==")


@app.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> str:
    """Add two whole numbers."""
    return str(a + b)


@app.tool()
def echo(text: str) -> str:
    """Say `text` back."""
    return text


@app.tool()
def big(n: int) -> str:
    """`n` characters."""
    return "x" * n


@app.tool()
def picture() -> list:
    """A caption and a tiny picture."""
    return ["a tiny picture:", Image(data=PNG, format="png")]


@app.tool()
def doc() -> list:
    """A text resource and a link to another."""
    return [EmbeddedResource(type="resource", resource=TextResourceContents(
                uri="file:///notes.txt", mime_type="text/plain", text="the notes")),
            ResourceLink(type="resource_link", uri="file:///big.bin", name="big")]


@app.tool()
def env(name: str) -> str:
    """The value of environment variable `name` in the server's process."""
    return os.environ.get(name, "<unset>")


@app.tool()
def header(name: str, ctx: Context) -> str:
    """The value of HTTP header `name` in the request that called this tool."""
    req = ctx.request_context.request
    return req.headers.get(name, "<unset>") if req is not None else "<no request>"


@app.tool()
def crash() -> str:
    """End the server's process at once."""
    os._exit(3)


@app.tool()
def hang() -> str:
    """Never answer."""
    while True:
        time.sleep(1)


@app.tool()
def fail() -> str:
    """Raise an error."""
    raise RuntimeError("the tool failed on purpose")


if __name__ == "__main__":
    if opts.http:
        app.run("streamable-http", host="127.0.0.1", port=opts.http)
    else:
        app.run()
