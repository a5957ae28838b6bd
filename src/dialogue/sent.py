"""What was sent: the exact request behind an answer, recorded when it is sent, and the estimate a
prompt cell shows before it is.

`record(request, provider)` turns a `llm.base.Request` (as `context.build` made it and the run
sent it) into a plain JSON record: the system prompt, the attached context and the entries other
parts of the builder list in `request.meta["context"]` (folder notes, attached docs, retrieved
chunks: whatever is there, shown as given), every turn as the model saw it with the messages it
was made of, what was hidden, shortened (each message's `cut`, from `meta["messages"]`; the
same figures as `meta["cut"]`) or dropped for the budget and why, the
tools offered, the prompt-cache breakpoints, token counts per part, model and max_tokens.

Recorded, not rebuilt: a request depends on more than the stored dialogue (the values of
$`x` and !`cmd` at the time, the kernel's tool signatures, the model's budget, the builder's own
rules as they were that day), so rebuilding an old answer's request would show today's request,
not the one sent. The store keeps each record once per answer version (`Store.save_request`), and
long texts in it are stored once by content hash in the store's `blobs`: the turns that earlier
prompts of a dialogue already sent repeat from one request to the next, so a long dialogue's
records cost a hash per repeated turn, not the turn again (bench/request_bench.py measures it).
Images are recorded by type and size, not their bytes: those stay in the message they came from.

`estimate(...)` is the count a prompt cell shows before sending: the tokens of the request it
would send now and how many of them are likely cached, with a label saying how that was decided
(the local model's disk KV prefix cache, Claude's prompt cache as the last answer left it, or
nothing known).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Sequence

from .images import decoded_size
from .llm.base import Request, Turn

__all__ = ["record", "cache_plan", "estimate", "entry_words", "context_words", "turn_text", "turn_title", "turn_tokens",
           "system_marked", "mode_name",
           "RECORD_VERSION", "CLAUDE_CACHE_TTL"]

RECORD_VERSION = 1
CLAUDE_CACHE_TTL = 300.0
"""Seconds an Anthropic `ephemeral` cache entry lives after its last use (the API's default)."""


def _part(p: Any) -> dict[str, Any]:
    if p.type == "image":  # measured, not decoded
        return {"type": "image", "mime": p.mime, "bytes": decoded_size(p.data)}
    return {"type": "text", "text": p.text}


def _turn(t: Turn, i: int, ids: Sequence[Sequence[str]]) -> dict[str, Any]:
    # no cache mark here: a breakpoint moves on with each prompt, the turn stays what it was
    # (so the next request's record repeats it, and the store keeps it once)
    out: dict[str, Any] = {"role": t.role, "parts": [_part(p) for p in t.parts()],
                           "messages": list(ids[i]) if i < len(ids) else []}
    if t.tool_call_id:
        out.update(tool_call_id=t.tool_call_id, name=t.name)
    if t.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in t.tool_calls]
    return out


def turn_text(turn: dict[str, Any]) -> str:
    """A recorded turn as text, the same on the terminal and the page: its text parts, each
    image as a line naming its type and size, each tool call the turn made as
    `-> name {arguments}`."""
    out = [p["text"] if p["type"] == "text" else f"[image {p['mime']}, {p['bytes']:,} bytes]"
           for p in turn["parts"] if p["type"] != "text" or p["text"]]
    out += [f"-> {c['name']} {json.dumps(c['arguments'], ensure_ascii=False)}"
            for c in turn.get("tool_calls") or []]
    return "\n\n".join(out)


