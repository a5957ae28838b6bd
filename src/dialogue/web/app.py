"""The web app: FastHTML routes over the dialogue service.

Routes return FT components: a full page for a plain request, the fragment alone for an HTMX
request (FastHTML decides from the HX-Request header). They are grouped by area in APIRouters
(dialogues, cells, runs, dialogue settings and kernel, adapters and their side-by-side trials,
Run all, static files) and call nothing but the `DialogueService` (plus the pure converters in
`dialogue.artifacts` and `dialogue.render`, and the adapter registry's list, read to tell a user
why an entry of a dialogue's adapter set is broken).

Errors a user can act on (a stale edit, a name already taken, an unknown model, a broken
notebook) are answered with a 4xx status and a toast swapped out-of-band, with `HX-Reswap: none`
so the part of the page the request aimed at stays as it was. A stale edit of a cell is shown in
the cell itself, with the user's text kept in its editor.

`serve()` runs it under uvicorn, bound to 127.0.0.1 unless told otherwise; any other address gets
a token (printed in the URL, as Jupyter does) that every request must carry.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import webbrowser
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasthtml.common import (APIRouter, Div, FastHTML, FileResponse, HTMLResponse,
                             HtmxResponseHeaders, Redirect, Response, StreamingResponse, to_xml)
from starlette.datastructures import FormData, UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..document import FLAGS, ContextItem, Dialogue, Kind, Message
from ..service import DialogueService, LiveState, RunAll, RunError
from ..store import ConflictError, NameTakenError, NotFoundError, StoreError
from . import views as V
from .security import LOOPBACK_NAMES, Guard, is_loopback, local_url, new_token

__all__ = ["create_app", "serve", "STATIC_DIR"]

log = logging.getLogger("dialogue.web")

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD = 100 * 1024 * 1024  # the notebook reader's own default limit

# Models offered in the picker when their provider's key is set. Any other name can be typed in
# the settings panel; the provider registry decides whether it is valid.
CLAUDE_MODELS = ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5")
OPENAI_MODELS = ("gpt-5", "gpt-5-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini")


# ---------------------------------------------------------------- errors -> responses

def _status(e: BaseException) -> int:
    from ..artifacts import NotebookError, NotebookTooLarge
    from ..kernel import KernelError
    from ..llm.base import ProviderError
    if isinstance(e, KernelError):  # the kernel could not start, died, timed out
        return 503
    if isinstance(e, (ConflictError, NameTakenError, RunError)):
        return 409
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, NotebookTooLarge):
        return 413
    if isinstance(e, (StoreError, ProviderError, NotebookError, ValueError)):
        return 400
    return 500


def refuse(message: str, status: int = 400, *, extra: Any = ()) -> HTMLResponse:
    """An HTMX answer that changes nothing on the page but shows why."""
    body = to_xml((V.toast(message), *extra))
    return HTMLResponse(body, status_code=status, headers={"HX-Reswap": "none"})


def _error_page(req: Request, message: str, status: int) -> HTMLResponse:
    if "hx-request" in req.headers:
        return refuse(message, status)
    from fasthtml.common import A, H1, Main, P, Title
    page = (Title("dialogue: error"),
            V.topbar(),
            Main(H1({404: "Not found", 409: "Conflict", 413: "Too large"}.get(status, "Error")),
                 P(message), P(A("Back to the dialogues", href="/")), cls="container"))
    from fasthtml.core import respond
    return HTMLResponse(to_xml(respond(req, [page[0]], page[1:])), status_code=status)


async def _domain_error(req: Request, exc: Exception) -> HTMLResponse:
    return _error_page(req, str(exc), _status(exc))


async def _bug(req: Request, exc: Exception) -> HTMLResponse:
    """Anything unexpected: say so on the page instead of failing silently (uvicorn logs it)."""
    return _error_page(req, f"Internal error ({type(exc).__name__}: {exc}); the server's log "
                            "has the details.", 500)


# ---------------------------------------------------------------- forms

def _int(v: Any, what: str) -> int:
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        raise StoreError(f"{what} must be a whole number, not {v!r}") from None


def _opt_int(v: Any, what: str) -> int | None:
    return None if v in (None, "") else _int(v, what)


def _text(v: Any) -> str | None:
    """A text field as the user typed it. Browsers send textarea line breaks as CRLF."""
    if v is None or isinstance(v, UploadFile):
        return None
    return str(v).replace("\r\n", "\n")


async def _form(req: Request) -> dict[str, Any]:
    """The request's form (FastHTML has already parsed and cached it). Read directly rather than
    through handler parameters: FastHTML fills a parameter from a cookie or header of the same
    name before the form, and cookies are shared by every app on localhost."""
    form = await req.form(max_part_size=MAX_UPLOAD)
    return {k: form.get(k) for k in form.keys()}


# ---------------------------------------------------------------- the app

@dataclass
class _Trial:
    """A side-by-side trial of two adapter sets: what was asked, and what each side answered.
    Kept in memory (the last few per server) so "Keep this answer" stores the text the server
    streamed, not text sent back by the page."""

    id: str
    did: str
    source: str
    sets: dict[str, dict[str, float]]
    max_tokens: int | None
    started: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


TRIALS_KEPT = 32


@dataclass
class _Ctx:
    service: DialogueService
    models_at: float = 0.0
    models_cache: tuple = ()
    trials: OrderedDict = field(default_factory=OrderedDict)
    instance: str = field(default_factory=lambda: secrets.token_hex(8))

    def models(self) -> list[tuple[str, str]]:
        """(model name, label) for the picker: local models whose files are present, and the
        hosted ones whose key is set. Cached for a few seconds: the registry is a file."""
        if time.monotonic() - self.models_at > 10:
            self.models_cache = tuple(_models())
            self.models_at = time.monotonic()
        return list(self.models_cache)


def _models() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    from ..gguf import models as lm
    try:
        lm.bundled_model_path()
        out.append(("local:default", "local:default (SmolLM2 135M, bundled)"))
    except Exception:  # not installed: the picker simply does not offer it
        pass
    # Not lm.list_models(): resolving gemma3-270m assembles its 253 MB file on first call.
    if importlib.util.find_spec(lm.GEMMA_PACKAGE) is not None:
        out.append((f"local:{lm.GEMMA_NAME}", f"local:{lm.GEMMA_NAME} (Gemma 3 270M base)"))
    try:
        for name in sorted(lm._read_registry()):
            out.append((f"local:{name}", f"local:{name}"))
    except Exception:  # an unreadable registry: `dialogue models` reports it
        pass
    if os.environ.get("ANTHROPIC_API_KEY"):
        out += [(m, m) for m in CLAUDE_MODELS]
    if os.environ.get("OPENAI_API_KEY"):
        out += [(m, m) for m in OPENAI_MODELS]
    return out


def _adapter_view(svc: DialogueService, d: Dialogue) -> V.AdapterView:
    """The picker's data: the registered adapters that fit the dialogue's local model, and why
    any entry of its set is not among them."""
    from ..llm.base import ProviderError
    if not d.model.startswith("local:"):
        return V.AdapterView()
    current = dict(d.meta.get("adapters") or {})
    try:
        choices = svc.adapter_choices(d.id)
    except ProviderError as e:  # an unknown local model, an unreadable registry: shown, not fatal
        return V.AdapterView([], {k: str(e) for k in current})
    names = {c.name for c in choices}
    problems: dict[str, str] = {}
    unknown = [k for k in current if k not in names]
    if unknown:
        from ..local.adapters import list_adapters, looks_like_path
        try:
            registered = {a.name for a in list_adapters()}
        except ProviderError:
            registered = set()
        for k in unknown:
            if k in registered:
                problems[k] = f"does not fit {d.model}"
            elif looks_like_path(k):
                if not Path(k).expanduser().is_file():
                    problems[k] = "the file is gone"
            else:
                problems[k] = "not registered"
    return V.AdapterView(choices, problems)


def _parse_set(form: FormData, prefix: str) -> dict[str, float]:
    """An adapter set from an editor's fields: `<prefix>-on` (checked names) and
    `<prefix>-scale:<name>` (each one's scale; empty means 1)."""
    out: dict[str, float] = {}
    for raw_name in form.getlist(f"{prefix}-on"):
        name = str(raw_name).strip()
        if not name:
            continue
        raw = form.get(f"{prefix}-scale:{name}")
        text = "1" if raw is None or str(raw).strip() == "" else str(raw).strip()
        try:
            scale = float(text)
        except ValueError:
            raise ValueError(f"the scale of {name} must be a number, not {text!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"the scale of {name} must be a finite number, not {text!r}")
        out[name] = scale
    return out


def _set_text(adapters: dict[str, float]) -> str:
    return ", ".join(f"{V._short(k)} ×{v:g}" for k, v in adapters.items()) if adapters else ""


def create_app(service: DialogueService, *, token: str | None = None,
               allowed_hosts: set[str] | frozenset[str] | None = LOOPBACK_NAMES,
               port: int | None = None) -> FastHTML:
    """The web app over `service`.

    Every handler is `async`: FastHTML runs plain functions in a thread pool, and the store's
    connection (and its transaction nesting) belongs to the event loop's thread, where the runs
    write their streams.

    `token`: required on every request when set (see `security`). `allowed_hosts`: the Host
    names answered when there is no token (default: loopback names only, against DNS
    rebinding; None answers any). On startup the app turns streams cut by a previous crash into
    versions; on shutdown it stops every run and kernel and closes the service."""
    ctx = _Ctx(service)

    async def startup() -> None:
        service.store.recover_interrupted()

    async def shutdown() -> None:
        await service.aclose()

    from ..artifacts import NotebookError
    from ..llm.base import ProviderError
    from ..kernel import KernelError
    # ValueError: the document model refuses bad input (an unknown kind) with it
    handlers: dict[Any, Any] = {e: _domain_error for e in (StoreError, ProviderError,
                                                            NotebookError, KernelError, ValueError)}
    handlers[500] = _bug
    app = FastHTML(
        title="dialogue", hdrs=V.page_hdrs(), default_hdrs=False, pico=False, htmx=False,
        surreal=False, canonical=False, sess_cls=None, secret_key=secrets.token_hex(32),
        htmlkw={"lang": "en", "data-theme": "light"}, exception_handlers=handlers,
        on_startup=[startup], on_shutdown=[shutdown], max_part_size=MAX_UPLOAD,
        middleware=[Middleware(Guard, token=token, allowed_hosts=allowed_hosts, port=port)])
    app.state.service = service

    for router in (_static_routes(), _health_routes(ctx), _dialogue_routes(ctx),
                   _settings_routes(ctx), _adapter_routes(ctx), _run_all_routes(ctx),
                   _cell_routes(ctx), _run_routes(ctx)):
        router.to_app(app)
    return app


# ---------------------------------------------------------------- static files

def _static_routes() -> APIRouter:
    rt = APIRouter()
    root = STATIC_DIR.resolve()
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".svg": "image/svg+xml"}

    @rt("/static/highlight.css")
    async def highlight_css_file() -> Response:
        return Response(V.highlight_stylesheet(), media_type="text/css; charset=utf-8",
                        headers={"Cache-Control": "max-age=3600"})

    @rt("/static/{path:path}")
    async def static_file(path: str) -> Response:
        # Not FastHTML's static_route_exts: it joins the URL path onto the folder as is.
        p = (root / path).resolve()
        if root not in p.parents or not p.is_file() or p.suffix not in types:
            return Response("not found", status_code=404)
        return FileResponse(p, media_type=types[p.suffix], headers={"Cache-Control": "no-cache"})

    return rt


# ---------------------------------------------------------------- health

def _health_routes(ctx: _Ctx) -> APIRouter:
    """What a page polls while it cannot reach the server (static/app.js): cheap, never cached,
    and behind the token like every route. `instance` changes when the server restarts, so a page
    knows that the runs it showed are gone (the store has how they ended)."""
    rt = APIRouter()

    @rt("/health")
    async def health() -> Response:
        return JSONResponse({"ok": True, "instance": ctx.instance},
                            headers={"Cache-Control": "no-store"})

    return rt


# ---------------------------------------------------------------- dialogues

def _free_name(service: DialogueService, name: str) -> str:
    taken = {d["name"] for d in service.list()}
    if name not in taken:
        return name
    i = 2
    while f"{name} ({i})" in taken:
        i += 1
    return f"{name} ({i})"


def _import_notice(d: Dialogue) -> Any | None:
    """The toast that says what importing `d` set aside (trust.vet_import), with the set-aside
    system prompt shown and a button that adopts it through the settings route; None when the
    import kept everything."""
    from fasthtml.common import Button, Details, Pre, Summary
    from ..trust import import_record
    rec = import_record(d)
    warnings = [w for w in rec.get("warnings", []) if isinstance(w, str)]
    if not warnings:
        return None
    system = rec.get("system")
    extra = None
    if isinstance(system, str) and system and not d.system:
        extra = Div(Details(Summary("Show the notebook's system prompt"), Pre(system),
                            cls="imported-system"),
                    Button("Use it as the system prompt", hx_post=f"/d/{d.id}/settings",
                           hx_vals={"system": system}, hx_include="#dversion",
                           data_act="adopt-system", cls="secondary"))
    text = "Imported. " + "; ".join(w[:1].upper() + w[1:] for w in warnings) + "."
    return V.toast(text, level="warning", extra=extra)


def _dialogue_routes(ctx: _Ctx) -> APIRouter:
    rt = APIRouter()
    svc = ctx.service

    @rt("/")
    async def index(req: Request) -> Any:
        q = req.query_params.get("q", "")
        hits = svc.search(q) if q.strip() else None
        return V.dialogues_page(svc.list(), svc.trash(), q=q, hits=hits)

    @rt("/search")
    async def search(req: Request) -> Any:
        q = req.query_params.get("q", "")
        try:
            hits = svc.search(q, limit=50) if q.strip() else None
        except StoreError as e:
            return refuse(str(e), 400)
        if "hx-request" not in req.headers:
            return V.dialogues_page(svc.list(), svc.trash(), q=q, hits=hits)
        return V.search_results(hits, q)

    @rt("/new", methods=["post"])
    async def new(req: Request) -> Any:
        f = await _form(req)
        name = (_text(f.get("name")) or "").strip()
        d = svc.create(name)
        return Redirect(f"/d/{d.id}")

    @rt("/import", methods=["post"])
    async def import_notebook(req: Request) -> Any:
        from ..artifacts import NotebookError, read_notebook
        f = await _form(req)
        up = f.get("file")
        if not isinstance(up, UploadFile) or not up.filename:
            return refuse("Choose an .ipynb file to import.", 400)
        stem = Path(up.filename).stem or "notebook"
        # read_notebook reads the spooled upload in chunks and refuses it past the limit
        try:
            doc = await asyncio.to_thread(read_notebook, up.file, name=stem, keep_ids=True)
        except NotebookError as e:
            why = str(e).removeprefix("notebook: ")
            return refuse(f"Cannot import {up.filename}: {why}", _status(e))
        d = svc.import_dialogue(doc, name=_free_name(svc, doc.name or stem))
        # what the import set aside (a model, the system prompt) is told on the dialogue's page
        return Redirect(f"/d/{d.id}?imported=1" if _import_notice(d) is not None
                        else f"/d/{d.id}")

    @rt("/d/{did}/row")
    async def row(did: str, req: Request) -> Any:
        d = svc.open(did)
        if req.query_params.get("edit"):
            return V.dialogue_row_edit(d)
        return V.dialogue_row(next(x for x in svc.list() if x["id"] == d.id))

    @rt("/d/{did}/rename", methods=["post"])
    async def rename(did: str, req: Request) -> Any:
        f = await _form(req)
        d = svc.open(did)
        try:
            svc.rename(d.id, (_text(f.get("name")) or "").strip(),
                       base_version=_opt_int(f.get("dversion"), "dversion"))
        except (NameTakenError, ConflictError, StoreError) as e:
            return HTMLResponse(to_xml(V.dialogue_row_edit(d, error=str(e))),
                                status_code=_status(e))
        return V.dialogue_row(next(x for x in svc.list() if x["id"] == d.id))

    @rt("/d/{did}/delete", methods=["post"])
    async def delete(did: str) -> Any:
        d = svc.open(did)
        svc.delete(d.id)
        return "", V.toast(f"Moved “{d.name}” to the trash.", level="info",
                           undo=f"/d/{d.id}/restore")

    @rt("/d/{did}/restore", methods=["post"])
    async def restore(did: str, req: Request) -> Any:
        d = svc.restore(did)
        listing = V.dialogue_list(svc.list(), svc.trash())
        listing.attrs["hx-swap-oob"] = "true"
        return (HtmxResponseHeaders(reswap="none"), listing,
                V.toast(f"Restored “{d.name}”.", level="info"))

    @rt("/d/{did}/export/{fmt}")
    async def export(did: str, fmt: str, req: Request) -> Response:
        from ..artifacts import to_html, to_ipynb_bytes, to_markdown, to_module
        d = svc.open(did)
        with_ai = req.query_params.get("ai", "") in ("1", "true", "yes")
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in d.name) or "dialogue"
        if fmt == "ipynb":
            body, mime = to_ipynb_bytes(d), "application/x-ipynb+json"
        elif fmt == "py":
            body, mime = to_module(d).encode(), "text/x-python; charset=utf-8"
        elif fmt == "md":
            body, mime = to_markdown(d, with_ai=with_ai).text.encode(), "text/markdown; charset=utf-8"
        elif fmt == "html":
            body, mime = to_html(d, with_ai=with_ai).encode(), "text/html; charset=utf-8"
        else:
            raise NotFoundError(f"no export format {fmt!r}: use ipynb, py, md or html")
        headers = {"Content-Disposition": f'attachment; filename="{stem}.{fmt}"'}
        if fmt == "html":  # never render an export inside the app's origin
            headers["Content-Security-Policy"] = "sandbox"
        return Response(body, media_type=mime, headers=headers)

    @rt("/d/{did}")
    async def dialogue(did: str, req: Request) -> Any:
        d = svc.open(did)
        running = {m.id for m in d.messages if svc.running(m.id)}
        live = {mid: s for mid in running if (s := svc.live(mid)) is not None}
        job = svc.run_all_of(d.id)
        page = V.dialogue_page(d, ctx.models(), svc.kernel_status(d.id), running, live,
                               adapters=_adapter_view(svc, d),
                               run_all=job.progress() if job is not None else None)
        notice = _import_notice(d) if req.query_params.get("imported") else None
        if notice is not None:  # the page's empty #toast holds it
            page = tuple(notice if getattr(x, "id", None) == "toast" else x for x in page)
        return page

    return rt


