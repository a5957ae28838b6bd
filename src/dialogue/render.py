"""Markdown and notebook outputs -> HTML that is safe to put in a page.

Everything a model, a notebook or a user wrote reaches a browser through this module: the web app
and the HTML export both call it, so there is one sanitizer to get right. Markdown is parsed with
markdown-it-py (CommonMark, plus tables and strikethrough) with raw HTML allowed, because notes
and model answers legitimately contain `<details>`, `<sub>`, tables; the result then goes through
nh3 (the Rust `ammonia` sanitizer) with an allowlist. No script, no event handler, no
`javascript:` (or any non-allowlisted) URL, no iframe/object/embed/form/style survives; `data:`
URLs are kept only for images (`<img src="data:image/...">`), which is how exported notebooks
carry their plots. Code is highlighted with Pygments into `<span class=...>` so the highlight
survives sanitizing (classes are kept, inline styles only as one exact colour on a `<span>`).

Maths (`$...$`, `$$...$$`, amsmath environments) is found by mdit-py-plugins' dollarmath and
amsmath rules (pandoc's rules for `$`: "$5 and $10" stays prose, code spans and fences stay
code) and rendered here to MathML with latex2mathml: no script, no font download, nothing from
the network, and the page and the HTML export show the same. The MathML elements and attributes
are allowlisted in the sanitizer like the rest.

Outputs: a stream shows what carriage returns and backspaces left of it
(`kernel.outputs.shown_stream`, Jupyter's rule), its ANSI colours as classed spans
(`ansi_html`), and an output longer than `LONG_LINES` lines scrolls in a box with a "show all"
toggle that needs no script (`<details>` and CSS `:has`), so it works in the export too.
"""
from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from copy import deepcopy
from functools import lru_cache
from typing import Any

import nh3
from markdown_it import MarkdownIt
from mdit_py_plugins.amsmath import amsmath_plugin
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight as _pyg_highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from .kernel.outputs import shown_stream

__all__ = ["render_markdown", "sanitize_html", "highlight_code", "highlight_css", "strip_ansi",
           "plain_text", "ansi_html", "render_math", "output_css", "render_output",
           "stream_tail_html", "stream_update_html",
           "render_outputs", "image_data_uri", "pick_mime", "output_mimes", "IMAGE_MIMES",
           "LONG_LINES"]

# ---------------------------------------------------------------- sanitizing

_TAGS = (set(nh3.ALLOWED_TAGS) | {"tfoot"}) - {"area", "map"}
_ATTRIBUTES: dict[str, set[str]] = deepcopy(nh3.ALLOWED_ATTRIBUTES)
_ATTRIBUTES.setdefault("*", set()).update({"title", "lang", "dir"})
_ATTRIBUTES["img"] = {"src", "alt", "width", "height", "title"}
_ATTRIBUTES["a"] = {"href", "hreflang", "title"}
# Classes carry code highlighting (Pygments token classes), code languages, pandas' table class
# and solveit's tool-call <details>; kept on the few tags that use them, never as inline styles.
for _t in ("code", "pre", "span", "div", "details", "summary", "table", "p"):
    _ATTRIBUTES.setdefault(_t, set()).add("class")
_ATTRIBUTES["details"].add("open")
# MathML (what latex2mathml writes, MathML Core and a few presentation elements browsers
# render). No href, no annotation-xml (an HTML integration point), no event handlers.
_MATHML = {"math", "semantics", "annotation", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace",
           "msup", "msub", "msubsup", "mfrac", "msqrt", "mroot", "mover", "munder", "munderover",
           "mtable", "mtr", "mtd", "mstyle", "mpadded", "mphantom", "menclose", "merror",
           "mmultiscripts", "mprescripts", "none"}
_TAGS |= _MATHML
_MATHML_ATTRS = {"mathvariant", "mathsize", "mathcolor", "mathbackground", "dir", "displaystyle",
                 "scriptlevel", "stretchy", "fence", "separator", "form", "lspace", "rspace",
                 "minsize", "maxsize", "largeop", "movablelimits", "symmetric", "accent",
                 "accentunder", "linethickness", "width", "height", "depth", "voffset",
                 "notation", "columnalign", "rowalign", "columnspacing", "rowspacing",
                 "columnlines", "rowlines", "columnspan", "rowspan", "frame", "framespacing",
                 "linebreak", "encoding"}
