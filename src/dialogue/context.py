"""Dialogue -> provider request: what the model sees when it answers a prompt.

Order, stable part first so that every prefix cache hits (the local KV store, Anthropic
`cache_control`, OpenAI's automatic prefix cache):

1. the system prompt, then the dialogue's mode text (`modes`: learning, concise; standard adds
   nothing);
2. the context notes of the dialogue's folders, outermost first (the service passes them:
   `folders=`), then the dialogue's attached context (`Request.context`; each part listed in
   `Request.meta["context"]` with its kind, "folder" or the attached item's);
3. the messages above the prompt, in order: notes and code (with outputs as text, images as image
   parts) folded into user turns, earlier prompts as user turns and their answers as assistant
   turns, hidden messages left out, consecutive user material merged so turns alternate;
4. the prompt itself, last, with the values of its `` $`expr` `` and `` !`cmd` `` references
   in delimited blocks after its text (references quoted inside markdown code are text).

Code outputs reach the model as a terminal shows them (carriage-return progress collapsed) and
shortened to the dialogue's OutputLimit (`meta["output_limit"]`; head and tail lines with a marker
line saying what was cut); `Request.meta["cut"]` lists what was cut. A small model's context is
not spent on the middle of a 900-line pip log.

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
    req = build(dialogue, upto=msg_id, output_limit=OutputLimit(head=40, tail=20, chars=4000))
"""
from __future__ import annotations

import base64
import binascii
import html
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from markdown_it import MarkdownIt

