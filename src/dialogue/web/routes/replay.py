"""Replay: an answer regenerated under the settings it recorded (`service.replay`), shown under
the answer as a verdict (the same, or a diff), with each setting that changed since (a model or
adapter file replaced under the same name) and notes. Nothing is stored.

Every text (the answers, the diff, adapter names) is model or user text: FT children, escaped."""
from __future__ import annotations

from typing import Any

from fasthtml.common import APIRouter, Div, Li, Small, Strong, Ul
from starlette.requests import Request

from ...service import NotFoundError, ProviderError, RunError, StoreError
from .. import paths
from .. import views as V
from ..common import site

rt = APIRouter()


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2:  # an adapter file: (hash, scale)
        h, s = v
        return f"{str(h or '?')[:12]} ×{s:g}" if isinstance(s, (int, float)) else str(h)
    if isinstance(v, str) and len(v) == 64:
        return v[:12]
    return "none" if v is None else str(v)


def verdict(res: dict[str, Any]) -> Any:
    """The replay's result as a box under the answer."""
    items: list[Any] = [Small("replaying…", cls="htmx-indicator")]  # for the next replay
    if res.get("error"):
        items.append(Div(f"The replay ended with an error: {res['error']}", cls="error"))
    if res["same"]:
        items.append(Strong(f"Replayed: the same answer ({len(res['stored']):,} characters).",
                            cls="replay-same"))
    else:
        items.append(Strong("Replayed: the answer differs from the stored one.", cls="replay-differs"))
    if res["changes"]:
        items.append(Ul(*[Li(f"changed since the answer: {c['what']}: {_short(c['then'])} → "
                             f"{_short(c['now'])}") for c in res["changes"]], cls="replay-changes"))
    for n in res["notes"]:
        items.append(Div(Small(n), cls="hint"))
    if not res["same"]:
        items.append(V.diff_pre(res["diff"]))
    return Div(*items, cls="replay-box", data_same="1" if res["same"] else "0")


@rt(paths.replay, methods=["post"])
async def replay(req: Request, did: str, mid: str) -> Any:
    svc = site(req).service
    try:
        res = await svc.replay(did, mid)
    except (NotFoundError, ProviderError, StoreError, RunError, ValueError) as e:
        return Div(f"Cannot replay: {e}", cls="error replay-box")
    return verdict(res)
