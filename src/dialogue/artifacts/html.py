"""A dialogue as one self-contained, safe HTML page.

Same content rules as the Markdown post (`markdown.py`: hidden messages and `#| hide` cells left
out, prompts only with `with_ai`), rendered through `dialogue.render`, the sanitizer the web app
uses: notes, prompts and answers are Markdown rendered then sanitized, and the `text/html`
outputs of code are sanitized too.

Why sanitize HTML outputs instead of putting them in a sandboxed `<iframe srcdoc>`: a sandboxed
iframe needs a fixed height (no script may resize it), so tables get scrollbars or clipped, and
each iframe is a separate document with its own styles; the outputs worth keeping in a post
(pandas tables, formatted text) survive sanitizing intact, while what does not survive (script,
widgets) cannot work in a static file anyway. As defence in depth the page carries a Content
Security Policy that allows no script at all and no network: even markup that slipped past the
sanitizer could not run or load anything.

Everything is inline (CSS, images as data: URIs), so the file can be mailed or hosted as is, and
opening it fetches nothing: an image a note or an answer links from elsewhere (which could be a
tracking pixel that tells its owner who opened the page, and when) is shown as a link to click,
not loaded, unless the export is made with `remote_images=True` (`--remote-images`). Both the
markup and the policy say so, for viewers that ignore a CSP given in a meta tag.
"""
from __future__ import annotations

import html
import re
from typing import Any

from dialogue.artifacts.markdown import (code_language, front_matter_title, merge_streams,
                                         raw_included, resolve_attachments, shows_input,
                                         shows_output, tool_calls_json, visible_messages)
from dialogue.artifacts.module import strip_directives
from dialogue.document import Dialogue, Kind
from dialogue.render import (highlight_code, highlight_css, image_data_uri, output_css,
                             render_markdown, render_outputs, sanitize_html)

