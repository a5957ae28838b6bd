"""LoRA adapters for the local models: a registry of GGUF adapters checked against their base,
PEFT -> GGUF conversion on add, and merging adapters into a new adapter (never into a model).

Why adapters and not merged models: a user keeps one quantized base on disk and adds adapters of a
few megabytes; the runtime applies any set of them with scales at run time (llama.cpp's adapter
API, `Runtime.set_adapters`), so switching costs microseconds and no reload. Merging happens
between adapters: the result is again a small GGUF LoRA.

The registry is `adapters.json` beside the model registry (`models.data_dir()`, `DIALOGUE_HOME`
in tests). Files the registry created (PEFT conversions, merges, downloads copied in) live in
`<data dir>/adapters/` under a name that includes a content hash: the runtime loads an adapter
once per path and keeps it, so a replaced adapter must never reuse a path.

Checks on add mirror what llama.cpp itself refuses (`src/llama-adapter.cpp`), but before anything
is registered and with a message that names the tensor: `general.type=adapter`,
`adapter.type=lora`, the base's `general.architecture`, every `X.lora_a` paired with an
`X.lora_b`, `X` a tensor of the base, `lora_a` ne = [in, r] and `lora_b` ne = [r, out] where the
base tensor is ne = [in, out] (token embeddings are the one transposed case). The base's tensor
shapes are read once with gguf's `GGUFReader` (seconds: it parses the whole vocabulary) and kept
in the registry file by the base's content hash, so later checks are instant.

Merge methods (weights are per parent; each parent's delta is `alpha/r * B @ A` per target tensor):
- linear: `sum_i w_i * delta_i`, re-factorized exactly from the stacked factors (QR of the
  stacked B and A, SVD of the small core): at rank = sum of the parents' ranks it reproduces the
  weighted sum to float precision; lower ranks keep the best approximation (Eckart-Young).
- ties (Yadav et al. 2023): each weighted delta trimmed to its `density` largest magnitudes, a sign
  elected per entry from the sum, and the entries that agree with it averaged (weighted by w_i);
  then truncated SVD to `rank`.
- dare (Yu et al. 2023): each delta's entries dropped with probability 1 - `density` (seeded),
  survivors rescaled by 1/density, weighted sum; then truncated SVD to `rank`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from .models import ModelSpec, data_dir, model_hash
from .models import resolve as resolve_model
from .runtime import AdapterError

if TYPE_CHECKING:
    from gguf import GGUFReader

__all__ = [
    "AdapterError", "UnknownAdapterError", "AdapterMismatchError", "AdapterInfo", "LoraFile",
    "registry_path", "adapters_dir", "read_lora", "check_against_base", "add", "remove", "info",
    "list_adapters", "resolve_set", "load_factors", "write_lora", "merge_files", "merge",
    "copy_into_registry", "MERGE_METHODS",
]

MERGE_METHODS = ("linear", "ties", "dare")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/].*\.gguf)?$")
_TOKEN_EMBD = "token_embd.weight"


class UnknownAdapterError(AdapterError):
    """A name that is neither a registered adapter nor a path to a GGUF LoRA file."""


class AdapterMismatchError(AdapterError):
    """An adapter that does not fit a base model (architecture, a tensor the base lacks, a shape),
    or parents of a merge that do not fit each other."""


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise AdapterError("LoRA adapters need the `gguf` package: pip install 'gguf>=0.17'") from e
    return gguf


# ---------------------------------------------------------------- places

def registry_path() -> Path:
    return data_dir() / "adapters.json"


def adapters_dir() -> Path:
    """Where adapters the registry made itself (conversions, merges, downloads) are kept."""
    return data_dir() / "adapters"


# ---------------------------------------------------------------- reading GGUF LoRA files

@dataclass(frozen=True)
class LoraFile:
    """What a GGUF LoRA file declares. `pairs`: base tensor name -> (lora_a ne, lora_b ne), in
    ggml order (ne0 first), as llama.cpp sees them."""

    path: Path
    architecture: str
    alpha: float
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    meta: dict[str, Any]

    @property
    def ranks(self) -> list[int]:
        return sorted({b[0] for _, b in self.pairs.values()})

    @property
    def targets(self) -> list[str]:
        """Short GGUF names of the adapted tensors (`attn_q`, `ffn_down`, ...)."""
        out = set()
        for n in self.pairs:
            parts = n.split(".")
            out.add(parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0])
        return sorted(out)


def _reader(path: Path) -> "GGUFReader":
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:  # gguf raises ValueError on bad magic
        raise AdapterError(f"{path} is not a readable GGUF file ({e})") from e


def _field(reader: "GGUFReader", key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read and check a GGUF LoRA adapter's header (no tensor data). Refuses, with a message that
    says what is wrong, a file that is not a GGUF, a full model, another adapter kind, or one with
    unpaired or untransposed tensors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AdapterError(f"no such adapter file: {p}")
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise AdapterError(f"{p} is not a GGUF file (it does not start with 'GGUF'); a PEFT adapter "
                               "is a directory with adapter_config.json and adapter_model.safetensors")
    r = _reader(p)
    kind = _field(r, "general.type")
    if kind != "adapter":
        what = "a model" if kind in (None, "model") else repr(kind)
        raise AdapterError(f"{p} is {what}, not an adapter (general.type must be 'adapter')")
    if _field(r, "adapter.type") != "lora":
        raise AdapterError(f"{p} is a {_field(r, 'adapter.type')!r} adapter; only LoRA adapters "
                           "(adapter.type='lora') can be applied")
    arch = _field(r, "general.architecture")
    if not arch:
        raise AdapterError(f"{p} has no general.architecture; it cannot be matched to a base model")
    alpha = float(_field(r, "adapter.lora.alpha") or 0.0)
    a: dict[str, tuple[int, ...]] = {}
    b: dict[str, tuple[int, ...]] = {}
    for t in r.tensors:
        ne = tuple(int(x) for x in t.shape)
        if t.name.endswith(".lora_a"):
            a[t.name[:-7]] = ne
        elif t.name.endswith(".lora_b"):
            b[t.name[:-7]] = ne
        else:
            raise AdapterError(f"{p}: tensor {t.name!r} is not a LoRA tensor (.lora_a / .lora_b)")
    if not a and not b:
        raise AdapterError(f"{p} holds no LoRA tensors")
    for n in sorted(set(a) ^ set(b)):
        raise AdapterError(f"{p}: LoRA tensor {n!r} has only its {'lora_a' if n in a else 'lora_b'} half")
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for n in sorted(a):
        if len(a[n]) != 2 or len(b[n]) != 2:
            raise AdapterError(f"{p}: LoRA tensors of {n!r} must be 2-D, got {a[n]} and {b[n]}")
        if n != _TOKEN_EMBD and a[n][1] != b[n][0]:
            raise AdapterError(f"{p}: {n}.lora_a is {a[n]} and {n}.lora_b is {b[n]} (ggml order): their "
                               "ranks differ (an untransposed adapter from llama.cpp's old finetune?)")
        pairs[n] = (a[n], b[n])
    meta = {k: _plain(f.contents()) for k, f in r.fields.items()
            if k.startswith(("dialogue.", "general.name", "training.", "adapter."))}
    return LoraFile(p.resolve(), str(arch), alpha, pairs, meta)


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


# ---------------------------------------------------------------- the base's shapes

_base_cache: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {}
_lock = threading.RLock()


def _base_shapes(base: ModelSpec) -> tuple[str, str, dict[str, tuple[int, ...]]]:
    """(content hash, architecture, tensor name -> ne) of a base GGUF, from memory, the registry
    file, or (once per base) the file itself."""
    h = model_hash(base.path)
    with _lock:
        if h in _base_cache:
            return h, *_base_cache[h]
        doc = _read_doc()
        got = doc["bases"].get(h)
        if got:
            arch, shapes = got["architecture"], {k: tuple(v) for k, v in got["tensors"].items()}
        else:
            r = _reader(base.path)
            if _field(r, "general.type") == "adapter":
                raise AdapterError(f"{base.path} is an adapter, not a base model")
            arch = str(_field(r, "general.architecture"))
            shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
            doc["bases"][h] = {"architecture": arch, "file": base.path.name,
                               "tensors": {k: list(v) for k, v in shapes.items()}}
            _write_doc(doc)
        _base_cache[h] = (arch, shapes)
        return h, arch, shapes


def check_against_base(lora: LoraFile, base: str | ModelSpec = "default") -> str:
    """Refuse an adapter that does not fit the base (AdapterMismatchError naming the
    architecture, the tensor and both shapes); return the base's content hash."""
    spec = base if isinstance(base, ModelSpec) else resolve_model(base)
    h, arch, shapes = _base_shapes(spec)
    if lora.architecture != arch:
        raise AdapterMismatchError(
            f"{lora.path.name} is an adapter for a {lora.architecture!r} model, but {spec.name} is "
            f"{arch!r}: it was trained on another base")
    for n, (a, b) in lora.pairs.items():
        if n not in shapes:
            raise AdapterMismatchError(f"{lora.path.name} adapts tensor {n!r}, which {spec.name} does not have "
                                       "(an adapter for another model of the same architecture?)")
        w = shapes[n]
        if n == _TOKEN_EMBD:  # llama.cpp applies it to rows it gathers: A and B swap roles
            ok = len(w) == 2 and w[0] == b[1] and w[1] == a[1]
        else:
            ok = len(w) == 2 and w[0] == a[0] and w[1] == b[1]
        if not ok:
            raise AdapterMismatchError(
                f"{lora.path.name} does not fit {spec.name}: tensor {n!r} is {list(w)} in the base "
                f"(ggml order: in, out) but the adapter's lora_a is {list(a)} and lora_b {list(b)} "
                f"(expected lora_a [{w[0]}, r] and lora_b [r, {w[1] if len(w) > 1 else '?'}])")
    return h