# ---------------------------------------------------------------- dialogue settings, kernel

def _settings_routes(ctx: _Ctx) -> APIRouter:
    rt = APIRouter(prefix="/d/{did}")
    svc = ctx.service

    def _after(d: Any, note: str) -> tuple:
        return (HtmxResponseHeaders(reswap="none"), V.dversion_input(d, oob=True),
                V.dialogue_title(d, oob=True), V.model_picker(d, ctx.models(), oob=True),
                V.adapters_control(d, _adapter_view(svc, d), oob=True),
                V.settings_panel(d, open_=True, oob=True) if note in ("settings", "context")
                else V.model_input(d, oob=True),
                V.toast({"name": "Renamed.", "model": f"Model: {d.model}",
                         "settings": "Settings saved.", "context": "Attached context saved."}
                        .get(note, "Saved."), level="info"))

    @rt("/settings", methods=["post"])
    async def settings(did: str, req: Request) -> Any:
        from ..llm.base import get_provider
        f = await _form(req)
        d = svc.open(did)
        base = _opt_int(f.get("dversion"), "dversion")
        changes: dict[str, Any] = {}
        for k in ("name", "model", "system"):
            v = _text(f.get(k))
            if v is None:
                continue
            v = v.strip() if k != "system" else v
            if v != getattr(d, k):
                changes[k] = v
        if not changes:
            return (HtmxResponseHeaders(reswap="none"), V.dversion_input(d, oob=True))
        if "model" in changes:
            get_provider(changes["model"])  # an unknown model or missing key: refused here
        d = svc.update(d.id, base_version=base, **changes)
        note = "name" if set(changes) == {"name"} else "model" if set(changes) == {"model"} \
            else "settings"
        return _after(d, note)

    @rt("/context", methods=["post"])
    async def context(did: str, req: Request) -> Any:
        f = await _form(req)
        d = svc.open(did)
        base = _opt_int(f.get("dversion"), "dversion")
        action = _text(f.get("action")) or "add"
        name = (_text(f.get("name")) or "").strip()
        if not name:
            return refuse("An attached context item needs a name.")
        content = _text(f.get("content")) or ""
        kind, source = "text", ""
        up = f.get("file")
        if isinstance(up, UploadFile) and up.filename:
            raw = await up.read()
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                return refuse(f"{up.filename} is not UTF-8 text; attach text files only.")
            kind, source = "file", up.filename
        items = list(d.context)
        if action == "remove":
            items = [c for c in items if c.name != name]
        elif action in ("add", "save"):
            old = next((c for c in items if c.name == name), None)
            if action == "add" and old is not None:
                return refuse(f"There is already an attached item named {name!r}.", 409)
            if action == "add" and not content.strip():
                return refuse("Paste some text or choose a file to attach.")
            new = ContextItem(name, content, kind if old is None else old.kind,
                              source or (old.source if old else ""))
            items = [new if c.name == name else c for c in items] if old else items + [new]
        else:
            return refuse(f"unknown context action {action!r}")
        d = svc.update(d.id, base_version=base, context=items)
        return _after(d, "context")

    @rt("/kernel")
    async def kernel(did: str) -> Any:
        d = svc.dialogue_id(did)
        return V.kernel_badge(d, svc.kernel_status(d))

    @rt("/kernel/interrupt", methods=["post"])
    async def interrupt(did: str) -> Any:
        d = svc.dialogue_id(did)
        await svc.interrupt(d)
        return V.kernel_badge(d, svc.kernel_status(d))

    @rt("/kernel/restart", methods=["post"])
    async def restart(did: str) -> Any:
        d = svc.dialogue_id(did)
        await svc.restart(d)
        return (V.kernel_badge(d, svc.kernel_status(d)),
                V.toast("Kernel restarted: its variables are gone.", level="info"))

    return rt