from .document import ContextItem, Dialogue, Kind, Message
from .llm.base import Part, Request, ToolCallReq, ToolSpec, Turn
from .modes import ModeError, mode_of
from .render import plain_text

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = [
    "build", "build_async", "references", "resolve", "Refs", "Resolved", "ContextError",
    "DEFAULT_SYSTEM", "estimate_tokens", "tool_names", "render_outputs", "IMAGE_TOKENS", "CHARS_PER_TOKEN",
    "OutputLimit", "parse_output_limit", "output_limit_of", "with_output_limit", "terminal_text",
    "cut_text", "attached_images", "Counter", "tools_tokens",
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


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    # CommonMark as the web page renders it, minus raw HTML: with HTML on, a line that starts
    # with a tag opens an HTML block and would hide the references after it. text_join off keeps
    # a backslash escape as its own token, so that \$`x` stays literal text.
    md = MarkdownIt("commonmark", {"html": False})
    if "text_join" in md.get_all_rules().get("core", []):
        md.disable("text_join")
    return md


@lru_cache(maxsize=1024)
def _sigil_spans(text: str) -> tuple[tuple[str, str], ...]:
    """(sigil, code) for every inline code span directly after a `$`, `!` or `&` in `text`.

    A reference is a sigil followed by a code span, so a markdown parser finds them exactly:
    markdown-it-py (CommonMark) rather than regexes of our own, because what is code in markdown
    has rules a regex gets wrong (``` ``!`ls` `` ``` is one span of any number of backticks, whose
    content is literal; fenced and indented blocks; backslash escapes). Code quoted in a prompt
    is then never mistaken for a reference. Cached: `tool_names` parses every note on each prompt.
    """
    out: list[tuple[str, str]] = []
    for tok in _markdown().parse(text):
        prev = None
        for child in tok.children or ():
            if (child.type == "code_inline" and prev is not None and prev.type == "text"
                    and prev.content and prev.content[-1] in "$!&"):
                out.append((prev.content[-1], child.content))
            prev = child
    return tuple(out)


def references(text: str, *, strict: bool = True) -> Refs:
    """`` $`expr` ``, `` !`cmd` ``, `` &`fn` `` and `` &`[f, g]` `` in `text` (solveit's syntax).
    Only outside markdown code: a reference quoted in an inline code span (``` ``!`ls` `` ```) or a
    fenced or indented code block is text, not a reference, and `\\$` escapes a sigil. A tool
    reference that is not a plain Python name (providers accept only names like that for tools)
    raises ContextError, or is skipped when not `strict` (for earlier messages, which the user is
    not sending now)."""
    refs = Refs()
    for sigil, body in _sigil_spans(text):
        body = body.strip()
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


# ---------------------------------------------------------------- long outputs

@dataclass(frozen=True)
class OutputLimit:
    """How much of a code message's output text the model sees: the first `head` and last
    `tail` lines, and at most `chars` characters of them (about 2/3 for the head, the rest for
    the tail). `head` and `tail` both 0: no line limit; `chars` 0: no character limit.

    The defaults (20 + 10 lines, 2,000 characters, about 500 tokens) are sized for the bundled
    8k-token model: ten long outputs still leave half its window for the notes, the prompt and
    the answer. The head says what ran (the first lines of a log, a traceback's entry point), the
    tail how it ended (the last lines of a log, the exception of a traceback), so the tail gets
    the fewer lines but is never dropped. 2,000 characters holds 30 ordinary lines; it is the
    limit that bites on a few very long lines (a big repr, a one-line JSON dump)."""

    head: int = 20
    tail: int = 10
    chars: int = 2000

    def to_dict(self) -> dict[str, int]:
        return {"head": self.head, "tail": self.tail, "chars": self.chars}


_OFF = (None, 0, False, "0", "off", "none", "no")


def parse_output_limit(value: Any = "default") -> OutputLimit | None:
    """The limit a setting stands for (None: no cutting). Accepts what `Dialogue.meta
    ["output_limit"]` may hold: absent or "default" (the defaults), 0 / None / "off" (no cutting),
    a dict with any of head, tail, chars (the rest from the defaults), or the CLI's text
    "HEAD,TAIL,CHARS" (e.g. "20,10,2000"). Anything else raises ContextError, one line."""
    if isinstance(value, OutputLimit):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "default":
            return OutputLimit()
        if text in _OFF:
            return None
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ContextError(f"output limit {value!r}: give HEAD,TAIL,CHARS as three whole numbers "
                               "(e.g. 20,10,2000; 0 = no limit of that kind), 'off' or 'default'")
        value = dict(zip(("head", "tail", "chars"), map(int, parts)))
    if value in _OFF and not isinstance(value, dict):
        return None
    if not isinstance(value, dict):
        raise ContextError(f"output limit {value!r}: expected {{'head': 20, 'tail': 10, 'chars': 2000}}, "
                           "0 for no cutting, or 'default'")
    unknown = sorted(set(value) - {"head", "tail", "chars"})
    if unknown:
        raise ContextError(f"output limit: unknown key {', '.join(map(repr, unknown))}; the keys are "
                           "head, tail and chars")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ContextError(f"output limit: {k} must be a whole number >= 0 (0 = no limit), got {v!r}")
    return OutputLimit(**value)


def with_output_limit(meta: dict[str, Any], value: Any) -> dict[str, Any]:
    """`meta` (a dialogue's) with the output limit setting `value` stored, checked: "default"
    removes the key, so the dialogue follows the defaults; no cutting is stored as 0."""
    lim = parse_output_limit(value)
    meta = dict(meta)
    if isinstance(value, str) and value.strip().lower() == "default":
        meta.pop("output_limit", None)
    else:
        meta["output_limit"] = lim.to_dict() if lim else 0
    return meta


def output_limit_of(dialogue: Dialogue) -> OutputLimit | None:
    """The dialogue's output limit: `meta["output_limit"]`, the defaults when it has none."""
    return parse_output_limit(dialogue.meta.get("output_limit", "default"))


def terminal_text(text: str) -> str:
    """Output text as the page shows it, as plain text: what carriage returns, backspaces and
    erase-line codes take back is gone (a progress bar redrawn 500 times is its last state;
    `kernel.outputs.collapse_stream`, Jupyter's rule) and colour and cursor codes are removed,
    so the model sees what the user saw."""
    return plain_text(text)


def cut_text(text: str, limit: OutputLimit | None) -> tuple[str, dict[str, int] | None]:
    """`text` (already as `terminal_text` shows it) within `limit`: head and tail kept, a marker
    line saying what was cut, e.g. "[... 47 lines (3,210 characters) cut ...]". Returns the text
    and {"lines", "chars", "kept_lines", "cut_lines", "cut_chars"} (None when nothing was cut).
    Deterministic, a function of the text and the limit only: the same output gives the same
    text in every request, which the prefix caches rely on."""
    if limit is None:
        return text, None
    lines = text.split("\n")
    n = len(lines)
    by_lines = (limit.head or limit.tail) and n > limit.head + limit.tail
    if not by_lines and (not limit.chars or len(text) <= limit.chars):
        return text, None
    head_end = limit.head if by_lines else n  # the lines the head may take, and the tail's
    tail_start = n - limit.tail if by_lines else 0
    budget = limit.chars or len(text)
    # The head takes whole lines within 2/3 of the characters, the tail whole lines within what
    # is left; a line longer than a whole share is cut inside itself (a one-line giant repr).
    head_budget = budget if not limit.chars else budget - budget // 3
    i = used = 0
    while i < head_end and used + len(lines[i]) + (i > 0) <= head_budget:
        used += len(lines[i]) + (i > 0)
        i += 1
    head = "\n".join(lines[:i])
    shown = set(range(i))  # the lines of which anything shows
    head_part = 0  # characters shown of line i, when it is too long for the head's whole share
    if i < head_end and len(lines[i]) > head_budget and head_budget - used - (i > 0) > 0:
        head_part = head_budget - used - (i > 0)
        head += ("\n" if i else "") + lines[i][:head_part]
        shown.add(i)
    tail_budget = budget - len(head)
    # The tail: whole lines the head did not show, from the end; then, when the next line up is
    # too long for the tail's whole share, the end of it.
    j, tused = n, 0
    while j > max(tail_start, i + (head_part > 0)) and tused + len(lines[j - 1]) + (j < n) <= tail_budget:
        tused += len(lines[j - 1]) + (j < n)
        j -= 1
    tail = "\n".join(lines[j:])
    k = j - 1  # the line above the tail
    if k >= max(tail_start, i) and len(lines[k]) > tail_budget:
        room = tail_budget - tused - (j < n)
        if k == i:
            room = min(room, len(lines[k]) - head_part)
        if room > 0:
            tail = lines[k][-room:] + ("\n" + tail if j < n else "")
            shown.add(k)
    shown |= set(range(j, n))
    cut_chars = len(text) - len(head) - len(tail)
    cut_lines = n - len(shown)
    what = (f"{cut_lines:,} line{'s' if cut_lines != 1 else ''} ({cut_chars:,} characters)"
            if cut_lines else f"{cut_chars:,} characters")
    marker = f"[... {what} cut ...]"
    out = "\n".join(x for x in (head, marker, tail) if x)
    return out, {"lines": n, "chars": len(text), "kept_lines": len(shown), "cut_lines": cut_lines,
                 "cut_chars": cut_chars}


def render_outputs(outputs: Sequence[dict[str, Any]], *, images: bool = True,
                   limit: OutputLimit | None = OutputLimit(),
                   cuts: list[dict[str, int]] | None = None) -> list[Part]:
    """A code message's outputs as parts: text (streams, results, errors with their traceback,
    as a terminal shows them) and images (base64, as the kernel sent them). Each run of text
    between images is cut to `limit` (see `cut_text`); what was cut is appended to `cuts`."""
    parts: list[Part] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            text, cut = cut_text("".join(texts).rstrip("\n"), limit)
            parts.append(Part(text=text))
            if cut and cuts is not None:
                cuts.append(cut)
            texts.clear()

    for o in outputs:
        t = o.get("output_type")
        if t == "stream":
            # each output as the page shows it: a stdout line a \r left open is not
            # overwritten by the stderr block after it
            texts.append(terminal_text(_text(o.get("text", ""))))
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
                txt = terminal_text(txt)
                texts.append(txt if txt.endswith("\n") else txt + "\n")
        elif t == "error":
            tb = "\n".join(o.get("traceback", []))
            texts.append(terminal_text(tb or f"{o.get('ename', '')}: {o.get('evalue', '')}") + "\n")
    flush()
    return parts


def _attachment_parts(m: Message, images: bool) -> list[Part]:
    """Images attached to a note or prompt, in nbformat's shape {name: {mime: base64}}. An
    attachment the models cannot take (another type, such as SVG, or over MAX_IMAGE_BYTES) is
    refused with a ContextError naming it: nothing the user attached is silently left out."""
    from .images import MAX_IMAGE_BYTES, decoded_size, describe_size, image_of

    parts: list[Part] = []
    for name, bundle in (m.attachments or {}).items():
        found = image_of(bundle)
        if found is None:
            if isinstance(bundle, dict) and any(str(k).startswith("image/") for k in bundle):
                raise ContextError(
                    f"attachment {name!r} of message {m.id} is {', '.join(map(str, bundle))}: "
                    "models take PNG, JPEG, GIF or WebP images; convert it, or hide the message")
            continue  # not an image (a text attachment of an imported notebook): not for models
        img, data = found
        if images:
            data = "".join(data.split())
            if (size := decoded_size(data)) > MAX_IMAGE_BYTES:
                raise ContextError(
                    f"attachment {name!r} of message {m.id} is {describe_size(size)}, over the "
                    f"{describe_size(MAX_IMAGE_BYTES)} a model takes per image: make it smaller or "
                    "hide the message")
            try:
                base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ContextError(f"attachment {name!r} of message {m.id} is not valid base64") from None
            parts.append(Part(type="image", mime=img, data=data))
        else:
            parts.append(Part(text=f"[attached image {name}]"))
    return parts


def attached_images(messages: Iterable[Message]) -> list[dict[str, str]]:
    """The images attached to notes and prompts among `messages` (not code outputs), as
    {"message", "name", "mime"}: what a model that cannot see images would miss."""
    from .images import image_of

    return [{"message": m.id, "name": name, "mime": found[0]}
            for m in messages if m.kind in (Kind.note, Kind.prompt)
            for name, bundle in (m.attachments or {}).items()
            if (found := image_of(bundle)) is not None]


def _message_parts(m: Message, *, images: bool, limit: OutputLimit | None,
                   cuts: list[dict[str, int]]) -> list[Part]:
    """User material from a note, code or raw message (not prompts). Only code outputs are cut:
    notes are what the user wrote for the model to read."""
    if m.kind == Kind.code:
        parts = [Part(text=_fence(m.source, "python"))] if m.source.strip() else []
        out = [Part(text=_fence(p.text)) if p.type == "text" else p
               for p in render_outputs(m.outputs, images=images, limit=limit, cuts=cuts)]
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


class Counter:
    """Tokens of a text by `count_tokens` (a model's tokenizer), else estimated (~4 characters a
    token, `estimate_tokens`); `exact` turns False once an estimate was used."""

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


def tools_tokens(tools: Sequence[ToolSpec], count: Callable[[str], int]) -> int:
    """The tokens tools take in a request, as the builder counts them: name, description and
    parameter schema of each."""
    return sum(count(t.name) + count(t.description) + count(json.dumps(t.parameters))
               for t in tools)


# ---------------------------------------------------------------- build

@dataclass
class _Item:
    """One visible message above the prompt, rendered: user parts, and an answer for prompts."""

    msg: Message
    user: list[Part]
    answer: str
    tokens: int
    cut: dict[str, Any] | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)  # tool calls replayed as turns
    user_tokens: int = 0  # of `tokens`, the user parts' (the rest is the answer and its calls)


