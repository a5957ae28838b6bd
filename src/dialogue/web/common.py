"""What the route modules share: the server's state (`Site`), reading forms, and answering an
error a user can act on with a toast.

Each handler finds the `Site` of its app with `site(req)`: the service, the adapter trials kept in
memory, the model picker's list, and the server's instance id. These are explicit objects made
once by `create_app`, not a bag of attributes the routes fill in.
"""
from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fasthtml.common import HTMLResponse, to_xml
from sse_starlette.sse import EventSourceResponse
from starlette.datastructures import UploadFile
from starlette.requests import Request

from ..service import (ConflictError, DialogueService, NameTakenError, NotFoundError,
                       ProviderError, RunError, StoreError)
from . import views as V

__all__ = ["Site", "Trial", "Trials", "site", "status_of", "refuse", "form", "text", "int_field",
           "opt_int", "event_stream", "oob", "MAX_UPLOAD", "TRIALS_KEPT"]

MAX_UPLOAD = 100 * 1024 * 1024  # the notebook reader's own default limit
SSE_PING = 15.0  # seconds between keep-alive comments on a quiet event stream
TRIALS_KEPT = 32


# ---------------------------------------------------------------- the server's state

@dataclass
class Trial:
    """A side-by-side trial of two adapter sets: what was asked, and what each side answered.
    Kept in memory so "Keep this answer" stores the text the server streamed, not text sent back
    by the page."""

    id: str
    did: str
    source: str
    sets: dict[str, dict[str, float]]
    max_tokens: int | None
    started: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


class Trials:
    """The last `keep` trials of this server, by id (a restart forgets them)."""

    def __init__(self, keep: int = TRIALS_KEPT):
        self.keep = keep
        self._items: OrderedDict[str, Trial] = OrderedDict()

    def new(self, did: str, source: str, sets: dict[str, dict[str, float]],
            max_tokens: int | None) -> Trial:
        tid = secrets.token_hex(8)
        t = self._items[tid] = Trial(tid, did, source, sets, max_tokens)
        while len(self._items) > self.keep:
            self._items.popitem(last=False)
        return t

    def get(self, did: str, tid: str) -> Trial | None:
        """The trial `tid` of dialogue `did`; None if it is not (or no longer) kept."""
        t = self._items.get(tid)
        return t if t is not None and t.did == did else None

    def of(self, did: str, tid: str) -> Trial:
        t = self.get(did, tid)
        if t is None:
            raise NotFoundError("This comparison is no longer in memory (the server keeps the "
                                f"last {self.keep}, until it restarts): run it again.")
        return t


class ModelChoices:
    """(model name, label) for the picker: the service's models that are ready now. Cached for
    a few seconds: listing reads the local registry file and the environment."""

    ttl = 10.0

    def __init__(self, service: DialogueService):
        self.service = service
        self._at = float("-inf")
        self._items: tuple[tuple[str, str], ...] = ()

    def __call__(self) -> list[tuple[str, str]]:
        if time.monotonic() - self._at > self.ttl:
            try:
                infos = self.service.models()
            except Exception:  # noqa: BLE001 - an unreadable registry: `dialogue models` says why
                infos = []
            self._items = tuple((i.name, i.label or i.name) for i in infos
                                if i.ready and not i.template)
            self._at = time.monotonic()
        return list(self._items)


@dataclass
class Site:
    """One server: its service, the model picker's list, the trials it keeps, and an instance id
    that changes when the server restarts (a page that polls /health sees its runs are gone).
    `sse_ping`: seconds between the keep-alive comments of a quiet event stream."""

    service: DialogueService
    sse_ping: float = SSE_PING
    trials: Trials = field(default_factory=Trials)
    instance: str = field(default_factory=lambda: secrets.token_hex(8))
    models: ModelChoices = field(init=False)

    def __post_init__(self) -> None:
        self.models = ModelChoices(self.service)


def site(req: Request) -> Site:
    return req.app.state.site


# ---------------------------------------------------------------- errors -> responses

def status_of(e: BaseException) -> int:
    """The HTTP status of an error a user can act on."""
    from ..artifacts import NotebookError, NotebookTooLarge
    from ..service import KernelError
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


# ---------------------------------------------------------------- forms

def int_field(v: Any, what: str) -> int:
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        raise StoreError(f"{what} must be a whole number, not {v!r}") from None


def opt_int(v: Any, what: str) -> int | None:
    return None if v in (None, "") else int_field(v, what)


def text(v: Any) -> str | None:
    """A text field as the user typed it. Browsers send textarea line breaks as CRLF."""
    if v is None or isinstance(v, UploadFile):
        return None
    return str(v).replace("\r\n", "\n")


async def form(req: Request) -> dict[str, Any]:
    """The request's form (FastHTML has already parsed and cached it). Read directly rather than
    through handler parameters: FastHTML fills a parameter from a cookie or header of the same
    name before the form, and cookies are shared by every app on localhost."""
    f = await req.form(max_part_size=MAX_UPLOAD)
    return {k: f.get(k) for k in f.keys()}


# ---------------------------------------------------------------- responses

def event_stream(req: Request, events: AsyncIterator[str]) -> EventSourceResponse:
    """Server-sent events, never cached or buffered by a proxy. sse-starlette's response sends a
    comment (`: ping`) every `sse_ping` seconds (the app's setting, read here for every stream), so a proxy or a browser does not close a stream whose
    cell is quiet (a long computation, a model reading a long prompt), ends the stream when the
    client goes away, and when the server shuts down. Our events are already encoded (`views.sse`
    keeps every line break of a streamed answer): they go out as bytes, which it sends as is."""

    async def encoded() -> AsyncIterator[bytes]:
        async for chunk in events:
            yield chunk.encode("utf-8")

    return EventSourceResponse(encoded(), ping=site(req).sse_ping,
                               headers={"Cache-Control": "no-cache"})


def oob(el: Any) -> Any:
    el.attrs["hx-swap-oob"] = "true"
    return el
