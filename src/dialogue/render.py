"""Markdown and notebook outputs -> HTML that is safe to put in a page.

Everything a model, a notebook or a user wrote reaches a browser through this module: the web app
and the HTML export both call it, so there is one sanitizer to get right. Markdown is parsed with
markdown-it-py (CommonMark, plus tables and strikethrough) with raw HTML allowed, because notes
and model answers legitimately contain `<details>`, `<sub>`, tables; the result then goes through
nh3 (the Rust `ammonia` sanitizer) with an allowlist. No script, no event handler, no
`javascript:` (or any non-allowlisted) URL, no iframe/object/embed/form/style survives; `data:`
URLs are kept only for images (`<img src="data:image/...">`), which is how exported notebooks
carry their plots. Code is highlighted with Pygments into `<span class=...>` so the highlight
survives sanitizing (classes are kept, inline styles are not).
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
from pygments import highlight as _pyg_highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

__all__ = ["render_markdown", "sanitize_html", "highlight_code", "highlight_css", "strip_ansi",
           "render_output", "render_outputs", "image_data_uri", "pick_mime", "output_mimes",
           "IMAGE_MIMES"]

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
_URL_SCHEMES = {"http", "https", "mailto", "data"}
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp|svg\+xml);base64,[a-z0-9+/=\s]*$", re.I)


def _filter_attr(tag: str, attr: str, value: str) -> str | None:
    # nh3 has already dropped every URL whose scheme is not in _URL_SCHEMES; this narrows `data:`
    # to images: a data:text/html link opens an attacker's page in a new origin-less document.
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


@lru_cache(maxsize=1)
def _md() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True, "highlight": _md_highlight})
    return md.enable(["table", "strikethrough"])


def render_markdown(text: str) -> str:
    """Markdown (a note, a prompt, a model's answer) -> sanitized HTML."""
    return sanitize_html(_md().render(text or ""))


# ---------------------------------------------------------------- outputs

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Remove terminal escape codes (IPython colours its tracebacks)."""
    return _ANSI.sub("", text)


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
                  image_src: Callable[[str, Any], str] | None = None) -> str:
    """One nbformat output -> sanitized HTML. `image_src(mime, value)` returns the URL an image
    gets (default: an inline data URI)."""
    t = output.get("output_type")
    if t == "stream":
        cls = "stderr" if output.get("name") == "stderr" else "stdout"
        text = html.escape(strip_ansi(_text(output.get("text", ""))))
        return f'<pre class="output {cls}">{text}</pre>'
    if t == "error":
        tb = output.get("traceback") or [f"{output.get('ename', '')}: {output.get('evalue', '')}"]
        return f'<pre class="output error">{html.escape(strip_ansi(chr(10).join(tb)))}</pre>'
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
        if mime == "application/json":
            return f'<pre class="output json">{html.escape(json.dumps(value, indent=2))}</pre>'
        return f'<pre class="output text">{html.escape(strip_ansi(_text(value)))}</pre>'
    return ""


def render_outputs(outputs: list[dict[str, Any]], **kw: Any) -> str:
    return "".join(render_output(o, **kw) for o in outputs)

