"""dialogue.render: markdown and outputs to sanitized HTML.

The XSS corpus and `assert_inert` live here and are reused by test_export.py for the HTML export.
`assert_inert` parses the HTML with the standard library's HTML parser (a real parser, the way a
browser tokenizes) and fails on anything that could run script or leave the page: script-capable
tags, event handler attributes, inline styles, and URLs with a scheme other than http(s)/mailto
(data: only as an image source).
"""
from __future__ import annotations

import html as htmlmod
import re
from html.parser import HTMLParser

import pytest

from dialogue.render import (LONG_LINES, ansi_html, highlight_code, highlight_css,
                             image_data_uri, output_css, pick_mime, plain_text, render_markdown,
                             render_output, render_outputs, sanitize_html, stream_update_html,
                             strip_ansi)

# Payloads from the usual sources of XSS tests (OWASP filter-evasion cheat sheet, known mutation
# XSS against sanitizers, markdown-specific link tricks). Each sets window.__xss when it runs.
XSS_PAYLOADS = [
    "<script>window.__xss=1</script>",
    "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    "<img src=x onerror=window.__xss=1>",
    "<img src=\"x\" ONERROR=\"window.__xss=1\">",
    "<img src=x:alert(1) onerror=eval(src)>",
    "<svg onload=window.__xss=1>",
    "<svg><script>window.__xss=1</script></svg>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__xss=1></style>",
    "<body onload=window.__xss=1>",
    "<iframe src=\"javascript:window.__xss=1\"></iframe>",
    "<iframe srcdoc=\"<script>window.__xss=1</script>\"></iframe>",
    "<object data=\"javascript:window.__xss=1\"></object>",
    "<embed src=\"javascript:window.__xss=1\">",
    "<form action=\"javascript:window.__xss=1\"><input type=submit></form>",
    "<button formaction=\"javascript:window.__xss=1\">go</button>",
    "<a href=\"javascript:window.__xss=1\">click</a>",
    "<a href=\"JaVaScRiPt:window.__xss=1\">click</a>",
    "<a href=\"&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;:window.__xss=1\">c</a>",
    "<a href=\"java\tscript:window.__xss=1\">tab</a>",
    "<a href=\" javascript:window.__xss=1\">space</a>",
    "<a href=\"vbscript:msgbox(1)\">vb</a>",
    "<a href=\"data:text/html;base64,PHNjcmlwdD53aW5kb3cuX194c3M9MTwvc2NyaXB0Pg==\">data</a>",
    "<img src=\"data:text/html,<script>window.__xss=1</script>\">",
    "<div style=\"background:url(javascript:window.__xss=1)\">styled</div>",
    "<div style=\"position:fixed;inset:0\">overlay</div>",
    "<style>@import 'http://evil.example/x.css';</style>",
    "<link rel=stylesheet href=http://evil.example/x.css>",
    "<meta http-equiv=\"refresh\" content=\"0;url=javascript:window.__xss=1\">",
    "<base href=\"javascript:/\">",
    "<details open ontoggle=window.__xss=1>",
    "<video><source onerror=\"window.__xss=1\"></video>",
    "<audio src=x onerror=window.__xss=1>",
    "<input autofocus onfocus=window.__xss=1>",
    "<noscript><p title=\"</noscript><img src=x onerror=window.__xss=1>\">",
    "<template><script>window.__xss=1</script></template>",
    "<!--><script>window.__xss=1</script>-->",
    "<p title=\"&quot;&gt;&lt;script&gt;window.__xss=1&lt;/script&gt;\">quoted</p>",
    "<x onclick=window.__xss=1>custom tag</x>",
    "<table background=\"javascript:window.__xss=1\"><tr><td>t</td></tr></table>",
    "<a href=\"#\" onclick=\"window.__xss=1\">hash</a>",
    "[md link](javascript:window.__xss=1)",
    "[md link caps](JAVASCRIPT:window.__xss=1)",
    "![md image](javascript:window.__xss=1)",
    "[md data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[ref]\n\n[ref]: javascript:window.__xss=1",
    "<javascript:window.__xss=1>",
    "```html\n<script>window.__xss=1</script>\n```",
    "```\"><script>window.__xss=1</script>\nx\n```",
    "<a href=\"https://ok.example/\" target=_blank>ok</a>",
    # maths, rendered to MathML: LaTeX that tries to smuggle markup in or out of it
    "$\\text{<img src=x onerror=window.__xss=1>}$",
    "$x</math><script>window.__xss=1</script>$",
    "$$\n\\text{</mtext></math><img src=x onerror=window.__xss=1>}\n$$",
    "$\\href{javascript:window.__xss=1}{click}$",
    "$\\color{red}{x}$ $\\style{background:url(javascript:x)}{y}$",
    "<math><mi href=\"javascript:window.__xss=1\">x</mi><annotation-xml encoding=\"text/html\">"
    "<img src=x onerror=window.__xss=1></annotation-xml></math>",
    "<span style=\"color:#ff0000;position:fixed\">styled span</span>",
]

