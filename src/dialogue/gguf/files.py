"""Reading GGUF files: one reader for models and adapters, cached for bases.

gguf-py's `GGUFReader` parses the whole metadata on open, vocabulary included: seconds for a
large-vocabulary base (Gemma's 262k tokens: about 9 s here). A base's reader is therefore kept per
file and process (`read`), keyed by path, size and mtime so a file replaced in place is read
again; the tensors themselves are a memory map, nothing is read until used. Adapters are small and
are often written, checked and moved within a second: they are read with `cache=False`.

The tensor name map (Hugging Face module names -> GGUF tensor names) is gguf-py's, the same one
transformers and llama.cpp's converters use.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor, TensorNameMap

__all__ = ["GGUFError", "GGUFFile", "is_gguf", "read", "name_map"]

MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A file that is not a readable GGUF, or an architecture gguf-py does not know. Serving and
    training wrap it in their own error types (AdapterError, ModelLoadError, UnknownModelError)."""


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """An open GGUF: its reader and its tensors by name (ggml order shapes: ne0 first)."""

    path: Path
    reader: "GGUFReader"
    tensors: dict[str, "ReaderTensor"]

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @property
    def kind(self) -> str:
        """`general.type`: "model" (also when absent, as in older files) or "adapter"."""
        return str(self.field("general.type") or "model")

    @property
    def architecture(self) -> str:
        arch = self.field("general.architecture")
        if not arch:
            raise GGUFError(f"{self.path.name} has no general.architecture")
        return str(arch)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(int(x) for x in t.shape) for n, t in self.tensors.items()}


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether a file starts with the GGUF magic (cheap: four bytes, before any parsing)."""
    try:
        with Path(path).open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # a core dependency; missing only in a broken install
        raise GGUFError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.17'") from e
    return gguf


def _open(path: Path) -> GGUFFile:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError on a bad magic, struct/index errors on a cut file
        raise GGUFError(f"{path} is not a readable GGUF file ({e})") from e
    return GGUFFile(path, reader, {t.name: t for t in reader.tensors})


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return _open(Path(path))


def read(path: str | os.PathLike[str], *, cache: bool = True) -> GGUFFile:
    """Open a GGUF file. With `cache` (for bases) the parsed file is kept per (path, size, mtime)
    for the life of the process."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise GGUFError(f"no such GGUF file: {p}") from e
    if not cache:
        return _open(p)
    return _open_cached(str(p), st.st_size, st.st_mtime_ns)


def name_map(arch: str, n_layers: int) -> "TensorNameMap":
    """gguf-py's map from Hugging Face module names to GGUF tensor names for an architecture."""
    gguf = _gguf()
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise GGUFError(f"gguf-py does not know the architecture {arch!r}")
    return gguf.get_tensor_name_map(arch_enum, n_layers)
