"""Exports: the Python module (imported and called), the Markdown post and the self-contained
HTML page (which must render the XSS corpus inert)."""
from __future__ import annotations

import base64
import importlib.util
import re
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dialogue.artifacts import (ModuleExportError, read_notebook, to_html, to_markdown, to_module,
                                write_markdown)
from dialogue.artifacts.html import CSP, CSP_REMOTE_IMAGES
from dialogue.artifacts.module import directives, export_directive, strip_directives
from dialogue.document import Dialogue, Kind, Message
from test_render import XSS_PAYLOADS, assert_inert

DATA = Path(__file__).parent / "data" / "notebooks"


def _import(path: Path):
    name = f"exported_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod


# ---------------------------------------------------------------- module

def test_module_from_notebook_imports_and_runs(tmp_path):
    d = read_notebook(DATA / "generated.ipynb")
    src = to_module(d)
    assert f"'generated' (id {d.id})" in src.splitlines()[0]
    assert "#|" not in src
    path = tmp_path / "generated_mod.py"
    path.write_text(src)
    mod = _import(path)
    assert mod.double(21) == 42
    assert mod.greet("Ada") == "hello, Ada"
    assert mod.__all__ == ["double", "GREETING", "greet"]
    assert mod.double.__doc__ == "Twice x."
    # only exported messages: the printing and erroring cells are not in the module
    assert "print(" not in src and "1 / 0" not in src


def test_module_from_solveit_dialog(tmp_path):
    d = read_notebook(DATA / "solveit_dialog.ipynb")
    path = tmp_path / "logtools.py"
    path.write_text(to_module(d))
    mod = _import(path)
    assert mod.count_levels(["t INFO a", "t ERROR b", "t INFO c"]) == {"INFO": 2, "ERROR": 1}


def test_module_order_future_flags_and_exporti(tmp_path):
    d = Dialogue(name="tools", messages=[
        Message(kind=Kind.code, source="x = 1"),  # not exported
        Message(kind=Kind.code,
                source="#| exporti\n_SCALE = 3\n\ndef _helper(v):\n    return v * _SCALE"),
        Message(kind=Kind.code, exported=True,
                source="from __future__ import annotations\n\ndef scaled(v: int) -> int:\n"
                       "    return _helper(v)"),
        Message(kind=Kind.note, source="#| export\nnotes are never code", exported=True),
        Message(kind=Kind.code, source="#| export\ndef dropped():\n    pass", exported=False),
        Message(kind=Kind.code, source="# export\nclass Box:\n    size = 2", exported=True),
    ])
    read_back = d.messages[1]
    assert read_back.exported is False  # a directive in a Message is only a flag via import
    d.messages[1].exported = True
    src = to_module(d)
    assert src.index("from __future__ import annotations") < src.index("__all__")
    assert src.index("_SCALE = 3") < src.index("def scaled") < src.index("class Box")
    assert "dropped" not in src and "x = 1" not in src and "notes are never" not in src
    path = tmp_path / "tools.py"
    path.write_text(src)
    mod = _import(path)
    assert mod.scaled(2) == 6 and mod.Box.size == 2
    assert mod.__all__ == ["scaled", "Box"]  # exporti names stay out of __all__


def test_module_refuses_magics_and_empty():
    d = Dialogue(name="m", messages=[Message(kind=Kind.code, source="%time 1+1", exported=True)])
    with pytest.raises(ModuleExportError, match=rf"message {d.messages[0].id} .*not valid Python"):
        to_module(d)
    with pytest.raises(ModuleExportError, match="no exported code messages"):
        to_module(Dialogue(name="empty", messages=[Message(kind=Kind.code, source="x = 1")]))


