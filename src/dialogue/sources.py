"""What a dialogue's attached context is read from: a local file or folder, an installed
package's documentation, a web page. Each reader returns a `Loaded` (the text and a report of what
was read and what was skipped, and why); the service stores the text as a `ContextItem` whose
`kind` and `source` say how to read it again (`read_source`, behind refresh).

- A file must be text (UTF-8, no NUL bytes); a binary one is refused, naming what it looks like.
- A folder is read recursively in name order, text-like files only: version-control, cache,
  virtual-environment and build folders are not entered, hidden files and binaries are skipped and
  listed, and the size limits (per file and in all) are enforced with a clear message.
- A package (by distribution or import name) is documented in a separate Python process (its code
  is imported there, never in ours, with a time limit): the docstrings and signatures of its
  public modules, its README (the long description in its metadata) and an `llms.txt`-style file
  where the distribution ships one.
- A URL (http or https only) is fetched with httpx2 (the HTTP client the SDKs bring), with size and
  time limits; HTML is reduced to its main part as Markdown (BeautifulSoup + markdownify).

A source is data, never configuration: nothing read here is executed in this process or changes a
setting.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["Loaded", "SourceError", "read_path", "read_package", "read_url", "html_text",
           "read_source", "IGNORED_DIRS", "MAX_FILE_BYTES", "MAX_TOTAL_BYTES", "MAX_URL_BYTES"]

#: folders a folder attachment never enters: version control, caches, environments, builds
IGNORED_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", "env", ".tox", ".nox",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "build", "dist",
    ".idea", ".vscode", "site-packages", ".eggs", "target", ".cache", ".gradle", "htmlcov",
})
MAX_FILE_BYTES = 1 << 20        # one file of a folder: 1 MiB (a single file attached: MAX_TOTAL)
MAX_TOTAL_BYTES = 8 << 20       # everything one attachment reads
MAX_FILES = 2_000
MAX_URL_BYTES = 5 << 20
URL_TIMEOUT_S = 20.0
PACKAGE_TIMEOUT_S = 120.0
# Suffixes that are never text, skipped in a folder without reading them
_BINARY_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .webp .bmp .ico .tif .tiff .pdf .zip .gz .tgz .bz2 .xz .zst .7z .tar "
    ".whl .egg .so .dylib .dll .exe .bin .o .a .pyc .pyo .class .jar .gguf .safetensors .pt .pth "
    ".onnx .npy .npz .pkl .pickle .parquet .feather .arrow .sqlite .sqlite3 .db .woff .woff2 .ttf "
    ".otf .eot .mp3 .mp4 .wav .flac .ogg .mov .avi .mkv .webm .psd .xlsx .docx .pptx .kv".split())


class SourceError(ValueError):
    """A source that cannot be attached (missing, binary, too large, unreachable); the message
    says which and why."""


class NoSourceError(SourceError):
    """An item with nothing to read again (uploaded, or text typed in): refresh skips it."""


@dataclass
class Loaded:
    """What a source read gave: the text to attach, its kind and source (how to read it again),
    the files it is made of (relative name, characters) and those skipped (name, why)."""

    name: str
    content: str
    kind: str
    source: str
    files: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a person: what was read and what was left out."""
        parts = [f"{len(self.content):,} characters"]
        if self.kind == "directory":
            parts.append(f"{len(self.files)} file{'s' * (len(self.files) != 1)}")
        if self.skipped:
            shown = ", ".join(f"{n} ({why})" for n, why in self.skipped[:8])
            more = f" and {len(self.skipped) - 8} more" if len(self.skipped) > 8 else ""
            parts.append(f"skipped {len(self.skipped)}: {shown}{more}")
        return "; ".join(parts + self.notes)


# ---------------------------------------------------------------- files and folders

def _binary_reason(data: bytes) -> str | None:
    """Why `data` is not text we can attach, or None when it is UTF-8 text."""
    if b"\0" in data[:8192]:
        return "binary: it has NUL bytes"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    return None


def _read_text(p: Path, limit: int) -> str:
    try:
        size = p.stat().st_size
        if size > limit:
            raise SourceError(f"{p} is {size:,} bytes, over the limit of {limit:,} for attached text")
        data = p.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {p}: {e.strerror or e}") from e
    why = _binary_reason(data)
    if why is not None:
        raise SourceError(f"{p} is not a text file ({why}); attach text files only")
    return data.decode("utf-8")


