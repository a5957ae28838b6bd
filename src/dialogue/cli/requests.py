"""`dialogue request NAME MSG [--json] [--answer N] [--estimate]`: what was sent for an answer
(the recorded request, part by part, with token counts and why anything was left out), or, with
--estimate, what the prompt would send now and how much of it is cached."""
from __future__ import annotations

import argparse
import asyncio
from typing import Any

from rich.panel import Panel
from rich.table import Table

from ..service import (DialogueService, NotFoundError, context_words, entry_words, mode_name,
                       system_marked, turn_text, turn_title, turn_tokens)
from ..terminal import plain
from .common import UserError, emit_json, out, when


def _n(v: Any) -> str:
    return "?" if v is None else f"{v:,}"


def _marks(rec: dict[str, Any]) -> list[str]:
    """A line per cache breakpoint."""
    plan = rec.get("cache") or {}
    return [f"after turn {b['turn'] + 1}" if b.get("at") == "turn"
             else f"after message {b['message'] + 1} of the body" if b.get("at") == "message"
             else "after the system prompt and context" for b in plan.get("breakpoints", [])]


def print_request(rec: dict[str, Any]) -> None:
    """The recorded request on the terminal, part by part, every text shown in full (through
    `terminal.plain`: control characters visible, never read as markup)."""
    out.print(plain(f"request of message {rec['message']} (answer version {rec['answer_version']}, "
                    f"sent {when(rec.get('at'))})", "bold"))
    if rec.get("copied_from"):
        out.print(plain(f"recorded for message {rec['copied_from']}, which this one was copied from"))
    out.print(plain(f"model {rec['model']} · max_tokens {rec['max_tokens']} · {_n(rec.get('tokens'))} "
                    f"tokens in ({rec.get('token_count', '')})"))
    marks = _marks(rec)
    plan = rec.get("cache") or {}
    out.print(plain(f"cache: {plan.get('about', 'none')}" + (f"; breakpoints {', '.join(marks)}"
                                                                if marks else "")))
    mode = mode_name(rec)
    sys_title = f"system · {_n(rec['system'].get('tokens'))} tokens" + (f" · mode {mode}" if mode else "") + (
        " · cache breakpoint after the context" if system_marked(rec) else "")
    out.print(Panel(plain(rec["system"]["text"]), title=plain(sys_title), title_align="left",
                    border_style="dim"))
    ctx = rec["context"]
    if ctx.get("text") or ctx.get("entries"):
        if ctx.get("entries"):
            t = Table("context entry", "kind", "tokens", "from / retrieved", box=None)
            for e in ctx["entries"]:
                t.add_row(plain(str(e.get("name", ""))), plain(str(e.get("kind", ""))),
                          _n(e.get("tokens")), plain(context_words(e)))
            out.print(t)
        out.print(Panel(plain(ctx["text"]), title=plain(f"context · {_n(ctx.get('tokens'))} tokens"),
                        title_align="left", border_style="dim"))
    if rec["tools"]:
        out.print(plain(f"tools offered ({_n(rec.get('tools_tokens'))} tokens): "
                        + ", ".join(t["name"] for t in rec["tools"])))
    else:
        out.print(plain("tools offered: none"))
    marked = set(plan.get("turns") or [])
    for i, (turn, tokens) in enumerate(zip(rec["turns"], turn_tokens(rec)), 1):
        title = turn_title(i, turn) + ("" if tokens is None else f" · {tokens:,} tokens")
        if i - 1 in marked:
            title += " · cache breakpoint"
        out.print(Panel(plain(turn_text(turn)), title=plain(title), title_align="left", border_style="dim"))
    if rec.get("prefill"):
        out.print(Panel(plain(rec["prefill"]), title="prefill (the answer's start)", title_align="left"))
    t = Table("message", "kind", "status", "tokens", "why / what", box=None)
    for e in rec["messages"]:
        t.add_row(plain(e["id"]), plain(e["kind"]), plain(e["status"]),
                  "" if e.get("tokens") is None else _n(e["tokens"]), plain(entry_words(e)))
    out.print(t)
    if rec.get("dropped"):
        out.print(plain(f"{rec['dropped']} message(s) dropped to fit the token budget"))
    for e in rec.get("ref_errors") or []:
        out.print(plain(f"reference failed: {e}"))
    if rec.get("adapters"):
        out.print(plain("adapters: " + ", ".join(f"{k} x{v}" for k, v in rec["adapters"].items())))


def cmd_request(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.estimate:
        if a.answer is not None:
            raise UserError("--estimate counts what the prompt would send now; --answer names a "
                            "past answer: give one of them")
        est = asyncio.run(svc.estimate(a.name, a.msg))
        if a.json:
            emit_json(est)
        elif "error" in est:
            raise UserError(est["error"])
        else:
            out.print(plain(est["label"]))
        return
    try:
        rec = svc.sent_request(a.name, a.msg, version=a.answer)
    except NotFoundError as e:
        raise UserError(str(e)) from None
    if a.json:
        emit_json(rec)
    else:
        print_request(rec)


def _args_request(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg", help="the prompt: id, id prefix or 1-based position")
    sp.add_argument("--answer", type=int, metavar="VERSION",
                    help="the answer version whose request to show (`dialogue history NAME MSG "
                         "--versions` lists them; default: the latest answer)")
    sp.add_argument("--estimate", action="store_true",
                    help="what the prompt would send now and how much of it is cached, before "
                         "sending it (nothing is evaluated or loaded)")
    sp.add_argument("--json", action="store_true", help="the record as one JSON document")


COMMANDS = {
    "request": (cmd_request, "what was sent for an answer: system prompt, context, each message "
                             "as the model saw it, tools, cache breakpoints, tokens", _args_request),
}
