"""The web app: FastHTML over the dialogue service.

Routes live in `web.routes`, one module-level router per area (dialogues, cells, runs, settings,
adapters); their paths are named once in `web.paths`. Routes return FT components: a full page for
a plain request, the fragment alone for an HTMX request (FastHTML decides from the HX-Request
header). They call nothing but the `DialogueService` (plus the pure converters in
`dialogue.artifacts` and `dialogue.render`): tests/test_layout.py holds the web to that.

Errors a user can act on (a stale edit, a name already taken, an unknown model, a broken
notebook) are answered with a 4xx status and a toast swapped out-of-band, with `HX-Reswap: none`
so the part of the page the request aimed at stays as it was. A stale edit of a cell is shown in
the cell itself, with the user's text kept in its editor.

`serve()` runs it under uvicorn, bound to 127.0.0.1 unless told otherwise; any other address gets
a token (printed in the URL, as Jupyter does) that every request must carry.
"""
from __future__ import annotations

import json
import logging
import secrets
import socket
import sys
import threading
import time
import webbrowser
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fasthtml.common import APIRouter, FastHTML, FileResponse, HTMLResponse, Response, to_xml
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..service import DialogueService, ProviderError, StoreError
from . import paths
from . import views as V
from .common import MAX_UPLOAD, SSE_PING, Site, refuse, site, status_of
from .routes import ROUTERS
from .security import LOOPBACK_NAMES, Guard, is_loopback, local_url, new_token

__all__ = ["create_app", "serve", "STATIC_DIR", "AccessLog", "ACCESS_LOGGER"]

STATIC_DIR = Path(__file__).parent / "static"


# ---------------------------------------------------------------- errors -> pages

def _error_page(req: Request, message: str, status: int) -> HTMLResponse:
    if "hx-request" in req.headers:
        return refuse(message, status)
    from fasthtml.common import A, H1, Main, P, Title
    from fasthtml.core import respond
    page = (Title("dialogue: error"),
            V.topbar(),
            Main(H1({404: "Not found", 409: "Conflict", 413: "Too large"}.get(status, "Error")),
                 P(message), P(A("Back to the dialogues", href=paths.index)), cls="container"))
    return HTMLResponse(to_xml(respond(req, [page[0]], page[1:])), status_code=status)


async def _domain_error(req: Request, exc: Exception) -> HTMLResponse:
    return _error_page(req, str(exc), status_of(exc))


async def _bug(req: Request, exc: Exception) -> HTMLResponse:
    """Anything unexpected: say so on the page instead of failing silently (uvicorn logs it)."""
    return _error_page(req, f"Internal error ({type(exc).__name__}: {exc}); the server's log "
                            "has the details.", 500)


# ---------------------------------------------------------------- the app's own routes

app_routes = APIRouter()
_STATIC_ROOT = STATIC_DIR.resolve()
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".svg": "image/svg+xml"}


@app_routes(paths.highlight_css)
async def highlight_css_file() -> Response:
    return Response(V.highlight_stylesheet(), media_type="text/css; charset=utf-8",
                    headers={"Cache-Control": "max-age=3600"})


@app_routes(paths.static)
async def static_file(path: str) -> Response:
    # Not FastHTML's static_route_exts: it joins the URL path onto the folder as is.
    p = (_STATIC_ROOT / path).resolve()
    if _STATIC_ROOT not in p.parents or not p.is_file() or p.suffix not in _STATIC_TYPES:
        return Response("not found", status_code=404)
    return FileResponse(p, media_type=_STATIC_TYPES[p.suffix], headers={"Cache-Control": "no-cache"})


@app_routes(paths.health)
async def health(req: Request) -> Response:
    """What a page polls while it cannot reach the server (static/app.js): cheap, never cached,
    and behind the token like every route. `instance` changes when the server restarts, so a
    page knows that the runs it showed are gone (the store has how they ended)."""
    return JSONResponse({"ok": True, "instance": site(req).instance},
                        headers={"Cache-Control": "no-store"})


@app_routes(paths.healthz, methods=["get"])
async def healthz() -> Response:
    """For a supervisor or a reverse proxy: the server is up and its event loop answers. Cheap
    (no database access at all, so never a write) and without the token (security.PUBLIC_PATHS),
    so it says nothing more than that."""
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------- access log

ACCESS_LOGGER = "dialogue.web.access"


