"""A dialogue as a blog post in Markdown.

Notes are the prose; code goes in fenced blocks followed by what it produced (streams and errors
as text blocks, images as images, HTML tables as sanitized HTML, markdown as markdown); prompts
and their answers appear only with `with_ai=True` (a post is usually the author's words and code,
the conversation being the scaffolding); hidden messages never appear. nbdev/Quarto cell
directives are honoured the way nbdev's docs honour them: `#| hide` leaves the cell out,
`#| echo: false` shows only its output, `#| output: false` only its code, and directive lines are
not shown.

Images are either inlined as `data:` URIs (one self-contained file) or returned as files to write
beside the post (`images="files"`, like nbconvert's `<name>_files/` folder): `to_markdown` is
pure and returns both the text and the files; `write_markdown` writes them.
"""
from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from dialogue.artifacts.module import directives, strip_directives
from dialogue.document import Dialogue, Kind, Message
from dialogue.render import IMAGE_MIMES, image_data_uri, plain_text, sanitize_html, strip_ansi

__all__ = ["to_markdown", "write_markdown", "MarkdownExport", "visible_messages", "code_language",
           "merge_streams", "has_own_title", "hidden_left_out", "front_matter_title",
           "tool_calls_json", "ImageMode"]

ImageMode = Literal["inline", "files"]
_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp",
        "image/svg+xml": "svg"}
_MD_PRIORITY = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml",
                "text/markdown", "text/html", "text/latex", "text/plain")
_ATTACHMENT = re.compile(r"attachment:([^\s)\"'>]+)")


@dataclass
class MarkdownExport:
    """The post's text, and the files (relative path -> bytes) its image links point to."""

    text: str
    files: dict[str, bytes] = field(default_factory=dict)


def slug(name: str) -> str:
    """A file-name-safe form of a dialogue name (for the images folder)."""
    s = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    s = re.sub(r"[^\w.-]+", "-", s).strip("-.")
    return s or "dialogue"


def code_language(dialogue: Dialogue) -> str:
    """The language of the dialogue's code, from the notebook metadata it came with."""
    meta = dialogue.meta or {}
    for v in ((meta.get("kernelspec") or {}).get("language"),
              (meta.get("language_info") or {}).get("name")):
        if isinstance(v, str) and re.match(r"^[\w+#.-]{1,40}$", v):
            return v
    return "python"


def visible_messages(dialogue: Dialogue, with_ai: bool,
                     with_hidden: bool = False) -> list[Message]:
    """The messages a post shows: not hidden (unless `with_hidden`), not `#| hide`, prompts only
    with `with_ai`."""
    out = []
    for m in dialogue.messages:
        if (m.hidden and not with_hidden) or (m.kind == Kind.prompt and not with_ai):
            continue
        if m.kind == Kind.code and "hide" in directives(m.source):
            continue
        out.append(m)
    return out


def has_own_title(msgs: list[Message]) -> bool:
    """Whether the post already starts with its title: a `# ` heading note, or front matter (a
    raw `---` cell, which must stay the first thing in the file and usually holds `title:`)."""
    if not msgs:
        return False
    first = msgs[0].source.lstrip()
    return (msgs[0].kind == Kind.note and first.startswith("# ")) or \
        (msgs[0].kind == Kind.raw and first.startswith("---"))


def front_matter_title(msgs: list[Message]) -> str | None:
    """The `title:` of a leading front-matter raw cell (`---` YAML block), if any."""
    if msgs and msgs[0].kind == Kind.raw and msgs[0].source.lstrip().startswith("---"):
        m = re.search(r"^title:\s*(.+?)\s*$", msgs[0].source, re.M)
        if m:
            return m.group(1).strip("'\"") or None
    return None


def shows_input(m: Message) -> bool:
    return directives(m.source).get("echo", "").lower() != "false"


def shows_output(m: Message) -> bool:
    return directives(m.source).get("output", "").lower() != "false"


def raw_included(m: Message, mimetypes: tuple[str, ...]) -> bool:
    """nbconvert's rule: a raw cell goes into an export when its raw_mimetype matches the target
    (or it has none)."""
    mt = str(m.meta.get("raw_mimetype") or m.meta.get("format") or "").lower()
    return mt in mimetypes


def _text(v: Any) -> str:
    return "".join(v) if isinstance(v, list) else str(v)


