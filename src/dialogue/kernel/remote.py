"""Kernels elsewhere: a dialogue's kernel run by a Jupyter Server or Kernel Gateway.

The gateway is named only by the config (`gateway_url`, `gateway_token`; `DIALOGUE_GATEWAY_URL`,
`DIALOGUE_GATEWAY_TOKEN`); a dialogue chooses one of its kernelspecs by name (`specs.Choice`
with `gateway`), so a dialogue file can never send code to a server of its choosing.

`RemoteKernel` is a `Kernel` whose client speaks the documented Jupyter kernel REST API
(``POST /api/kernels``, ``.../interrupt``, ``DELETE``) and websocket protocol
(``/api/kernels/ID/channels``: one JSON text frame per message, its ``channel`` field naming
shell, iopub, stdin or control) instead of ZeroMQ. Everything that runs code (execute, the
IOPub loop with its idle handling, the output cap and folding, input(), timeouts, silent calls,
helper modules) is `Kernel`'s own: the client below has the interface of the jupyter_client
client that `Kernel` uses (`execute`, `kernel_info`, `input`, `session.msg`,
`shell_channel.send`, `get_shell_msg` / `get_iopub_msg` / `get_stdin_msg` raising queue.Empty),
and `poll()` says whether the remote kernel is still there, as a local kernel's process does.

Why not jupyter_server's own gateway client (`jupyter_server.gateway.GatewayKernelClient`):
it is configured through a process-wide singleton (one gateway, set through traitlets), connects
with a blocking websocket in the event loop, reads it in a thread, and waits for messages by
spinning on ``asyncio.sleep(0)`` (a busy core while a cell runs); and it would make all of
jupyter_server (a web server, nbconvert) a dependency of a client. The protocol it speaks is
small and documented, and `httpx2` (already ours) and `websockets` speak it from asyncio.

A remote kernel's death: the websocket closes, or the gateway reports its kernel ``dead`` or
``restarting`` (its restarter replaced a kernel that died; the variables are gone either way).
The run in progress says so; the next run deletes what is left and starts a fresh kernel.
Remote kernels are deleted on shutdown, and at exit by a hook, as local ones are ended.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .. import config
from .kernel import Kernel, KernelStartError
from .process import Tree
from .specs import KernelChoiceError

log = logging.getLogger(__name__)

__all__ = ["Gateway", "GatewayError", "RemoteKernel"]

# what the gateway's websocket says about a kernel that is gone (execution_state, no parent)
_GONE_STATES = {"dead": "the gateway reports the kernel dead",
                "restarting": "the kernel died on the gateway (the gateway restarted it, "
                              "without its variables)"}
_LIVE: dict[str, "Gateway"] = {}  # remote kernel id -> its gateway, for the exit hook
_LIVE_LOCK = threading.Lock()
_hook_installed = False


class GatewayError(KernelChoiceError):
    """The gateway cannot be used: not configured, unreachable, or refusing; the message says
    which and what to change."""


@dataclass(frozen=True)
class Gateway:
    """A Jupyter Server or Kernel Gateway, as the config names it."""

    url: str
    token: str | None = None
    timeout: float = 30.0

    @classmethod
    def configured(cls) -> "Gateway":
        url = config.get("gateway_url")
        if not url:
            raise GatewayError("no kernel gateway is configured: set gateway_url (and "
                               "gateway_token) in config.toml, or DIALOGUE_GATEWAY_URL and "
                               "DIALOGUE_GATEWAY_TOKEN")
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise GatewayError(f"gateway_url must be an http:// or https:// URL, not {url!r}")
        return cls(url.strip().rstrip("/"), config.get("gateway_token"))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def api(self, *path: str) -> str:
        return "/".join([self.url, "api", *(quote(p, safe="") for p in path)])

    def ws_url(self, kernel_id: str, session_id: str) -> str:
        p = urlsplit(self.api("kernels", kernel_id, "channels"))
        scheme = "wss" if p.scheme == "https" else "ws"
        return urlunsplit((scheme, p.netloc, p.path, f"session_id={session_id}", ""))

    def _check(self, r: Any, what: str) -> Any:
        """The response's JSON, or GatewayError in words."""
        if r.status_code in (401, 403):
            raise GatewayError(f"the kernel gateway at {self.url} refused {what} (HTTP "
                               f"{r.status_code}): check gateway_token / DIALOGUE_GATEWAY_TOKEN")
        if r.status_code >= 400:
            detail = ""
            with contextlib.suppress(Exception):
                body = r.json()
                detail = body.get("message") or body.get("reason") or ""
            raise GatewayError(f"the kernel gateway at {self.url} could not {what} (HTTP "
                               f"{r.status_code}{': ' + str(detail)[:300] if detail else ''})")
        return r.json() if r.content else None

    def _unreachable(self, e: Exception) -> GatewayError:
        return GatewayError(f"cannot reach the kernel gateway at {self.url}: "
                            f"{type(e).__name__}: {e}")

    def specs(self) -> dict[str, dict[str, Any]]:
        """{name: kernelspec ("display_name", "language", ...)} of the gateway's kernels."""
        import httpx2
        try:
            r = httpx2.get(self.api("kernelspecs"), headers=self.headers, timeout=self.timeout)
        except httpx2.HTTPError as e:
            raise self._unreachable(e) from None
        body = self._check(r, "list its kernels") or {}
        specs = body.get("kernelspecs") if isinstance(body, dict) else None
        if not isinstance(specs, dict):
            raise GatewayError(f"{self.url} did not answer as a Jupyter kernel gateway "
                               "(no kernelspecs in GET /api/kernelspecs)")
        return {str(n): dict((v or {}).get("spec") or {}) for n, v in sorted(specs.items())}

    def check_spec(self, name: str) -> None:
        specs = self.specs()
        if name not in specs:
            raise GatewayError(f"the kernel gateway at {self.url} has no kernel named {name!r} "
                               f"(it has: {', '.join(specs) or 'none'})")

    async def start_kernel(self, name: str) -> str:
        import httpx2
        try:
            async with httpx2.AsyncClient(headers=self.headers, timeout=self.timeout) as c:
                r = await c.post(self.api("kernels"), json={"name": name})
        except httpx2.HTTPError as e:
            raise self._unreachable(e) from None
        body = self._check(r, f"start the kernel {name!r}")
        return str(body["id"])

    async def interrupt(self, kernel_id: str) -> None:
        import httpx2
        try:
            async with httpx2.AsyncClient(headers=self.headers, timeout=self.timeout) as c:
                r = await c.post(self.api("kernels", kernel_id, "interrupt"))
        except httpx2.HTTPError as e:
            raise self._unreachable(e) from None
        self._check(r, "interrupt the kernel")

    async def delete(self, kernel_id: str) -> None:
        """Shut the remote kernel down (a kernel already gone is no error)."""
        import httpx2
        try:
            async with httpx2.AsyncClient(headers=self.headers, timeout=self.timeout) as c:
                r = await c.delete(self.api("kernels", kernel_id))
        except httpx2.HTTPError as e:
            raise self._unreachable(e) from None
        if r.status_code != 404:
            self._check(r, "shut the kernel down")

    def delete_sync(self, kernel_id: str) -> None:
        import httpx2
        with contextlib.suppress(Exception):
            httpx2.delete(self.api("kernels", kernel_id), headers=self.headers, timeout=5.0)