for _t in _MATHML:
    _ATTRIBUTES[_t] = set(_MATHML_ATTRS)
_ATTRIBUTES["math"] |= {"display", "xmlns"}
# ANSI colours beyond the 16 named ones (256-colour and 24-bit codes) are one exact colour
_ATTRIBUTES["span"].add("style")
_COLOUR_STYLE = re.compile(r"(?:color:#[0-9a-f]{6};)?(?:background-color:#[0-9a-f]{6};)?")
_URL_SCHEMES = {"http", "https", "mailto", "data"}
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp|svg\+xml);base64,[a-z0-9+/=\s]*$", re.I)


def _filter_attr(tag: str, attr: str, value: str) -> str | None:
    # nh3 has already dropped every URL whose scheme is not in _URL_SCHEMES; this narrows `data:`
    # to images: a data:text/html link opens an attacker's page in a new origin-less document.
    if attr == "style":
        return value if _COLOUR_STYLE.fullmatch(value) and value else None
    if attr in ("mathcolor", "mathbackground"):  # a colour, never a url(...) or an expression
        return value if re.fullmatch(r"#?[0-9a-zA-Z]{1,20}", value) else None
    if attr in ("href", "src", "cite") and value.strip().lower().startswith("data:"):
        if tag == "img" and attr == "src" and _DATA_IMAGE.match(value.strip()):
            return value
        return None
    return value


def sanitize_html(fragment: str) -> str:
    """Make an HTML fragment inert: allowlisted tags and attributes only (see module docstring).
    Used on rendered markdown and on the `text/html` outputs of code."""
    return nh3.clean(fragment, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes=_URL_SCHEMES,
                     attribute_filter=_filter_attr, clean_content_tags={"script", "style"},
                     strip_comments=True, link_rel="noopener noreferrer")


# ---------------------------------------------------------------- markdown

_LANG = re.compile(r"^[\w+#.-]{1,40}$")


def highlight_code(code: str, lang: str = "python") -> str:
    """Code -> `<pre class="highlight"><code class="language-...">` with Pygments token classes
    (style them with `highlight_css()`). Unknown languages are escaped, not guessed: guessing
    makes prose look like code."""
    lang = (lang or "").strip().split()[0] if (lang or "").strip() else ""
    lang = lang if _LANG.match(lang) else ""
    body = html.escape(code)
    if lang:
        lexer = _lexer(lang.lower())
        if lexer is not None:
            body = _pyg_highlight(code, lexer, _FORMATTER)
    cls = f' class="language-{html.escape(lang)}"' if lang else ""
    return f'<pre class="highlight"><code{cls}>{body}</code></pre>'


# Building a lexer and a formatter is about half the cost of highlighting a short cell (profiled
# on a 1,000-cell page); both are stateless between calls, so one of each is kept.
_FORMATTER = HtmlFormatter(nowrap=True)


