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
Security Policy that allows no script at all and no network except images: even markup that
slipped past the sanitizer could not run.

Everything is inline (CSS, images as data: URIs), so the file can be mailed or hosted as is.
"""
from __future__ import annotations

import html
from typing import Any

from dialogue.artifacts.markdown import (code_language, front_matter_title, merge_streams,
                                         raw_included, resolve_attachments, shows_input,
                                         shows_output, tool_calls_json, visible_messages)
from dialogue.artifacts.module import strip_directives
from dialogue.document import Dialogue, Kind
from dialogue.render import (highlight_code, highlight_css, image_data_uri, render_markdown,
                             render_outputs, sanitize_html)

__all__ = ["to_html", "CSP"]

CSP = "default-src 'none'; img-src data: https:; style-src 'unsafe-inline'; base-uri 'none'; " \
      "form-action 'none'"

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
"""


def _outputs_html(outputs: list[dict[str, Any]]) -> str:
    return render_outputs(merge_streams(outputs))


def to_html(dialogue: Dialogue, *, with_ai: bool = False, title: str | None = None) -> str:
    """The dialogue as a complete HTML document (a string)."""
    msgs = visible_messages(dialogue, with_ai)
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
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="dialogue">\n'
        f"<title>{html.escape(page_title)}</title>\n"
        f"<style>{_CSS}\n{highlight_css()}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + f"\n<footer>Exported from the dialogue {html.escape(dialogue.name)}.</footer>\n"
        "</main>\n</body>\n</html>\n")