def fence(body: str, lang: str = "") -> str:
    """A fenced block that cannot be closed early by backticks inside `body`."""
    longest = max((len(r) for r in re.findall(r"`+", body)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{body.rstrip(chr(10))}\n{ticks}"


class _Images:
    """Where images go: inline data URIs, or files collected for writing beside the post."""

    def __init__(self, mode: ImageMode, folder: str) -> None:
        if mode not in ("inline", "files"):
            raise ValueError(f"images must be 'inline' or 'files', not {mode!r}")
        self.mode, self.folder = mode, folder
        self.files: dict[str, bytes] = {}

    def url(self, mime: str, value: Any, stem: str) -> str | None:
        """The link for an image, or None when its data is not valid base64."""
        if self.mode == "inline":
            return image_data_uri(mime, value)
        raw = _text(value)
        if mime == "image/svg+xml":
            data = raw.encode()
        else:
            try:
                data = base64.b64decode(re.sub(r"\s+", "", raw), validate=True)
            except ValueError:  # binascii.Error: not an image; a post must not fail over it
                return None
        path = f"{self.folder}/{stem}.{_EXT[mime]}"
        n = 1
        while path in self.files and self.files[path] != data:
            n += 1
            path = f"{self.folder}/{stem}-{n}.{_EXT[mime]}"
        self.files[path] = data
        return path


def resolve_attachments(m: Message, url: Callable[[str, Any, str], str | None]) -> str:
    """Replace `attachment:NAME` links in a note with what `url(mime, value, stem)` returns."""
    if not m.attachments:
        return m.source

    def sub(match: re.Match[str]) -> str:
        name = unquote(match.group(1))
        bundle = m.attachments.get(name) or m.attachments.get(match.group(1))
        if not isinstance(bundle, dict):
            return match.group(0)
        mime = next((k for k in IMAGE_MIMES if k in bundle), None)
        if mime is None:
            return match.group(0)
        return url(mime, bundle[mime], f"{m.id}-{slug(Path(name).stem)}") or match.group(0)

    return _ATTACHMENT.sub(sub, m.source)


def _output_md(o: dict[str, Any], images: _Images, stem: str) -> str:
    t = o.get("output_type")
    if t == "stream":
        return fence(plain_text(_text(o.get("text", ""))), "text")  # progress bars collapsed
    if t == "error":
        tb = o.get("traceback") or [f"{o.get('ename', '')}: {o.get('evalue', '')}"]
        return fence(strip_ansi("\n".join(tb)), "text")
    if t not in ("execute_result", "display_data"):
        return ""
    data = o.get("data") or {}
    mime = next((k for k in _MD_PRIORITY if k in data), None)
    if mime is None:
        return ""
    value = data[mime]
    if mime in IMAGE_MIMES:
        link = images.url(mime, value, stem)
        return f"![output]({link})" if link else "*(an image output that could not be decoded)*"
    if mime == "text/markdown":
        return _text(value).strip("\n")
    if mime == "text/html":
        # Raw HTML in Markdown ends at a blank line; squeeze them so the block stays one block.
        cleaned = re.sub(r"\n\s*\n", "\n", sanitize_html(_text(value)).strip())
        return f'<div class="output">\n{cleaned}\n</div>'
    if mime == "text/latex":
        return _text(value).strip("\n")
    return fence(strip_ansi(_text(value)), "text")


def merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive writes to one stream read as one block, as Jupyter shows them."""
    out: list[dict[str, Any]] = []
    for o in outputs:
        if (o.get("output_type") == "stream" and out and out[-1].get("output_type") == "stream"
                and out[-1].get("name") == o.get("name")):
            out[-1] = {**out[-1], "text": _text(out[-1].get("text", "")) + _text(o.get("text", ""))}
        else:
            out.append(o)
    return out


def tool_calls_json(m: Message) -> str:
    """A prompt's tool calls (name, arguments, result) as indented JSON, for a folded block."""
    calls = [{k: c.get(k) for k in ("name", "arguments", "result") if k in c}
             for c in m.tool_calls if isinstance(c, dict)]
    return json.dumps(calls, indent=2, ensure_ascii=False, default=str)


def _prompt_md(m: Message) -> str:
    quoted = "\n".join("> " + ln if ln else ">" for ln in m.source.strip("\n").splitlines())
    parts = [f"> **Prompt**\n>\n{quoted}" if quoted else "> **Prompt**"]
    if m.tool_calls:
        n = len(m.tool_calls)
        parts.append(f"<details><summary>{n} tool call{'s' * (n != 1)}</summary>\n\n"
                     f"{fence(tool_calls_json(m), 'json')}\n\n</details>")
    if m.response.strip():
        parts.append(m.response.strip("\n"))
    return "\n\n".join(parts)


def hidden_left_out(dialogue: Dialogue, with_ai: bool) -> int:
    """How many hidden messages a post leaves out (those it would show were they not hidden):
    what an export tells its user, who may want them (`with_hidden`)."""
    return len(visible_messages(dialogue, with_ai, True)) - len(visible_messages(dialogue, with_ai))


def to_markdown(dialogue: Dialogue, *, with_ai: bool = False, images: ImageMode = "inline",
                images_dir: str | None = None, title: bool = True,
                with_hidden: bool = False) -> MarkdownExport:
    """The dialogue as a Markdown post. `images="files"` returns image files under `images_dir`
    (default `<name>_files`, relative to the post) instead of inlining them. Hidden messages
    (hidden from the model) are left out unless `with_hidden`."""
    imgs = _Images(images, images_dir or f"{slug(dialogue.name)}_files")
    lang = code_language(dialogue)
    blocks: list[str] = []
    msgs = visible_messages(dialogue, with_ai, with_hidden)
    if title and not has_own_title(msgs):
        blocks.append(f"# {dialogue.name}")
    for m in msgs:
        if m.kind == Kind.note:
            text = resolve_attachments(m, imgs.url).strip("\n")
            if text:
                blocks.append(text)
        elif m.kind == Kind.raw:
            if raw_included(m, ("", "text/markdown", "text/x-markdown")) and m.source.strip():
                blocks.append(m.source.strip("\n"))
        elif m.kind == Kind.prompt:
            blocks.append(_prompt_md(m))
        else:
            code = strip_directives(m.source)
            if shows_input(m) and code.strip():
                blocks.append(fence(code, lang))
            if shows_output(m):
                for k, o in enumerate(merge_streams(m.outputs)):
                    md = _output_md(o, imgs, f"{m.id}-{k}")
                    if md:
                        blocks.append(md)
    return MarkdownExport(text="\n\n".join(blocks) + "\n", files=imgs.files)


def write_markdown(dialogue: Dialogue, path: str | Path, *, with_ai: bool = False,
                   images: ImageMode = "files", with_hidden: bool = False) -> Path:
    """Write the post to `path` and its images beside it (in `<stem>_files/`). Returns the path."""
    path = Path(path)
    export = to_markdown(dialogue, with_ai=with_ai, images=images,
                         images_dir=f"{slug(path.stem)}_files", with_hidden=with_hidden)
    for rel, data in export.files.items():
        target = path.parent / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    path.write_text(export.text, encoding="utf-8")
    return path
