"""Dialogue -> provider request: what the model sees when it answers a prompt.

Order, stable part first so that every prefix cache hits (the local KV store, Anthropic
`cache_control`, OpenAI's automatic prefix cache):

1. the system prompt;
2. the dialogue's attached context (`Request.context`);
3. the messages above the prompt, in order: notes and code (with outputs as text, images as image
   parts) folded into user turns, earlier prompts as user turns and their answers as assistant
   turns, hidden messages left out, consecutive user material merged so turns alternate;
4. the prompt itself, last, with the values of its `` $`expr` `` and `` !`cmd` `` references
   in delimited blocks after its text.

`` &`fn` `` / `` &`[f, g]` `` in any visible note or prompt above (and in the prompt) offer those
kernel functions as tools. Tool references are collected from the whole visible dialogue, not
just the prompt, so the tool list (which providers put before everything else) stays the same from
one prompt to the next and the cached prefix survives.

Earlier prompts' tool calls are not replayed: their answers carry what the model concluded, and
replaying calls would require offering tools the current prompt may not have.

API::

    req = build(dialogue, upto=msg_id, budget=8000, count_tokens=provider.count_tokens)
    req = await build_async(dialogue, upto=msg_id, kernel=kernel, budget=8000)  # with $`x` etc.
    refs = references(text)  # Refs(exprs, cmds, tools)
"""
from __future__ import annotations

import base64
import binascii
import html
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .document import Dialogue, Kind, Message
from .llm.base import Part, Request, ToolSpec, Turn

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = [
    "build", "build_async", "references", "resolve", "Refs", "Resolved", "ContextError",
    "DEFAULT_SYSTEM", "estimate_tokens", "tool_names", "render_outputs", "IMAGE_TOKENS", "CHARS_PER_TOKEN",
]

DEFAULT_SYSTEM = (
    "You are a helpful assistant working inside a dialogue: a document of the user's notes, "
    "Python code cells that run in a live kernel (shown with their outputs), and prompts to you. "
    "Answer the user's last message."
)
"""Used when a dialogue sets no system prompt of its own, so the model knows what the fenced
code and "Output:" blocks in the user turns are."""

CHARS_PER_TOKEN = 4
ESTIMATE_NOTE = f"estimate (~{CHARS_PER_TOKEN} characters per token)"
IMAGE_TOKENS = 1000
"""Estimate for one image: providers charge by pixel area (Anthropic about w*h/750, so about 1,000
tokens for a typical 800x900 plot); a fixed figure keeps the budget arithmetic simple and errs
on the large side for the small plots cells usually make."""

_IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_REF = re.compile(r"([$!&])`([^`\n]+)`")
_FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.S | re.M)
_IDENT = re.compile(r"[A-Za-z_]\w*")


class ContextError(ValueError):
    """The request cannot be built as asked (unknown message, bad reference, over budget)."""


# ---------------------------------------------------------------- references

@dataclass
class Refs:
    """References in a text, in order of first appearance, without repeats."""

    exprs: list[str] = field(default_factory=list)
    cmds: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.exprs or self.cmds or self.tools)


def references(text: str, *, strict: bool = True) -> Refs:
    """`` $`expr` ``, `` !`cmd` ``, `` &`fn` `` and `` &`[f, g]` `` in `text` (solveit's syntax).
    Fenced code blocks are skipped: code quoted in a prompt is not a reference. A tool reference
    that is not a plain Python name (providers accept only names like that for tools) raises
    ContextError, or is skipped when not `strict` (for earlier messages, which the user is not
    sending now)."""
    refs = Refs()
    for m in _REF.finditer(_FENCE.sub("", text)):
        sigil, body = m.group(1), m.group(2).strip()
        if not body:
            continue
        if sigil == "$":
            _add(refs.exprs, body)
        elif sigil == "!":
            _add(refs.cmds, body)
        else:
            names = body[1:-1].split(",") if body.startswith("[") and body.endswith("]") else [body]
            for n in (n.strip() for n in names):
                if not n:
                    continue
                if not _IDENT.fullmatch(n):
                    if not strict:
                        continue
                    raise ContextError(f"&`{body}`: {n!r} is not a function name; tools are named "
                                       "by a plain Python name, like &`search` or &`[search, fetch]`")
                _add(refs.tools, n)
    return refs


def _add(xs: list[str], x: str) -> None:
    if x not in xs:
        xs.append(x)