# ---------------------------------------------------------------- adapters and trials (issue 8)

def _adapter_routes(ctx: _Ctx) -> APIRouter:
    rt = APIRouter(prefix="/d/{did}")
    svc = ctx.service

    def saved(d: Dialogue, note: str) -> tuple:
        return (HtmxResponseHeaders(reswap="none"), V.dversion_input(d, oob=True),
                V.adapters_control(d, _adapter_view(svc, d), oob=True),
                V.toast(note, level="info"))

    def set_adapters(did: str, adapters: dict[str, float] | None, base: int | None) -> Any:
        """Store a set (versioned); a refusal (unknown, mismatch, a stale page) is a toast and
        changes nothing."""
        from ..llm.base import ProviderError
        try:
            d = svc.set_adapters(did, adapters, base_version=base)
        except ConflictError as e:  # another tab changed the settings: offer to reload
            from fasthtml.common import A
            body = to_xml(V.toast(f"Not saved: {e}",
                                  extra=A("Reload", href=f"/d/{did}", cls="toast-link")))
            return HTMLResponse(body, status_code=409, headers={"HX-Reswap": "none"})
        except (ProviderError, StoreError, ValueError) as e:
            return refuse(f"Not saved: {e}", _status(e))
        text = _set_text(dict(d.meta.get("adapters") or {}))
        return saved(d, f"Adapters: {text}" if text else "No adapters: the base model answers.")

    @rt("/adapters", methods=["post"])
    async def adapters(did: str, req: Request) -> Any:
        form = await req.form()
        d = svc.dialogue_id(did)
        base = _opt_int(form.get("dversion"), "dversion")
        new = None if form.get("clear") else _parse_set(form, "set")
        if new:
            # Checking a set against a base the registry has not seen parses the base's GGUF
            # (seconds): do that off the event loop; the store write below then finds it cached.
            # A refusal here is raised again, with the same message, by svc.set_adapters.
            model = svc.store.get_dialogue(d, with_messages=False).model
            with contextlib.suppress(Exception):
                await asyncio.to_thread(svc.resolve_adapters, model, new)
        return set_adapters(d, new, base)

    @rt("/compare")
    async def compare(did: str) -> Any:
        d = svc.open(did)
        if not d.model.startswith("local:"):
            return refuse(f"Adapters apply to local models only; {d.model} is not one. Choose a "
                          "local model to compare adapter sets.")
        return V.compare_modal(d, _adapter_view(svc, d))

    @rt("/trials", methods=["post"])
    async def new_trial(did: str, req: Request) -> Any:
        form = await req.form()
        d = svc.open(did)
        if not d.model.startswith("local:"):
            return refuse(f"Adapters apply to local models only; {d.model} is not one.")
        source = _text(form.get("source")) or ""
        if not source.strip():
            return refuse("Write a prompt to compare the answers to.")
        max_tokens = _opt_int(form.get("max_tokens"), "max tokens")
        if max_tokens is not None and max_tokens < 1:
            return refuse("Max tokens must be at least 1.")
        sets = {"a": _parse_set(form, "a"), "b": _parse_set(form, "b")}
        # The editors offer only adapters that fit (and the dialogue's own entries): anything
        # else, or an entry shown as broken, is refused here rather than in a column.
        view = _adapter_view(svc, d)
        ok = ({c.name for c in view.choices} | set(d.meta.get("adapters") or {})) - set(view.problems)
        for side, chosen in sets.items():
            for name in chosen:
                if name not in ok:
                    why = view.problems.get(name, f"not a registered adapter for {d.model}")
                    return refuse(f"Set {side.upper()}: {name}: {why}.")
        t = _Trial(secrets.token_hex(8), d.id, source, sets, max_tokens)
        ctx.trials[t.id] = t
        while len(ctx.trials) > TRIALS_KEPT:
            ctx.trials.popitem(last=False)
        return V.trial_out(d.id, t.id, sets)

    def trial_of(did: str, tid: str) -> _Trial:
        t = ctx.trials.get(tid)
        if t is None or t.did != svc.dialogue_id(did):
            raise NotFoundError("This comparison is no longer in memory (the server keeps the "
                                f"last {TRIALS_KEPT}, until it restarts): run it again.")
        return t

    @rt("/trials/{tid}/stream")
    async def trial_stream(did: str, tid: str) -> StreamingResponse:
        t = ctx.trials.get(tid)
        if t is not None and t.did != svc.dialogue_id(did):
            t = None

        async def events():
            if t is None:
                yield V.sse("end-a", to_xml(V.toast("This comparison is over; run it again.")))
                yield V.sse("close", "")
                return
            if t.started:  # EventSource reconnected: show where it ended, never run it twice
                for side in ("a", "b"):
                    res = t.results.get(side) or {"error": "cut off: the connection was lost"}
                    yield V.sse(f"end-{side}", to_xml(V.trial_column(t.did, t.id, side, t.sets[side],
                                                                     result=res)))
                yield V.sse("close", "")
                return
            t.started = True
            try:
                for side in ("a", "b"):
                    if side == "b":
                        yield V.sse("status-b", to_xml(V.trial_status("b", "answering…")))
                    async for chunk in side_events(t, side):
                        yield chunk
            except Exception:  # a rendering bug must not leave EventSource reconnecting forever
                log.exception("trial %s failed", t.id)
            yield V.sse("close", "")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def side_events(t: _Trial, side: str):
        """One side of a trial. The service's generator is closed however this ends: when the
        page goes away (the dialog closed, the tab closed) Starlette cancels the response and
        the cancellation reaches the model's worker, which stops within a token."""
        from ..service import Answer, follow
        res: dict[str, Any] = {"text": "", "usage": {}, "seconds": 0.0, "error": "", "kept": False,
                               "done": False}
        t.results[side] = res
        ans = Answer()
        async for _ in follow(svc.trial(t.did, t.source, adapters=t.sets[side],
                                        max_tokens=t.max_tokens), ans):
            if len(ans.text) > len(res["text"]):
                piece, res["text"] = ans.text[len(res["text"]):], ans.text
                yield V.sse(f"text-{side}", V.text_chunk(piece))
        res.update(error=ans.error, usage=ans.record(svc.open(t.did).model),
                   seconds=ans.seconds, done=True)
        extra = to_xml(V.toast(f"{side.upper()}: {res['error']}")) if res["error"] else ""
        yield V.sse(f"end-{side}", to_xml(V.trial_column(t.did, t.id, side, t.sets[side],
                                                         result=res)) + extra)

    async def trial_side(did: str, tid: str, req: Request) -> tuple[Any, _Trial, str]:
        """The form, the trial and the side ("a" or "b"; "" if the form names neither)."""
        f = await _form(req)
        t = trial_of(did, tid)
        side = _text(f.get("side")) or ""
        return f, t, side if side in t.sets else ""

    @rt("/trials/{tid}/keep", methods=["post"])
    async def keep(did: str, tid: str, req: Request) -> Any:
        f, t, side = await trial_side(did, tid, req)
        if not side:
            return refuse("unknown side: a or b")
        res = t.results.get(side)
        if res is None or not res.get("done"):
            return refuse(f"Answer {side.upper()} is not finished yet.", 409)
        if res.get("error") or not res.get("text"):
            return refuse(f"Answer {side.upper()} has nothing to keep.", 409)
        if res.get("kept"):
            return refuse(f"Answer {side.upper()} is already kept.", 409)
        res["kept"] = True  # before the write: a double click must not add it twice
        try:
            m = svc.add(t.did, "prompt", t.source, response=res["text"], usage=dict(res["usage"]),
                        meta={"adapters": dict(t.sets[side]), "trial": True})
        except BaseException:
            res["kept"] = False
            raise
        d = svc.open(t.did)
        label = _set_text(t.sets[side]) or "no adapters"
        return (HtmxResponseHeaders(retarget="#cells", reswap="beforeend"), V.cell(t.did, m),
                V.keep_button(t.did, t.id, side, kept=True, oob=True), V.totals(d, oob=True),
                V.toast(f"Kept answer {side.upper()} ({label}) at the end of the dialogue.",
                        level="info"))

    @rt("/trials/{tid}/use", methods=["post"])
    async def use(did: str, tid: str, req: Request) -> Any:
        f, t, side = await trial_side(did, tid, req)
        if not side:
            return refuse("unknown side: a or b")
        return set_adapters(t.did, dict(t.sets[side]) or None,
                            _opt_int(f.get("dversion"), "dversion"))

    return rt