__all__ = ["to_html", "CSP", "CSP_REMOTE_IMAGES"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; " \
      "form-action 'none'"
CSP_REMOTE_IMAGES = CSP.replace("img-src data:", "img-src data: https: http:")

# A start tag as nh3 writes it: every attribute value double-quoted, a quote inside one escaped
# as &quot;, `<` in text escaped, so `"[^"]*"` is one whole value and a regex over the sanitizer's
# output is exact (an HTML parser would only re-serialize what nh3 has already normalised). Every
# tag is matched, not only <img>, so that "<img>" inside another tag's attribute value is consumed
# with that tag and never taken for an element.
_TAG = re.compile(r'<([a-zA-Z][\w-]*)((?:\s+[\w:-]+(?:="[^"]*")?)*)\s*/?>')
_ATTR = re.compile(r'([\w:-]+)(?:="([^"]*)")?')


def _unload_remote_images(markup: str) -> str:
    """Every image that is not a data: URI becomes a link to it: nothing is fetched on opening."""
    def swap(m: re.Match[str]) -> str:
        if m.group(1).lower() != "img":
            return m.group(0)
        attrs = {k.lower(): v or "" for k, v in _ATTR.findall(m.group(2))}
        src = attrs.get("src", "")
        if src.strip().lower().startswith("data:"):
            return m.group(0)
        # nh3 leaves "<" unescaped inside attribute values: the alt text goes into the text
        # of the page escaped again, or an alt of "<img src=...>" would become an element
        label = html.escape(html.unescape(attrs.get("alt") or attrs.get("title") or "image"))
        if not src.strip():
            return f'<span class="remote-image">[{label}]</span>'
        # values stay in attributes, escaped as nh3 wrote them
        return (f'<a class="remote-image" href="{src}" rel="noopener noreferrer" '
                f'title="not loaded: {src}">[image: {label}]</a>')
    return _TAG.sub(swap, markup)


_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --code-bg: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 16px/1.6 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 52rem; margin: 0 auto; padding: 2rem 1.25rem 4rem; }
h1, h2, h3 { line-height: 1.25; }
img { max-width: 100%; height: auto; }
pre { background: var(--code-bg); padding: .75rem 1rem; overflow-x: auto; border-radius: 6px;
  font: 13.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
.message { margin: 1.25rem 0; }
.code .outputs { margin-top: .25rem; }
.output { margin: .25rem 0; }
pre.output { background: #fff; border: 1px solid var(--line); }
pre.output.stderr { background: #fff8f0; }
pre.output.error { background: #fff0f0; border-color: #f3b6b6; }
.output.html { overflow-x: auto; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9em; }
th, td { border: 1px solid var(--line); padding: .25rem .6rem; text-align: left; }
blockquote { margin: 0; padding: 0 1rem; color: var(--muted);
  border-left: .25rem solid var(--line); }
.prompt .ask { border-left: .25rem solid var(--accent); padding: .25rem 1rem;
  background: #f5f9ff; }
.prompt .label { font-size: .8em; font-weight: 600; text-transform: uppercase;
  color: var(--accent); }
.prompt .answer { padding: 0 1rem; border-left: .25rem solid var(--line); }
footer { margin-top: 3rem; font-size: .8em; color: var(--muted); }
a.remote-image { font-size: .9em; }
"""


def _outputs_html(outputs: list[dict[str, Any]]) -> str:
    return render_outputs(merge_streams(outputs))


def to_html(dialogue: Dialogue, *, with_ai: bool = False, title: str | None = None,
            remote_images: bool = False, with_hidden: bool = False) -> str:
    """The dialogue as a complete HTML document (a string). `remote_images`: load images from
    the web where notes and answers link them (off: they show as links). Hidden messages are
    left out unless `with_hidden`."""
    msgs = visible_messages(dialogue, with_ai, with_hidden)
    page_title = title or front_matter_title(msgs) or dialogue.name
    lang = code_language(dialogue)
    body: list[str] = []
    if msgs and msgs[0].kind == Kind.raw and msgs[0].source.lstrip().startswith("---"):
        msgs = msgs[1:]  # front matter is for site generators; its title titles the page
    if not (msgs and msgs[0].kind == Kind.note and msgs[0].source.lstrip().startswith("# ")):
        body.append(f"<h1>{html.escape(page_title)}</h1>")
    for m in msgs:
        if m.kind == Kind.note:
            text = resolve_attachments(m, lambda mime, v, stem: image_data_uri(mime, v))
            body.append(f'<section class="message note">{render_markdown(text)}</section>')
        elif m.kind == Kind.raw:
            if raw_included(m, ("", "text/html")) and m.source.strip():
                body.append(f'<section class="message raw">{sanitize_html(m.source)}</section>')
        elif m.kind == Kind.prompt:
            answer = (f'<div class="answer">{render_markdown(m.response)}</div>'
                      if m.response.strip() else "")
            if m.tool_calls:
                n = len(m.tool_calls)
                answer = (f'<details class="tool-calls"><summary>{n} tool call'
                          f'{"s" * (n != 1)}</summary>'
                          f"{highlight_code(tool_calls_json(m), 'json')}</details>{answer}")
            body.append('<section class="message prompt"><div class="ask">'
                        '<div class="label">Prompt</div>'
                        f"{render_markdown(m.source)}</div>{answer}</section>")
        else:
            parts = []
            code = strip_directives(m.source)
            if shows_input(m) and code.strip():
                parts.append(f'<div class="input">{highlight_code(code, lang)}</div>')
            if shows_output(m) and m.outputs:
                parts.append(f'<div class="outputs">{_outputs_html(m.outputs)}</div>')
            if parts:
                body.append(f'<section class="message code">{"".join(parts)}</section>')
    content = "\n".join(body)
    if not remote_images:
        content = _unload_remote_images(content)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta http-equiv="Content-Security-Policy" '
        f'content="{CSP_REMOTE_IMAGES if remote_images else CSP}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="dialogue">\n'
        f"<title>{html.escape(page_title)}</title>\n"
        f"<style>{_CSS}\n{highlight_css()}\n{output_css()}</style>\n</head>\n<body>\n<main>\n"
        + content
        + f"\n<footer>Exported from the dialogue {html.escape(dialogue.name)}.</footer>\n"
        "</main>\n</body>\n</html>\n")