@dataclass
class Resolved:
    """The values of a prompt's references, as the kernel gave them: `values` maps each
    expression to its text (or its error, as text), `shell` each command to its output, `tools`
    the tool specs. `errors` lists the references that failed, for a surface to point out."""

    values: dict[str, str] = field(default_factory=dict)
    shell: dict[str, str] = field(default_factory=dict)
    tools: list[ToolSpec] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _cap(text: str, limit: int) -> str:
    """Keep the head and the tail: the start says what a thing is, the end how it finished."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit:,} characters cut ...]\n{text[-tail:] if tail else ''}"


async def resolve(kernel: "Kernel", refs: Refs, *, max_value_chars: int = 10_000,
                  timeout: float = 30.0) -> Resolved:
    """Evaluate references in the kernel. An expression or command that fails contributes its
    error text (the model and the user both learn what went wrong); a tool that cannot be
    described raises (tools.ToolSchemaError), since offering a broken tool helps no one."""
    from .kernel import ExecutionError, KernelTimeout
    from .tools import schemas

    out = Resolved()
    for e in refs.exprs:
        try:
            out.values[e] = _cap(await kernel.eval(e, timeout=timeout), max_value_chars)
        except (ExecutionError, KernelTimeout) as err:
            out.values[e] = f"[error: {err}]"
            out.errors.append(f"$`{e}`: {err}")
    for c in refs.cmds:
        try:
            out.shell[c] = _cap(await kernel.shell(c, timeout=timeout), max_value_chars)
        except (ExecutionError, KernelTimeout) as err:
            out.shell[c] = f"[error: {err}]"
            out.errors.append(f"!`{c}`: {err}")
    if refs.tools:
        out.tools = await schemas(kernel, refs.tools)
    return out


def _block(resolved: Resolved) -> str:
    """The values block appended to the prompt: XML-like tags, because every model family reads
    them as clear delimiters and they cannot be confused with the markdown around them."""
    def tags(tag: str, attr: str, items: dict[str, str]) -> list[str]:
        return [f'<{tag} {attr}="{html.escape(k)}">\n{v.rstrip(nl)}\n</{tag}>' for k, v in items.items()]

    nl = "\n"
    parts: list[str] = []
    if resolved.values:
        parts.append("\n".join(["<variables>", *tags("variable", "expr", resolved.values), "</variables>"]))
    if resolved.shell:
        parts.append("\n".join(["<shell>", *tags("command", "cmd", resolved.shell), "</shell>"]))
    return "\n".join(parts)


# ---------------------------------------------------------------- rendering

def _text(v: Any) -> str:
    return "".join(v) if isinstance(v, list) else str(v)


def _fence(text: str, lang: str = "") -> str:
    # A fence longer than any backtick run inside, so code or output holding ``` stays inside.
    runs = [len(r) for r in re.findall(r"`{3,}", text)]
    f = "`" * max(3, max(runs, default=0) + 1)
    return f"{f}{lang}\n{text}\n{f}" if text else f"{f}{lang}\n{f}"


def _bundle_text(data: dict[str, Any]) -> str | None:
    """The best text of a mime bundle for a model: markdown, else a text/plain that is more than
    an object's default repr, else HTML, LaTeX or JSON."""
    if "text/markdown" in data:
        return _text(data["text/markdown"])
    plain = _text(data["text/plain"]) if "text/plain" in data else None
    if plain is not None and not re.fullmatch(r"<[^<>]* (object|at 0x[0-9a-f]+)[^<>]*>", plain.strip()):
        return plain
    for mime in ("text/html", "text/latex"):
        if mime in data:
            return _text(data[mime])
    if "application/json" in data:
        return json.dumps(data["application/json"])
    return plain


def render_outputs(outputs: Sequence[dict[str, Any]], *, images: bool = True,
                   max_chars: int = 20_000) -> list[Part]:
    """A code message's outputs as parts: text (streams, results, errors with their traceback,
    ANSI colours removed) and images (base64, as the kernel sent them). Text is capped at
    `max_chars`, keeping its head and tail."""
    parts: list[Part] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            parts.append(Part(text=_cap("".join(texts).rstrip("\n"), max_chars)))
            texts.clear()

    for o in outputs:
        t = o.get("output_type")
        if t == "stream":
            texts.append(_text(o.get("text", "")))
        elif t in ("execute_result", "display_data"):
            data = o.get("data", {})
            img = next((m for m in _IMAGE_MIMES if m in data), None)
            if img and images:
                flush()
                parts.append(Part(type="image", mime=img, data="".join(_text(data[img]).split())))
                continue
            txt = _bundle_text(data)
            if txt is None and img:
                txt = f"[{img} image]"
            if txt:
                texts.append(txt if txt.endswith("\n") else txt + "\n")
        elif t == "error":
            tb = _ANSI.sub("", "\n".join(o.get("traceback", [])))
            texts.append((tb or f"{o.get('ename', '')}: {o.get('evalue', '')}") + "\n")
    flush()
    return parts


