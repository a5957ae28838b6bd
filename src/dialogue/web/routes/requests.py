"""What was sent: the panel on an answer listing the exact request it was sent with (opened by
its "Request" toggle, fetched only then), and the estimate a prompt's editor shows before
sending (fetched by app.js when the editor opens and when typing pauses).

Every text in the panel (the system prompt, context, each turn, tool descriptions, reasons) is
model or user text: it goes in as FT children, which escape it, never as markup."""
from __future__ import annotations

from typing import Any

from fasthtml.common import (APIRouter, Code, Details, Div, Li, Pre, Small, Span, Strong, Summary,
                             Table, Tbody, Td, Th, Thead, Tr, Ul)
from starlette.requests import Request
from starlette.responses import JSONResponse

from ...service import (NotFoundError, context_words, entry_words, mode_name, system_marked,
                        turn_text, turn_title, turn_tokens)
from .. import paths
from ..common import form, site, text

rt = APIRouter()


def _n(v: Any) -> str:
    return "" if v is None else f"{v:,}"


def _flag(word: str, why: str = "") -> Any:
    return Span(word, cls="rq-flag", title=why or None)


def panel(rec: dict[str, Any]) -> Any:
    """The request as a table of its parts (tokens and flags), each part's text one click away,
    then every message up to the prompt and what became of it."""
    cache_about = str((rec.get("cache") or {}).get("about") or "")
    head = Div(Strong(rec["model"]), f" · max_tokens {rec['max_tokens']:,} · ",
               Span(f"{_n(rec.get('tokens'))} tokens in", title=str(rec.get("token_count") or "")),
               f" ({rec.get('token_count', '')}) · answer version {rec['answer_version']}",
               f" of message {rec['copied_from']}, which this one was copied from"
               if rec.get("copied_from") else "",
               Div(Small(f"cache: {cache_about}")), cls="rq-head")
    rows: list[Any] = []

    def row(part: str, tokens: Any, flags: list[Any], body: Any) -> None:
        rows.append(Tr(Td(part), Td(_n(tokens), cls="num"), Td(*flags),
                       Td(Details(Summary("show"), body) if body is not None else "")))

    mode = mode_name(rec)
    row("system prompt", rec["system"].get("tokens"),
        ([_flag(f"mode: {mode}", "the mode's text ends the system prompt")] if mode else []) +
        ([_flag("cache breakpoint", "Claude caches everything up to here")]
         if system_marked(rec) else []),
        Pre(rec["system"]["text"], cls="rq-text"))
    ctx = rec["context"]
    for e in ctx.get("entries") or []:
        words = context_words(e)
        row(f"context: {e.get('kind', '')} {e.get('name', '')}".strip(), e.get("tokens"),
            [_flag("retrieved", "a document too large for the context: only its chunks that "
                   "best match the prompt were sent")] if e.get("retrieved") is not None else [],
            Small(words) if words else None)
    if ctx.get("text"):
        row("context (as sent)", ctx.get("tokens"), [], Pre(ctx["text"], cls="rq-text"))
    if rec["tools"]:
        row(f"tools: {', '.join(t['name'] for t in rec['tools'])}", rec.get("tools_tokens"), [],
            Ul(*[Li(Code(t["name"]), " ", t.get("description") or "") for t in rec["tools"]]))
    else:
        row("tools", 0, [_flag("none offered")], None)
    marked = set((rec.get("cache") or {}).get("turns") or [])
    for i, (turn, tokens) in enumerate(zip(rec["turns"], turn_tokens(rec)), 1):
        flags = [_flag("cache breakpoint", "cached up to the end of this turn")] if i - 1 in marked else []
        row(turn_title(i, turn), tokens, flags, Pre(turn_text(turn), cls="rq-text"))
    if rec.get("prefill"):
        row("prefill", None, [], Pre(rec["prefill"], cls="rq-text"))
    parts = Table(Thead(Tr(Th("part"), Th("tokens"), Th("flags"), Th(""))), Tbody(*rows), cls="rq-parts")

    mrows = []
    for e in rec["messages"]:
        flags = [_flag(e["status"])] + ([_flag("pinned")] if e.get("pinned") else []) + \
                ([_flag("cut")] if e.get("cut") else [])
        mrows.append(Tr(Td(Code(e["id"])), Td(e["kind"]), Td(*flags), Td(_n(e.get("tokens")), cls="num"),
                        Td(entry_words(e)), cls=f"rq-{e['status']}"))
    msgs = Table(Thead(Tr(Th("message"), Th("kind"), Th("status"), Th("tokens"), Th("why"))),
                 Tbody(*mrows), cls="rq-messages")
    notes = []
    if rec.get("dropped"):
        notes.append(Small(f"{rec['dropped']} earlier message(s) dropped to fit the token budget"))
    for err in rec.get("ref_errors") or []:
        notes.append(Small(f"reference failed: {err}", cls="warn"))
    return Div(head, parts, msgs, *notes, cls="rq-panel")


@rt(paths.request_panel)
async def request_panel(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    try:
        rec = svc.sent_request(did, mid)
    except NotFoundError as e:
        return Div(Small(str(e)), cls="rq-panel rq-none")
    return panel(rec)


@rt(paths.estimate, methods=["post"])
async def estimate(did: str, mid: str, req: Request) -> Any:
    """{"label", "tokens", "cached", ...} or {"error"} as JSON (app.js writes it as text)."""
    f = await form(req)
    svc = site(req).service
    try:
        est = await svc.estimate(did, mid, source=text(f.get("source")))
    except NotFoundError as e:
        est = {"error": str(e)}
    return JSONResponse(est)