def test_directive_parsing():
    assert export_directive("#| export\nx = 1") == "export"
    assert export_directive("#|exports\nx") == "exports"
    assert export_directive("# | exporti\nx") == "exporti"
    assert export_directive("#export\nx") == "export"  # nbdev 1
    assert export_directive("x = 1\n#| export") is None  # directives come first
    assert export_directive("# export the data below\nx") is None
    assert export_directive("#| hide\nx") is None
    assert strip_directives("#| export\n#| hide\n# a comment\nx = 1\n") == "# a comment\nx = 1"
    assert directives("#| echo: false\n#| output:false\n#| hide\nx") == {
        "echo": "false", "output": "false", "hide": ""}


# ---------------------------------------------------------------- markdown

def test_markdown_post_inline():
    d = read_notebook(DATA / "generated.ipynb")
    md = to_markdown(d).text
    assert md.startswith("---\ntitle: Generated test notebook")  # raw front matter first
    assert "# A generated notebook" in md
    assert "```python\ndef double(x: int) -> int:" in md and "#| export" not in md
    assert "```text\nto stdout 42\n```" in md and "```text\nto stderr\n```" in md
    assert "ZeroDivisionError" in md and "\x1b[" not in md
    assert "![output](data:image/png;base64,iVBOR" in md
    assert "![output](data:image/svg+xml;base64," in md
    assert "![gradient](data:image/png;base64,iVBOR" in md  # the attachment, resolved
    assert "**bold** output with `code`" in md
    assert '<table class="dataframe">' in md and "<td>2</td>" in md
    # the HTML output is there, sanitized (the script is only in the code block that made it)
    block = re.search(r'<div class="output">\n(.*?)\n</div>', md, re.S).group(1)
    assert "<table" in block and "<script" not in block and "onerror" not in block
    assert_inert(block)


def test_markdown_post_with_files(tmp_path):
    d = read_notebook(DATA / "generated.ipynb")
    export = to_markdown(d, images="files", images_dir="post_files")
    assert "data:image" not in export.text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", export.text)
    assert links and set(links) == set(export.files)
    pngs = [v for k, v in export.files.items() if k.endswith(".png")]
    assert len(pngs) == 2 and all(v.startswith(b"\x89PNG\r\n\x1a\n") for v in pngs)
    svgs = [v for k, v in export.files.items() if k.endswith(".svg")]
    assert svgs and svgs[0].startswith(b"<svg")
    out = write_markdown(d, tmp_path / "my post.md")
    text = out.read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / link).is_file(), link
        assert link.startswith("my-post_files/")


def _ai_dialogue() -> Dialogue:
    return Dialogue(name="ai", messages=[
        Message(kind=Kind.note, source="Intro prose."),
        Message(kind=Kind.prompt, source="Why is the sky blue?\nBriefly.",
                response="Rayleigh **scattering**.",
                tool_calls=[{"id": "t1", "name": "lookup", "arguments": {"q": "<sky>"},
                             "result": "</details><script>window.__xss=1</script>"}]),
        Message(kind=Kind.note, source="Secret scratch note.", hidden=True),
        Message(kind=Kind.code, source="#| hide\nimport os"),
        Message(kind=Kind.code, source="#| echo: false\nprint('only output')",
                outputs=[{"output_type": "stream", "name": "stdout", "text": "only output\n"}]),
        Message(kind=Kind.code, source="#| output: false\nprint('only code')",
                outputs=[{"output_type": "stream", "name": "stdout", "text": "noise\n"}]),
        Message(kind=Kind.prompt, source="Hidden prompt", response="hidden answer", hidden=True),
    ])


def test_markdown_ai_and_hidden_rules():
    d = _ai_dialogue()
    plain = to_markdown(d).text
    assert "Intro prose." in plain and "sky" not in plain and "Rayleigh" not in plain
    assert "Secret" not in plain and "import os" not in plain
    assert "only output" in plain and "print('only output')" not in plain
    assert "print('only code')" in plain and "noise" not in plain
    ai = to_markdown(d, with_ai=True).text
    assert "> **Prompt**\n>\n> Why is the sky blue?\n> Briefly.\n\n<details>" in ai
    assert "<summary>1 tool call</summary>\n\n```json\n" in ai and '"name": "lookup"' in ai
    assert "</details>\n\nRayleigh **scattering**." in ai
    assert "Hidden prompt" not in ai and "hidden answer" not in ai
    with pytest.raises(ValueError, match="images must be"):
        to_markdown(d, images="web")  # type: ignore[arg-type]