def _attachment_parts(m: Message, images: bool) -> list[Part]:
    """Images attached to a note or prompt, in nbformat's shape {name: {mime: base64}}."""
    parts: list[Part] = []
    for name, bundle in (m.attachments or {}).items():
        if not isinstance(bundle, dict):
            continue
        img = next((k for k in _IMAGE_MIMES if k in bundle), None)
        if img is None:
            continue
        if images:
            data = "".join(_text(bundle[img]).split())
            try:
                base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ContextError(f"attachment {name!r} of message {m.id} is not valid base64") from None
            parts.append(Part(type="image", mime=img, data=data))
        else:
            parts.append(Part(text=f"[attached image {name}]"))
    return parts


def _message_parts(m: Message, *, images: bool, max_output_chars: int) -> list[Part]:
    """User material from a note, code or raw message (not prompts)."""
    if m.kind == Kind.code:
        parts = [Part(text=_fence(m.source, "python"))] if m.source.strip() else []
        out = [Part(text=_fence(p.text)) if p.type == "text" else p
               for p in render_outputs(m.outputs, images=images, max_chars=max_output_chars)]
        if out and out[0].type == "text":
            out[0] = Part(text="Output:\n" + out[0].text)
        elif out:
            out.insert(0, Part(text="Output:"))
        return parts + out
    parts = [Part(text=m.source)] if m.source.strip() else []
    return parts + _attachment_parts(m, images)


def _merge(parts: Iterable[Part]) -> list[Part] | str:
    """Adjacent text parts joined by a blank line; a plain string when there are no images."""
    out: list[Part] = []
    for p in parts:
        if p.type == "text" and not p.text:
            continue
        if p.type == "text" and out and out[-1].type == "text":
            out[-1] = Part(text=out[-1].text + "\n\n" + p.text)
        else:
            out.append(p)
    if all(p.type == "text" for p in out):
        return out[0].text if out else ""
    return out


# ---------------------------------------------------------------- tokens