_FORBIDDEN_TAGS = {"script", "iframe", "object", "embed", "form", "input", "button", "textarea",
                   "select", "style", "link", "meta", "base", "frame", "frameset", "applet",
                   "svg", "template", "noscript", "body", "html", "head", "video",
                   "audio", "source", "x"}
_URL_ATTRS = {"href", "src", "action", "formaction", "xlink:href", "background", "poster",
              "cite", "data", "srcset", "lowsrc", "dynsrc"}


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    handle_startendtag = handle_starttag


def assert_inert(fragment: str, *, allow_tags: frozenset[str] = frozenset()) -> None:
    """Fail if `fragment` contains anything that can run script or pull in remote code."""
    p = _Collect()
    p.feed(fragment)
    p.close()
    for tag, attrs in p.tags:
        assert tag not in _FORBIDDEN_TAGS - allow_tags, f"forbidden tag <{tag}> in {fragment!r}"
        for name, value in attrs:
            assert not name.startswith("on"), f"event handler {name} on <{tag}>"
            assert name != "srcdoc", f"attribute {name} on <{tag}>"
            # the one inline style let through: an exact colour on a span (ANSI colours)
            assert name != "style" or (tag == "span" and re.fullmatch(
                r"(color:#[0-9a-f]{6};)?(background-color:#[0-9a-f]{6};)?", value or "")), \
                f"style {value!r} on <{tag}>"
            if name in _URL_ATTRS and value:
                v = re.sub(r"[\x00-\x20]+", "", htmlmod.unescape(value)).lower()
                scheme = v.split(":", 1)[0] if re.match(r"^[a-z][a-z0-9+.-]*:", v) else ""
                if scheme == "data":
                    assert tag == "img" and name == "src" and v.startswith("data:image/"), \
                        f"data: URL in {name} of <{tag}>"
                else:
                    assert scheme in ("", "http", "https", "mailto"), \
                        f"{scheme}: URL in {name} of <{tag}>: {value!r}"
    low = fragment.lower()
    assert "<script" not in low and "javascript:" not in _attr_text(fragment)


def _attr_text(fragment: str) -> str:
    p = _Collect()
    p.feed(fragment)
    return " ".join(re.sub(r"\s+", "", v or "").lower() for _, a in p.tags for _, v in a)


def test_checker_catches_what_it_must():
    """The checker itself must fail on live payloads, or every test using it proves nothing."""
    for bad in ["<script>x</script>", "<img src=x onerror=f()>", "<a href='javascript:f()'>a</a>",
                "<a href='data:text/html,x'>a</a>", "<div style='x'>a</div>", "<iframe></iframe>",
                "<a href='java&#x09;script:f()'>a</a>"]:
        with pytest.raises(AssertionError):
            assert_inert(bad)
    assert_inert("<p><a href='https://x.example/'>ok</a><img src='data:image/png;base64,AA=='></p>")


@pytest.mark.parametrize("payload", XSS_PAYLOADS)
def test_markdown_xss_corpus_renders_inert(payload):
    assert_inert(render_markdown(payload))


@pytest.mark.parametrize("payload", XSS_PAYLOADS)
def test_html_sanitizer_xss_corpus_inert(payload):
    assert_inert(sanitize_html(payload))


@pytest.mark.parametrize("payload", XSS_PAYLOADS)
def test_html_output_xss_corpus_inert(payload):
    out = {"output_type": "display_data", "data": {"text/html": payload, "text/plain": "x"},
           "metadata": {}}
    assert_inert(render_output(out))
    md = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
          "data": {"text/markdown": payload}}
    assert_inert(render_output(md))


def test_safe_markdown_survives():
    src = ("# Title\n\nSome **bold** and ~~gone~~ text with a [link](https://example.com/a?b=1).\n\n"
           "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
           "```python\ndef f(x):\n    return x + 1\n```\n\n"
           "![plot](data:image/png;base64,iVBORw0KGgo=)\n\n"
           "<details class='tool-usage-details'><summary>call</summary>result</details>\n\n"
           "H<sub>2</sub>O")
    out = render_markdown(src)
    assert "<h1>Title</h1>" in out
    assert "<strong>bold</strong>" in out and "<s>gone</s>" in out
    assert 'href="https://example.com/a?b=1"' in out and 'rel="noopener noreferrer"' in out
    assert "<table>" in out and "<td>2</td>" in out
    assert '<pre class="highlight"><code class="language-python">' in out
    assert '<span class="k">def</span>' in out  # Pygments token classes survive sanitizing
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in out
    assert "<details class=\"tool-usage-details\"><summary>call</summary>" in out
    assert "<sub>2</sub>" in out
    assert_inert(out)


