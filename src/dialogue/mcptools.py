"""MCP servers' tools, offered to the model like the dialogue's other tools.

Configuration is the `mcpServers` JSON shape other MCP clients (Claude Desktop, editors) use::

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "."],
                  "env": {"DEBUG": "1"}},
        "search": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer ..."}}}}

It comes from two places, both the user's: the global file (`mcp.json` beside config.toml, or
the file `DIALOGUE_MCP_CONFIG` names) and a dialogue's own servers (``meta["mcp"]["servers"]``,
versioned like every setting). A dialogue uses only the servers it enables
(``meta["mcp"]["enabled"]``, names; its own server wins over a global one of that name). A file
from someone else never configures or enables one (`trust.vet_import` sets both aside).

`MCPPool` (one per service) keeps one running connection per distinct server configuration for
the service's life: a server starts on first use, its tool list is cached (and dropped when the
server says it changed), a server that exits gives the call a clear error and is started again on
the next use, and a start or a call that takes longer than its limit
(`DIALOGUE_MCP_START_TIMEOUT`, `DIALOGUE_MCP_CALL_TIMEOUT`) is an error naming the server and the
limit (a call that timed out stops the server; the next use starts it again). `close()` stops them
all.

The `mcp` package's client runs on anyio task groups, whose cancel scopes belong to the task that
entered them. So each connection is entered and left by one task of its own (`_own`), which waits
until the connection is closed; calls from any task of the same loop go through its session. A
service used from another event loop later (the CLI runs one loop per command) starts its servers
again there.

`MCPTools` is the ToolSource (see `tools`) of an answer's MCP tools, each named
``<server>__<tool>`` (letters, digits, _ and - only, at most 64 characters, as providers require).
A tool's `readOnlyHint` annotation marks it as reading only. Results come back as text: text
content as is, images, audio and resources summarised in a line each.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .document import Dialogue
    from .llm.base import ToolSpec

log = logging.getLogger(__name__)  # dialogue.mcptools

__all__ = ["MCPConfigError", "MCPServerError", "ServerConfig", "parse_servers", "global_path",
           "global_servers", "dialogue_servers", "enabled_names", "servers_for", "with_mcp",
           "MCPPool", "MCPTools", "offer", "add_instructions", "MAX_INSTRUCTIONS", "META_KEY",
           "DEFAULT_START_TIMEOUT", "DEFAULT_CALL_TIMEOUT"]

META_KEY = "mcp"  # dialogue meta: {"servers": {name: entry}, "enabled": [name, ...]}
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_CALL_TIMEOUT = 60.0
_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
_TOOL_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class MCPConfigError(ValueError):
    """An mcpServers configuration that cannot be used; the message names the entry and why."""


class MCPServerError(ValueError):
    """An MCP server that did not start or list its tools (the message names it and says why).
    A ValueError, as every error a user can act on: surfaces show it in one line and an answer
    ends with it."""


@dataclass(frozen=True)
class ServerConfig:
    """One server of an mcpServers configuration: a command to run (stdio) or a URL (streamable
    HTTP). `origin` is where it was configured ("global" or "dialogue")."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""
    url: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    origin: str = "global"

    @property
    def transport(self) -> str:
        return "http" if self.url else "stdio"

    @property
    def key(self) -> str:
        """What makes two configurations the same running server (the name and origin do not)."""
        raw = json.dumps([self.command, self.args, self.env, self.cwd, self.url, self.headers])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """How it runs, for people: the command line or the URL (never env or header values)."""
        if self.url:
            return self.url
        return " ".join([self.command, *self.args])

    def to_entry(self) -> dict[str, Any]:
        """The mcpServers entry it was read from."""
        if self.url:
            out: dict[str, Any] = {"url": self.url}
            if self.headers:
                out["headers"] = dict(self.headers)
            return out
        out = {"command": self.command, "args": list(self.args)}
        if self.env:
            out["env"] = dict(self.env)
        if self.cwd:
            out["cwd"] = self.cwd
        return out