def turn_tokens(rec: dict[str, Any]) -> list[int | None]:
    """Tokens of each recorded turn, from the message listing: a user turn, its messages' user
    parts (their tokens less their answers'); the first turn of an answer, the answer's tokens
    (with its tool calls and results, which follow it as turns of their own: None)."""
    entries = {e["id"]: e for e in rec["messages"]}
    out: list[int | None] = []
    answered: set[str] = set()
    for t in rec["turns"]:
        ms = [entries[x] for x in t.get("messages") or [] if x in entries]
        if t["role"] == "user":
            out.append(sum(int(e.get("tokens") or 0) - int(e.get("answer_tokens") or 0) for e in ms))
        elif ms and ms[0]["id"] not in answered:
            answered.add(ms[0]["id"])
            out.append(int(ms[0].get("answer_tokens") or 0))
        else:
            out.append(None)
    return out


def turn_title(i: int, turn: dict[str, Any]) -> str:
    """"turn 3: tool result of add (a1b2c3d4)": which turn, whose, from which messages."""
    role = f"tool result of {turn.get('name') or '?'}" if turn["role"] == "tool" else turn["role"]
    return f"turn {i}: {role} ({', '.join(turn.get('messages') or []) or '-'})"


def system_marked(rec: dict[str, Any]) -> bool:
    """Whether a recorded request's system block carries a cache breakpoint."""
    return any(b.get("at") == "system" for b in (rec.get("cache") or {}).get("breakpoints", []))


def mode_name(rec: dict[str, Any]) -> str | None:
    """The answering mode whose text ends a recorded request's system prompt (None: none)."""
    mode = rec.get("mode") or {}
    return mode.get("name") if mode.get("chars") else None


def context_words(entry: dict[str, Any]) -> str:
    """A context entry's flags in words: where it came from and, for a document too large for
    the context, how many of its chunks were retrieved for this prompt."""
    bits = [str(entry["source"])] if entry.get("source") else []
    if entry.get("retrieved") is not None:
        bits.append(f"retrieved {len(entry['retrieved'])} of {entry.get('of', '?')} chunks "
                    "(the best matches for the prompt)")
    return " · ".join(bits)


def entry_words(entry: dict[str, Any]) -> str:
    """What became of a message in a request, in the words the CLI and the page both show:
    the prompt, why it was left out, or what of its output was cut."""
    if entry.get("prompt"):
        return "the prompt"
    why = str(entry.get("reason") or "")
    c = entry.get("cut")
    if c:
        why = (f"output shortened: {c['cut_lines']:,} of {c['lines']:,} lines "
               f"({c['cut_chars']:,} characters) cut")
    return "; ".join(x for x in ("pinned" if entry.get("pinned") else "", why) if x)


def tool_tokens(request: Request, provider: Any = None) -> tuple[int | None, int | None]:
    """(the request's input tokens, its tools' tokens) for the tools it offers now. The builder
    counts the kernel functions it was given; the run then offers the whole toolbox (document
    tools, MCP servers' tools), so the tools are counted again here, as the builder counts them
    (the provider's tokenizer, else ~4 characters a token), and the total follows."""
    from .context import Counter, tools_tokens
    by_part = request.meta.get("tokens_by_part") or {}
    tokens, counted = request.meta.get("tokens"), by_part.get("tools")
    if tokens is None or counted is None:
        return tokens, counted
    actual = tools_tokens(request.tools, Counter(getattr(provider, "count_tokens", None)))
    return int(tokens) - int(counted) + actual, actual