def test_data_urls_only_for_images():
    out = sanitize_html('<img src="data:image/svg+xml;base64,PHN2Zy8+">'
                        '<a href="data:image/png;base64,AAAA">x</a>'
                        '<img src="data:text/html;base64,AAAA">')
    assert 'src="data:image/svg+xml;base64,PHN2Zy8+"' in out
    assert "data:image/png" not in out  # not as a link target
    assert "text/html" not in out


def test_highlight_escapes_unknown_and_hostile_languages():
    out = highlight_code("<b>x</b>", "no-such-language")
    assert "&lt;b&gt;x&lt;/b&gt;" in out and "<b>" not in out
    out = highlight_code("x", '"><script>')
    assert "<script" not in out
    assert ".highlight .k" in highlight_css()


def test_strip_ansi_and_error_output():
    tb = ["\x1b[31m---------\x1b[39m", "\x1b[31mZeroDivisionError\x1b[39m: division by zero"]
    assert strip_ansi(tb[1]) == "ZeroDivisionError: division by zero"
    out = render_output({"output_type": "error", "ename": "ZeroDivisionError",
                         "evalue": "division by zero", "traceback": tb})
    # the colours become classed spans, as in Jupyter; no escape code reaches the page
    assert out == ('<pre class="output error"><span class="ansi-red-fg">---------</span>\n'
                   '<span class="ansi-red-fg">ZeroDivisionError</span>: division by zero</pre>')


def test_ansi_colours_become_spans_and_only_colours_pass_the_sanitizer():
    assert ansi_html("plain <b> & \"text\"") == "plain &lt;b&gt; &amp; &quot;text&quot;"
    assert ansi_html("\x1b[1;31mbold red\x1b[0m \x1b[42mon green\x1b[49m back") == (
        '<span class="ansi-red-intense-fg ansi-bold">bold red</span> '
        '<span class="ansi-green-bg">on green</span> back')
    # IPython's 256-colour and 24-bit codes: an exact colour style; cursor codes and titles go
    assert ansi_html("\x1b[38;5;241;43m1\x1b[39;49m\x1b[?25l\x1b]0;title\x07 "
                     "\x1b[38;2;255;128;0m<x>\x1b[0m") == (
        '<span class="ansi-yellow-bg" style="color:#626262;">1</span> '
        '<span style="color:#ff8000;">&lt;x&gt;</span>')
    assert ansi_html("\x1b[7minverse\x1b[27m \x1b[3;4;9mx\x1b[m") == (
        '<span class="ansi-default-inverse-fg ansi-default-inverse-bg">inverse</span> '
        '<span class="ansi-italic ansi-underline ansi-strike">x</span>')
    colour = '<span style="color:#626262;">1</span>'
    assert sanitize_html(colour) == colour  # the colour a span carries survives sanitizing...
    for style in ("color:red", "color:#626262;position:fixed", "background:url(x)",
                  "color:#626262; ", "color:expression(1)"):  # ...and nothing else does
        assert "style" not in sanitize_html(f'<span style="{style}">1</span>'), style
    css = output_css()
    assert ".ansi-red-fg { color:" in css and ".ansi-bold { font-weight: bold; }" in css


def test_a_stream_shows_what_its_carriage_returns_left():
    out = render_output({"output_type": "stream", "name": "stdout",
                         "text": "\r  0%\r 50%\r\x1b[32m100%\x1b[0m\nok\b\b\bdone\n"})
    assert out == '<pre class="output stdout"><span class="ansi-green-fg">100%</span>\ndone\n</pre>'
    assert plain_text("\r  0%\r 50%\r\x1b[32m100%\x1b[0m\n") == "100%\n"


def test_a_live_stream_is_updated_by_its_last_line_only():
    """A running cell's stream output is shown with its open last line in a span; a chunk that
    joins it is sent as that line again and what follows, colours carried over."""
    live = render_output({"output_type": "stream", "name": "stdout",
                          "text": "done 1\n\x1b[31mred\nstep 3\r"}, live=True)
    assert live == ('<pre class="output stdout">done 1\n<span class="ansi-red-fg">red\n</span>'
                    '<span class="open-line"><span class="ansi-red-fg">step 3</span></span></pre>')
    assert stream_update_html("a\nstep 3\r", "a\nstep 4\r") == \
        '<span class="open-line">step 4</span>'
    assert stream_update_html("a\nstep 3", "a\nstep 3 done\nnext") == \
        'step 3 done\n<span class="open-line">next</span>'
    assert stream_update_html("\x1b[32mok\nb", "\x1b[32mok\nb\bc") == \
        '<span class="open-line"><span class="ansi-green-fg">c</span></span>'
    assert stream_update_html("a\nb", "x\nb") is None  # its lines changed: show it all