def estimate_tokens(text: str) -> int:
    """About 4 characters per token: right within ~20% for English prose and code on the common
    BPE tokenizers, used only where no tokenizer is at hand."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


class _Counter:
    def __init__(self, count_tokens: Callable[[str], int | None] | None):
        self.fn = count_tokens
        self.exact = count_tokens is not None

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        if self.fn is not None:
            n = self.fn(text)
            if n is not None:
                return int(n)
            self.exact = False  # the provider has no tokenizer (count_tokens returned None)
        return estimate_tokens(text)

    def parts(self, parts: Sequence[Part]) -> int:
        return sum(IMAGE_TOKENS if p.type == "image" else self(p.text) for p in parts)


# ---------------------------------------------------------------- build

@dataclass
class _Item:
    """One visible message above the prompt, rendered: user parts, and an answer for prompts."""

    msg: Message
    user: list[Part]
    answer: str
    tokens: int


def _prompt_parts(m: Message, block: str, images: bool) -> list[Part]:
    text = m.source + (f"\n\n{block}" if block else "")
    return ([Part(text=text)] if text.strip() else []) + _attachment_parts(m, images)


def build(dialogue: Dialogue, upto: str | Message, *, budget: int | None = None,
          count_tokens: Callable[[str], int | None] | None = None, resolved: Resolved | None = None,
          model: str | None = None, system: str | None = None, max_tokens: int = 1024,
          temperature: float | None = None, images: bool = True, max_output_chars: int = 20_000
          ) -> Request:
    """The request for answering prompt `upto` (an id or the message itself).

    `budget` caps the input tokens (system, context, tools and turns); over it, the oldest
    unpinned messages are dropped first and `Request.dropped` says how many. `count_tokens` is the
    model's tokenizer (e.g. the local model's); without it, or when it returns None, tokens are
    estimated at ~4 characters each and `meta["token_count"]` says so. `resolved` carries the
    values of the prompt's references (see `build_async`); a prompt with $`expr` or !`cmd`
    references and no `resolved` values is refused, since the model would see names without
    values. `images=False` replaces images by a text mention, for models that take none.

    meta: upto, tokens (the count for what is sent), token_count ("tokenizer" or "estimate"),
    refs (the references block appended to the prompt, worth storing on the prompt message as
    meta["refs"] so later requests replay it unchanged), ref_errors."""
    if budget is not None and budget <= 0:
        raise ContextError(f"budget must be a positive number of tokens, got {budget}")
    upto_id = upto.id if isinstance(upto, Message) else upto
    try:
        idx = dialogue.index(upto_id)
    except KeyError:
        raise ContextError(f"no message {upto_id!r} in dialogue {dialogue.name!r}") from None
    prompt = dialogue.messages[idx]
    if prompt.kind != Kind.prompt:
        raise ContextError(f"message {upto_id!r} is a {prompt.kind.value} message; only a prompt can be "
                           "sent to a model")
    refs = references(prompt.source)
    resolved = resolved or Resolved()
    missing = [f"$`{e}`" for e in refs.exprs if e not in resolved.values]
    missing += [f"!`{c}`" for c in refs.cmds if c not in resolved.shell]
    offered = {t.name for t in resolved.tools}
    missing += [f"&`{n}`" for n in tool_names(dialogue, prompt.id) if n not in offered]
    if missing:
        raise ContextError(f"the dialogue refers to {', '.join(missing)}, which need a kernel to "
                           "evaluate: use build_async(..., kernel=...)")
    count = _Counter(count_tokens)

    above = [m for m in dialogue.messages[:idx] if not m.hidden]
    items: list[_Item] = []
    for m in above:
        if m.kind == Kind.prompt:
            user = _prompt_parts(m, m.meta.get("refs", "") if isinstance(m.meta, dict) else "", images)
            answer = m.response
        else:
            user, answer = _message_parts(m, images=images, max_output_chars=max_output_chars), ""
        if not user and not answer:
            continue
        items.append(_Item(m, user, answer, count.parts(user) + count(answer)))

    block = _block(resolved)
    last = _prompt_parts(prompt, block, images)
    sys_text = dialogue.system if system is None else system
    if system is None and not sys_text:
        sys_text = DEFAULT_SYSTEM
    ctx = _context_text(dialogue)
    tools = list(resolved.tools)
    fixed = count(sys_text) + count(ctx) + count.parts(last) + sum(
        count(t.name) + count(t.description) + count(json.dumps(t.parameters)) for t in tools)
    total = fixed + sum(it.tokens for it in items)

    dropped = 0
    if budget is not None and total > budget:
        keep: list[_Item] = []
        for it in items:  # oldest first
            if total > budget and not it.msg.pinned:
                total -= it.tokens
                dropped += 1
            else:
                keep.append(it)
        items = keep
        if total > budget:
            pinned = sum(it.tokens for it in items)
            raise ContextError(
                f"the request needs {total:,} tokens even without the {dropped} messages that can be "
                f"dropped, over the budget of {budget:,}: the system prompt, attached context, tools "
                f"and the prompt take {fixed:,}, pinned messages {pinned:,}. Unpin or shorten something.")

    turns: list[Turn] = []
    pending: list[Part] = []
    for it in items:
        pending += it.user
        if it.answer:
            turns.append(Turn(role="user", content=_merge(pending)))
            turns.append(Turn(role="assistant", content=it.answer))
            pending = []
    turns.append(Turn(role="user", content=_merge(pending + last)))
    # The last assistant turn ends the part that the next prompt will share: a cache breakpoint.
    for t in reversed(turns):
        if t.role == "assistant":
            t.cache = True
            break

    return Request(
        model=model if model is not None else dialogue.model, messages=turns, system=sys_text,
        context=ctx, tools=tools, max_tokens=max_tokens, temperature=temperature, dropped=dropped,
        meta={"upto": prompt.id, "tokens": total,
              "token_count": "tokenizer" if count.exact else ESTIMATE_NOTE,
              "refs": block, "ref_errors": list(resolved.errors)})


def _context_text(dialogue: Dialogue) -> str:
    out = []
    for c in dialogue.context:
        attrs = f' name="{html.escape(c.name)}"' + (f' source="{html.escape(c.source)}"' if c.source else "")
        out.append(f"<context{attrs}>\n{c.content}\n</context>")
    return "\n\n".join(out)


def tool_names(dialogue: Dialogue, upto: str | Message) -> list[str]:
    """Tool names referenced (&`fn`) in the prompt and in every visible note and prompt above."""
    upto_id = upto.id if isinstance(upto, Message) else upto
    try:
        idx = dialogue.index(upto_id)
    except KeyError:
        raise ContextError(f"no message {upto_id!r} in dialogue {dialogue.name!r}") from None
    names: list[str] = []
    for m in dialogue.messages[: idx + 1]:
        if m.kind in (Kind.note, Kind.prompt) and (not m.hidden or m.id == upto_id):
            for n in references(m.source, strict=m.id == upto_id).tools:
                _add(names, n)
    return names


async def build_async(dialogue: Dialogue, upto: str | Message, *, kernel: "Kernel",
                      max_value_chars: int = 10_000, ref_timeout: float = 30.0, **kwargs: Any) -> Request:
    """`build`, with the prompt's $`expr` and !`cmd` references evaluated in `kernel` and the
    &`tool` references of the visible dialogue turned into tool specs there."""
    upto_id = upto.id if isinstance(upto, Message) else upto
    try:
        prompt = dialogue.message(upto_id)
    except KeyError:
        raise ContextError(f"no message {upto_id!r} in dialogue {dialogue.name!r}") from None
    refs = references(prompt.source)
    refs.tools = tool_names(dialogue, upto_id)
    resolved = await resolve(kernel, refs, max_value_chars=max_value_chars, timeout=ref_timeout)
    return build(dialogue, upto_id, resolved=resolved, **kwargs)