def test_markdown_fence_survives_backticks():
    d = Dialogue(name="f", messages=[Message(kind=Kind.code, source='s = """\n```\n"""')])
    md = to_markdown(d, title=False).text
    assert md.startswith("````python\n") and md.rstrip().endswith("````")


# ---------------------------------------------------------------- html

class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _body(page: str) -> str:
    return page[page.index("<main>"): page.index("</main>") + 7]


def test_html_page_is_self_contained():
    d = read_notebook(DATA / "generated.ipynb")
    page = to_html(d)
    p = _Tags()
    p.feed(page)
    tags = [t for t, _ in p.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    assert {"http-equiv": "Content-Security-Policy", "content": CSP} in [a for t, a in p.tags
                                                                           if t == "meta"]
    assert "script-src" not in CSP and "default-src 'none'" in CSP
    imgs = [a["src"] for t, a in p.tags if t == "img" and a["src"].startswith("data:")]
    assert len(imgs) == 3 and all(s.startswith("data:image/") for s in imgs)
    # the only other image, the sanitized <img src=x onerror=...> of the HTML output, is not
    # loaded: it became a link (a relative src would load from wherever the page is hosted)
    assert [a for t, a in p.tags if t == "img" and not a["src"].startswith("data:")] == []
    assert {"class": "remote-image", "href": "x", "rel": "noopener noreferrer",
            "title": "not loaded: x"} in [a for t, a in p.tags if t == "a"]
    png = base64.b64decode(imgs[0].split(",", 1)[1])
    assert png.startswith(b"\x89PNG")  # the attachment, decodable
    assert '<span class="k">def</span>' in page and ".highlight .k" in page
    assert '<table class="dataframe">' in page and "ZeroDivisionError" in page
    assert "\x1b" not in page
    assert_inert(_body(page))
    # the front-matter raw cell titles the page instead of showing as text
    assert "<title>Generated test notebook</title>" in page and "author: dialogue" not in page
    assert "<h1>A generated notebook</h1>" in page


def test_html_ai_rules():
    d = _ai_dialogue()
    assert "Rayleigh" not in to_html(d)
    page = to_html(d, with_ai=True)
    assert "<strong>scattering</strong>" in page and "Why is the sky blue?" in page
    assert '<details class="tool-calls"><summary>1 tool call</summary>' in page
    assert "lookup" in page
    assert_inert(_body(page))
    assert "Hidden prompt" not in page and "Secret" not in page and "import os" not in page


def _hostile_dialogue() -> Dialogue:
    msgs = []
    for i, p in enumerate(XSS_PAYLOADS):
        msgs += [
            Message(kind=Kind.note, source=p),
            Message(kind=Kind.prompt, source=p, response=p),
            Message(kind=Kind.raw, source=p, meta={"raw_mimetype": "text/html"}),
            Message(kind=Kind.code, source=p, outputs=[
                {"output_type": "display_data", "metadata": {}, "data": {"text/html": p}},
                {"output_type": "execute_result", "execution_count": i, "metadata": {},
                 "data": {"text/markdown": p}},
                {"output_type": "stream", "name": "stdout", "text": p},
                {"output_type": "error", "ename": p, "evalue": p, "traceback": [p]}]),
        ]
        msgs[-4].attachments = {"x.png": {"image/png": p}}
        msgs[-4].source = "![a](attachment:x.png) " + p
        msgs[-1].outputs.append({"output_type": "display_data", "metadata": {},
                                 "data": {"image/png": p + ")<script>window.__xss=1</script>"}})
    return Dialogue(name="</title><script>window.__xss=1</script>", messages=msgs)


def test_html_export_renders_xss_corpus_inert():
    page = to_html(_hostile_dialogue(), with_ai=True)
    assert_inert(_body(page))
    head = page[: page.index("<body>")]
    assert "<script" not in head.lower() and "&lt;/title&gt;&lt;script&gt;" in head


def test_markdown_export_html_blocks_and_images_inert():
    d = _hostile_dialogue()
    md = to_markdown(d, with_ai=True).text
    blocks = re.findall(r'<div class="output">\n(.*?)\n</div>', md, re.S)
    assert len(blocks) == len(XSS_PAYLOADS)
    for b in blocks:
        assert_inert(b)
    # image links made from hostile "image" data stay one link: only base64 characters inside
    for link in re.findall(r"!\[(?:output|a)\]\((data:[^)]*)\)", md):
        assert re.fullmatch(r"data:image/png;base64,[A-Za-z0-9+/=]*", link), link
    files = to_markdown(d, with_ai=True, images="files")
    assert "could not be decoded" in files.text  # corrupt images do not break the post
    assert all(not k.startswith("/") and ".." not in k for k in files.files)


PIXEL = "https://tracker.example/p.gif?who=reader"


def _remote_image_dialogue() -> Dialogue:
    """A remote image wherever an export can carry one: a note (markdown and raw HTML), an
    answer, a raw cell and an HTML output of code; and a data: image that must stay."""
    data_png = "data:image/png;base64,iVBORw0KGgo="
    return Dialogue(name="Pixels", messages=[
        Message(kind=Kind.note, source=f"# Pixels\n\n![pixel]({PIXEL}&n=1) and "
                                       f'<img src="{PIXEL}&n=2" alt="<b>two</b>" width=1>'
                                       f"\n\n![inline]({data_png})"),
        Message(kind=Kind.prompt, source="Hi", response=f"![answer]({PIXEL}&n=3)"),
        Message(kind=Kind.raw, source=f'<img src="{PIXEL}&n=4">',
                meta={"raw_mimetype": "text/html"}),
        Message(kind=Kind.code, source="show()", outputs=[
            {"output_type": "display_data", "metadata": {},
             "data": {"text/html": f'<p title="<img>"><img src="http://tracker.example/{5}.gif">'
                                   "</p>"}}]),
    ])


def test_html_export_loads_nothing_remote_by_default():
    page = to_html(_remote_image_dialogue(), with_ai=True)
    p = _Tags()
    p.feed(page)
    csp = [a["content"] for t, a in p.tags if t == "meta" and a.get("http-equiv")]
    assert csp == [CSP]
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"
    assert "https:" not in CSP and "http:" not in CSP
    assert ["no-referrer"] == [a["content"] for t, a in p.tags if a.get("name") == "referrer"]
    imgs = [a for t, a in p.tags if t == "img"]
    assert [a["src"] for a in imgs] == ["data:image/png;base64,iVBORw0KGgo="]
    # each remote image is a link the reader may follow, named by its alt text, not an element
    links = {a["href"] for t, a in p.tags if t == "a" and a.get("class") == "remote-image"}
    assert links == {f"{PIXEL}&n=1", f"{PIXEL}&n=2", f"{PIXEL}&n=3", f"{PIXEL}&n=4",
                     "http://tracker.example/5.gif"}
    assert "[image: pixel]" in page and "[image: &lt;b&gt;two&lt;/b&gt;]" in page
    assert '<p title="&lt;img&gt;">' in page  # "<img>" inside an attribute stays text
    assert_inert(_body(page))


def test_html_export_loads_remote_images_only_when_asked():
    page = to_html(_remote_image_dialogue(), with_ai=True, remote_images=True)
    p = _Tags()
    p.feed(page)
    assert [a["content"] for t, a in p.tags if t == "meta" and a.get("http-equiv")] == \
        [CSP_REMOTE_IMAGES]
    assert "img-src data: https: http:;" in CSP_REMOTE_IMAGES
    assert len([a for t, a in p.tags if t == "img" and "tracker.example" in a["src"]]) == 5
    assert "remote-image" not in _body(page)