def test_long_outputs_scroll_with_a_toggle_that_needs_no_script():
    short = render_output({"output_type": "stream", "name": "stdout", "text": "x\n" * LONG_LINES})
    assert "output-long" not in short
    text = "".join(f"line {i}\n" for i in range(500))
    for out in (render_output({"output_type": "stream", "name": "stdout", "text": text}),
                render_output({"output_type": "execute_result", "data": {"text/plain": text}}),
                render_output({"output_type": "stream", "name": "stdout", "text": "y" * 10_000})):
        assert out.startswith('<div class="output-long"><pre class="output ')
        assert '<details class="output-more"><summary>' in out and out.endswith("</details></div>")
    assert "Show all 500 lines" in render_output({"output_type": "stream", "name": "stdout",
                                                  "text": text})
    assert ".output-long:has(> details[open]) > pre.output { max-height: none; }" in output_css()


MATH_CASES = [
    # (markdown, what must be in the HTML, what must not)
    ("Let $y = f(x)$ be", ['<span class="math inline"><math', "<mi>y</mi>", "<mi>f</mi>"], ["$"]),
    ("$$\n\\frac{a}{b}\n$$", ['<span class="math display"><math', 'display="block"', "<mfrac>"],
     ["$$"]),
    ("It costs $5 and $10.", ["It costs $5 and $10."], ["<math"]),
    ("Between $ 1 and 2 $ no", ["$ 1 and 2 $"], ["<math"]),
    ("`$x$` and\n\n```\n$$y$$\n```", ["<code>$x$</code>", "$$y$$"], ["<math"]),
    ("\\$x\\$ escaped", ["$x$ escaped"], ["<math"]),
    # a price's dollar does not pair with one in a code span after it
    ("It costs $10, see `$z$` and *this*", ["It costs $10, see <code>$z$</code> and <em>this</em>"],
     ["<math"]),
    ("\\begin{equation}\nE = mc^2\n\\end{equation}", ["<math", "<msup>"], ["begin"]),
    ("bad $\\frac{$ and $\\unknowncommand$", ["math-error", "\\unknowncommand"], []),
]


@pytest.mark.parametrize("md,present,absent", MATH_CASES)
def test_maths_renders_to_mathml_and_prose_dollars_stay_prose(md, present, absent):
    out = render_markdown(md)
    for p in present:
        assert p in out, (p, out)
    for a in absent:
        assert a not in out, (a, out)
    assert_inert(out)


def test_latex_outputs_render_as_maths():
    sympy = render_output({"output_type": "execute_result",
                           "data": {"text/latex": "$\\displaystyle x^{2} + 1$", "text/plain": "x**2 + 1"}})
    assert sympy.startswith('<div class="output latex"><span class="math inline"><math')
    assert "<msup><mi>x</mi>" in sympy
    display = render_output({"output_type": "display_data",
                             "data": {"text/latex": "\\[\\int_0^1 x\\,dx\\]"}})
    assert 'display="block"' in display and "∫" in display


def test_render_outputs_kinds():
    outs = [
        {"output_type": "stream", "name": "stdout", "text": "a < b\n"},
        {"output_type": "stream", "name": "stderr", "text": "warn\n"},
        {"output_type": "display_data", "metadata": {},
         "data": {"image/png": "iVBORw0KGgo=\n", "text/plain": "<Figure>"}},
        {"output_type": "execute_result", "execution_count": 2, "metadata": {},
         "data": {"application/json": {"k": [1, 2]}, "text/plain": "{...}"}},
        {"output_type": "execute_result", "execution_count": 3, "metadata": {},
         "data": {"text/plain": "42"}},
    ]
    out = render_outputs(outs)
    assert '<pre class="output stdout">a &lt; b\n</pre>' in out
    assert '<pre class="output stderr">warn' in out
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in out
    assert "&quot;k&quot;" in out and "42" in out
    linked = render_outputs(outs[2:3], image_src=lambda m, v: "img/1.png")
    assert linked.count('src="img/1.png"') == 1


def test_pick_mime_priorities():
    data = {"text/html": "<b>", "image/png": "AA", "text/plain": "x"}
    assert pick_mime(data) == "text/html"
    assert pick_mime(data, prefer_images=True) == "image/png"
    assert pick_mime({"application/x-unknown": 1}) is None
    assert image_data_uri("image/svg+xml", "<svg/>") == "data:image/svg+xml;base64,PHN2Zy8+"