def cache_plan(request: Request, provider: Any = None) -> dict[str, Any]:
    """Where the request's prompt cache applies. Claude: the `cache_control` breakpoints exactly
    as the Anthropic adapter placed them in the body it sends (read back from `build_body`, not
    guessed). A local model: llama.cpp's prefix KV cache, saved to disk at turn boundaries. Others
    (OpenAI and compatible servers): the provider's own automatic prefix cache, no breakpoints."""
    model = request.model
    if model.startswith("local:"):
        return {"kind": "local", "about": "llama.cpp prefix KV cache, kept on disk at turn "
                                          "boundaries: any prefix read before is not read again",
                "breakpoints": []}
    build_body = getattr(provider, "build_body", None)
    if model.startswith("claude-") and callable(build_body):
        try:
            body = build_body(request)
        except ValueError as e:
            return {"kind": "anthropic", "about": f"breakpoints unknown: {e}", "breakpoints": []}
        marks: list[dict[str, Any]] = []
        if any("cache_control" in b for b in body.get("system") or []):
            marks.append({"at": "system", "about": "after the system prompt and attached context"})
        one_to_one = len(body["messages"]) == len(request.messages) + bool(request.prefill.rstrip())
        for j, m in enumerate(body["messages"]):
            blocks = m["content"] if isinstance(m["content"], list) else []
            if any("cache_control" in b for b in blocks):
                marks.append({"at": "turn", "turn": j} if one_to_one else {"at": "message", "message": j})
        return {"kind": "anthropic", "about": "Claude prompt-cache breakpoints (cache_control, "
                                              "ephemeral: 5 minutes)", "breakpoints": marks}
    return {"kind": "automatic", "about": "the provider's automatic prefix cache (no breakpoints "
                                          "to place)", "breakpoints": []}


def record(request: Request, provider: Any = None, *, at: float | None = None) -> dict[str, Any]:
    """The JSON record of `request` as sent (see the module's docstring)."""
    meta = request.meta
    plan = cache_plan(request, provider)
    turn_marks = {b["turn"] for b in plan["breakpoints"] if b.get("at") == "turn"}
    if plan["kind"] != "anthropic":
        # the builder's own mark (the end of the part the next prompt shares)
        turn_marks = {i for i, t in enumerate(request.messages) if t.cache}
    plan["turns"] = sorted(turn_marks)  # the turns a breakpoint follows (0-based)
    by_part = dict(meta.get("tokens_by_part") or {})
    tokens, by_part["tools"] = tool_tokens(request, provider)
    ids = meta.get("turn_messages") or []
    return {
        "v": RECORD_VERSION,
        "at": time.time() if at is None else at,
        "model": request.model,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "stop": list(request.stop),
        "prefill": request.prefill,
        "tokens": tokens,
        "token_count": meta.get("token_count", ""),
        "system": {"text": request.system, "tokens": by_part.get("system")},
        "context": {"text": request.context, "tokens": by_part.get("context"),
                    "entries": [dict(e) for e in meta.get("context") or [] if isinstance(e, dict)]},
        "tools": _tools(request),
        "tools_tokens": by_part.get("tools"),
        "prompt_tokens": by_part.get("prompt"),
        "turns": [_turn(t, i, ids) for i, t in enumerate(request.messages)],
        "messages": [dict(e) for e in meta.get("messages") or []],
        "dropped": request.dropped,
        "ref_errors": list(meta.get("ref_errors") or []),
        "adapters": dict(meta.get("adapters") or {}),
        "mode": meta.get("mode"),  # the answering mode whose text ends the system prompt
        "images": list(meta.get("images") or []),  # images the user attached, where they came from
        "cache": plan,
    }


def _tools(request: Request) -> list[dict[str, Any]]:
    return [{"name": t.name, "description": t.description, "parameters": t.parameters}
            for t in request.tools]


def _digest(tools: Any, system: str, context: str, turns: list[tuple[str, Any]]) -> str:
    """A hash of the part of a request a prompt cache keys on: tools, system, context and turns
    (role and parts as a record keeps them, not their breakpoint marks)."""
    h = hashlib.sha256()
    for x in (tools, system, context, turns):
        h.update(repr(x).encode())
        h.update(b"\0")
    return h.hexdigest()


def _record_digest(rec: dict[str, Any], upto: int) -> str:
    """`_digest` of a stored record's first `upto` turns."""
    return _digest(rec.get("tools"), rec["system"]["text"], rec["context"]["text"],
                   [(t["role"], t["parts"]) for t in rec["turns"][:upto]])