def _str_map(v: Any, what: str) -> tuple[tuple[str, str], ...]:
    if v is None:
        return ()
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str)
                                          for k, x in v.items()):
        raise MCPConfigError(f"{what} must be an object of strings")
    return tuple(sorted(v.items()))


def parse_entry(name: Any, entry: Any, *, origin: str = "global", where: str = "") -> ServerConfig:
    """One mcpServers entry, checked. Keys other MCP clients add (`disabled`, `autoApprove`,
    `timeout`, ...) are ignored, so a file copied from one works here."""
    at = f"{where}: " if where else ""
    if not isinstance(name, str) or not _NAME.match(name) or not name.strip():
        raise MCPConfigError(f"{at}an MCP server name must be 1 to 64 printable characters, "
                             f"got {name!r}")
    what = f"{at}MCP server {name!r}"
    if not isinstance(entry, dict):
        raise MCPConfigError(f"{what}: an entry is an object with \"command\" or \"url\"")
    kind = entry.get("type", entry.get("transport"))
    if kind in ("sse",):
        raise MCPConfigError(f"{what}: the old SSE transport is not supported; use the "
                             "server's streamable-HTTP endpoint")
    if kind not in (None, "stdio", "http", "streamable-http", "streamable_http", "streamableHttp"):
        raise MCPConfigError(f"{what}: unknown transport type {kind!r}")
    command, url = entry.get("command"), entry.get("url")
    if bool(command) == bool(url):
        raise MCPConfigError(f"{what}: give exactly one of \"command\" (a program to run) and "
                             "\"url\" (a streamable-HTTP endpoint)")
    if url:
        if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
            raise MCPConfigError(f"{what}: url must be an http:// or https:// address, got {url!r}")
        return ServerConfig(name, url=url, headers=_str_map(entry.get("headers"), f"{what}: headers"),
                            origin=origin)
    if not isinstance(command, str):
        raise MCPConfigError(f"{what}: command must be a string")
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise MCPConfigError(f"{what}: args must be a list of strings")
    cwd = entry.get("cwd") or ""
    if not isinstance(cwd, str):
        raise MCPConfigError(f"{what}: cwd must be a string")
    return ServerConfig(name, command=command, args=tuple(args),
                        env=_str_map(entry.get("env"), f"{what}: env"), cwd=cwd, origin=origin)


def parse_servers(data: Any, *, origin: str = "global", where: str = "") -> dict[str, ServerConfig]:
    """{name: ServerConfig} from `{"mcpServers": {...}}` (or the inner mapping alone)."""
    at = f"{where}: " if where else ""
    if isinstance(data, dict) and "mcpServers" in data:
        data = data["mcpServers"]
    if not isinstance(data, dict):
        raise MCPConfigError(f"{at}expected {{\"mcpServers\": {{name: {{...}}}}}}")
    return {n: parse_entry(n, e, origin=origin, where=where) for n, e in data.items()}


def global_path(environ: Mapping[str, str] | None = None) -> Path:
    """`DIALOGUE_MCP_CONFIG`, else mcp.json beside the config file (the user config dir)."""
    from .config import config_path
    env = os.environ if environ is None else environ
    if env.get("DIALOGUE_MCP_CONFIG", "").strip():
        return Path(env["DIALOGUE_MCP_CONFIG"].strip()).expanduser()
    return config_path(env).parent / "mcp.json"


