"""Reading what a dialogue attaches: files, folders, installed packages' docs, web pages (from a
real HTTP server on 127.0.0.1), and the retrieval that cuts docs too large for the context."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dialogue import retrieval
from dialogue.sources import (MAX_FILE_BYTES, SourceError, html_text, read_package, read_path,
                              read_source, read_url)
from pages import PageServer, page

PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(64)


# ---------------------------------------------------------------- files and folders

def test_a_text_file_is_read_with_its_path(tmp_path: Path) -> None:
    f = tmp_path / "notes.md"
    f.write_text("# Notes\n\nçà et là\n", encoding="utf-8")
    got = read_path(f)
    assert (got.name, got.kind, got.source) == ("notes.md", "file", str(f.resolve()))
    assert got.content == "# Notes\n\nçà et là\n"


@pytest.mark.parametrize("data, why", [(PNG, "NUL bytes"), (b"caf\xe9 latin-1", "not UTF-8")])
def test_a_binary_file_is_refused_with_the_reason(tmp_path: Path, data: bytes, why: str) -> None:
    f = tmp_path / "thing.dat"
    f.write_bytes(data)
    with pytest.raises(SourceError, match=f"not a text file.*{why}"):
        read_path(f)


def test_a_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        read_path(tmp_path / "nope")


def _project(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "__init__.py").write_text("def hello():\n    return 'hi'\n")
    (root / "README.md").write_text("# Project\n")
    (root / "logo.png").write_bytes(PNG)
    (root / "data.bin").write_bytes(b"abc\0def")          # binary without a binary suffix
    (root / ".env").write_text("SECRET=1\n")
    (root / "big.txt").write_text("x" * (MAX_FILE_BYTES + 1))
    for d in (".git", "__pycache__", "node_modules", "src/pkg/__pycache__"):
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / "junk.txt").write_text("should not be read\n")


def test_a_folder_reads_text_files_and_lists_what_it_skipped(tmp_path: Path) -> None:
    _project(tmp_path)
    got = read_path(tmp_path, name="proj")
    assert (got.name, got.kind, got.source) == ("proj", "directory", str(tmp_path.resolve()))
    assert [n for n, _ in got.files] == ["README.md", "src/pkg/__init__.py"]
    assert "==> src/pkg/__init__.py <==\ndef hello():" in got.content
    assert "should not be read" not in got.content and "SECRET" not in got.content
    skipped = dict(got.skipped)
    assert skipped["logo.png"] == "binary" and skipped["data.bin"] == "binary"
    assert skipped[".env"] == "hidden" and skipped[".git/"] == "not entered"
    assert skipped["node_modules/"] == "not entered" and skipped["src/pkg/__pycache__/"] == "not entered"
    assert "over" in skipped["big.txt"]
    line = got.summary()
    assert "2 files" in line and "skipped 8" in line and "logo.png (binary)" in line


def test_a_folder_without_text_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    with pytest.raises(SourceError, match="no text files.*a.png"):
        read_path(tmp_path)


# ---------------------------------------------------------------- packages

def test_an_installed_packages_docs_readme_and_api(tmp_path: Path) -> None:
    got = read_package("markdownify")
    assert (got.kind, got.source) == ("package", "markdownify")
    assert got.content.startswith("# markdownify ")
    assert "## README" in got.content and "pip install markdownify" in got.content
    assert "#### class markdownify.MarkdownConverter(**options)" in got.content
    assert "- `MarkdownConverter.convert(self, html)`" in got.content
    # by its import name too (markdown_it is distributed as markdown-it-py)
    assert "### module markdown_it.main" in read_package("markdown_it").content


def _fake_dist(site: Path, *, hang: bool = False) -> None:
    pkg = site / "fakedocs"
    (pkg / "_private").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''\
        """Fake docs: the top module."""
        import os as _os
        print("noise on stdout at import")  # must not break the JSON line
        def greet(name: str, *, loud: bool = False) -> str:
            """Say hello to `name`."""
            return name
        class Thing:
            """A thing."""
            def run(self, n: int = 1) -> None:
                """Run it n times."""
            def _hidden(self): ...
        def _secret(): ...
        '''))
    (pkg / "_private" / "__init__.py").write_text('"""PRIVATE-MODULE"""\n')
    (pkg / "broken.py").write_text("raise RuntimeError('cannot import me')\n")
    (pkg / "tests.py").write_text('"""TEST-MODULE"""\n')
    if hang:
        (pkg / "slow.py").write_text("import time\ntime.sleep(30)\n")
    (pkg / "llms.txt").write_text("# fakedocs\n\n> LLMS-TXT-INDEX for models\n")
    info = site / "fakedocs-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakedocs\nVersion: 1.2\n"
                                   "Summary: a fake package\n\nFAKE-README body\n")
    (info / "RECORD").write_text("fakedocs/__init__.py,,\nfakedocs/broken.py,,\nfakedocs/llms.txt,,\n"
                                 "fakedocs-1.2.dist-info/METADATA,,\n")
    (info / "top_level.txt").write_text("fakedocs\n")


def test_package_docs_take_llms_txt_readme_public_api_and_list_failures(tmp_path: Path) -> None:
    _fake_dist(tmp_path)
    got = read_package("fakedocs", paths=[tmp_path])
    c = got.content
    assert c.startswith("# fakedocs 1.2\n\na fake package")
    assert c.index("## llms.txt") < c.index("## README") < c.index("## API")
    assert "LLMS-TXT-INDEX" in c and "FAKE-README body" in c
    assert "#### fakedocs.greet(name: str, *, loud: bool = False) -> str\n\nSay hello to `name`." in c
    assert "#### class fakedocs.Thing()" in c and "- `Thing.run(self, n: int = 1) -> None`\n  Run it n times." in c
    for absent in ("_secret", "_hidden", "PRIVATE-MODULE", "TEST-MODULE", "noise on stdout"):
        assert absent not in c
    assert ("fakedocs.broken", "import failed: RuntimeError: cannot import me") in got.skipped


def test_a_package_that_hangs_on_import_is_stopped(tmp_path: Path) -> None:
    _fake_dist(tmp_path, hang=True)
    with pytest.raises(SourceError, match="took over 3 s"):
        read_package("fakedocs", paths=[tmp_path], timeout=3)


@pytest.mark.parametrize("name, msg", [("no-such-package-xyz", "no installed package"),
                                       ("os; rm -rf /", "not a package name")])
def test_an_unknown_package_is_a_clear_error(name: str, msg: str) -> None:
    with pytest.raises(SourceError, match=msg):
        read_package(name)


# ---------------------------------------------------------------- web pages

HTML = """<!doctype html><html><head><title>Widget guide</title><style>.x{color:red}</style>
<script>var secret = "SCRIPT-TEXT";</script></head><body>
<header><a href="/">Home</a> | <a href="/blog">Blog</a></header>
<nav><ul><li>MENU-ITEM</li></ul></nav>
<main><h1>Widget guide</h1><p>Widgets <b>spin</b> &amp; <a href="/api">turn</a>.</p>
<h2>Install</h2><pre><code>pip install widget_lib</code></pre>
<ul><li>first_item</li><li>second</li></ul></main>
<footer>FOOTER-TEXT</footer></body></html>"""


def test_html_is_reduced_to_the_main_text_as_markdown() -> None:
    title, text = html_text(HTML)
    assert title == "Widget guide"
    assert text.startswith("# Widget guide\n\nWidgets **spin** & [turn](/api).")
    assert "## Install" in text and "```\npip install widget_lib\n```" in text
    assert "- first_item" in text
    for absent in ("SCRIPT-TEXT", "color:red", "MENU-ITEM", "FOOTER-TEXT", "Blog"):
        assert absent not in text


def test_a_url_is_fetched_and_reduced(tmp_path: Path) -> None:
    routes = {"/guide.html": page("text/html; charset=utf-8", HTML),
              "/old": page("", b"", status=301, headers={"Location": "/guide.html"}),
              "/notes.txt": page("text/plain; charset=latin-1", "caf\xe9".encode("latin-1")),
              "/meta.html": page("text/html", '<html><head><meta charset="windows-1252"></head>'
                                 '<body><p>d\xe9j\xe0 vu</p></body></html>'.encode("cp1252")),
              "/logo.png": page("image/png", PNG),
              "/big.txt": page("text/plain", "y" * 5000),
              "/gone": page("text/plain", "", status=404),
              "/slow": page("text/plain", "late", delay=3)}
    with PageServer(routes) as srv:
        got = read_url(srv.url("/guide.html"))
        assert (got.kind, got.source, got.name) == ("url", srv.url("/guide.html"),
                                                    srv.url("/guide.html").split("//")[1])
        assert got.content.startswith("# Widget guide") and "SCRIPT-TEXT" not in got.content
        moved = read_url(srv.url("/old"), name="guide")
        assert moved.name == "guide" and "Widgets **spin**" in moved.content
        assert moved.notes == [f"redirected to {srv.url('/guide.html')}"]
        assert read_url(srv.url("/notes.txt")).content == "café\n"  # the declared charset
        assert read_url(srv.url("/meta.html")).content == "déjà vu\n"  # the page's own
        with pytest.raises(SourceError, match="is image/png, not text"):
            read_url(srv.url("/logo.png"))
        with pytest.raises(SourceError, match="5,000 bytes, over the limit of 1,000"):
            read_url(srv.url("/big.txt"), max_bytes=1000)
        with pytest.raises(SourceError, match="answered 404"):
            read_url(srv.url("/gone"))
        with pytest.raises(SourceError, match="did not answer within 1 s"):
            read_url(srv.url("/slow"), timeout=1)
        assert srv.hits["/guide.html"] == 2
    for bad in ("file:///etc/passwd", "ftp://example.org/x", "javascript:alert(1)", "/relative"):
        with pytest.raises(SourceError, match="not an http"):
            read_url(bad)


def test_read_source_reads_again_and_refuses_what_has_no_source(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("one")
    assert read_source("file", str(f), "a").content == "one"
    with pytest.raises(SourceError, match="uploaded"):
        read_source("file", "a.txt", "a")
    with pytest.raises(SourceError, match="no source"):
        read_source("text", "", "rules")


# ---------------------------------------------------------------- retrieval

def _doc() -> str:
    sections = []
    for i, topic in enumerate(["installation pip wheel", "configuration toml settings",
                               "streaming responses tokens", "authentication keys oauth",
                               "pagination cursors pages", "retries backoff timeouts"]):
        sections.append(f"## Section {i + 1}: {topic.split()[0]}\n\n" +
                        f"This section covers {topic}. " * 40)
    return "\n\n".join(sections)


def test_split_keeps_headings_at_chunk_starts_and_loses_no_text() -> None:
    doc = _doc()
    chunks = retrieval.split(doc, size=1600)
    assert len(chunks) >= 6 and all(len(c) <= 1600 for c in chunks)
    assert sum(c.startswith("## Section") for c in chunks) == 6
    assert "".join(doc.split()) == "".join("".join(chunks).split())


def test_bm25_ranks_the_matching_chunk_first() -> None:
    chunks = ["all about installation with pip", "streaming tokens as they come",
              "oauth authentication and api keys", "nothing relevant here"]
    assert retrieval.rank(chunks, "How do I authenticate with OAuth keys?")[0] == 2
    assert retrieval.rank(chunks, "streamed tokens?")[0] == 1  # stemmed: streamed ~ streaming
    assert retrieval.rank(chunks, "???") == [0, 1, 2, 3]


def test_fit_keeps_small_items_whole_and_retrieves_from_the_large_one() -> None:
    count = lambda t: len(t) // 4  # noqa: E731 - a stand-in tokenizer
    small = ("rules", "Always answer in French.")
    big = ("docs", _doc())
    whole = retrieval.fit([small, big], None, "anything", count)
    assert [f.retrieved for f in whole] == [None, None] and whole[1].text == big[1]
    fits = retrieval.fit([small, big], 700, "how do retries and backoff work?", count)
    assert fits[0].text == small[1] and fits[0].retrieved is None
    docs = fits[1]
    assert docs.of == len(retrieval.split(big[1])) and docs.retrieved
    assert docs.tokens <= 700 - fits[0].tokens
    assert "retries backoff timeouts" in docs.text and "oauth" not in docs.text
    assert docs.text.startswith(f"[chunk {docs.retrieved[0]} of {docs.of}]")
    assert docs.retrieved == sorted(docs.retrieved)  # sent in document order