NO_RESULT = "(no result: the answer ended before this call ran)"


def replayed_calls(m: Message) -> list[dict[str, Any]]:
    """The tool calls of answer `m` as later requests replay them: each with its id, name,
    arguments and the result the model got (every call has one: the APIs refuse a call without
    its result)."""
    out = []
    for c in m.tool_calls or []:
        if not isinstance(c, dict) or not c.get("id") or not c.get("name"):
            continue
        res = c.get("result")
        out.append({"id": str(c["id"]), "name": str(c["name"]),
                    "arguments": c.get("arguments") if isinstance(c.get("arguments"), dict) else {},
                    "result": str(res) if res is not None else NO_RESULT})
    return out


def calls_text(calls: Sequence[dict[str, Any]]) -> str:
    """Tool calls written into an answer's text, for a request that offers no tools (a tool
    call without the tool offered is refused by some APIs): what was called and what came back."""
    return "".join(f"[called {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)}); "
                   f"result: {c['result']}]\n\n" for c in calls)


def _prompt_parts(m: Message, block: str, images: bool) -> list[Part]:
    text = m.source + (f"\n\n{block}" if block else "")
    return ([Part(text=text)] if text.strip() else []) + _attachment_parts(m, images)


def build(dialogue: Dialogue, upto: str | Message, *, budget: int | None = None,
          count_tokens: Callable[[str], int | None] | None = None, resolved: Resolved | None = None,
          model: str | None = None, system: str | None = None, max_tokens: int = 1024,
          temperature: float | None = None, images: bool = True, output_limit: Any = "dialogue",
          folders: Sequence[ContextItem] = (), tools_offered: bool | None = None) -> Request:
    """The request for answering prompt `upto` (an id or the message itself).

    `budget` caps the input tokens (system, context, tools and turns); over it, the oldest
    unpinned messages are dropped first and `Request.dropped` says how many. `count_tokens` is the
    model's tokenizer (e.g. the local model's); without it, or when it returns None, tokens are
    estimated at ~4 characters each and `meta["token_count"]` says so. `resolved` carries the
    values of the prompt's references (see `build_async`); a prompt with $`expr` or !`cmd`
    references and no `resolved` values is refused, since the model would see names without
    values. `images=False` replaces images by a text mention, for models that take none.
    `output_limit` (an OutputLimit, None for no cutting, or what `parse_output_limit` takes)
    shortens long code outputs; by default the dialogue's setting, `meta["output_limit"]`.
    `folders`: the context notes of the folders the dialogue is in, outermost first (kind
    "folder", named by the folder's path), sent before the attached context.
    `tools_offered`: whether the request will offer tools when sent (by default whether
    `resolved` has any; a caller that adds tools after the build, or clears them, says so). Earlier
    tool calls are replayed as tool turns only then, and otherwise written into the answers' text
    (an API refuses tool calls in the history of a request that offers no tools).
    Pinned messages are cut too: pinning keeps a message in the context, it does not make a
    900-line log worth its tokens (a note, never cut, is the way to keep a long text whole).

    meta: upto, tokens (the count for what is sent), token_count ("tokenizer" or "estimate"),
    refs (the references block appended to the prompt, worth storing on the prompt message as
    meta["refs"] so later requests replay it unchanged), ref_errors, cut (one entry per message
    sent whose output was shortened: {"message", "lines", "chars", "kept_lines", "cut_lines",
    "cut_chars"}, summed over its outputs; [] when nothing was cut)."""
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
    count = Counter(count_tokens)
    if tools_offered is None:
        tools_offered = bool(resolved.tools)
    if output_limit == "dialogue":
        try:
            limit = output_limit_of(dialogue)
        except ContextError as e:
            raise ContextError(f"dialogue {dialogue.name!r}: {e}") from None
    else:
        limit = parse_output_limit(output_limit)

    left_out: dict[str, dict[str, Any]] = {}  # what became of a message not sent, and why
    items: list[_Item] = []
    for m in dialogue.messages[:idx]:
        if m.hidden:
            left_out[m.id] = {"status": "hidden", "reason": "hidden from the model by the user"}
            continue
        cuts: list[dict[str, int]] = []
        calls: list[dict[str, Any]] = []
        if m.kind == Kind.prompt:
            user = _prompt_parts(m, m.meta.get("refs", "") if isinstance(m.meta, dict) else "", images)
            answer, calls = m.response, replayed_calls(m)
            if calls and not tools_offered:  # as text: no tools offered, so no tool turns
                answer, calls = calls_text(calls) + answer, []
        else:
            user, answer = _message_parts(m, images=images, limit=limit, cuts=cuts), ""
        if not user and not answer:
            left_out[m.id] = {"status": "empty", "reason": "nothing to send"}
            continue
        cut = {"message": m.id, **{k: sum(c[k] for c in cuts) for k in cuts[0]}} if cuts else None
        utok = count.parts(user)
        items.append(_Item(m, user, answer, utok + count(answer) + sum(
            count(json.dumps(c["arguments"])) + count(c["result"]) for c in calls), cut, calls,
            user_tokens=utok))

    block = _block(resolved)
    last = _prompt_parts(prompt, block, images)
    sys_text = dialogue.system if system is None else system
    if system is None and not sys_text:
        sys_text = DEFAULT_SYSTEM
    try:
        mode, mode_text = mode_of(dialogue.meta)
    except ModeError as e:
        raise ContextError(f"dialogue {dialogue.name!r}: {e}") from None
    if mode_text:  # the mode is text in the system prompt, as the settings show it
        sys_text = f"{sys_text}\n\n{mode_text}" if sys_text else mode_text
    notes = [f for f in folders if f.content.strip()]
    # attached docs may take the budget but a quarter (kept for the conversation) and what the
    # system prompt, folder notes and the prompt need; over it, the largest are retrieved
    room = None if budget is None else max(0, budget - budget // 4 - count(sys_text)
                                           - count(_context_text(notes)) - count.parts(last))
    attached, attached_meta = _fit_attached(dialogue.context, room, count, prompt.source)
    parts = [*notes, *attached]
    ctx = _context_text(parts)
    tools = list(resolved.tools)
    by_part = {"system": count(sys_text), "context": count(ctx), "prompt": count.parts(last),
               "tools": tools_tokens(tools, count)}
    fixed = sum(by_part.values())
    total = fixed + sum(it.tokens for it in items)

    dropped = 0
    if budget is not None and total > budget:
        keep: list[_Item] = []
        for it in items:  # oldest first
            if total > budget and not it.msg.pinned:
                total -= it.tokens
                dropped += 1
                left_out[it.msg.id] = {
                    "status": "dropped", "tokens": it.tokens,
                    "reason": f"over the token budget of {budget:,}: the oldest unpinned messages "
                              "are left out first"}
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
    turn_ids: list[list[str]] = []  # the messages each turn was made of, for the request record
    pending: list[Part] = []
    pending_ids: list[str] = []
    for it in items:
        pending += it.user
        pending_ids.append(it.msg.id)
        if it.calls:
            # an answer that called tools, as the tool loop sent it: its calls, one tool turn per
            # result, then its text (the text it wrote before a call is stored with the rest)
            turns.append(Turn(role="user", content=_merge(pending)))
            turns.append(Turn(role="assistant", content="", tool_calls=[
                ToolCallReq(id=c["id"], name=c["name"], arguments=c["arguments"]) for c in it.calls]))
            turns += [Turn(role="tool", content=c["result"], tool_call_id=c["id"], name=c["name"])
                      for c in it.calls]
            turn_ids += [pending_ids] + [[it.msg.id]] * (1 + len(it.calls))
            if it.answer:
                turns.append(Turn(role="assistant", content=it.answer))
                turn_ids.append([it.msg.id])
            pending, pending_ids = [], []
        elif it.answer:
            turns.append(Turn(role="user", content=_merge(pending)))
            turns.append(Turn(role="assistant", content=it.answer))
            turn_ids += [pending_ids, [it.msg.id]]
            pending, pending_ids = [], []
    turns.append(Turn(role="user", content=_merge(pending + last)))
    turn_ids.append(pending_ids + [prompt.id])
    # The last assistant turn ends the part that the next prompt will share: a cache breakpoint.
    for t in reversed(turns):
        if t.role == "assistant":
            t.cache = True
            break

    return Request(
        model=model if model is not None else dialogue.model, messages=turns, system=sys_text,
        context=ctx, tools=tools, max_tokens=max_tokens, temperature=temperature, dropped=dropped,
        meta={"upto": prompt.id, "tokens": total, "mode": {"name": mode, "chars": len(mode_text)},
              "context": [{"kind": c.kind, "name": c.name, "source": c.source,
                           "tokens": count(c.content)} for c in notes] + attached_meta,
              "token_count": "tokenizer" if count.exact else ESTIMATE_NOTE,
              "refs": block, "ref_errors": list(resolved.errors),
              "cut": [it.cut for it in items if it.cut],
              # only where there are some: the images the user attached, for the request view
              **({"images": imgs} if (imgs := attached_images([*(it.msg for it in items), prompt]))
                 else {}),
              "tokens_by_part": by_part, "turn_messages": turn_ids,
              "messages": _listing(dialogue.messages[:idx + 1], items, left_out, by_part["prompt"])})