# ---------------------------------------------------------------- run all

def _run_all_routes(ctx: _Ctx) -> APIRouter:
    rt = APIRouter(prefix="/d/{did}")
    svc = ctx.service

    @rt("/run_all", methods=["post"])
    async def run_all(did: str) -> Any:
        d = svc.dialogue_id(did)
        try:
            job = svc.start_all(d)
        except RunError as e:
            if "no code cell" not in str(e):
                raise
            return refuse(str(e))
        return V.run_all_control(d, job.progress())

    @rt("/run_all/stop", methods=["post"])
    async def stop_all(did: str) -> Any:
        await svc.stop_all(svc.dialogue_id(did))
        return Response(status_code=204)

    @rt("/run_all/stream")
    async def run_all_stream(did: str, req: Request) -> StreamingResponse:
        d = svc.dialogue_id(did)
        job: RunAll | None = svc.run_all_of(d, finished=True)
        # the cells a page already shows as started (a reloaded page rendered them running)
        seen = _opt_int(req.query_params.get("from"), "from") or 0

        async def events():
            i = seen
            try:
                while job is not None:
                    while i < len(job.started):
                        mid = job.started[i]
                        i += 1
                        m = svc.message(d, mid)
                        live = svc.live(mid)
                        yield V.sse("cell", V.frag(
                            _oob(V.result(d, m, running=True, live=live)),
                            _oob(V.gutter(m, running=True))))
                        yield V.sse("progress", to_xml(V.run_all_progress(i, len(job.todo))))
                    if job.done:
                        break
                    await job.changed()
            except Exception:  # a rendering bug must not leave EventSource reconnecting forever
                log.exception("run-all stream of %s failed", d)
            end = [V.run_all_control(d, None)]
            if job is not None and job.stopped:
                end.append(V.toast(job.stopped))
            elif job is not None:
                end.append(V.toast(f"Ran {len(job.started)} code cell"
                                   f"{'s' if len(job.started) != 1 else ''}.", level="info"))
            yield V.sse("done", V.frag(end))
            yield V.sse("close", "")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return rt


