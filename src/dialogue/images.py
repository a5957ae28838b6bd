"""Images a user puts in a note or a prompt: checked, named and stored the way a notebook stores
them, as the message's nbformat cell attachments ``{"name.png": {"image/png": "<base64>"}}``,
referenced from the markdown as ``![name.png](attachment:name.png)``. So an .ipynb export carries
them and an import brings them back, and the page, the exports and the model request all read the
one copy.

What is accepted: PNG, JPEG, GIF and WebP (what Claude and OpenAI both take as image input), told
apart by their first bytes, never by a file name or a browser's claim; at most `MAX_IMAGE_BYTES`
(5 MiB, Claude's limit per image and under OpenAI's), so any image a dialogue holds can be sent.
Anything else is refused with an `ImageError` that says what the data is and what would do.

A leaf: imports nothing of ours (the service, context building and rendering all use it).
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["ImageError", "IMAGE_MIMES", "MAX_IMAGE_BYTES", "MAX_IMAGES", "sniff", "image_bundle",
           "read_image", "attachment_name", "image_ref", "decoded_size", "image_of",
           "with_images", "describe_size", "referenced", "check_base64"]

IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp")
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_IMAGES = 20
"""Images one message may hold: Claude takes at most 20 per request from its web clients and
100 through the API; a note with more is better split."""

_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ImageError(ValueError):
    """Data that cannot be a message's image (not an image we accept, too big, unreadable)."""


def sniff(data: bytes) -> str | None:
    """The image type of `data` by its signature, or None. Four fixed signatures (the formats'
    own specifications); a library (filetype, python-magic) would add a dependency, or a native
    one, for these four comparisons."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def describe_size(n: int) -> str:
    """Bytes in words, in the units of the limit: "812 bytes", "48.2 KiB", "7.1 MiB"."""
    if n < 1024:
        return f"{n:,} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def _limit_words() -> str:
    return f"{MAX_IMAGE_BYTES // (1024 * 1024)} MiB"


def image_bundle(data: bytes, *, what: str = "the image") -> dict[str, str]:
    """`data` as a notebook attachment bundle {mime: base64}, after checking it is a PNG, JPEG,
    GIF or WebP of at most MAX_IMAGE_BYTES (ImageError otherwise, naming `what`)."""
    if not data:
        raise ImageError(f"{what} is empty")
    mime = sniff(data)
    if mime is None:
        head = data[:16]
        kind = "text" if _looks_like_text(head) else "binary data"
        raise ImageError(f"{what} is not an image we can attach ({kind} starting {head[:8]!r}): "
                         "use a PNG, JPEG, GIF or WebP file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{what} is {describe_size(len(data))}, over the {_limit_words()} an "
                         "image may be (the most Claude accepts): make it smaller (crop, scale "
                         "down, or save as JPEG)")
    return {mime: base64.b64encode(data).decode("ascii")}


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_image(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(file name, bundle) for an image file, checked as `image_bundle` does."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageError(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    size = p.stat().st_size
    if size > MAX_IMAGE_BYTES:  # before reading a 2 GB video into memory
        raise ImageError(f"{p} is {describe_size(size)}, over the {_limit_words()} an image may "
                         "be (the most Claude accepts): make it smaller (crop, scale down, or "
                         "save as JPEG)")
    return p.name, image_bundle(p.read_bytes(), what=str(p))


def attachment_name(name: str, mime: str, taken: Iterable[str] = ()) -> str:
    """A name for a new attachment: `name` reduced to letters, digits, dot, dash and underscore
    (so it needs no escaping in a markdown link), with the extension of its type, made unique
    among `taken` ("image.png", "image-2.png", ...). A pasted screenshot has no name: "image"."""
    stem = Path(name or "").stem
    stem = _SAFE.sub("-", stem).strip("-.") or "image"
    ext = _EXT.get(mime, "bin")
    taken = set(taken)
    out, n = f"{stem[:60]}.{ext}", 1
    while out in taken:
        n += 1
        out = f"{stem[:60]}-{n}.{ext}"
    return out


def image_ref(name: str) -> str:
    """The markdown that shows attachment `name` (a name from `attachment_name`)."""
    return f"![{name}](attachment:{name})"


def decoded_size(b64: str) -> int:
    """Bytes a base64 text decodes to (without decoding it)."""
    s = re.sub(r"[^A-Za-z0-9+/=]", "", b64)
    return len(s) * 3 // 4 - (s.endswith("=")) - (s.endswith("=="))


def image_of(bundle: Any) -> tuple[str, str] | None:
    """(mime, base64 text) of an attachment bundle's image in a type we accept, or None."""
    if not isinstance(bundle, Mapping):
        return None
    for mime in IMAGE_MIMES:
        if mime in bundle:
            v = bundle[mime]
            return mime, "".join(v) if isinstance(v, list) else str(v)
    return None


def with_images(source: str, attachments: Mapping[str, Any],
                images: Iterable[str | os.PathLike | bytes | tuple[str, bytes]]
                ) -> tuple[str, dict[str, Any]]:
    """(source, attachments) with `images` added: each a file path, raw bytes, or (name, bytes).
    Each is checked (ImageError names the bad one; nothing is added then), named uniquely, and
    referenced on a line of its own at the end of the source."""
    atts = dict(attachments)
    refs: list[str] = []
    for img in images:
        if isinstance(img, (bytes, bytearray)):
            name, bundle = "image", image_bundle(bytes(img))
        elif isinstance(img, tuple):
            name, bundle = img[0], image_bundle(bytes(img[1]), what=str(img[0]))
        else:
            name, bundle = read_image(img)
        mime = next(iter(bundle))
        name = attachment_name(name, mime, atts)
        atts[name] = bundle
        refs.append(image_ref(name))
    if len([a for a in atts.values() if image_of(a)]) > MAX_IMAGES:
        raise ImageError(f"a message can hold at most {MAX_IMAGES} images; split the rest "
                         "into another note")
    if refs:
        source = source.rstrip("\n") + ("\n\n" if source.strip() else "") + "\n".join(refs)
    return source, atts


def referenced(source: str, attachments: Mapping[str, Any]) -> dict[str, Any]:
    """The attachments `source` still refers to (`attachment:NAME`, the name as written or
    percent-encoded), in their order."""
    from urllib.parse import unquote
    names = {unquote(x) for x in re.findall(r"attachment:([^\s)\"'>`]+)", source)}
    return {n: v for n, v in attachments.items() if n in names or unquote(n) in names}


def check_base64(data: str, what: str) -> bytes:
    """Decode an attachment's base64 text, or ImageError naming `what`."""
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what} is not valid base64") from None