# ---------------------------------------------------------------- registry file

@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter, as `dialogue adapters info` shows it. `targets`: the module names it
    was trained on if the file records them (`q_proj`...), else the GGUF tensor kinds (`attn_q`...).
    `provenance`: what it was trained or merged from, as far as the file, a sidecar JSON or the
    source recorded it."""

    name: str
    path: str
    base: str
    base_hash: str
    architecture: str
    rank: int | list[int]
    alpha: float
    targets: list[str]
    tensors: int
    size: int
    source: str          # gguf | peft | hub | merge
    origin: str          # the path or repository it was added from
    managed: bool        # the registry owns the file (rm deletes it)
    added: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _empty_doc() -> dict[str, Any]:
    return {"version": 1, "adapters": {}, "bases": {}}


def _read_doc() -> dict[str, Any]:
    p = registry_path()
    if not p.exists():
        return _empty_doc()
    try:
        doc = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"the adapter registry {p} is unreadable ({e}); fix or delete it") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("adapters"), dict):
        raise AdapterError(f"the adapter registry {p} has no 'adapters' table; fix or delete it")
    doc.setdefault("bases", {})
    return doc


def _write_doc(doc: dict[str, Any]) -> None:
    p = registry_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".adapters.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, p)  # a crash leaves the old registry or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _info(name: str, e: Mapping[str, Any]) -> AdapterInfo:
    return AdapterInfo(name=name, **{k: e[k] for k in AdapterInfo.__dataclass_fields__ if k != "name" and k in e})


def _entry(lora: LoraFile, *, base: ModelSpec, base_hash: str, source: str, origin: str, managed: bool,
           provenance: Mapping[str, Any]) -> dict[str, Any]:
    ranks = lora.ranks
    hf = lora.meta.get("dialogue.targets")
    return {"path": str(lora.path), "base": base.name, "base_hash": base_hash,
            "architecture": lora.architecture, "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": lora.alpha, "targets": hf.split(",") if isinstance(hf, str) and hf else lora.targets,
            "tensors": len(lora.pairs), "size": lora.path.stat().st_size, "source": source, "origin": origin,
            "managed": managed, "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "provenance": dict(provenance)}


def _register(name: str, entry: dict[str, Any]) -> AdapterInfo:
    """Write `entry` under `name`; a file the registry made for the entry it replaces is deleted."""
    with _lock:
        doc = _read_doc()
        old = doc["adapters"].get(name)
        doc["adapters"][name] = entry
        _write_doc(doc)
    if old and old.get("managed") and old["path"] != entry["path"]:
        Path(old["path"]).unlink(missing_ok=True)
    return _info(name, entry)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise AdapterError(f"bad adapter name {name!r}: use letters, digits, '.', '_' or '-' (max 64), "
                           "starting with a letter or digit")


def _default_name(s: str) -> str:
    stem = Path(s.rstrip("/")).name
    stem = stem.removesuffix(".gguf").removesuffix(".safetensors")
    if stem in ("adapter", "adapter_model", "") and len(Path(s.rstrip("/")).parts) > 1:
        stem = Path(s.rstrip("/")).parent.name  # `out/adapter.gguf` -> `out`
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem)[:64].lstrip(".-_") or "adapter"


def _sidecar(paths: Iterable[Path]) -> dict[str, Any]:
    """Training records next to an adapter: `<file>.json` or the trainer's `train_config.json`."""
    keep = ("model", "method", "quant", "r", "alpha", "targets", "steps", "seq_len", "sources",
            "final_loss", "dialogues", "docs", "trained_on")
    for p in paths:
        if p.is_file():
            try:
                d = json.loads(p.read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(d, dict):
                return {"file": str(p), **{k: d[k] for k in keep if k in d}}
    return {}


def _provenance(lora: LoraFile, sidecars: Iterable[Path], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    prov: dict[str, Any] = {}
    for k, v in lora.meta.items():
        if k.startswith("dialogue.") and k not in ("dialogue.rank", "dialogue.targets"):
            key = k.removeprefix("dialogue.")
            if key == "merge" and isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            prov[key] = v
    side = _sidecar(sidecars)
    if side:
        prov["training"] = side
    prov.update(extra or {})
    return prov


def _content_name(name: str, path: Path) -> Path:
    h = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return adapters_dir() / f"{name}-{h}.gguf"


def _adopt(tmp: Path, name: str) -> Path:
    """Move a file the registry made into adapters_dir under a content-hashed name."""
    dest = _content_name(name, tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def _download(repo: str) -> Path:
    """Fetch an adapter from the Hugging Face Hub: `owner/name` (a PEFT adapter, or a repo with one
    .gguf) or `owner/name/file.gguf`. Only ever on the user's explicit `adapters add REPO`."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as e:
        raise AdapterError("adding an adapter from the Hub needs `pip install huggingface_hub`") from e
    parts = repo.split("/")
    repo_id = "/".join(parts[:2])
    try:
        if len(parts) > 2:
            return Path(hf_hub_download(repo_id=repo_id, filename="/".join(parts[2:])))
        d = Path(snapshot_download(repo_id=repo_id, allow_patterns=[
            "*.gguf", "adapter_config.json", "adapter_model.safetensors", "*.json"]))
    except Exception as e:  # the SDK raises many kinds (offline, 404, gated, auth): all end here
        raise AdapterError(f"could not download the adapter {repo!r} from the Hugging Face Hub: {e}") from e
    if (d / "adapter_config.json").is_file():
        return d
    ggufs = sorted(d.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise AdapterError(f"{repo} holds neither a PEFT adapter nor a .gguf file")
    raise AdapterError(f"{repo} holds several .gguf files ({', '.join(g.name for g in ggufs[:6])}): "
                       f"add one as {repo_id}/<file>.gguf")


def _convert_peft(d: Path, base: ModelSpec, name: str) -> Path:
    """PEFT LoRA -> GGUF with the trainer's converter (`train.export.peft_to_gguf`: gguf-py's
    tensor name map, llama.cpp's q/k row permutation for llama bases, alpha), not a second copy."""
    try:
        from ..train.export import peft_to_gguf
    except ImportError as e:
        raise AdapterError("converting a PEFT adapter to GGUF needs the [train] extra (torch, "
                           "safetensors): pip install 'dialogue[train]'; or add a .gguf adapter") from e
    try:
        cfg = json.loads((d / "adapter_config.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{d}/adapter_config.json is unreadable ({e})") from e
    if cfg.get("use_dora"):
        raise AdapterError(f"{d} is a DoRA adapter: llama.cpp applies W + s*BA only, and DoRA also "
                           "rescales every output row by its magnitude vector; it cannot be served as GGUF")
    adapters_dir().mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=adapters_dir(), prefix=f".{name}.", suffix=".gguf")
    os.close(fd)
    try:
        peft_to_gguf(d, tmp, base.path, meta={"converted_from": str(d),
                                              "peft_base": str(cfg.get("base_model_name_or_path") or "")})
    except AdapterError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:  # the trainer's own AdapterError, safetensors and shape errors
        Path(tmp).unlink(missing_ok=True)
        raise AdapterMismatchError(f"could not convert the PEFT adapter {d} for {base.name}: {e}") from e
    return Path(tmp)


def add(path_or_repo: str | os.PathLike[str], name: str | None = None, *, base: str | ModelSpec | None = None,
        replace: bool = False) -> AdapterInfo:
    """Register an adapter for a base model (`base`: a local model name, default the bundled one).

    A GGUF LoRA file is checked against the base and registered where it is (like a model, the file
    stays the user's). A PEFT directory (adapter_config.json + adapter_model.safetensors) is
    converted to GGUF into the registry's own folder. Anything else that is not a path but looks
    like `owner/name[/file.gguf]` is downloaded from the Hub first. Nothing is registered unless
    every check passes."""
    spec = base if isinstance(base, ModelSpec) else resolve_model(base or "default")
    src = str(path_or_repo)
    p = Path(src).expanduser()
    source, origin = "gguf", str(p.resolve()) if p.exists() else src
    if not p.exists():
        if not _REPO_RE.match(src) or src.startswith((".", "/", "~")):
            raise AdapterError(f"no such adapter file or directory: {src} (to download one from the "
                               "Hugging Face Hub, give owner/name or owner/name/file.gguf)")
        p, source = _download(src), "hub"
    if name is None:
        name = _default_name(src)
    _check_name(name)
    with _lock:
        doc = _read_doc()
        if name in doc["adapters"] and not replace:
            raise AdapterError(f"adapter {name!r} is already registered (to {doc['adapters'][name]['path']}); "
                               "remove it first or pass replace=True")
    managed = False
    extra: dict[str, Any] = {}
    sidecars: list[Path]
    if p.is_dir():
        if not (p / "adapter_config.json").is_file() or not (p / "adapter_model.safetensors").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1 and not (p / "adapter_config.json").exists():
                p = ggufs[0]
            else:
                raise AdapterError(f"{p} is not a PEFT adapter directory (it needs adapter_config.json and "
                                   "adapter_model.safetensors) and holds no single .gguf adapter")
    if p.is_dir():
        gguf_path = _convert_peft(p, spec, name)
        managed = True
        source = "peft" if source == "gguf" else source
        sidecars = [p / "train_config.json", p.parent / "train_config.json"]
    else:
        gguf_path = p
        sidecars = [p.with_name(p.name + ".json"), p.with_suffix(".json"), p.parent / "train_config.json"]
    try:
        lora = read_lora(gguf_path)
        h = check_against_base(lora, spec)
        if source == "hub":
            extra["repo"] = src
        prov = _provenance(lora, sidecars, extra)
        if managed:
            gguf_path = _adopt(gguf_path, name)
            lora = read_lora(gguf_path)
    except BaseException:
        if managed:
            Path(gguf_path).unlink(missing_ok=True)
        raise
    entry = _entry(lora, base=spec, base_hash=h, source=source, origin=origin, managed=managed, provenance=prov)
    return _register(name, entry)


def remove(name: str) -> None:
    """Forget a registered adapter; delete its file only if the registry made it (a conversion, a
    merge): a file the user added by path stays theirs."""
    with _lock:
        doc = _read_doc()
        if name not in doc["adapters"]:
            raise UnknownAdapterError(f"no registered adapter named {name!r}"
                                      + _known(doc["adapters"]))
        e = doc["adapters"].pop(name)
        _write_doc(doc)
    if e.get("managed"):
        Path(e["path"]).unlink(missing_ok=True)


def _known(adapters: Mapping[str, Any]) -> str:
    return f" (registered: {', '.join(sorted(adapters))})" if adapters else " (none is registered)"


def list_adapters() -> list[AdapterInfo]:
    return [_info(n, e) for n, e in sorted(_read_doc()["adapters"].items())]


def info(name_or_path: str | os.PathLike[str]) -> AdapterInfo:
    """A registered adapter, or (for a path) what the file itself says, checked against nothing."""
    key = str(name_or_path)
    doc = _read_doc()
    if key in doc["adapters"]:
        return _info(key, doc["adapters"][key])
    p = Path(key).expanduser()
    if p.is_file():
        lora = read_lora(p)
        ranks = lora.ranks
        hf = lora.meta.get("dialogue.targets")
        return AdapterInfo(name=p.stem, path=str(lora.path), base=str(lora.meta.get("dialogue.base", "")),
                           base_hash="", architecture=lora.architecture,
                           rank=ranks[0] if len(ranks) == 1 else ranks, alpha=lora.alpha,
                           targets=hf.split(",") if isinstance(hf, str) and hf else lora.targets,
                           tensors=len(lora.pairs), size=p.stat().st_size, source="file", origin=str(p),
                           managed=False, provenance=_provenance(lora, [p.with_name(p.name + ".json"),
                                                                        p.parent / "train_config.json"]))
    raise UnknownAdapterError(f"unknown adapter {key!r}" + _known(doc["adapters"]))


# ---------------------------------------------------------------- the service's entry point

def _scale(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise AdapterError(f"the scale of adapter {key!r} must be a number, got {v!r}")
    s = float(v)
    if not math.isfinite(s):
        raise AdapterError(f"the scale of adapter {key!r} must be finite, got {v!r}")
    return s


def looks_like_path(key: str) -> bool:
    """Whether an entry of an adapter set names a file rather than a registered adapter."""
    return key.endswith(".gguf") or "/" in key or os.sep in key or key.startswith("~")


def resolve_set(adapters: Mapping[str, Any] | None, *, base: str | ModelSpec | None = None) -> dict[str, float]:
    """{registered name or .gguf path: scale} -> {absolute file path: scale}, what
    `Runtime.set_adapters` and `request.meta["adapters"]` take.

    Unknown names raise UnknownAdapterError listing the registered ones; scales must be finite
    numbers; a scale of 0 means "off" and is left out (so it shares the KV cache of the set
    without it). With `base`, every adapter must fit it: one registered for another base file is
    re-checked against this one (shapes and architecture, from the cached base shapes) and
    refused with AdapterMismatchError if it does not fit."""
    if not adapters:
        return {}
    if not isinstance(adapters, Mapping):
        raise AdapterError(f"an adapter set is a mapping {{name: scale}}, got {type(adapters).__name__}")
    spec: ModelSpec | None = None
    if base is not None:
        spec = base if isinstance(base, ModelSpec) else resolve_model(base)
    doc = _read_doc()
    reg = doc["adapters"]
    out: dict[str, float] = {}
    for key, v in adapters.items():
        key = str(key)
        s = _scale(key, v)
        if s == 0.0:
            continue
        if key in reg:
            e = reg[key]
            p = Path(e["path"])
            if not p.is_file():
                raise AdapterError(f"registered adapter {key!r} points to {p}, which no longer exists; "
                                   f"`dialogue adapters rm {key}` and add it again")
            if spec is not None and e.get("base_hash") != model_hash(spec.path):
                check_against_base(read_lora(p), spec)
        elif looks_like_path(key):
            p = Path(key).expanduser()
            lora = read_lora(p)
            if spec is not None:
                check_against_base(lora, spec)
        else:
            raise UnknownAdapterError(f"unknown adapter {key!r}" + _known(reg)
                                      + "; give a registered name or a path to a .gguf LoRA file")
        path = str(p.resolve())
        out[path] = out.get(path, 0.0) + s  # one file named twice: the scales add up, as the deltas would
    return {p: s for p, s in out.items() if s != 0.0}


# ---------------------------------------------------------------- tensors

def load_factors(path: str | os.PathLike[str]) -> tuple[LoraFile, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A GGUF LoRA's factors as float64 (A: r x in, B: out x r) per base tensor, with llama.cpp's
    scale alpha/r folded into B, so that the tensor's delta is exactly `B @ A` at adapter scale 1."""
    gguf = _gguf()
    lora = read_lora(path)
    r = _reader(lora.path)
    data: dict[str, np.ndarray] = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        data[t.name] = np.array(arr, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for n in lora.pairs:
        A, B = data[f"{n}.lora_a"], data[f"{n}.lora_b"]
        rank = B.shape[1]
        scale = lora.alpha / rank if lora.alpha else 1.0  # llama.cpp: alpha 0 means "no alpha scaling"
        out[n] = (A, B * scale)
    return lora, out


def write_lora(path: str | os.PathLike[str], architecture: str,
               factors: Mapping[str, tuple[np.ndarray, np.ndarray]], *, alpha: float | None = None,
               meta: Mapping[str, Any] | None = None, dtype: str = "f16") -> Path:
    """Write a GGUF LoRA adapter llama.cpp loads: factors A (r x in) and B (out x r) per base tensor
    name (`blk.0.attn_q.weight`). `alpha` None writes alpha = rank (scale 1: B @ A is the delta as
    given); every tensor must then have the same rank. The file appears atomically."""
    gguf = _gguf()
    if dtype not in ("f16", "f32"):
        raise AdapterError(f"adapter dtype must be f16 or f32, got {dtype!r}")
    if not factors:
        raise AdapterError("an adapter needs at least one tensor")
    ranks = {B.shape[1] for _, B in factors.values()}
    if alpha is None:
        if len(ranks) != 1:
            raise AdapterError(f"alpha=None needs one rank for every tensor, got {sorted(ranks)}")
        alpha = float(next(iter(ranks)))
    for n, (A, B) in factors.items():
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"factors of {n!r} do not chain: A {A.shape}, B {B.shape}")
    np_dt = np.float16 if dtype == "f16" else np.float32
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, architecture)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        for k, v in (meta or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                w.add_string(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
            elif isinstance(v, int):
                w.add_uint32(k, v)
            else:
                w.add_float32(k, v)
        for n in sorted(factors):
            A, B = factors[n]
            w.add_tensor(f"{n}.lora_a", np.ascontiguousarray(A, dtype=np_dt))  # (r, in)  -> ne [in, r]
            w.add_tensor(f"{n}.lora_b", np.ascontiguousarray(B, dtype=np_dt))  # (out, r) -> ne [r, out]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- merging

def _exact_lowrank(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k factors of sum_i B_i A_i without forming the dense matrix: with
    B = [B_1 .. B_n] = Qb Rb and A^T = [A_1; ..; A_n]^T = Qa Ra, the sum is Qb (Rb Ra^T) Qa^T, and
    the SVD of the small core gives the singular vectors. Exact at k = sum of ranks."""
    B = np.concatenate(Bs, axis=1)
    A = np.concatenate(As, axis=0)
    Qb, Rb = np.linalg.qr(B)
    Qa, Ra = np.linalg.qr(A.T)
    U, S, Vt = np.linalg.svd(Rb @ Ra.T)
    k = min(k, len(S))
    sq = np.sqrt(S[:k])
    return (Qb @ U[:, :k]) * sq, (sq[:, None] * Vt[:k]) @ Qa.T


def _truncated_svd(M: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rank-k factors (B, A) of a dense matrix. Randomized range finder with power iterations
    (Halko, Martinsson & Tropp 2011) for large matrices: numpy has no truncated SVD, scipy is not a
    dependency, and the exact SVD of every delta of even a 135M model took about a minute here."""
    m, n = M.shape
    k = min(k, m, n)
    if min(m, n) <= 4 * k + 32:
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
    else:
        p = min(min(m, n), 2 * k + 16)
        Y = M @ rng.standard_normal((n, p))
        for _ in range(2):  # power iterations sharpen the spectrum; QR keeps them stable
            Q, _ = np.linalg.qr(Y)
            Z, _ = np.linalg.qr(M.T @ Q)
            Y = M @ Z
        Q, _ = np.linalg.qr(Y)
        Ub, S, Vt = np.linalg.svd(Q.T @ M, full_matrices=False)
        U = Q @ Ub
    sq = np.sqrt(S[:k])
    return U[:, :k] * sq, sq[:, None] * Vt[:k]


class _one_blas_thread:
    """Run numpy's BLAS/LAPACK on one thread while merging. The merge makes thousands of small
    QR/SVD calls; OpenBLAS's thread pool spinning at each of them, next to torch's OpenMP pool or
    other busy processes, was measured 3-60x slower here than one thread. threadpoolctl is the
    maintained way to set that at run time; without it the merge is merely slower."""

    def __enter__(self) -> "_one_blas_thread":
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self._ctl = None
        else:
            self._ctl = threadpool_limits(1, user_api="blas")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctl is not None:
            self._ctl.restore_original_limits()


def _pad(B: np.ndarray, A: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad factors to rank k, so the whole adapter has one rank (alpha = rank means scale 1)."""
    r = B.shape[1]
    if r == k:
        return B, A
    return (np.concatenate([B, np.zeros((B.shape[0], k - r))], axis=1),
            np.concatenate([A, np.zeros((k - r, A.shape[1]))], axis=0))


def _merge_tensors(loaded: Sequence[tuple[LoraFile, dict[str, tuple[np.ndarray, np.ndarray]]]],
                   w: Sequence[float], shapes: Mapping[str, tuple[int, int]], method: str, k: int, dens: float,
                   rng: np.random.Generator, svd_rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per base tensor: the parents' weighted deltas combined by `method`, as rank-k (A, B)."""
    merged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for n in sorted(shapes):
        present = [(wi, fac[n]) for wi, (_, fac) in zip(w, loaded) if n in fac]
        if method == "linear":
            B, A = _exact_lowrank([wi * B for wi, (A, B) in present], [A for _, (A, B) in present], k)
        else:
            deltas = np.stack([wi * (B @ A) for wi, (A, B) in present])  # weighted task vectors
            if method == "ties":
                flat = np.abs(deltas).reshape(len(present), -1)
                keep = max(1, int(round(dens * flat.shape[1])))
                thr = np.partition(flat, flat.shape[1] - keep, axis=1)[:, flat.shape[1] - keep]
                deltas = np.where(np.abs(deltas) >= thr[:, None, None], deltas, 0.0)
                sign = np.sign(deltas.sum(axis=0))
                agree = (np.sign(deltas) == sign) & (deltas != 0)
                wts = np.array([wi for wi, _ in present])[:, None, None] * agree
                denom = wts.sum(axis=0)
                # each delta already carries its weight: the weighted mean of the agreeing deltas
                # w_i*d_i over the sum of their weights
                dense = np.where(denom != 0, (deltas * agree).sum(axis=0) / np.where(denom == 0, 1, denom), 0.0)
            else:  # dare
                masks = rng.random(deltas.shape) < dens
                dense = (deltas * masks).sum(axis=0) / dens
            B, A = _truncated_svd(dense, k, svd_rng)
        B, A = _pad(B, A, k)
        merged[n] = (A, B)
    return merged


def merge_files(parents: Sequence[str | os.PathLike[str]], weights: Sequence[float], out: str | os.PathLike[str],
                *, method: str = "linear", rank: int | None = None, density: float | None = None,
                seed: int = 0, dtype: str = "f16", meta: Mapping[str, Any] | None = None) -> Path:
    """Merge GGUF LoRA adapters into a new GGUF LoRA adapter at `out` (see the module docstring for
    the methods). `rank` defaults to the sum of the parents' ranks for linear (exact) and their
    largest rank for ties/dare; `density` (fraction kept) defaults to 0.5. Parents must adapt the
    same architecture with the same tensor shapes; a tensor only some parents adapt counts as
    zero in the others."""
    if method not in MERGE_METHODS:
        raise AdapterError(f"unknown merge method {method!r}: use one of {', '.join(MERGE_METHODS)}")
    if len(parents) < 1:
        raise AdapterError("merge needs at least one parent adapter")
    if len(weights) != len(parents):
        raise AdapterError(f"{len(parents)} adapters but {len(weights)} weights: give one weight per adapter")
    w = [_scale(str(p), x) for p, x in zip(parents, weights)]
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if density is not None and not (0.0 < density <= 1.0):
        raise AdapterError(f"density must be in (0, 1], got {density!r}")
    if method == "linear" and density is not None:
        raise AdapterError("density applies to ties and dare only")
    dens = 0.5 if density is None else float(density)
    loaded = [load_factors(p) for p in parents]
    arch = loaded[0][0].architecture
    shapes: dict[str, tuple[int, int]] = {}
    for lora, fac in loaded:
        if lora.architecture != arch:
            raise AdapterMismatchError(f"cannot merge a {lora.architecture!r} adapter ({lora.path.name}) with a "
                                       f"{arch!r} one ({loaded[0][0].path.name})")
        for n, (A, B) in fac.items():
            if n == _TOKEN_EMBD:
                raise AdapterError(f"{lora.path.name} adapts the token embeddings, which llama.cpp applies "
                                   "transposed; merging such adapters is not supported")
            s = (B.shape[0], A.shape[1])
            if shapes.setdefault(n, s) != s:
                raise AdapterMismatchError(f"cannot merge: tensor {n!r} is {shapes[n]} (out, in) in one parent "
                                           f"and {s} in {lora.path.name}: the parents are for different bases")
    parent_ranks = [max(lora.ranks) for lora, _ in loaded]
    k = rank or (sum(parent_ranks) if method == "linear" else max(parent_ranks))
    rng = np.random.default_rng(seed)
    svd_rng = np.random.default_rng([seed, 1])
    with _one_blas_thread():
        merged = _merge_tensors(loaded, w, shapes, method, k, dens, rng, svd_rng)
    info_meta = {"method": method, "rank": k, "weights": w, "seed": seed if method == "dare" else None,
                 "density": dens if method != "linear" else None,
                 "parents": [{"file": lora.path.name, "hash": model_hash(lora.path)[:16]} for lora, _ in loaded]}
    m = {"dialogue.merge": info_meta, "dialogue.rank": k}
    bases = {lora.meta.get("dialogue.base") for lora, _ in loaded} - {None}
    if len(bases) == 1:
        m["dialogue.base"] = bases.pop()
    m.update(meta or {})
    return write_lora(out, arch, merged, alpha=None, meta=m, dtype=dtype)


def merge(parents: Sequence[str], weights: Sequence[float], out_name: str, *, method: str = "linear",
          rank: int | None = None, density: float | None = None, seed: int = 0, dtype: str = "f16",
          replace: bool = False) -> AdapterInfo:
    """Merge registered adapters (or .gguf paths) into a new registered adapter `out_name`, kept in
    the registry's folder. The parents must belong to one base; the result is checked against it."""
    _check_name(out_name)
    doc = _read_doc()
    if out_name in doc["adapters"] and not replace:
        raise AdapterError(f"adapter {out_name!r} is already registered; choose another --out or remove it")
    paths: list[str] = []
    bases: dict[str, str] = {}
    for p in parents:
        e = doc["adapters"].get(str(p))
        if e is not None:
            paths.append(e["path"])
            bases[e["base_hash"]] = e["base"]
        elif looks_like_path(str(p)) and Path(p).expanduser().is_file():
            paths.append(str(Path(p).expanduser().resolve()))
        else:
            raise UnknownAdapterError(f"unknown adapter {p!r}" + _known(doc["adapters"]))
    if len(bases) > 1:
        raise AdapterMismatchError(f"the adapters belong to different bases ({', '.join(sorted(bases.values()))}): "
                                   "merge adapters of one base")
    base_name = next(iter(bases.values()), "default")
    spec = resolve_model(base_name)
    adapters_dir().mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=adapters_dir(), prefix=f".{out_name}.", suffix=".gguf")
    os.close(fd)
    try:
        merge_files(paths, weights, tmp, method=method, rank=rank, density=density, seed=seed, dtype=dtype,
                    meta={"dialogue.parents": ",".join(str(p) for p in parents)})
        lora = read_lora(tmp)
        h = check_against_base(lora, spec)
        prov = _provenance(lora, [])
        dest = _adopt(Path(tmp), out_name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    lora = read_lora(dest)
    entry = _entry(lora, base=spec, base_hash=h, source="merge", origin=" + ".join(str(p) for p in parents),
                   managed=True, provenance=prov)
    return _register(out_name, entry)


def copy_into_registry(path: str | os.PathLike[str], name: str | None = None, *,
                       base: str | ModelSpec | None = None, replace: bool = False) -> AdapterInfo:
    """Register a copy of a GGUF adapter that the registry owns (for a file in a temporary place,
    e.g. a training run's output the user will delete); `rm` deletes the copy. A PEFT directory
    or a Hub repo goes through `add`, whose conversion is already the registry's own file."""
    src = Path(path).expanduser()
    if not src.is_file():
        return add(path, name, base=base, replace=replace)
    name = name or _default_name(str(path))
    _check_name(name)
    read_lora(src)
    if name in _read_doc()["adapters"] and not replace:
        raise AdapterError(f"adapter {name!r} is already registered; remove it first or pass replace=True")
    adapters_dir().mkdir(parents=True, exist_ok=True)
    dest = _content_name(name, src)
    existed = dest.exists()
    shutil.copyfile(src, dest)
    try:
        add(dest, name, base=base, replace=replace)
    except BaseException:
        if not existed:
            dest.unlink(missing_ok=True)
        raise
    with _lock:
        doc = _read_doc()
        e = doc["adapters"][name]
        e.update(managed=True, origin=str(src.resolve()))
        e["provenance"] = _provenance(read_lora(dest), [src.with_name(src.name + ".json"), src.parent / "train_config.json"])
        _write_doc(doc)
    return info(name)