def read_path(path: str | os.PathLike[str], *, name: str | None = None) -> Loaded:
    """A text file, or a folder's text files (see the module docstring for what is skipped)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"no such file or folder: {p}")
    if p.is_file():
        text = _read_text(p, MAX_TOTAL_BYTES)
        return Loaded(name or p.name, text, "file", str(p.resolve()), files=[(p.name, len(text))])
    if not p.is_dir():
        raise SourceError(f"{p} is neither a file nor a folder")
    root = p.resolve()
    files: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    chunks: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            rel = (here / d).relative_to(root).as_posix()
            if d in IGNORED_DIRS or d.endswith(".egg-info"):
                skipped.append((rel + "/", "not entered"))
            elif d.startswith("."):
                skipped.append((rel + "/", "hidden"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            fp = here / f
            rel = fp.relative_to(root).as_posix()
            if f.startswith("."):
                skipped.append((rel, "hidden"))
                continue
            if fp.suffix.lower() in _BINARY_SUFFIXES:
                skipped.append((rel, "binary"))
                continue
            if fp.is_symlink() and not fp.resolve().is_relative_to(root):
                skipped.append((rel, "a link out of the folder"))
                continue
            try:
                size = fp.stat().st_size
                if size > MAX_FILE_BYTES:
                    skipped.append((rel, f"{size:,} bytes, over {MAX_FILE_BYTES:,}"))
                    continue
                data = fp.read_bytes()
            except OSError as e:
                skipped.append((rel, e.strerror or "unreadable"))
                continue
            why = _binary_reason(data)
            if why is not None:
                skipped.append((rel, "binary" if "NUL" in why else why))
                continue
            if len(files) >= MAX_FILES or total + len(data) > MAX_TOTAL_BYTES:
                raise SourceError(
                    f"{root} holds more text than one attachment takes ({MAX_FILES:,} files or "
                    f"{MAX_TOTAL_BYTES:,} bytes); attach a smaller folder or single files")
            text = data.decode("utf-8")
            total += len(data)
            files.append((rel, len(text)))
            chunks.append(f"==> {rel} <==\n{text.rstrip()}\n")
    if not files:
        raise SourceError(f"{root} has no text files to attach"
                          + (f" (skipped: {', '.join(n for n, _ in skipped[:10])})" if skipped else ""))
    return Loaded(name or root.name, "\n".join(chunks), "directory", str(root), files=files,
                  skipped=skipped)


# ---------------------------------------------------------------- packages

def read_package(package: str, *, name: str | None = None, python: str | None = None,
                 paths: Sequence[str] = (), timeout: float = PACKAGE_TIMEOUT_S) -> Loaded:
    """An installed package's documentation, gathered by `_pkgdocs.py` in a separate,
    isolated Python process (`python`, default this one) so that importing the package's modules
    runs none of its code here; a package that hangs on import is stopped after `timeout`.
    `paths` go first on that process's module path (a project's source folder, not installed)."""
    package = package.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", package):
        raise SourceError(f"{package!r} is not a package name")
    script = Path(__file__).with_name("_pkgdocs.py")
    with tempfile.TemporaryDirectory(prefix="dialogue-pkgdocs-") as cwd:  # nothing importable there
        try:
            r = subprocess.run([python or sys.executable, "-I", str(script), package,
                                *(str(Path(p).resolve()) for p in paths)], cwd=cwd,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                               env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
        except subprocess.TimeoutExpired:
            raise SourceError(f"documenting {package} took over {timeout:.0f} s (importing its "
                              "modules hung?); nothing was attached") from None
    try:
        doc = json.loads(r.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise SourceError(f"could not document {package}: {tail[0]}") from None
    if doc.get("error"):
        raise SourceError(doc["error"])
    head = f"# {doc['dist'] or package} {doc.get('version') or ''}".rstrip()
    if doc.get("summary"):
        head += f"\n\n{doc['summary']}"
    parts = [head]
    files: list[tuple[str, int]] = []
    for key, title in (("llms", doc.get("llms_name") or "llms.txt"), ("readme", "README"),
                       ("api", "API: public modules, signatures and docstrings")):
        if doc.get(key):
            parts.append(f"## {title}\n\n{doc[key].strip()}")
            files.append((title, len(doc[key])))
    skipped = [(m, why) for m, why in doc.get("skipped", [])]
    n = len(doc.get("modules", []))
    notes = [f"{n} module{'s' * (n != 1)} documented"] + list(doc.get("notes", []))
    return Loaded(name or package, "\n\n".join(parts) + "\n", "package", package, files=files,
                  skipped=skipped, notes=notes)


# ---------------------------------------------------------------- web pages

_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/x-yaml",
               "application/yaml", "application/toml", "application/javascript", "application/x-ndjson")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "object",
              "embed", "form", "button", "nav", "aside", "footer", "dialog")


def html_text(html: str | bytes) -> tuple[str, str]:
    """(title, readable Markdown text) of an HTML page: its <main> or <article> where it has one,
    else its body, without scripts, styles, menus, forms and footers. Written with markdownify (on
    BeautifulSoup's tree) rather than our own walk: it already gets headings, lists, tables, links
    and <pre> code blocks right."""
    from bs4 import BeautifulSoup, Comment
    from markdownify import MarkdownConverter
    soup = BeautifulSoup(html, "html.parser")
    title = " ".join(soup.title.get_text().split()) if soup.title else ""
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    for c in soup.find_all(string=lambda s: isinstance(s, Comment)):
        c.extract()
    for tag in soup.find_all(attrs={"hidden": True}):
        tag.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    if root is not soup.find("main") and root is not soup.find("article"):
        for tag in root.find_all("header"):  # a site header (logo, menu) outside the content
            tag.decompose()
    md = MarkdownConverter(heading_style="ATX", bullets="-", code_language="", escape_asterisks=False,
                           escape_underscores=False, escape_misc=False,
                           strip=["img"]).convert_soup(root)
    md = re.sub(r"[ \t]+\n", "\n", md)
    md = re.sub(r"\n{3,}", "\n\n", md).strip()
    if title and not md.lstrip("# ").startswith(title[:40]):
        md = f"# {title}\n\n{md}"
    return title, md


def read_url(url: str, *, name: str | None = None, max_bytes: int = MAX_URL_BYTES,
             timeout: float = URL_TIMEOUT_S) -> Loaded:
    """A web page's text: http(s) only, redirects followed (at most 5), at most `max_bytes` read
    and `timeout` seconds per step. HTML is reduced to readable text (`html_text`); other text
    types are kept as they are; anything else (a PDF, an image) is refused."""
    import httpx2
    from urllib.parse import urlsplit
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SourceError(f"{url!r} is not an http(s) URL; only web pages can be attached by URL")
    try:
        with httpx2.Client(follow_redirects=True, max_redirects=5, timeout=timeout,
                           headers={"User-Agent": "dialogue (attach)", "Accept":
                                    "text/html, text/markdown, text/plain;q=0.9, */*;q=0.5"}) as c:
            with c.stream("GET", url) as r:
                if r.status_code >= 400:
                    raise SourceError(f"{url} answered {r.status_code} {r.reason_phrase}")
                ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype and not ctype.startswith(_TEXT_TYPES + _HTML_TYPES):
                    raise SourceError(f"{url} is {ctype}, not text or HTML; nothing was attached")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise SourceError(f"{url} is {int(declared):,} bytes, over the limit of "
                                      f"{max_bytes:,}")
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise SourceError(f"{url} is over the limit of {max_bytes:,} bytes")
                final = str(r.url)
                encoding = r.charset_encoding
    except httpx2.TimeoutException:
        raise SourceError(f"{url} did not answer within {timeout:.0f} s") from None
    except httpx2.TooManyRedirects:
        raise SourceError(f"{url} redirects too many times") from None
    except httpx2.HTTPError as e:
        raise SourceError(f"cannot fetch {url}: {e}") from None
    data = bytes(body)
    if b"\0" in data[:8192]:
        raise SourceError(f"{url} is binary, not text; nothing was attached")
    text = data.decode(encoding or "utf-8", "replace")
    is_html = ctype in _HTML_TYPES or (not ctype and re.match(r"\s*<(!doctype html|html)", text, re.I))
    notes = [] if final == url else [f"redirected to {final}"]
    if is_html:  # undeclared charset: BeautifulSoup reads the page's <meta charset> or guesses
        title, text = html_text(text if encoding else data)
        if not text.strip():
            raise SourceError(f"{url} has no readable text (a page drawn by scripts?)")
    return Loaded(name or _url_name(parts), text.strip() + "\n", "url", url, notes=notes)


def _url_name(parts) -> str:
    tail = [p for p in parts.path.split("/") if p]
    return parts.netloc + ("/" + tail[-1] if tail else "")


# ---------------------------------------------------------------- read again

def read_source(kind: str, source: str, name: str) -> Loaded:
    """Read an attached item again from where it came from (refresh)."""
    if kind in ("file", "directory"):
        if not source or not os.path.isabs(source):
            raise NoSourceError(f"{name!r} was uploaded, not read from a path here: attach it "
                                "again")
        return read_path(source, name=name)
    if kind == "package":
        return read_package(source, name=name)
    if kind == "url":
        return read_url(source, name=name)
    raise NoSourceError(f"{name!r} is {kind} text with no source to read again")