# ---------------------------------------------------------------- cells

def _apply_text(svc: DialogueService, did: str, mid: str, f: dict[str, Any],
                render: Any) -> Message | HTMLResponse:
    """Store the source (and answer) the page sent, if they differ from what is stored. A stale
    version is refused with the cell shown in conflict, the user's text kept in its editor."""
    m = svc.message(did, mid)
    changes = {}
    src, resp = _text(f.get("source")), _text(f.get("response"))
    if src is not None and src != m.source:
        changes["source"] = src
    if resp is not None and resp != m.response:
        changes["response"] = resp
    if not changes:
        return m
    base = _opt_int(f.get("version"), "version")
    try:
        return svc.edit(did, mid, base_version=base if base is not None else m.version, **changes)
    except ConflictError as e:
        cur = svc.message(did, mid)
        return HTMLResponse(to_xml(render(cur, conflict={
            **_typed(svc, did, mid, base, src, resp, cur), "message": str(e)})), status_code=409)


def _typed(svc: DialogueService, did: str, mid: str, base: int | None, src: str | None,
           resp: str | None, cur: Message) -> dict[str, str | None]:
    """What the user typed in a refused save, for the conflict view to keep in its editors:
    `mine` (the source) and `answer`, each None where the page sent what it was showing (the
    version it was based on), so the editor then holds what is stored now and "save mine over it"
    does not write a stale copy of a part the user never touched over another tab's change (the
    page sends the whole cell, its source included, when only the answer was edited)."""
    shown = next((v.state for v in svc.history(did, mid) if v.version == base), None) \
        if base is not None else None
    mine = src if src is not None and (shown is None or src != shown.get("source")) else None
    answer = resp if resp is not None and (shown is None or resp != shown.get("response")) \
        else None
    if mine is None and answer is None:  # nothing of the user's own: show the source they sent
        mine = src if src is not None else cur.source
    return {"mine": mine, "answer": answer}