_PICKER: dict[tuple[str, str | None], tuple[float, dict[str, dict[str, Any]]]] = {}
_PICKER_TTL = 30.0


def specs_for_picker(gw: Gateway) -> dict[str, dict[str, Any]]:
    """`gw.specs()` for a page that lists them: asked at most every 30 s, with a 3 s timeout,
    and {} (logged) when the gateway does not answer, so a page never waits on a gateway that
    is down."""
    key = (gw.url, gw.token)
    hit = _PICKER.get(key)
    if hit is not None and time.monotonic() - hit[0] < _PICKER_TTL:
        return hit[1]
    try:
        specs = Gateway(gw.url, gw.token, timeout=3.0).specs()
    except GatewayError as e:
        log.warning("the kernel picker lists no gateway kernels: %s", e)
        specs = {}
    _PICKER[key] = (time.monotonic(), specs)
    return specs


def _exit_hook() -> None:
    """At exit, delete the remote kernels still running (as local kernels are ended)."""
    with _LIVE_LOCK:
        live = list(_LIVE.items())
        _LIVE.clear()
    for kid, gw in live:
        gw.delete_sync(kid)


def _register(kid: str, gw: Gateway) -> None:
    global _hook_installed
    with _LIVE_LOCK:
        _LIVE[kid] = gw
        if not _hook_installed:
            atexit.register(_exit_hook)
            _hook_installed = True


