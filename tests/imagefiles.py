"""Real image files for tests, made here (no binary fixtures to keep in step)."""
from __future__ import annotations

import base64
import os
import struct
import zlib


def png(w: int = 3, h: int = 2, rgb: bytes = b"\xff\x00\x00") -> bytes:
    """A real PNG (`w` x `h` pixels of one colour), written with zlib as the format says."""
    return _png(w, h, b"".join(b"\x00" + rgb * w for _ in range(h)))


def noise_png(w: int, h: int) -> bytes:
    """A real PNG of random pixels: it does not compress, so it is about 3 * w * h bytes."""
    return _png(w, h, b"".join(b"\x00" + os.urandom(3 * w) for _ in range(h)), level=1)


def _png(w: int, h: int, rows: bytes, level: int = 6) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, level)) + chunk(b"IEND", b""))


PNG = png()
B64 = base64.b64encode(PNG).decode()