def _cell_routes(ctx: _Ctx) -> APIRouter:
    rt = APIRouter(prefix="/d/{did}")
    svc = ctx.service

    def render(did: str, m: Message, **kw: Any) -> Any:
        return V.cell(did, m, running=svc.running(m.id), **kw)

    def apply_text(did: str, mid: str, f: dict[str, Any]) -> Message | HTMLResponse:
        return _apply_text(svc, did, mid, f, lambda x, **kw: render(did, x, **kw))

    @rt("/cells", methods=["post"])
    async def add(did: str, req: Request) -> Any:
        f = await _form(req)
        d = svc.dialogue_id(did)
        kind = _text(f.get("kind")) or "code"
        after, before = _text(f.get("after")) or None, _text(f.get("before")) or None
        m = svc.add(d, kind, "", after=after, before=before)
        if after:
            target, swap = f"#m-{m_id(svc, d, after)}", "afterend"
        elif before:
            target, swap = f"#m-{m_id(svc, d, before)}", "beforebegin"
        else:
            target, swap = "#cells", "beforeend"
        return (HtmxResponseHeaders(retarget=target, reswap=swap),
                render(d, m, editing=True, new=True))

    @rt("/m/{mid}")
    async def get_cell(did: str, mid: str) -> Any:
        return render(svc.dialogue_id(did), svc.message(did, mid))

    @rt("/m/{mid}/save", methods=["post"])
    async def save(did: str, mid: str, req: Request) -> Any:
        d = svc.dialogue_id(did)
        m = apply_text(d, mid, await _form(req))
        if isinstance(m, HTMLResponse):
            return m
        return render(d, m)

    @rt("/m/{mid}/kind", methods=["post"])
    async def kind(did: str, mid: str, req: Request) -> Any:
        d = svc.dialogue_id(did)
        f = await _form(req)
        m = apply_text(d, mid, f)
        if isinstance(m, HTMLResponse):
            return m
        k = _text(f.get("kind")) or ""
        if k not in (x.value for x in Kind):
            return refuse(f"unknown kind {k!r}: use code, note or prompt")
        if k != m.kind.value:
            m = svc.edit(d, m.id, base_version=m.version, kind=k)
        return render(d, m)

    @rt("/m/{mid}/flag", methods=["post"])
    async def flag(did: str, mid: str, req: Request) -> Any:
        d = svc.dialogue_id(did)
        f = await _form(req)
        name = _text(f.get("flag")) or ""
        if name not in FLAGS:
            return refuse(f"unknown flag {name!r}; flags are {', '.join(FLAGS)}")
        m = apply_text(d, mid, f)
        if isinstance(m, HTMLResponse):
            return m
        value = f.get("value")
        new = (not getattr(m, name)) if value in (None, "") else value in ("1", "true", "on")
        base = _opt_int(f.get("version"), "version")
        if "source" in f or "response" in f:  # apply_text has just checked (and maybe moved) it
            base = m.version
        m = svc.set_flags(d, m.id, base_version=base if base is not None else m.version,
                          **{name: new})
        return render(d, m)

    @rt("/m/{mid}/move", methods=["post"])
    async def move(did: str, mid: str, req: Request) -> Any:
        d = svc.dialogue_id(did)
        f = await _form(req)
        by = _int(f.get("by", 0), "by")
        m = svc.move(d, mid, by=by)
        ids = [x.id for x in svc.open(d).messages]
        i = ids.index(m.id)
        after = ids[i - 1] if i > 0 else ""
        return HtmxResponseHeaders(trigger=json.dumps({"dlgMoved": {"id": m.id, "after": after}}))

    @rt("/m/{mid}/delete", methods=["post"])
    async def delete(did: str, mid: str, req: Request) -> Any:
        d = svc.dialogue_id(did)
        f = await _form(req)
        m = svc.message(d, mid)
        if svc.running(m.id):
            return refuse("This cell is running: stop it before deleting it.", 409)
        svc.delete_message(d, m.id, base_version=_opt_int(f.get("version"), "version"))
        first = (m.source.strip().splitlines() or [""])[0][:40]
        return "", V.toast(f"Deleted {m.kind.value} cell" + (f" “{first}”" if first else "") + ".",
                           level="info", undo=f"/d/{d}/m/{m.id}/undelete")

    @rt("/m/{mid}/undelete", methods=["post"])
    async def undelete(did: str, mid: str) -> Any:
        d = svc.dialogue_id(did)
        m = svc.restore_message(d, mid)
        ids = [x.id for x in svc.open(d).messages]
        i = ids.index(m.id)
        if i > 0:
            target, swap = f"#m-{ids[i - 1]}", "afterend"
        elif len(ids) > 1:
            target, swap = f"#m-{ids[1]}", "beforebegin"
        else:
            target, swap = "#cells", "beforeend"
        return (HtmxResponseHeaders(retarget=target, reswap=swap), render(d, m),
                V.toast("Restored.", level="info"))

    @rt("/m/{mid}/answer")
    async def answer(did: str, mid: str) -> Any:
        d = svc.dialogue_id(did)
        return V.answer_editor(d, svc.message(d, mid))

    @rt("/m/{mid}/history")
    async def history(did: str, mid: str) -> Any:
        d = svc.dialogue_id(did)
        m = svc.message(d, mid)
        return V.history_modal(d, m, svc.history(d, m.id))

    @rt("/m/{mid}/restore_version", methods=["post"])
    async def restore_version(did: str, mid: str, req: Request) -> Any:
        d = svc.dialogue_id(did)
        f = await _form(req)
        m = svc.restore_version(d, mid, _int(f.get("to"), "version to restore"),
                                base_version=_opt_int(f.get("version"), "version"))
        return render(d, m), Div(id="modal", hx_swap_oob="true")

    @rt("/m/{mid}/fork", methods=["post"])
    async def fork(did: str, mid: str) -> Any:
        new = svc.fork(did, mid)
        return Redirect(f"/d/{new.id}")

    return rt


