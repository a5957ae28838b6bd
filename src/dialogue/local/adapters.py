"""LoRA adapters for the local models: a registry of GGUF adapters checked against their base,
PEFT -> GGUF conversion on add, and merged adapters registered as new ones (never merged into a model).

Why adapters and not merged models: a user keeps one quantized base on disk and adds adapters of a
few megabytes; the runtime applies any set of them with scales at run time (llama.cpp's adapter
API, `Runtime.set_adapters`), so switching costs microseconds and no reload. Merging happens
between adapters: the result is again a small GGUF LoRA.

The registry is `adapters.json` beside the model registry (`models.data_dir()`, `DIALOGUE_HOME`
in tests). Files the registry created (PEFT conversions, merges, downloads copied in) live in
`<data dir>/adapters/` under a name that includes a content hash: the runtime loads an adapter
once per path and keeps it, so a replaced adapter must never reuse a path.

An adapter is checked against its base before anything is registered (`gguf.lora.check_fits`:
architecture, every tensor present, shapes). The base's tensor shapes are read once (seconds: gguf
parses the whole vocabulary) and kept in the registry file by the base's content hash, so later
checks are instant. Reading, writing and converting the files is `dialogue.gguf.lora`; merging is
`local.merge`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..gguf import files
from ..gguf.lora import (AdapterError, AdapterMismatchError, LoraFile, check_fits, check_scale, peft_to_gguf,
                         read_lora)
from ..gguf.models import ModelSpec, data_dir, model_hash, registry_lock
from ..gguf.models import resolve as resolve_model
from ..progress import OnProgress, Steps
from .merge import MERGE_METHODS, merge_files

__all__ = [
    "UnknownAdapterError", "AdapterInfo", "registry_path", "adapters_dir", "check_against_base", "add", "remove",
    "info", "list_adapters", "resolve_set", "merge", "copy_into_registry", "looks_like_path", "MERGE_METHODS",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/].*\.gguf)?$")


class UnknownAdapterError(AdapterError):
    """A name that is neither a registered adapter nor a path to a GGUF LoRA file."""


# ---------------------------------------------------------------- places

def registry_path() -> Path:
    return data_dir() / "adapters.json"


def adapters_dir() -> Path:
    """Where adapters the registry made itself (conversions, merges, downloads) are kept."""
    return data_dir() / "adapters"


# ---------------------------------------------------------------- the base's shapes

_base_cache: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {}


def _lock() -> Any:
    """The registry held across threads and processes (the CLI and a server both write it)."""
    return registry_lock(registry_path())


def _base_shapes(base: ModelSpec, on_progress: OnProgress | None = None) -> tuple[str, str, dict[str, tuple[int, ...]]]:
    """(content hash, architecture, tensor name -> ne) of a base GGUF, from memory, the registry
    file, or (once per base) the file itself: that scan is reported to `on_progress`."""
    h = model_hash(base.path)
    with _lock():
        if h in _base_cache:
            return h, *_base_cache[h]
        doc = _read_doc()
        got = doc["bases"].get(h)
        if got:
            arch, shapes = got["architecture"], {k: tuple(v) for k, v in got["tensors"].items()}
        else:
            try:
                # gguf-py reads the whole tensor table in one call: a spinner, not a bar
                with Steps(on_progress, f"reading the tensor shapes of {base.path.name}", total=None):
                    g = files.read(base.path)  # the one cached reader of a base (training's too)
                    kind, arch, shapes = g.kind, g.architecture, g.shapes()
            except files.GGUFError as e:
                raise AdapterError(str(e)) from e
            if kind == "adapter":
                raise AdapterError(f"{base.path} is an adapter, not a base model")
            doc["bases"][h] = {"architecture": arch, "file": base.path.name,
                               "tensors": {k: list(v) for k, v in shapes.items()}}
            _write_doc(doc)
        _base_cache[h] = (arch, shapes)
        return h, arch, shapes


def check_against_base(lora: LoraFile, base: str | ModelSpec = "default",
                       on_progress: OnProgress | None = None) -> str:
    """Refuse an adapter that does not fit the base (AdapterMismatchError naming the
    architecture, the tensor and both shapes); return the base's content hash."""
    spec = base if isinstance(base, ModelSpec) else resolve_model(base)
    h, arch, shapes = _base_shapes(spec, on_progress)
    check_fits(lora, arch, shapes, spec.name)
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
    with _lock():
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
        raise AdapterError("adding an adapter from the Hugging Face Hub needs the `hub` extra: "
                           "pip install 'dialogue[hub]'") from e
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