@lru_cache(maxsize=64)
def _lexer(lang: str):
    try:
        return get_lexer_by_name(lang, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


@lru_cache(maxsize=4)
def highlight_css(style: str = "default") -> str:
    """The stylesheet for `highlight_code`'s token classes, scoped to `.highlight`."""
    return HtmlFormatter(style=style).get_style_defs(".highlight")


def _md_highlight(code: str, lang: str, attrs: str) -> str:
    return highlight_code(code, lang)


def render_math(latex: str, display: bool = False) -> str:
    """LaTeX maths -> MathML (latex2mathml), wrapped in `<span class="math inline">` or
    `<span class="math display">`. LaTeX it cannot read is shown as written, in a code span
    with class `math-error` (and its reason as the title), never dropped."""
    import latex2mathml.converter  # on the first formula: 15 ms of import a CLI call rarely needs

    cls = "math display" if display else "math inline"
    try:
        mathml = latex2mathml.converter.convert(latex.strip(),
                                                display="block" if display else "inline")
    except Exception as e:  # latex2mathml raises its own errors and, on some input, others
        return (f'<code class="math-error" title="{html.escape(f"not rendered: {e}")}">'
                f'{html.escape(latex)}</code>')
    return f'<span class="{cls}">{mathml}</span>'


def _math_rule(display: bool, block: bool = False):
    def render(self, tokens, idx, options, env) -> str:
        out = render_math(tokens[idx].content, display)
        return f'<div class="math-block">{out}</div>\n' if block else out
    return render


def _amsmath_rule(self, tokens, idx, options, env) -> str:
    return f'<div class="math-block">{render_math(tokens[idx].content, True)}</div>\n'


def _not_across_code(rule):
    """dollarmath's inline rule, refusing a span that would take in a backtick: in "costs $10,
    see `$x$`" the dollar of the price would otherwise pair with the one inside the code span
    (dollarmath runs before the code-span rule), eating the code."""
    def guarded(state, silent: bool) -> bool:
        start, n, pending = state.pos, len(state.tokens), state.pending
        if not rule(state, silent):
            return False
        if "`" not in state.src[start:state.pos]:
            return True
        state.pos = start
        del state.tokens[n:]  # the math token, and the text before it that pushing it flushed
        state.pending = pending
        return False
    return guarded


@lru_cache(maxsize=1)
def _md() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True, "highlight": _md_highlight})
    md.enable(["table", "strikethrough"])
    # pandoc's rules: no space inside the dollars, no digit after the closing one
    md.use(dollarmath_plugin, allow_space=False, allow_digits=False, double_inline=True,
           allow_labels=False).use(amsmath_plugin)
    rules = md.inline.ruler.__rules__
    math = rules[md.inline.ruler.__find__("math_inline")].fn
    md.inline.ruler.at("math_inline", _not_across_code(math))
    md.add_render_rule("math_inline", _math_rule(False))
    md.add_render_rule("math_inline_double", _math_rule(True))
    md.add_render_rule("math_block", _math_rule(True, block=True))
    md.add_render_rule("amsmath", _amsmath_rule)
    return md


def render_markdown(text: str, attachments: dict[str, Any] | None = None) -> str:
    """Markdown (a note, a prompt, a model's answer) -> sanitized HTML. `attachments` (a
    message's, nbformat's {name: {mime: base64}}) are shown where the markdown refers to them
    (`![](attachment:name.png)`; see `_resolve_attachments`), and image attachments the text does
    not refer to (a notebook may hold such) after it, marked as such: the model is sent every
    image a message holds, so the page shows every one."""
    md = _md()
    if not attachments:
        return sanitize_html(md.render(text or ""))
    env: dict[str, Any] = {}
    tokens = md.parse(text or "", env)
    used = _resolve_attachments(tokens, attachments)
    out = md.renderer.render(tokens, md.options, env)
    rest = [n for n, b in attachments.items()
            if n not in used and isinstance(b, dict) and any(m in b for m in IMAGE_MIMES)]
    if rest:
        shown = []
        for name in rest:
            src, problem = _attachment_src(attachments, name)
            shown.append(f'<img src="{html.escape(src)}" alt="{html.escape(name)}" '
                         f'title="{html.escape(name)}">' if src else
                         f'<span class="attachment-error">[image {html.escape(name)}: '
                         f'{html.escape(problem)}]</span>')
        out += (f'<div class="attachments-unreferenced" title="Attached to this message and sent '
                f'to the model, but not placed in its text">{"".join(shown)}</div>')
    return sanitize_html(out)


def _attachment_src(attachments: dict[str, Any], name: str) -> tuple[str, str]:
    """(data: URL, "") for attachment `name`, or ("", why it cannot be shown). Only the image types
    the sanitizer lets through (`IMAGE_MIMES`, base64 only), at most `images.MAX_IMAGE_BYTES`."""
    from .images import MAX_IMAGE_BYTES, decoded_size, describe_size

    bundle = attachments.get(name)
    mime = next((m for m in IMAGE_MIMES if isinstance(bundle, dict) and m in bundle), None)
    if bundle is None:
        return "", "no such attachment"
    if mime is None:
        return "", "not an image"
    if mime != "image/svg+xml" and (size := decoded_size(_text(bundle[mime]))) > MAX_IMAGE_BYTES:
        return "", (f"{describe_size(size)}, over the {MAX_IMAGE_BYTES // (1024 * 1024)} MiB "
                    "shown inline")
    return image_data_uri(mime, bundle[mime]), ""