def m_id(svc: DialogueService, did: str, ref: str) -> str:
    return svc.message_id(did, ref)


# ---------------------------------------------------------------- runs

def _run_routes(ctx: _Ctx) -> APIRouter:
    rt = APIRouter(prefix="/d/{did}/m/{mid}")
    svc = ctx.service

    @rt("/run", methods=["post"])
    async def run(did: str, mid: str, req: Request) -> Any:
        d = svc.dialogue_id(did)
        f = await _form(req)
        m = svc.message(d, mid)
        if m.kind not in (Kind.code, Kind.prompt):  # "running" a note shows it: save, render
            saved = _apply_text(svc, d, m.id, f, lambda x, **kw: V.cell(d, x, **kw))
            return saved if isinstance(saved, HTMLResponse) else V.cell(d, saved)
        if svc.running(m.id):
            raise RunError("This cell is already running.")
        # save what the editor holds first, in the same request: a separate save could race
        m = _apply_text(svc, d, m.id, f, lambda x, **kw: V.cell(d, x, **kw))
        if isinstance(m, HTMLResponse):
            return m
        prefill = _text(f.get("prefill")) or None
        svc.start(d, m.id, prefill=prefill if m.kind == Kind.prompt else None)
        m = svc.message(d, m.id)
        return V.cell(d, m, running=True,
                      live=LiveState(m.kind, (prefill or "") if m.kind == Kind.prompt else ""))

    @rt("/stop", methods=["post"])
    async def stop(did: str, mid: str) -> Any:
        d = svc.dialogue_id(did)
        m = svc.message(d, mid)
        await svc.stop(m.id)
        return Response(status_code=204)

    @rt("/stream")
    async def stream(did: str, mid: str, req: Request) -> StreamingResponse:
        d = svc.dialogue_id(did)
        m0 = svc.message(d, mid)

        async def events():
            try:
                async for chunk in live_events():
                    yield chunk
            except Exception:  # a rendering bug must not leave EventSource reconnecting forever
                log.exception("event stream of message %s failed", m0.id)
            # the stored state is the truth: render it, then tell EventSource not to reconnect
            m = svc.message(d, m0.id)
            dd = svc.open(d)
            yield V.sse("done", to_xml(V.result(d, m, oob_extra=[
                V.version_input(m, oob=True),
                _oob(V.gutter(m, running=False)),  # the execution count
                V.totals(dd, oob=True),
                _oob(V.kernel_badge(d, svc.kernel_status(d)))])))
            yield V.sse("close", "")

        async def live_events():
            state: LiveState | None = None
            async for what, item in svc.watch(m0.id):
                if what == "snapshot":
                    state = item
                    yield V.sse("snapshot", V.frag(V.live_body(d, m0, state)))
                    continue
                ev = item
                reading = state.progress is not None
                state.apply(ev)
                if ev.type == "text":
                    if reading:  # the answer has started: it replaces the reading progress
                        yield V.sse("progress", to_xml(V.read_progress(m0.id, None)))
                    yield V.sse("text", V.text_chunk(ev.data))
                elif ev.type == "progress":
                    yield V.sse("progress", to_xml(V.read_progress(m0.id, state.progress)))
                elif ev.type == "output":
                    t = ev.data.get("output_type")
                    if t in ("clear_output", "update_display_data"):
                        yield V.sse("outputs", V.frag(V.outputs_html(state.outputs)))
                    else:
                        yield V.sse("output", V.frag(V.output_fragment(ev.data)))
                elif ev.type in ("tool_call", "tool_result"):
                    yield V.sse("tools", V.frag(V.tool_calls_html(state.tool_calls)))
                elif ev.type == "error":  # not "error": EventSource's own connection-error event
                    yield V.sse("run-error", V.frag(V.error_box(str(ev.data))))
                elif ev.type == "done":
                    break

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return rt


def _oob(el: Any) -> Any:
    el.attrs["hx-swap-oob"] = "true"
    return el


# ---------------------------------------------------------------- serve

def serve(*, db: str | None = None, host: str = "127.0.0.1", port: int = 5001,
          open_browser: bool = True, token: str | None = None) -> None:
    """Run the app under uvicorn until Ctrl+C. Binding beyond the loopback interface without a
    token generates one; the URL printed (and opened) carries it."""
    import uvicorn
    loopback = is_loopback(host)
    if not loopback and not token:
        token = new_token()
    try:  # one server per database: a second one names the first (Store.claim_server says why)
        service = DialogueService(db)
        service.store.claim_server(local_url(host, port))
    except StoreError as e:
        raise SystemExit(f"dialogue: {e}") from None
    _check_port(host, port)
    app = create_app(service, token=token, allowed_hosts=LOOPBACK_NAMES if not token else None,
                     port=port)
    url = local_url(host, port)
    if token:
        url += f"?token={token}"
    print(f"dialogue: serving {service.store.path} at {url}", flush=True)
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