class AccessLog:
    """One JSON line per request on the `dialogue.web.access` logger: when it ended, the client,
    method, path, status, bytes sent and duration. Outside the Guard, so refused requests are
    logged too; the query string's token is never written. An event stream is logged when it
    ends. Plain ASGI (not a Starlette BaseHTTPMiddleware) so streams pass through untouched."""

    def __init__(self, app: Any, logger: logging.Logger | None = None):
        self.app = app
        self.log = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status, sent = 0, 0

        async def counting_send(msg: dict) -> None:
            nonlocal status, sent
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body":
                sent += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.log.info(json.dumps(self.record(scope, status, sent, time.perf_counter() - t0)))

    @staticmethod
    def record(scope: dict, status: int, sent: int, seconds: float) -> dict[str, Any]:
        query = [(k, "***" if k == "token" else v)
                 for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                       keep_blank_values=True)]
        client = scope.get("client")
        headers = dict(scope.get("headers") or [])
        return {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "client": client[0] if client else None, "method": scope["method"],
                "path": scope["path"], "query": urlencode(query),
                "status": status or None,  # None: the app sent no response (a crash, a cut)
                "bytes": sent, "ms": round(seconds * 1000, 1),
                "user_agent": headers.get(b"user-agent", b"").decode("latin-1")}


def enable_access_log(stream: Any = None) -> logging.Logger:
    """Write the access log's JSON lines, bare, to `stream` (default: stderr)."""
    log = logging.getLogger(ACCESS_LOGGER)
    if not any(getattr(h, "dialogue_access", False) for h in log.handlers):
        h = logging.StreamHandler(stream or sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h.dialogue_access = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False  # one JSON line, not again through the app's own log format
    return log


def create_app(service: DialogueService, *, token: str | None = None,
               allowed_hosts: set[str] | frozenset[str] | None = LOOPBACK_NAMES,
               port: int | None = None, sse_ping: float = SSE_PING,
               access_log: bool = False) -> FastHTML:
    """The web app over `service`.

    Every handler is `async`: FastHTML runs plain functions in a thread pool, and the store's
    connection (and its transaction nesting) belongs to the event loop's thread, where the runs
    write their streams.

    `token`: required on every request when set (see `security`). `allowed_hosts`: the Host
    names answered when there is no token (default: loopback names only, against DNS
    rebinding; None answers any). `sse_ping`: seconds between keep-alive comments on a quiet
    event stream. `access_log`: one JSON line per request (`AccessLog`). On startup the app turns streams cut by a previous crash into
    versions; on shutdown it stops every run and kernel and closes the service."""

    async def startup() -> None:
        service.recover_interrupted()

    async def shutdown() -> None:
        await service.aclose()

    from ..artifacts import NotebookError
    # ValueError: the document model refuses bad input (an unknown kind) with it
    handlers: dict[Any, Any] = {e: _domain_error for e in (StoreError, ProviderError,
                                                            NotebookError, ValueError)}
    handlers[_kernel_error()] = _domain_error
    handlers[500] = _bug
    app = FastHTML(
        title="dialogue", hdrs=V.page_hdrs(), default_hdrs=False, pico=False, htmx=False,
        surreal=False, canonical=False, sess_cls=None, secret_key=secrets.token_hex(32),
        htmlkw={"lang": "en", "data-theme": "light"}, exception_handlers=handlers,
        on_startup=[startup], on_shutdown=[shutdown], max_part_size=MAX_UPLOAD,
        middleware=[*([Middleware(AccessLog)] if access_log else []),
                    Middleware(Guard, token=token, allowed_hosts=allowed_hosts, port=port)])
    app.state.site = Site(service, sse_ping=sse_ping)
    for router in (app_routes, *ROUTERS):
        router.to_app(app)
    return app


def _kernel_error() -> type[Exception]:
    from ..service import KernelError
    return KernelError


# ---------------------------------------------------------------- serve

def serve(*, db: str | None = None, host: str = "127.0.0.1", port: int = 5001,
          open_browser: bool = True, token: str | None = None, access_log: bool = False,
          sse_ping: float = SSE_PING) -> None:
    """Run the app under uvicorn until Ctrl+C. Binding beyond the loopback interface without a
    token generates one; the URL printed (and opened) carries it. `access_log`: one JSON line
    per request on stderr."""
    import uvicorn
    loopback = is_loopback(host)
    if not loopback and not token:
        token = new_token()
    try:  # one server per database: a second one names the first (Store.claim_server says why)
        service = DialogueService(db)
        service.claim_server(local_url(host, port))
    except StoreError as e:
        raise SystemExit(f"dialogue: {e}") from None
    _check_port(host, port)
    if access_log:
        enable_access_log()
    app = create_app(service, token=token, allowed_hosts=LOOPBACK_NAMES if not token else None,
                     port=port, sse_ping=sse_ping, access_log=access_log)
    url = local_url(host, port)
    if token:
        url += f"?token={token}"
    print(f"dialogue: serving {service.path} at {url}", flush=True)
    if not loopback:
        print(f"dialogue: listening on {host}: anyone who can reach this machine and has the "
              "token can run code as you. Ctrl+C stops it.", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    # A short graceful-shutdown window: open event streams would otherwise keep uvicorn waiting.
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on",
                timeout_graceful_shutdown=3)


def _check_port(host: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"dialogue: cannot listen on {host}:{port} ({e.strerror}); "
                             "choose another port with --port") from None