def global_servers(path: Path | None = None) -> dict[str, ServerConfig]:
    """The user's global servers; {} when the file does not exist. A file that is not JSON or
    holds a bad entry raises MCPConfigError naming it."""
    p = global_path() if path is None else path
    try:
        raw = p.read_text("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise MCPConfigError(f"cannot read the MCP config file {p}: {e}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MCPConfigError(f"the MCP config file {p} is not valid JSON: {e}") from None
    return parse_servers(data, origin="global", where=str(p))


def _meta(d: "Dialogue") -> dict[str, Any]:
    v = d.meta.get(META_KEY)
    return v if isinstance(v, dict) else {}


def dialogue_servers(d: "Dialogue") -> dict[str, ServerConfig]:
    return parse_servers(_meta(d).get("servers") or {}, origin="dialogue",
                         where=f"dialogue {d.name!r}")


def enabled_names(d: "Dialogue") -> list[str]:
    names = _meta(d).get("enabled") or []
    return [n for n in names if isinstance(n, str)]


def configured(d: "Dialogue | None", path: Path | None = None) -> dict[str, ServerConfig]:
    """Every server `d` could use: the global ones, then its own (which win by name)."""
    out = dict(global_servers(path))
    if d is not None:
        out.update(dialogue_servers(d))
    return out


def servers_for(d: "Dialogue", path: Path | None = None) -> list[ServerConfig]:
    """The servers `d` enables, in the order enabled. A name enabled but configured nowhere is an
    MCPConfigError (the user must see it, not lose the tools silently)."""
    names = enabled_names(d)
    if not names:
        return []
    known = configured(d, path)
    missing = [n for n in names if n not in known]
    if missing:
        raise MCPConfigError(f"dialogue {d.name!r} enables MCP server(s) "
                             f"{', '.join(map(repr, missing))}, configured nowhere (global file "
                             f"{global_path() if path is None else path}, or the dialogue's own); "
                             "configure it again, or switch it off (settings panel, or dialogue "
                             "mcp disable)")
    return [known[n] for n in names]


def with_mcp(meta: dict[str, Any], *, enable: list[str] | None = None,
             disable: list[str] | None = None, servers: dict[str, Any] | None = None,
             remove: list[str] | None = None) -> dict[str, Any]:
    """`meta` with its MCP part changed: names enabled / disabled, own servers added (an
    mcpServers mapping, checked) or removed. The other keys are kept."""
    cur = dict(meta.get(META_KEY) or {})
    own = dict(cur.get("servers") or {})
    if servers:
        parse_servers(servers, origin="dialogue")  # refuse a bad entry before storing it
        own.update(servers.get("mcpServers", servers))
    for n in remove or []:
        own.pop(n, None)
    on = [n for n in cur.get("enabled") or [] if isinstance(n, str)]
    for n in enable or []:
        if n not in on:
            on.append(n)
    on = [n for n in on if n not in set(disable or []) and n not in set(remove or [])]
    new = {**({"servers": own} if own else {}), **({"enabled": on} if on else {})}
    out = {k: v for k, v in meta.items() if k != META_KEY}
    if new:
        out[META_KEY] = new
    return out


def _seconds(env: str, default: float) -> float:
    v = os.environ.get(env, "").strip()
    if not v:
        return default
    try:
        s = float(v)
    except ValueError:
        s = -1.0
    if not 0 < s < float("inf"):
        raise MCPConfigError(f"{env} must be a positive number of seconds, got {v!r}")
    return s


def start_timeout() -> float:
    return _seconds("DIALOGUE_MCP_START_TIMEOUT", DEFAULT_START_TIMEOUT)


def call_timeout() -> float:
    return _seconds("DIALOGUE_MCP_CALL_TIMEOUT", DEFAULT_CALL_TIMEOUT)


# ---------------------------------------------------------------- one running server

def _leaf(e: BaseException) -> BaseException:
    """The first real error inside anyio's exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _why(e: BaseException) -> str:
    e = _leaf(e)
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass
class ToolInfo:
    """A tool as its server lists it."""

    name: str
    description: str
    parameters: dict[str, Any]
    reads_only: bool = False


class Connection:
    """One running MCP server (see the module docstring). `tools()` and `call()` start it when
    it is not running."""

    def __init__(self, cfg: ServerConfig, *, start_timeout: float, call_timeout: float):
        self.cfg = cfg
        self.start_timeout, self.call_timeout = start_timeout, call_timeout
        self._client: Any = None
        self._task: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._tools: list[ToolInfo] | None = None
        self.instructions = ""  # what its initialize result told clients, "" for nothing
        self._errlog: Any = None
        self.starts = 0  # how many times it was started (tests, the settings page)

    @property
    def running(self) -> bool:
        """Up, on the loop asking (outside any loop: up on the loop it was started on)."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = self._loop
        return (self._client is not None and self._task is not None and not self._task.done()
                and self._loop is here)

    def stderr_size(self) -> int:
        try:
            return os.fstat(self._errlog.fileno()).st_size if self._errlog is not None else 0
        except (OSError, ValueError):
            return 0

    def stderr_since(self, offset: int = 0, limit: int = 600) -> str:
        """The last whole lines (at most `limit` characters) the server wrote to stderr after
        `offset` (stdio servers), for an error message."""
        f = self._errlog
        if f is None:
            return ""
        size = self.stderr_size()
        start = max(offset, size - limit)
        try:
            data = os.pread(f.fileno(), size - start, start).decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        if start > offset and "\n" in data:
            data = data.split("\n", 1)[1]  # from a line's start
        return data.strip()

    def _said(self, offset: int = 0) -> str:
        tail = self.stderr_since(offset)
        return f"; it said: {tail}" if tail else ""

    def _target(self, hc: Any) -> Any:
        if self.cfg.url:
            from mcp.client.streamable_http import streamable_http_client
            return streamable_http_client(self.cfg.url, http_client=hc)
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client
        params = StdioServerParameters(command=self.cfg.command, args=list(self.cfg.args),
                                       env=dict(self.cfg.env) or None, cwd=self.cfg.cwd or None)
        return stdio_client(params, errlog=self._errlog)

    async def _on_message(self, message: Any) -> None:
        from mcp.types import ToolListChangedNotification
        if isinstance(message, ToolListChangedNotification):
            self._tools = None

    async def _own(self, ready: asyncio.Future) -> None:
        """Enter the client, hand it over, wait for close, leave it: all in this one task."""
        from mcp import Client
        try:
            async with contextlib.AsyncExitStack() as stack:
                hc = None
                if self.cfg.url:  # the MCP SDK's own timeouts: a response stream may stay open
                    import httpx2
                    hc = await stack.enter_async_context(httpx2.AsyncClient(
                        headers=dict(self.cfg.headers), timeout=httpx2.Timeout(30.0, read=300.0)))
                client = await stack.enter_async_context(
                    Client(self._target(hc), message_handler=self._on_message, cache=None))
                if not ready.done():
                    ready.set_result(client)
                assert self._stop is not None
                await self._stop.wait()
        except asyncio.CancelledError:
            if not ready.done():
                ready.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - whatever ended it (anyio groups too): say why
            log.info("MCP server %r ended: %s", self.cfg.name, _why(e))
            if not ready.done():
                ready.set_exception(MCPServerError(_why(e)))
        finally:
            self._client = None

    async def _start(self) -> None:
        await self._shutdown()
        loop = self._loop = asyncio.get_running_loop()
        said = self.stderr_size()
        if self.cfg.command and self._errlog is None:
            self._errlog = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        ready: asyncio.Future = loop.create_future()
        self._ready = ready
        self._stop = asyncio.Event()
        self._task = loop.create_task(self._own(ready), name=f"mcp:{self.cfg.name}")
        self.starts += 1
        what = f"MCP server {self.cfg.name!r} ({self.cfg.describe()})"
        try:
            async with asyncio.timeout(self.start_timeout):
                client = await asyncio.shield(ready)
                self._client = client
                self.instructions = (getattr(client, "instructions", None) or "").strip()
                self._tools = await self._list(client)
        except TimeoutError:
            await self._shutdown()
            raise MCPServerError(f"{what} did not start within {self.start_timeout:g} s "
                                 f"(DIALOGUE_MCP_START_TIMEOUT){self._said(said)}") from None
        except asyncio.CancelledError:
            await self._shutdown()
            raise
        except Exception as e:
            await self._shutdown()
            why = str(e) if isinstance(e, MCPServerError) else _why(e)
            raise MCPServerError(f"{what} could not start: {why}{self._said(said)}") from None
        log.info("MCP server %r started with %d tools", self.cfg.name, len(self._tools))

    async def _list(self, client: Any) -> list[ToolInfo]:
        out: list[ToolInfo] = []
        cursor = None
        for _ in range(100):  # a server whose pages never end cannot hang us
            page = await client.list_tools(cursor=cursor)
            for t in page.tools:
                ann = t.annotations
                out.append(ToolInfo(t.name, t.description or t.title or "",
                                    dict(t.input_schema or {"type": "object", "properties": {}}),
                                    bool(ann is not None and ann.read_only_hint)))
            cursor = page.next_cursor
            if not cursor:
                break
        return out

    async def _ensure(self, check: bool = False) -> Any:
        """The client, started if it is not running. `check`: ask a running server for its tool
        list first (fresh: what an answer offers), and start it again if it does not answer (it
        died while idle). Not a ping: the 2026-07-28 protocol removed it."""
        here = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not here:
            self._lock, self._lock_loop = asyncio.Lock(), here
        async with self._lock:
            if self.running and check:
                try:
                    async with asyncio.timeout(self.start_timeout):
                        self._tools = await self._list(self._client)
                except Exception as e:  # noqa: BLE001 - closed, timed out: start it again
                    log.info("MCP server %r did not list its tools (%s); starting it again",
                             self.cfg.name, _why(e))
                    self.close_soon()
            if not self.running:
                await self._start()
            return self._client

    async def tools(self, *, check: bool = False) -> list[ToolInfo]:
        """Its tools (the cached list). `check`: listed again (an answer's start does, so a
        server that died since the last answer is started again, and a changed list is seen)."""
        client = await self._ensure(check)
        if self._tools is None:  # the server said its list changed
            try:
                async with asyncio.timeout(self.start_timeout):
                    self._tools = await self._list(client)
            except TimeoutError:
                raise MCPServerError(f"MCP server {self.cfg.name!r} did not list its tools "
                                     f"within {self.start_timeout:g} s") from None
        return list(self._tools)

    async def call(self, tool: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """(text, is_error); never raises for the server's failure: the model is told."""
        from mcp import MCPError
        from mcp.types import CONNECTION_CLOSED
        name = f"MCP server {self.cfg.name!r}"
        said = self.stderr_size()
        try:
            client = await self._ensure()
        except MCPServerError as e:
            return str(e), True
        try:
            async with asyncio.timeout(self.call_timeout):
                res = await client.call_tool(tool, arguments)
        except TimeoutError:
            self.close_soon()
            return (f"{name} did not answer {tool} within {self.call_timeout:g} s "
                    "(DIALOGUE_MCP_CALL_TIMEOUT); the server was stopped and starts again on "
                    "next use"), True
        except MCPError as e:
            if e.code == CONNECTION_CLOSED or not self.running:
                self.close_soon()
                return (f"{name} stopped while running {tool} (connection closed)"
                        f"{self._said(said)}; "
                        "it starts again on next use"), True
            return f"{name} refused {tool}: {e}", True
        except Exception as e:  # noqa: BLE001 - a malformed result, a transport error
            if not self.running:
                self.close_soon()
                return f"{name} stopped while running {tool}: {_why(e)}{self._said(said)}", True
            return f"{name} failed to run {tool}: {_why(e)}", True
        return result_text(res), bool(res.is_error)

    def close_soon(self) -> None:
        """Mark it stopped now (the next use starts it again) and let it exit in the background."""
        self._client = None
        if self._stop is not None:
            self._stop.set()

    async def _shutdown(self) -> None:
        task, self._task = self._task, None
        self._client = None
        if self._stop is not None:
            self._stop.set()
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return
        if self._ready is not None and not self._ready.done():
            task.cancel()  # still starting (a handshake that never comes): nothing to close
        # the stdio transport's own shutdown is bounded (stdin closed, then SIGTERM, SIGKILL)
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        await self._shutdown()
        if self._errlog is not None:
            self._errlog.close()
            self._errlog = None


def result_text(res: Any) -> str:
    """A CallToolResult as text for the model: text content as is, the rest in a line each; the
    structured content when there is nothing else."""
    parts: list[str] = []
    for c in res.content or []:
        kind = getattr(c, "type", "")
        if kind == "text":
            parts.append(c.text)
        elif kind in ("image", "audio"):
            size = len(c.data) * 3 // 4
            parts.append(f"[{kind} {c.mime_type}, {size:,} bytes, not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource {c.uri}" + (f" ({c.name})" if c.name else "") + "]")
        elif kind == "resource":
            r = c.resource
            text = getattr(r, "text", None)
            if text is not None:
                parts.append(f"[resource {r.uri}]\n{text}")
            else:
                parts.append(f"[resource {r.uri}, {r.mime_type or 'binary'}, not shown]")
        else:
            parts.append(f"[{kind or 'unknown'} content, not shown]")
    if not parts and res.structured_content is not None:
        parts.append(json.dumps(res.structured_content, ensure_ascii=False))
    return "\n".join(parts)


# ---------------------------------------------------------------- the servers of one service

class MCPPool:
    """One Connection per distinct server configuration, for the life of the service."""

    def __init__(self) -> None:
        self._conns: dict[str, Connection] = {}
        self._closing: set[asyncio.Task] = set()

    def connection(self, cfg: ServerConfig) -> Connection:
        c = self._conns.get(cfg.key)
        if c is None:
            if cfg.origin == "global":
                self._retire(cfg)
            c = self._conns[cfg.key] = Connection(cfg, start_timeout=start_timeout(),
                                                  call_timeout=call_timeout())
        else:  # the settings apply to the next call
            c.start_timeout, c.call_timeout = start_timeout(), call_timeout()
        return c

    def _retire(self, cfg: ServerConfig) -> None:
        """The global file now says something else for `cfg.name`: stop the server it said
        before (it would otherwise run, unused, until the app stops)."""
        for key, old in list(self._conns.items()):
            if old.cfg.origin == "global" and old.cfg.name == cfg.name and key != cfg.key:
                del self._conns[key]
                try:
                    t = asyncio.get_running_loop().create_task(old.close())
                except RuntimeError:  # no loop here: mark it stopped; its loop's end reaps it
                    old.close_soon()
                    continue
                self._closing.add(t)
                t.add_done_callback(self._closing.discard)

    def peek(self, cfg: ServerConfig) -> Connection | None:
        return self._conns.get(cfg.key)

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(c.close() for c in conns), *self._closing, return_exceptions=True)


def tool_name(server: str, tool: str) -> str:
    """`<server>__<tool>` in the characters every provider accepts, at most 64 of them."""
    name = _TOOL_CHARS.sub("_", f"{server}__{tool}")
    if len(name) > 64:
        name = name[:55] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


@dataclass
class MCPTools:
    """The ToolSource of an answer's MCP tools: each offered name routed to its server's tool.
    A result longer than `limit` characters is cut (and says so), as a kernel tool's is."""

    routes: dict[str, tuple[Connection, str]] = field(default_factory=dict)
    limit: int = 20_000
    conns: list[Connection] = field(default_factory=list)  # every server's, tools or none

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        if name not in self.routes:
            return f"there is no MCP tool named {name!r}", True
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}", True
        from .tools import _cap
        conn, tool = self.routes[name]
        text, err = await conn.call(tool, arguments)
        return _cap(text, self.limit), err

    async def preview(self, name: str, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """What an approval shows (the approvals' preview shape, kind "text"): the server, how
        it runs, the tool and its arguments."""
        if name not in self.routes:
            return None
        conn, tool = self.routes[name]
        args = json.dumps(arguments, ensure_ascii=False, indent=2)
        return {"kind": "text", "text": f"MCP server {conn.cfg.name!r} ({conn.cfg.describe()}) "
                                        f"runs its tool {tool!r} with\n{args}"}


async def specs_of(pool: MCPPool, servers: list[ServerConfig]) -> tuple[MCPTools, list["ToolSpec"]]:
    """The tools of `servers` (started as needed, in parallel) as one source and its specs.
    A server that cannot start raises MCPServerError naming it."""
    from .llm.base import ToolSpec
    conns = [pool.connection(s) for s in servers]
    listed = await asyncio.gather(*(c.tools(check=True) for c in conns), return_exceptions=True)
    errors = [str(x) for x in listed if isinstance(x, BaseException)]
    if errors:
        raise MCPServerError("; ".join(errors))
    source, specs = MCPTools(conns=conns), []
    for conn, tools in zip(conns, listed):
        for t in tools:  # type: ignore[union-attr]
            n = tool_name(conn.cfg.name, t.name)
            if n in source.routes:
                raise MCPServerError(f"two MCP tools are both offered as {n!r}; rename a server")
            source.routes[n] = (conn, t.name)
            specs.append(ToolSpec(name=n, description=t.description, parameters=t.parameters,
                                  reads_only=t.reads_only, source=f"mcp:{conn.cfg.name}"))
    return source, specs


# A server's instructions past this many characters are cut (and say so): they are the server's
# text, sent with every prompt of the dialogues that enable it
MAX_INSTRUCTIONS = 8_000


async def offer(pool: MCPPool, d: "Dialogue", box: Any, req: Any = None,
                count: Any = None) -> None:
    """Add the tools of the MCP servers `d` enables to the answer's Toolbox `box`, and with
    `req` (the answer's Request) what those servers' initialize results say to clients
    (`instructions`) to its context (`add_instructions`; `count` counts tokens)."""
    servers = servers_for(d)
    if not servers:
        return
    source, specs = await specs_of(pool, servers)
    box.add(source, specs)
    if req is not None:
        add_instructions(req, source.conns, count)  # the connections that listed the tools


def add_instructions(req: Any, conns: list[Connection], count: Any = None) -> None:
    """Append each server's instructions to `req.context` after the attached context, as a
    ``<context mcp_server="NAME">`` block (so they sit in the cached prefix, and the model can
    tell whose they are), and list each in `req.meta["context"]` (kind "mcp", the server's name
    and how it runs, its tokens) for the request view; the request's token figures grow by
    them. `count`: a token counter (None or a None result: the builder's estimate)."""
    import html
    from .context import Counter
    counter = Counter(count)
    blocks, entries = [], []
    for c in conns:
        text = c.instructions
        if not text:
            continue
        if len(text) > MAX_INSTRUCTIONS:
            text = (text[:MAX_INSTRUCTIONS] + f"\n[cut: the server's instructions are "
                    f"{len(c.instructions):,} characters; the first {MAX_INSTRUCTIONS:,} are sent]")
        block = f'<context mcp_server="{html.escape(c.cfg.name)}">\n{text}\n</context>'
        blocks.append(block)
        entries.append({"kind": "mcp", "name": c.cfg.name, "source": c.cfg.describe(),
                        "tokens": counter(block)})
    if not blocks:
        return
    req.context = "\n\n".join(x for x in (req.context, *blocks) if x)
    req.meta["context"] = [*(req.meta.get("context") or []), *entries]
    added = sum(e["tokens"] for e in entries)
    by_part = req.meta.get("tokens_by_part")
    if isinstance(by_part, dict) and by_part.get("context") is not None:
        by_part["context"] += added
    if req.meta.get("tokens") is not None:
        req.meta["tokens"] += added
