"""GGUF LoRA adapters: read and check one, check it against a base, write one, convert PEFT.

The format is llama.cpp's (`src/llama-adapter.cpp`): metadata `general.type=adapter`,
`general.architecture` = the base's, `adapter.type=lora`, float `adapter.lora.alpha`; tensors
`<base tensor>.lora_a` and `<base tensor>.lora_b`, with lora_a ne = [in, r] and lora_b ne = [r, out]
where the base tensor is ne = [in, out] (token embeddings are the one transposed case); the delta
applied is scale * alpha / r * B @ A. Every check here mirrors what llama.cpp itself refuses, but
before anything is registered or served and with a message that names the tensor.

One writer (`write_lora`, atomic: the file appears whole or not at all) serves the trainer's
export, PEFT conversion and adapter merges. Converting Hugging Face LoRA factors (`write_hf_lora`,
`peft_to_gguf`) is ours, with gguf-py's `GGUFWriter` and tensor name map: llama.cpp's
`convert_lora_to_gguf.py` is not installed by any package and works only beside its own copy of
gguf-py. What it does that matters, we do too: gguf-py's names
(`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q.weight`), llama.cpp's rotary row permutation of
q/k for llama-family bases applied to `lora_b` (gemma3, qwen2 and qwen3 keep transformers' row
order; tested against llama.cpp for each), and every tensor the adapter names checked against the
base GGUF before writing. numpy only: no torch needed to convert (bf16 PEFT files excepted).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from ..errors import ProviderError
from ..progress import OnProgress, Steps
from . import files

__all__ = [
    "AdapterError", "AdapterMismatchError", "DORA_REFUSAL", "LoraFile", "read_lora", "check_fits",
    "load_factors", "write_lora", "HFLora", "write_hf_lora", "peft_to_gguf", "gguf_tensor_name",
    "GGUF_PERMUTED_ARCHS", "GGUF_ARCH_OF_MODEL_TYPE", "TOKEN_EMBD", "check_scale", "gguf_to_peft",
]

TOKEN_EMBD = "token_embd.weight"
# Architectures whose q/k rows llama.cpp's HF converter permutes (LlamaModel's `undo_permute`).
GGUF_PERMUTED_ARCHS = ("llama",)
# transformers model_type -> GGUF architecture, for bases that were not loaded from a GGUF.
GGUF_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                           "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "phi3": "phi3"}

DORA_REFUSAL = ("DoRA adapters cannot be exported to GGUF: llama.cpp applies W + s·BA only, and DoRA also "
                "rescales every output row by its magnitude vector")


class AdapterError(ProviderError, ValueError):
    """A LoRA adapter cannot be read, built, written, loaded or applied as asked; the message says
    why. A ProviderError for serving (a run fails with it), a ValueError for training's callers."""


class AdapterMismatchError(AdapterError):
    """An adapter that does not fit a base model (architecture, a tensor the base lacks, a shape),
    or parents of a merge that do not fit each other."""