def _unregister(kid: str) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(kid, None)


# ---------------------------------------------------------------- the websocket client

class _Channel:
    """One channel's incoming messages; `socket` is itself, so that `Kernel`'s stdin poller can
    name it as it names a ZeroMQ socket."""

    def __init__(self, client: "_Client", name: str):
        self.client, self.name = client, name
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.socket = self

    def send(self, msg: dict[str, Any]) -> None:
        self.client._send(self.name, msg)

    async def get(self, timeout: float | None) -> dict[str, Any]:
        if not self.queue.empty():
            return self.queue.get_nowait()
        if timeout is not None and timeout <= 0:
            raise queue.Empty
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise queue.Empty from None


def _decode(raw: str | bytes) -> dict[str, Any]:
    """One websocket frame as a message: JSON text, or the binary form of a message with
    buffers (a count, offsets, then the JSON part and the buffers; the buffers are dropped:
    nothing we store uses them)."""
    if isinstance(raw, str):
        return json.loads(raw)
    n = int.from_bytes(raw[:4], "big")
    offsets = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(n)]
    end = offsets[1] if n > 1 else len(raw)
    return json.loads(raw[offsets[0]:end].decode())


class _Client:
    """A kernel's channels over one websocket, with the methods `Kernel` calls on a
    jupyter_client AsyncKernelClient."""

    def __init__(self, ws: Any, on_gone: Any):
        from jupyter_client.session import Session
        self.ws = ws
        self.session = Session(key=b"", username="dialogue")
        self.shell_channel = _Channel(self, "shell")
        self.iopub_channel = _Channel(self, "iopub")
        self.stdin_channel = _Channel(self, "stdin")
        self.control_channel = _Channel(self, "control")
        self._channels = {c.name: c for c in (self.shell_channel, self.iopub_channel,
                                               self.stdin_channel, self.control_channel)}
        self.gone: str | None = None  # why the remote kernel is no longer there
        self._on_gone = on_gone
        self.arrived = asyncio.Event()  # set on every message (and on the end)
        self._out: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._writer = loop.create_task(self._write())

    # -- what Kernel reads as a process
    def poll(self) -> int | None:
        return None if self.gone is None else 1

    def mark_gone(self, why: str) -> None:
        if self.gone is None:
            self.gone = why
            self._on_gone(why)
        self.arrived.set()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    msg = _decode(raw)
                except (ValueError, IndexError, UnicodeDecodeError):
                    log.warning("kernel gateway: a frame that is not a Jupyter message was ignored")
                    continue
                ch = self._channels.get(msg.get("channel") or "")
                if ch is None:
                    continue
                if (ch.name == "iopub" and msg.get("msg_type") == "status"
                        and not (msg.get("parent_header") or {}).get("msg_id")):
                    state = (msg.get("content") or {}).get("execution_state")
                    if state in _GONE_STATES:
                        self.mark_gone(_GONE_STATES[state])
                        continue
                ch.queue.put_nowait(msg)
                self.arrived.set()
        except Exception as e:  # the connection broke
            log.info("kernel gateway websocket: %s", e)
        self.mark_gone("the connection to the kernel gateway closed")

    async def _write(self) -> None:
        while True:
            data = await self._out.get()
            if data is None:
                return
            try:
                await self.ws.send(data)
            except Exception as e:
                self.mark_gone(f"the connection to the kernel gateway broke ({e})")
                return

    def _send(self, channel: str, msg: dict[str, Any]) -> None:
        from jupyter_client.jsonutil import json_default
        self._out.put_nowait(json.dumps({**msg, "channel": channel}, default=json_default))

    # -- jupyter_client's client interface, as Kernel uses it
    def execute(self, code: str, silent: bool = False, store_history: bool = True,
                user_expressions: dict[str, Any] | None = None, allow_stdin: bool | None = None,
                stop_on_error: bool = True) -> str:
        msg = self.session.msg("execute_request", {
            "code": code, "silent": silent, "store_history": store_history,
            "user_expressions": user_expressions or {}, "allow_stdin": bool(allow_stdin),
            "stop_on_error": stop_on_error})
        self.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    def kernel_info(self) -> str:
        msg = self.session.msg("kernel_info_request", {})
        self.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    def input(self, text: str) -> None:
        self.stdin_channel.send(self.session.msg("input_reply", {"value": text}))

    async def get_shell_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.shell_channel.get(timeout)

    async def get_iopub_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.iopub_channel.get(timeout)

    async def get_stdin_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.stdin_channel.get(timeout)

    async def close(self) -> None:
        self._out.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer, 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