def _convert_peft(d: Path, base: ModelSpec, name: str, on_progress: OnProgress | None = None) -> Path:
    """PEFT LoRA -> GGUF (`gguf.lora.peft_to_gguf`, the trainer's converter too) into a temporary
    file in the registry's folder."""
    try:
        cfg = json.loads((d / "adapter_config.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{d}/adapter_config.json is unreadable ({e})") from e
    adapters_dir().mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=adapters_dir(), prefix=f".{name}.", suffix=".gguf")
    os.close(fd)
    try:
        peft_to_gguf(d, tmp, base.path, meta={"converted_from": str(d),
                                              "peft_base": str(cfg.get("base_model_name_or_path") or "")},
                     on_progress=on_progress)
    except AdapterError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:  # safetensors and shape errors of a damaged adapter
        Path(tmp).unlink(missing_ok=True)
        raise AdapterMismatchError(f"could not convert the PEFT adapter {d} for {base.name}: {e}") from e
    return Path(tmp)


def add(path_or_repo: str | os.PathLike[str], name: str | None = None, *, base: str | ModelSpec | None = None,
        replace: bool = False, on_progress: OnProgress | None = None) -> AdapterInfo:
    """Register an adapter for a base model (`base`: a local model name, default the bundled one).

    A GGUF LoRA file is checked against the base and registered where it is (like a model, the file
    stays the user's). A PEFT directory (adapter_config.json + adapter_model.safetensors) is
    converted to GGUF into the registry's own folder. Anything else that is not a path but looks
    like `owner/name[/file.gguf]` is downloaded from the Hub first. Nothing is registered unless
    every check passes. `on_progress` hears the long steps (a conversion, the base's first scan)."""
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
    with _lock():
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
        gguf_path = _convert_peft(p, spec, name, on_progress)
        managed = True
        source = "peft" if source == "gguf" else source
        sidecars = [p / "train_config.json", p.parent / "train_config.json"]
    else:
        gguf_path = p
        sidecars = [p.with_name(p.name + ".json"), p.with_suffix(".json"), p.parent / "train_config.json"]
    try:
        lora = read_lora(gguf_path)
        h = check_against_base(lora, spec, on_progress)
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
    with _lock():
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
        s = check_scale(key, v)
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



def merge(parents: Sequence[str], weights: Sequence[float], out_name: str, *, method: str = "linear",
          rank: int | None = None, density: float | None = None, seed: int = 0, dtype: str = "f16",
          replace: bool = False, on_progress: OnProgress | None = None) -> AdapterInfo:
    """Merge registered adapters (or .gguf paths) into a new registered adapter `out_name`, kept in
    the registry's folder. The parents must belong to one base; the result is checked against it.
    `on_progress` hears the tensors merged and the file written."""
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
                    meta={"dialogue.parents": ",".join(str(p) for p in parents)}, on_progress=on_progress)
        lora = read_lora(tmp)
        h = check_against_base(lora, spec, on_progress)
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
                       base: str | ModelSpec | None = None, replace: bool = False,
                       on_progress: OnProgress | None = None) -> AdapterInfo:
    """Register a copy of a GGUF adapter that the registry owns (for a file in a temporary place,
    e.g. a training run's output the user will delete); `rm` deletes the copy. A PEFT directory
    or a Hub repo goes through `add`, whose conversion is already the registry's own file."""
    src = Path(path).expanduser()
    if not src.is_file():
        return add(path, name, base=base, replace=replace, on_progress=on_progress)
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
        add(dest, name, base=base, replace=replace, on_progress=on_progress)
    except BaseException:
        if not existed:
            dest.unlink(missing_ok=True)
        raise
    with _lock():
        doc = _read_doc()
        e = doc["adapters"][name]
        e.update(managed=True, origin=str(src.resolve()))
        e["provenance"] = _provenance(read_lora(dest), [src.with_name(src.name + ".json"), src.parent / "train_config.json"])
        _write_doc(doc)
    return info(name)