def _resolve_attachments(tokens: list[Any], attachments: dict[str, Any]) -> set[str]:
    """Point the images of `tokens` that say `attachment:NAME` at a `data:` URL of that
    attachment (`_attachment_src`); one that cannot be shown (a missing name, another type, a
    too-big image from an imported notebook) becomes a short note saying so, never a broken
    link. Done on markdown-it's image tokens, so a reference quoted in code stays text. Returns
    the names referred to."""
    from urllib.parse import unquote

    used: set[str] = set()
    for tok in tokens:
        for child in tok.children or ():
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            if not src.startswith("attachment:"):
                continue
            name = unquote(src[len("attachment:"):])
            used.add(name)
            url, problem = _attachment_src(attachments, name)
            if problem:
                child.type, child.tag, child.children = "html_inline", "", None
                child.content = (f'<span class="attachment-error">[image {html.escape(name)}: '
                                 f'{html.escape(problem)}]</span>')
            else:
                child.attrSet("src", url)
    return used


# ---------------------------------------------------------------- outputs

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Remove terminal escape codes (IPython colours its tracebacks)."""
    return _ANSI.sub("", text)


def plain_text(text: str) -> str:
    """Stream text as the page shows it, as plain text: what carriage returns and backspaces
    took back gone, no escape codes. What the model and the Markdown export get."""
    return strip_ansi(shown_stream(text))


# ANSI colour (SGR) codes -> HTML. nbconvert's ansi2html filter does this, but nbconvert
# brings a dozen packages (jinja2, mistune, bleach, beautifulsoup4, nbclient, ...) for one
# function; the `ansi2html` package erases lines on cursor-up codes, leaves other codes in the
# text, has no class for 24-bit colours and took 0.48 s on a MB with 60,000 codes (this: 0.2 s). So
# this small converter: Jupyter's class names for the 16 colours (light-theme colours in
# `output_css`), an exact `color:#rrggbb` style for 256-colour and 24-bit codes (the only
# inline style the sanitizer lets through), bold, faint, italic, underline, inverse, strike.
_SGR = re.compile(r"\x1b\[([0-9;:]*)m")
_NAMES = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")
_CUBE = (0, 95, 135, 175, 215, 255)


def _colour_256(n: int) -> int | str:
    """A 256-colour index: 0-15 stay indices (classes), the rest become #rrggbb."""
    if n < 16:
        return n
    if n < 232:
        n -= 16
        return "#%02x%02x%02x" % (_CUBE[n // 36], _CUBE[n // 6 % 6], _CUBE[n % 6])
    g = 8 + 10 * (n - 232)
    return f"#{g:02x}{g:02x}{g:02x}"


def _extended(params: tuple[int, ...], i: int) -> tuple[int | str | None, int]:
    """A 38/48 colour starting at params[i] (5;n or 2;r;g;b): the colour and the next index."""
    if i + 1 < len(params) and params[i + 1] == 5 and i + 2 < len(params):
        return _colour_256(params[i + 2] % 256), i + 3
    if i + 1 < len(params) and params[i + 1] == 2 and i + 4 < len(params):
        r, g, b = (min(255, v) for v in params[i + 2:i + 5])
        return f"#{r:02x}{g:02x}{b:02x}", i + 5
    return None, len(params)


@lru_cache(maxsize=256)
def _params(codes: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split("[;:]", codes)) if codes else (0,)


class _Style:
    __slots__ = ("fg", "bg", "bold", "faint", "italic", "underline", "inverse", "strike")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fg: int | str | None = None
        self.bg: int | str | None = None
        self.bold = self.faint = self.italic = self.underline = self.inverse = self.strike = False

    def key(self) -> tuple:
        return (self.fg, self.bg, self.bold, self.faint, self.italic, self.underline,
                self.inverse, self.strike)

    def apply(self, codes: str) -> None:
        params = _params(codes)
        i = 0
        while i < len(params):
            p = params[i]
            i += 1
            if p == 0:
                self.reset()
            elif p in (1, 2, 3, 4, 7, 9):
                setattr(self, {1: "bold", 2: "faint", 3: "italic", 4: "underline", 7: "inverse",
                               9: "strike"}[p], True)
            elif p == 22:
                self.bold = self.faint = False
            elif p in (23, 24, 27, 29):
                setattr(self, {23: "italic", 24: "underline", 27: "inverse", 29: "strike"}[p], False)
            elif 30 <= p <= 37 or 90 <= p <= 97:
                self.fg = p - 30 if p < 90 else p - 82
            elif 40 <= p <= 47 or 100 <= p <= 107:
                self.bg = p - 40 if p < 100 else p - 92
            elif p == 39:
                self.fg = None
            elif p == 49:
                self.bg = None
            elif p in (38, 48):
                colour, i = _extended(params, i - 1)
                if colour is not None:
                    if p == 38:
                        self.fg = colour
                    else:
                        self.bg = colour

    def span(self) -> str:
        """The opening tag for text in this style ("" for the default)."""
        fg, bg = (self.bg, self.fg) if self.inverse else (self.fg, self.bg)
        if fg is None and self.inverse:
            fg = "inverse"
        if bg is None and self.inverse:
            bg = "inverse"
        if self.bold and isinstance(fg, int) and fg < 8:
            fg += 8  # bold shows the bright colour, as terminals and Jupyter do
        classes, style = [], ""
        for part, c in (("fg", fg), ("bg", bg)):
            if isinstance(c, int):
                tone = ("-intense" if c >= 8 else "")
                classes.append(f"ansi-{_NAMES[c % 8]}{tone}-{part}")
            elif c == "inverse":
                classes.append(f"ansi-default-inverse-{part}")
            elif c is not None:
                style += f"{'color' if part == 'fg' else 'background-color'}:{c};"
        classes += [f"ansi-{n}" for n in ("bold", "faint", "italic", "underline", "strike")
                    if getattr(self, n)]
        if not classes and not style:
            return ""
        attrs = f' class="{" ".join(classes)}"' if classes else ""
        return f'<span{attrs}{f" style={chr(34)}{style}{chr(34)}" if style else ""}>'


def ansi_html(text: str) -> str:
    """Text with ANSI escape codes -> escaped HTML with its colours as `<span>`s (classes from
    `output_css`). Codes other than colours are dropped."""
    if "\x1b" not in text:
        return html.escape(text)
    out: list[str] = []
    style = _Style()
    tags: dict[tuple, str] = {}  # a style's opening tag, made once
    pos = 0
    for m in [*_SGR.finditer(text), None]:
        piece = text[pos:m.start() if m else len(text)]
        if "\x1b" in piece:
            piece = strip_ansi(piece)
        if piece:
            key = style.key()
            tag = tags.get(key)
            if tag is None:
                tag = tags[key] = style.span()
            body = html.escape(piece)
            out.append(f"{tag}{body}</span>" if tag else body)
        if m is None:
            break
        style.apply(m.group(1))
        pos = m.end()
    return "".join(out)


IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml")
# The richest representation we can show safely, first. application/javascript and widget views
# need a live kernel and a JS runtime: they fall back to their text/plain.
_PRIORITY = ("text/html", "image/svg+xml", "image/png", "image/jpeg", "image/gif", "image/webp",
             "text/markdown", "text/latex", "application/json", "text/plain")


def _text(v: Any) -> str:
    return "".join(v) if isinstance(v, list) else str(v)


def output_mimes(output: dict[str, Any]) -> dict[str, Any]:
    return output.get("data") or {}


def pick_mime(data: dict[str, Any], *, prefer_images: bool = False) -> str | None:
    """The MIME type of `data` to show. `prefer_images` puts images before HTML (markdown export,
    where an image is worth more than a sanitized HTML repr of the same figure)."""
    order: tuple[str, ...] = _PRIORITY
    if prefer_images:
        order = tuple(m for m in _PRIORITY if m in IMAGE_MIMES) + tuple(
            m for m in _PRIORITY if m not in IMAGE_MIMES)
    for m in order:
        if m in data:
            return m
    return None


def image_data_uri(mime: str, value: Any) -> str:
    """A `data:` URI for an image output value (base64 for bitmaps; SVG is stored as text)."""
    raw = _text(value)
    if mime == "image/svg+xml":
        return "data:image/svg+xml;base64," + base64.b64encode(raw.encode()).decode()
    # Only the base64 alphabet: a hostile "image" value must not end the URL (in Markdown, a `)`
    # would close the link and let raw HTML follow).
    return f"data:{mime};base64," + re.sub(r"[^A-Za-z0-9+/=]", "", raw)


def render_output(output: dict[str, Any], *,
                  image_src: Callable[[str, Any], str] | None = None, live: bool = False) -> str:
    """One nbformat output -> sanitized HTML. `image_src(mime, value)` returns the URL an image
    gets (default: an inline data URI). `live`: a stream's last line goes in a
    `<span class="open-line">`, which the page replaces as the stream goes on
    (`stream_tail_html`)."""
    t = output.get("output_type")
    if t == "stream":
        cls = "stderr" if output.get("name") == "stderr" else "stdout"
        text = shown_stream(_text(output.get("text", "")))
        if live:
            cut = text.rfind("\n") + 1
            return _text_block(text, cls, body=ansi_html(text[:cut]) + stream_tail_html(text[:cut], text[cut:]))
        return _text_block(text, cls)
    if t == "error":
        tb = output.get("traceback") or [f"{output.get('ename', '')}: {output.get('evalue', '')}"]
        return _text_block("\n".join(tb), "error")
    if t in ("execute_result", "display_data"):
        data = output_mimes(output)
        mime = pick_mime(data)
        if mime is None:
            return ""
        value = data[mime]
        if mime in IMAGE_MIMES:
            src = image_src(mime, value) if image_src else image_data_uri(mime, value)
            return sanitize_html(f'<div class="output image"><img src="{html.escape(src)}" '
                                 f'alt="output"></div>')
        if mime == "text/html":
            return f'<div class="output html">{sanitize_html(_text(value))}</div>'
        if mime == "text/markdown":
            return f'<div class="output markdown">{render_markdown(_text(value))}</div>'
        if mime == "text/latex":
            return f'<div class="output latex">{_latex_output(_text(value))}</div>'
        if mime == "application/json":
            return _text_block(json.dumps(value, indent=2), "json", ansi=False)
        return _text_block(_text(value), "text")
    return ""


LONG_LINES = 40
"""An output with more lines than this shows in a scrolled box (`pre.output` under
`.output-long`, about 30 lines high) with a toggle to show it all, as Jupyter scrolls long
outputs."""


def _text_block(text: str, cls: str, ansi: bool = True, body: str | None = None) -> str:
    """A text output as `<pre class="output CLS">`, its ANSI colours as spans (or `body`, the
    HTML for it); a long one in a box that scrolls, with a `<details>` toggle (`output_css`
    opens the box when it is open: no script, so the same markup works in the page and in an
    exported file)."""
    if body is None:
        body = ansi_html(text) if ansi else html.escape(text)
    pre = f'<pre class="output {cls}">{body}</pre>'
    lines = text.count("\n") + (not text.endswith("\n"))
    if lines <= LONG_LINES and len(text) <= 80 * LONG_LINES:
        return pre
    return (f'<div class="output-long">{pre}<details class="output-more"><summary>'
            f'<span class="closed">Show all {lines:,} lines</span>'
            f'<span class="opened">Scroll it again</span></summary></details></div>')


def _sgr_since_reset(text: str, stop: int | None = None) -> str:
    """The colour codes that set the style at the end of `text[:stop]`: those since its last
    reset (so a long coloured output is not scanned whole for every chunk)."""
    limit = len(text) if stop is None else stop
    start = end = limit
    while start > 0:  # back from the end to the last reset, code by code
        start = text.rfind("\x1b[", 0, end)
        if start < 0 or text.startswith(("\x1b[0m", "\x1b[m"), start):
            break
        end = start
    return "".join(m.group(0) for m in _SGR.finditer(text, max(start, 0), limit))


def stream_tail_html(settled: str, tail: str) -> str:
    """The HTML for the end of a stream's text from where its lines `settled` end: the rest of
    its lines, then its last (open) line in `<span class="open-line">`. A stream chunk only
    ever rewrites the open line, so a running cell's page replaces that span with this instead
    of the whole output (which would send a chatty cell's output again with every print).
    Colours still set at the end of `settled` carry on."""
    return _tail_html(_sgr_since_reset(settled), tail)


def _tail_html(carry: str, tail: str) -> str:
    cut = tail.rfind("\n") + 1
    lines, last = tail[:cut], tail[cut:]
    out = ansi_html(carry + lines) if lines else ""
    if "\x1b" in lines:
        carry = _sgr_since_reset(carry + lines)
    return f'{out}<span class="open-line">{ansi_html(carry + last)}</span>'


def stream_update_html(old: str, new: str) -> str | None:
    """What replaces the open line of a stream output shown live (`render_output(live=True)`)
    when its text goes from `old` to `new` (`kernel.outputs.fold_output` joined a chunk to it):
    `stream_tail_html` from where `old`'s lines end; None when those lines changed too (then
    the whole output must be shown again)."""
    cut = old.rfind("\n") + 1
    # fold_output keeps a stream's lines and rewrites only its last one; the end of those lines
    # is compared, not all of them (a whole comparison per chunk would be quadratic)
    if len(new) < cut or new[max(0, cut - 256):cut] != old[max(0, cut - 256):cut]:
        return None
    return _tail_html(_sgr_since_reset(old, cut), shown_stream(new[cut:]))


_LATEX_MATH = re.compile(r"^\s*(\$\$?)(.*?)\1\s*$|^\s*\\\[(.*?)\\\]\s*$|^\s*\\\((.*?)\\\)\s*$", re.S)


def _latex_output(latex: str) -> str:
    """A `text/latex` output (SymPy's, IPython's `Math`/`Latex`): one formula in $, $$, \\[ or
    \\( delimiters is maths; anything else is Markdown with maths in it."""
    m = _LATEX_MATH.match(latex)
    if m is None:
        return render_markdown(latex)
    dollars, in_dollars, in_brackets, in_parens = m.groups()
    if dollars:
        return sanitize_html(render_math(in_dollars, display=dollars == "$$"))
    if in_brackets is not None:
        return sanitize_html(render_math(in_brackets, display=True))
    return sanitize_html(render_math(in_parens, display=False))


@lru_cache(maxsize=1)
def output_css() -> str:
    """The stylesheet for what this module writes besides highlighting: ANSI colour classes
    (JupyterLab's light-theme colours), maths, and long outputs' scrolled box and toggle."""
    named = {"black": ("#3e424d", "#282c36"), "red": ("#e75c58", "#b22b31"),
             "green": ("#00a250", "#007427"), "yellow": ("#ddb62b", "#b27d12"),
             "blue": ("#208ffb", "#0065ca"), "magenta": ("#d160c4", "#a03196"),
             "cyan": ("#60c6c8", "#258f8f"), "white": ("#c5c1b4", "#a1a6b2")}
    rules = []
    for name, (normal, intense) in named.items():
        for tone, colour in (("", normal), ("-intense", intense)):
            rules.append(f".ansi-{name}{tone}-fg {{ color: {colour}; }}")
            rules.append(f".ansi-{name}{tone}-bg {{ background-color: {colour}; }}")
    rules += [
        ".ansi-default-inverse-fg { color: #fff; }",
        ".ansi-default-inverse-bg { background-color: #111; }",
        ".ansi-bold { font-weight: bold; }", ".ansi-faint { opacity: .7; }",
        ".ansi-italic { font-style: italic; }", ".ansi-underline { text-decoration: underline; }",
        ".ansi-strike { text-decoration: line-through; }",
        ".math.display { display: block; margin: .5em 0; overflow-x: auto; }",
        ".math-block { overflow-x: auto; }",
        "math { font-size: 1.1em; }",
        "code.math-error { color: #b22b31; }",
        ".output-long > pre.output { max-height: 30em; overflow-y: auto; }",
        ".output-long:has(> details[open]) > pre.output { max-height: none; }",
        ".output-more > summary { cursor: pointer; font-size: .8em; color: #59636e;"
        " padding: .1rem .6rem; list-style: none; }",
        ".output-more > summary::-webkit-details-marker { display: none; }",
        ".output-more[open] > summary .closed, .output-more:not([open]) > summary .opened"
        " { display: none; }",
    ]
    return "\n".join(rules) + "\n"


def render_outputs(outputs: list[dict[str, Any]], **kw: Any) -> str:
    return "".join(render_output(o, **kw) for o in outputs)