class _QueuePoller:
    """`Kernel._stdin_poller` for the websocket: waits until IOPub or stdin has a message."""

    def __init__(self, kc: _Client):
        self.kc = kc

    async def poll(self, ms: int) -> list[tuple[Any, int]]:
        kc = self.kc
        chans = (kc.iopub_channel, kc.stdin_channel)
        if not any(not c.queue.empty() for c in chans) and kc.gone is None:
            kc.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(kc.arrived.wait(), max(0, ms) / 1000)
        return [(c.socket, 1) for c in chans if not c.queue.empty()]


class _Manager:
    """What `Kernel` calls on its kernel manager, for a remote kernel."""

    def __init__(self, gateway: Gateway, kernel_id: str):
        self.gateway, self.kernel_id = gateway, kernel_id

    async def interrupt_kernel(self) -> None:
        await self.gateway.interrupt(self.kernel_id)


# ---------------------------------------------------------------- the kernel

class RemoteKernel(Kernel):
    """A `Kernel` on the configured gateway, running the kernelspec `choice.gateway`. `cwd` and
    `env` are this machine's and are not sent: the kernel runs where the gateway runs it.
    `pid` is None and `containment` is "remote" (the gateway holds the process)."""

    def __init__(self, *, gateway: Gateway | None = None, **options: Any):
        super().__init__(**options)
        if self.choice is None or not getattr(self.choice, "gateway", None):
            raise ValueError("a RemoteKernel needs a choice with a gateway kernelspec")
        # None: the config's, read at each start (a run then says when none is configured)
        self._gateway = gateway
        self._started_on: Gateway | None = None
        self.spec_name: str = self.choice.gateway
        self.kernel_id: str | None = None

    @property
    def gateway(self) -> Gateway:
        """The gateway the kernel runs (or will next start) on; GatewayError when none is
        configured."""
        return self._started_on or self._gateway or Gateway.configured()

    @property
    def _proc(self) -> Any:
        return self._kc

    @property
    def pid(self) -> int | None:
        return None

    @property
    def containment(self) -> str | None:
        return "remote" if self._kc is not None else None

    @property
    def label(self) -> str:
        try:
            return f"{self.spec_name} on {self.gateway.url}"
        except GatewayError:
            return f"{self.spec_name} (gateway)"

    def _stdin_poller(self, kc: Any) -> Any:
        return _QueuePoller(kc)

    async def _kill(self, tree: Tree | None) -> None:
        kc, kid = self._kc, self.kernel_id
        if kc is not None:
            kc.mark_gone("the kernel was stopped")
        if kid is not None:
            with contextlib.suppress(Exception):
                await self.gateway.delete(kid)

    def _gone(self, why: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = f"The kernel {self.label} is gone: {why}"

    async def _launch(self) -> None:
        try:
            from websockets.asyncio.client import connect
        except ImportError:
            raise KernelStartError("a kernel on a gateway needs the websockets package: "
                                   "pip install 'dialogue[remote]'") from None
        t0 = time.monotonic()
        try:
            gw = self._gateway or Gateway.configured()
            kid = await gw.start_kernel(self.spec_name)
        except GatewayError as e:
            raise KernelStartError(f"could not start the kernel {self.label}: {e}") from None
        _register(kid, gw)
        try:
            ws = await connect(gw.ws_url(kid, uuid.uuid4().hex), additional_headers=gw.headers,
                               open_timeout=gw.timeout, max_size=None, compression=None)
        except Exception as e:
            await self._forget(gw, kid)
            raise KernelStartError(f"could not connect to the kernel {self.label}: "
                                   f"{type(e).__name__}: {e}") from None
        self._stop_reason = None
        kc = _Client(ws, self._gone)
        self._km, self._kc, self.kernel_id = _Manager(gw, kid), kc, kid
        self._started_on = gw
        reply = await self._wait_ready(kc)
        if reply is None:
            why = kc.gone or f"no answer within {self.startup_timeout:g} s"
            await self._stop_locked(now=True)
            raise KernelStartError(f"the kernel {self.label} did not come up ({why})")
        self.language_info = dict(reply.get("language_info") or {})
        log.info("kernel %s started (id %s) in %.2f s", self.label, kid, time.monotonic() - t0)

    async def _wait_ready(self, kc: _Client) -> dict[str, Any] | None:
        """The kernel_info reply, asked for again each second until one comes (as
        jupyter_client's `wait_for_ready` does): a request that reaches the gateway before it
        has connected the kernel's channels is lost. None if the kernel is gone first or
        `startup_timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        asked: set[str] = set()
        next_ask = loop.time()
        while kc.gone is None and loop.time() < deadline:
            if loop.time() >= next_ask:
                asked.add(kc.kernel_info())
                next_ask = loop.time() + 1.0
            try:
                msg = await kc.get_shell_msg(timeout=max(0.0, min(next_ask, deadline) - loop.time()))
            except queue.Empty:
                continue
            if msg.get("parent_header", {}).get("msg_id") in asked:
                return msg.get("content") or {}
        return None

    async def _forget(self, gw: Gateway, kid: str) -> None:
        with contextlib.suppress(Exception):
            await gw.delete(kid)
        _unregister(kid)

    async def _stop_locked(self, now: bool) -> None:
        km, kc, kid = self._km, self._kc, self.kernel_id
        if km is None:
            return
        if kc is not None:  # a run in progress sees the kernel gone (with _stop_reason's words)
            kc.mark_gone(self._stop_reason or "the kernel was stopped")
        cur = self._current
        if (cur is not None and self._current_msg is not None and not cur.done()
                and cur is not asyncio.current_task()):
            await asyncio.wait([cur], timeout=5)
        if kid is not None:  # the gateway asks the kernel to exit, then ends it
            await self._forget(km.gateway, kid)
        if kc is not None:
            await kc.close()
        self._km = self._kc = None
        self.kernel_id = self._started_on = None
        self._modules = {}