def _request_digest(request: Request, upto: int) -> str:
    """`_digest` of a request's first `upto` turns, as its record would give (not building it)."""
    return _digest(_tools(request), request.system, request.context,
                   [(t.role, [_part(p) for p in t.parts()]) for t in request.messages[:upto]])


def estimate(request: Request, *, provider: Any = None, previous: dict[str, Any] | None = None,
             previous_usage: dict[str, Any] | None = None,
             local_cached: Callable[[Request], tuple[int | None, int | None, str]] | None = None,
             unresolved: int = 0, now: float | None = None) -> dict[str, Any]:
    """What a prompt would send now: {"tokens", "exact", "cached", "cached_label", "label"}.

    `previous` is the record of the last answer above the prompt in the same dialogue (None when
    there is none) and `previous_usage` its stored usage: for Claude, the prefix that answer sent
    is in the prompt cache when it used the cache (it read or wrote some), is younger than
    `CLAUDE_CACHE_TTL`, and this request starts with exactly what it sent (same tools, system,
    context and turns). `local_cached(request)` -> (tokens by the model's tokenizer or None,
    cached tokens or None, label) asks the local model's disk KV cache. `unresolved`: references
    whose values are only known when the prompt is sent (not counted)."""
    now = time.time() if now is None else now
    tokens = int(tool_tokens(request, provider)[0] or 0)
    exact = request.meta.get("token_count") == "tokenizer"
    cached: int | None = 0
    label = "no prompt cache"
    model = request.model
    if model.startswith("local:"):
        if local_cached is None:
            cached, label = None, "cached: unknown until the model is loaded"
        else:
            n, cached, label = local_cached(request)
            if n is not None:
                tokens, exact = n, True
    elif model.startswith("claude-"):
        cached, label = _claude_cached(request, provider, previous, previous_usage, now)
    else:
        cached, label = None, "cached: decided by the provider's automatic prefix cache"
    if cached is not None:
        cached = min(cached, tokens)  # Claude's count of the prefix against our estimate of the whole
    words = f"{'' if exact else '~'}{tokens:,} tokens to send"
    if unresolved:
        words += f" (+ the values of {unresolved} reference{'s' if unresolved != 1 else ''})"
    if cached is not None:
        words += f" · {'' if exact or not cached else '~'}{cached:,} cached"
    words += f" ({label})"
    if request.dropped:
        words += (f" · {request.dropped} earlier message{'s' if request.dropped != 1 else ''} "
                  "left out to fit")
    window = getattr(provider, "context_window", None)
    over = bool(window) and tokens + request.max_tokens > int(window)
    if over:
        words += (f" · over the model's context of {int(window):,} tokens with the answer's "
                  f"{request.max_tokens:,}: shorten or hide something")
    return {"tokens": tokens, "exact": exact, "cached": cached, "cached_label": label,
            "label": words, "dropped": request.dropped, "over": over, "model": model}


def _claude_cached(request: Request, provider: Any, previous: dict[str, Any] | None,
                   usage: dict[str, Any] | None, now: float) -> tuple[int, str]:
    if previous is None or not usage:
        return 0, "no earlier answer in this dialogue wrote Claude's prompt cache"
    if not (usage.get("cache_read") or usage.get("cache_write")):
        return 0, "the last answer did not use Claude's prompt cache"
    age = now - float(previous.get("at") or 0)
    if age > CLAUDE_CACHE_TTL:
        return 0, f"Claude's prompt cache from the last answer has expired ({round(age / 60)} min ago; it lasts 5)"
    k = len(previous["turns"])
    if k > len(request.messages) or _record_digest(previous, k) != _request_digest(request, k):
        return 0, "the dialogue changed above the last answer: Claude's prompt cache will not match"
    n = int(usage.get("input") or 0) + int(usage.get("cache_read") or 0) + int(usage.get("cache_write") or 0)
    return n, f"Claude's prompt cache, written by the last answer {round(age)} s ago; it lasts 5 min"