def check_scale(key: str, v: Any) -> float:
    """An adapter's scale (or a merge weight) as a float: a finite number, never a bool or text."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise AdapterError(f"the scale of adapter {key!r} must be a number, got {v!r}")
    s = float(v)
    if not math.isfinite(s):
        raise AdapterError(f"the scale of adapter {key!r} must be finite, got {v!r}")
    return s


# ---------------------------------------------------------------- reading

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


def _open(p: Path) -> files.GGUFFile:
    try:
        return files.read(p, cache=False)  # small, and often replaced: never cached
    except files.GGUFError as e:
        raise AdapterError(str(e)) from e


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read and check a GGUF LoRA adapter's header (no tensor data). Refuses, with a message that
    says what is wrong, a file that is not a GGUF, a full model, another adapter kind, or one with
    unpaired or untransposed tensors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AdapterError(f"no such adapter file: {p}")
    if not files.is_gguf(p):
        raise AdapterError(f"{p} is not a GGUF file (it does not start with 'GGUF'); a PEFT adapter "
                           "is a directory with adapter_config.json and adapter_model.safetensors")
    g = _open(p)
    kind = g.field("general.type")
    if kind != "adapter":
        what = "a model" if kind in (None, "model") else repr(kind)
        raise AdapterError(f"{p} is {what}, not an adapter (general.type must be 'adapter')")
    if g.field("adapter.type") != "lora":
        raise AdapterError(f"{p} is a {g.field('adapter.type')!r} adapter; only LoRA adapters "
                           "(adapter.type='lora') can be applied")
    arch = g.field("general.architecture")
    if not arch:
        raise AdapterError(f"{p} has no general.architecture; it cannot be matched to a base model")
    alpha = float(g.field("adapter.lora.alpha") or 0.0)
    a: dict[str, tuple[int, ...]] = {}
    b: dict[str, tuple[int, ...]] = {}
    for name, ne in g.shapes().items():
        if name.endswith(".lora_a"):
            a[name[:-7]] = ne
        elif name.endswith(".lora_b"):
            b[name[:-7]] = ne
        else:
            raise AdapterError(f"{p}: tensor {name!r} is not a LoRA tensor (.lora_a / .lora_b)")
    if not a and not b:
        raise AdapterError(f"{p} holds no LoRA tensors")
    for n in sorted(set(a) ^ set(b)):
        raise AdapterError(f"{p}: LoRA tensor {n!r} has only its {'lora_a' if n in a else 'lora_b'} half")
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for n in sorted(a):
        if len(a[n]) != 2 or len(b[n]) != 2:
            raise AdapterError(f"{p}: LoRA tensors of {n!r} must be 2-D, got {a[n]} and {b[n]}")
        if n != TOKEN_EMBD and a[n][1] != b[n][0]:
            raise AdapterError(f"{p}: {n}.lora_a is {a[n]} and {n}.lora_b is {b[n]} (ggml order): their "
                               "ranks differ (an untransposed adapter from llama.cpp's old finetune?)")
        pairs[n] = (a[n], b[n])
    meta = {k: _plain(f.contents()) for k, f in g.reader.fields.items()
            if k.startswith(("dialogue.", "general.name", "training.", "adapter."))}
    return LoraFile(p.resolve(), str(arch), alpha, pairs, meta)


def check_fits(lora: LoraFile, architecture: str, shapes: Mapping[str, tuple[int, ...]], base_name: str) -> None:
    """Refuse an adapter that does not fit a base of this architecture and these tensor shapes
    (ggml order), with an AdapterMismatchError naming the architecture, the tensor and both shapes."""
    if lora.architecture != architecture:
        raise AdapterMismatchError(
            f"{lora.path.name} is an adapter for a {lora.architecture!r} model, but {base_name} is "
            f"{architecture!r}: it was trained on another base")
    for n, (a, b) in lora.pairs.items():
        if n not in shapes:
            raise AdapterMismatchError(f"{lora.path.name} adapts tensor {n!r}, which {base_name} does not have "
                                       "(an adapter for another model of the same architecture?)")
        w = shapes[n]
        if n == TOKEN_EMBD:  # llama.cpp applies it to rows it gathers: A and B swap roles
            ok = len(w) == 2 and w[0] == b[1] and w[1] == a[1]
        else:
            ok = len(w) == 2 and w[0] == a[0] and w[1] == b[1]
        if not ok:
            raise AdapterMismatchError(
                f"{lora.path.name} does not fit {base_name}: tensor {n!r} is {list(w)} in the base "
                f"(ggml order: in, out) but the adapter's lora_a is {list(a)} and lora_b {list(b)} "
                f"(expected lora_a [{w[0]}, r] and lora_b [r, {w[1] if len(w) > 1 else '?'}])")


def load_factors(path: str | os.PathLike[str]) -> tuple[LoraFile, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A GGUF LoRA's factors as float64 (A: r x in, B: out x r) per base tensor, with llama.cpp's
    scale alpha/r folded into B, so that the tensor's delta is exactly `B @ A` at adapter scale 1."""
    from gguf.quants import dequantize

    lora = read_lora(path)
    g = _open(lora.path)
    data: dict[str, np.ndarray] = {}
    for name, t in g.tensors.items():
        arr = dequantize(t.data, t.tensor_type)
        data[name] = np.array(arr, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for n in lora.pairs:
        A, B = data[f"{n}.lora_a"], data[f"{n}.lora_b"]
        rank = B.shape[1]
        scale = lora.alpha / rank if lora.alpha else 1.0  # llama.cpp: alpha 0 means "no alpha scaling"
        out[n] = (A, B * scale)
    return lora, out


# ---------------------------------------------------------------- writing

def write_lora(path: str | os.PathLike[str], architecture: str,
               factors: Mapping[str, tuple[np.ndarray, np.ndarray]], *, alpha: float | None = None,
               meta: Mapping[str, Any] | None = None, dtype: str = "f16",
               on_progress: OnProgress | None = None) -> Path:
    """Write a GGUF LoRA adapter llama.cpp loads: factors A (r x in) and B (out x r) per base tensor
    name (`blk.0.attn_q.weight`). `alpha` None writes alpha = rank (scale 1: B @ A is the delta as
    given); every tensor must then have the same rank. `meta`: full keys; strings as strings,
    ints as uint32, floats as float32, anything else as JSON. The file appears atomically: a
    failure or a crash leaves no file, or the previous one."""
    from gguf import GGUFWriter

    if dtype not in ("f16", "f32"):
        raise AdapterError(f"GGUF adapter dtype must be f16 or f32, got {dtype!r}")
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
        w = GGUFWriter(tmp, architecture)
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
        steps = Steps(on_progress, f"writing {path.name}", total=None)
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
        steps.finish()
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- Hugging Face / PEFT -> GGUF

@dataclass(frozen=True)
class HFLora:
    """One adapted linear in Hugging Face terms: `name` the module (`model.layers.0.self_attn.q_proj`),
    A (r x in), B (out x r), and the scale PEFT applies (alpha/r, or alpha/sqrt(r) with rsLoRA).
    `dora`: the adapter also has a magnitude vector (which GGUF cannot carry)."""

    name: str
    A: np.ndarray
    B: np.ndarray
    r: int
    scaling: float
    dora: bool = False


def gguf_tensor_name(hf_module: str, arch: str, n_layers: int) -> str:
    """`model.layers.3.mlp.down_proj` -> `blk.3.ffn_down.weight` (gguf-py's name map)."""
    try:
        nm = files.name_map(arch, n_layers)
    except files.GGUFError as e:
        raise AdapterError(str(e)) from e
    g = nm.get_name(hf_module)
    if g is None:
        raise AdapterError(f"no GGUF tensor name for {hf_module} in {arch}")
    return f"{g}.weight"


def _permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k output rows (interleaved -> halves rotary)."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def write_hf_lora(path: str | os.PathLike[str], adapters: Sequence[HFLora], *, arch: str, n_layers: int,
                  n_head: int, n_kv: int, base_tensors: Collection[str] | None = None, base_name: str | None = None,
                  dtype: str = "f16", meta: Mapping[str, Any] | None = None,
                  on_progress: OnProgress | None = None) -> Path:
    """Write Hugging Face LoRA factors as a GGUF adapter for a base of GGUF architecture `arch`
    (`n_head`, `n_kv`: its query and key/value heads, for the llama q/k permutation). With
    `base_tensors` (the base GGUF's tensor names) every adapted tensor must be one of them:
    llama.cpp would refuse the adapter at serving time, this says so now, by name. `meta` keys are
    written under `dialogue.`; `base_name` as `dialogue.base`."""
    if not adapters:
        raise AdapterError("there are no LoRA adapters to export")
    if len({a.r for a in adapters}) != 1:
        raise AdapterError("adapters of different ranks per layer are not supported by this exporter")
    if any(a.dora for a in adapters):
        raise AdapterError(f"{DORA_REFUSAL}.")
    if dtype not in ("f16", "f32"):
        raise AdapterError(f"GGUF adapter dtype must be f16 or f32, got {dtype!r}")
    r = adapters[0].r
    alpha = adapters[0].scaling * r  # llama.cpp scales by alpha / rank
    names = {a.name: gguf_tensor_name(a.name, arch, n_layers) for a in adapters}
    if base_tensors is not None:
        missing = sorted(n for n in names.values() if n not in base_tensors)
        if missing:
            raise AdapterMismatchError(f"the base GGUF {base_name or ''} has no tensor {missing[0]}"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the adapter "
                               "was not trained on this base")
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    steps = Steps(on_progress, "converting LoRA factors", total=len(adapters), unit="tensors")
    for a in adapters:
        steps.advance()
        name = names[a.name]
        B = a.B * (a.scaling / (alpha / a.r))  # fold any per-layer scale difference into B
        if arch in GGUF_PERMUTED_ARCHS:
            if name.endswith("attn_q.weight"):
                B = _permute_rows(B, n_head)
            elif name.endswith("attn_k.weight"):
                B = _permute_rows(B, n_kv)
        factors[name] = (a.A, B)
    m: dict[str, Any] = {}
    if base_name is not None:
        m["dialogue.base"] = base_name
    m["dialogue.rank"] = int(r)
    m["dialogue.targets"] = ",".join(sorted({a.name.rsplit(".", 1)[-1] for a in adapters}))
    m.update({f"dialogue.{k}": str(v) for k, v in (meta or {}).items()})
    steps.finish()
    return write_lora(path, arch, factors, alpha=alpha, meta=m, dtype=dtype, on_progress=on_progress)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """PEFT's tensors as float32 numpy arrays. Through torch when it is installed (bf16 files:
    numpy has no bfloat16), else safetensors' numpy loader."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        try:
            from safetensors.numpy import load_file as load_np
        except ImportError as e:
            raise AdapterError("converting a PEFT adapter to GGUF needs `safetensors` (in the [train] extra): "
                               "pip install 'dialogue[train]'; or add a .gguf adapter") from e
        try:
            return {k: v.astype(np.float32) for k, v in load_np(str(path)).items()}
        except (TypeError, ValueError) as e:  # bf16 without torch
            raise AdapterError(f"{path} holds tensors numpy cannot read ({e}); install torch to convert it") from e
    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def _count(v: Any) -> int:
    """A count from GGUF metadata; per-layer arrays (some architectures vary heads by layer) give
    their first value, which is all the llama q/k permutation needs."""
    if isinstance(v, (list, tuple)):
        v = v[0] if v else 0
    return int(v or 0)


def peft_to_gguf(adapter_dir: str | os.PathLike[str], out_path: str | os.PathLike[str],
                 base_gguf: str | os.PathLike[str], dtype: str = "f16", meta: Mapping[str, Any] | None = None,
                 on_progress: OnProgress | None = None) -> Path:
    """Convert a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) to a GGUF
    adapter for the GGUF base it was trained on, without loading any model weights: the base's
    architecture, layer and head counts come from its metadata. `on_progress` hears each stage
    (reading the tensors, the base's metadata, converting the factors, writing the file)."""
    d = Path(adapter_dir)
    cfg_path, st_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise AdapterError(f"{d} is not a PEFT adapter (adapter_config.json and adapter_model.safetensors)")
    try:
        pc = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{cfg_path} is unreadable ({e})") from e
    if pc.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters convert to GGUF, not {pc.get('peft_type')}")
    if pc.get("use_dora"):
        raise AdapterError(f"{d} is a DoRA adapter. {DORA_REFUSAL}.")
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise AdapterError("per-module rank or alpha patterns are not supported")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    scaling = alpha / (r ** 0.5 if pc.get("use_rslora") else r)
    with Steps(on_progress, f"reading {st_path.name}", total=None):
        sd = _load_safetensors(st_path)
    if any("lora_magnitude_vector" in k for k in sd):
        raise AdapterError(f"{d} is a DoRA adapter. {DORA_REFUSAL}.")
    ads: list[HFLora] = []
    for k in sorted(sd):
        if not k.endswith(".lora_A.weight"):
            continue
        stem = k[: -len(".lora_A.weight")]
        if f"{stem}.lora_B.weight" not in sd:
            raise AdapterError(f"{st_path}: {stem} has a lora_A but no lora_B")
        ads.append(HFLora(stem.removeprefix("base_model.model."), sd[k], sd[f"{stem}.lora_B.weight"], r, scaling))
    try:
        with Steps(on_progress, f"reading the base {Path(base_gguf).name}", total=None):
            base = files.read(base_gguf)
        arch = base.architecture
    except files.GGUFError as e:
        raise AdapterError(str(e)) from e
    n_head = _count(base.field(f"{arch}.attention.head_count"))
    return write_hf_lora(out_path, ads, arch=arch, n_layers=_count(base.field(f"{arch}.block_count")),
                         n_head=n_head, n_kv=_count(base.field(f"{arch}.attention.head_count_kv")) or n_head,
                         base_tensors=set(base.tensors), base_name=base.path.name, dtype=dtype, meta=meta,
                         on_progress=on_progress)


# HF modules a decoder layer's adapters can target, for the GGUF -> PEFT direction
_HF_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _unpermute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `_permute_rows`: llama.cpp's rotary row order back to transformers'."""
    return b.reshape(n_head, b.shape[0] // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_to_peft(path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 base_gguf: str | os.PathLike[str], *, base_model: str = "") -> Path:
    """Write a GGUF LoRA adapter as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors, float32), the form vLLM and SGLang load: the inverse of
    `peft_to_gguf`, with transformers' module names and q/k row order, for the GGUF base it was
    made for (its architecture, layer and head counts come from the base's metadata).
    `base_model` goes into the config's `base_model_name_or_path` (the server's model id).

    PEFT has one rank and one alpha per adapter; GGUF has a rank per tensor. Tensors of a lower
    rank are padded with zero rows and columns (which add nothing) and each tensor's
    alpha / r is folded into its B, with `lora_alpha = r`: the delta is exactly the GGUF's.
    The directory is written beside its final name and renamed into place, so a reader never
    sees half of it."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise AdapterError("writing a PEFT adapter needs `safetensors` (in the [train] extra): "
                           "pip install 'dialogue[train]'") from e
    lora, fac = load_factors(path)
    if TOKEN_EMBD in fac:
        raise AdapterError(f"{lora.path.name} adapts the token embeddings, which PEFT stores "
                           "differently; exporting such an adapter is not supported")
    try:
        base = files.read(base_gguf)
    except files.GGUFError as e:
        raise AdapterError(str(e)) from e
    arch = base.architecture
    if arch != lora.architecture:
        raise AdapterMismatchError(f"{lora.path.name} is a {lora.architecture!r} adapter, the base "
                                   f"{base.path.name} is {arch!r}")
    n_layers = _count(base.field(f"{arch}.block_count"))
    n_head = _count(base.field(f"{arch}.attention.head_count"))
    n_kv = _count(base.field(f"{arch}.attention.head_count_kv")) or n_head
    hf_of = {gguf_tensor_name(f"model.layers.{i}.{m}", arch, n_layers): f"model.layers.{i}.{m}"
             for i in range(n_layers) for m in _HF_LAYER_MODULES}
    unknown = sorted(n for n in fac if n not in hf_of)
    if unknown:
        raise AdapterError(f"{lora.path.name} adapts {unknown[0]}, which has no PEFT module name here")
    r = max(A.shape[0] for A, _ in fac.values())
    tensors: dict[str, np.ndarray] = {}
    for name, (A, B) in fac.items():
        k = A.shape[0]
        B = B.astype(np.float32) * np.float32(lora.alpha / k if lora.alpha else 1.0)
        if arch in GGUF_PERMUTED_ARCHS:
            if name.endswith("attn_q.weight"):
                B = _unpermute_rows(B, n_head)
            elif name.endswith("attn_k.weight"):
                B = _unpermute_rows(B, n_kv)
        if k < r:
            A = np.concatenate([A, np.zeros((r - k, A.shape[1]), A.dtype)])
            B = np.concatenate([B, np.zeros((B.shape[0], r - k), B.dtype)], axis=1)
        stem = f"base_model.model.{hf_of[name]}"
        tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(A, np.float32)
        tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(B, np.float32)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(r),
              "target_modules": sorted({hf_of[n].rsplit(".", 1)[-1] for n in fac}),
              "base_model_name_or_path": base_model, "bias": "none", "lora_dropout": 0.0,
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "inference_mode": True}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), "utf-8")
        if out.exists():
            import shutil
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