def _listing(messages: Sequence[Message], items: Sequence[_Item], left_out: dict[str, dict[str, Any]],
             prompt_tokens: int) -> list[dict[str, Any]]:
    """Every message up to the prompt and what became of it in the request: sent (its tokens,
    pinned, what of its output was cut), hidden, empty or dropped for the budget (with why)."""
    sent = {it.msg.id: it for it in items}
    out: list[dict[str, Any]] = []
    for m in messages:
        e: dict[str, Any] = {"id": m.id, "kind": m.kind.value}
        if m is messages[-1]:
            e.update(status="sent", tokens=prompt_tokens, prompt=True)
        elif m.id in sent:
            it = sent[m.id]
            e.update(status="sent", tokens=it.tokens, pinned=m.pinned)
            if it.tokens > it.user_tokens:
                e["answer_tokens"] = it.tokens - it.user_tokens  # its answer (and tool calls)
            if it.cut:
                e["cut"] = {k: v for k, v in it.cut.items() if k != "message"}
        else:
            e.update(left_out.get(m.id, {"status": "empty", "reason": "nothing to send"}))
        out.append(e)
    return out


def _fit_attached(items: Sequence[ContextItem], room: int | None, count: Callable[[str], int],
                  query: str) -> tuple[list[ContextItem], list[dict[str, Any]]]:
    """The attached items as sent, and their `Request.meta["context"]` entries: whole when they
    fit in `room` tokens (None: no limit), else the largest cut to the chunks that best match
    `query` (`retrieval.fit`), marked as such in the text the model reads and in the entry
    (`retrieved`: the chunk numbers sent, `of`: how many there are)."""
    from dataclasses import replace
    from .retrieval import fit
    out: list[ContextItem] = []
    meta: list[dict[str, Any]] = []
    for c, f in zip(items, fit([(c.name, c.content) for c in items], room, query, count)):
        e: dict[str, Any] = {"kind": c.kind, "name": c.name, "source": c.source, "tokens": f.tokens}
        if f.retrieved is not None:
            header = (f"[retrieved: the {len(f.retrieved)} of {f.of} chunks of {c.name!r} that best "
                      "match the prompt; the rest is left out to fit the context]\n\n")
            c = replace(c, content=header + f.text)
            # the chunks were counted by fit: only the header is new
            e.update(tokens=f.tokens + count(header), retrieved=f.retrieved, of=f.of)
        out.append(c)
        meta.append(e)
    return out, meta


def _context_text(items: Sequence[ContextItem]) -> str:
    out = []
    for c in items:
        attrs = f' name="{html.escape(c.name)}"' + (f' source="{html.escape(c.source)}"' if c.source else "")
        if c.kind == "folder":  # the model can tell a folder's standing note from an attachment
            attrs = f' folder="{html.escape(c.name)}"'
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
