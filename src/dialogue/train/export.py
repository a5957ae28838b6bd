"""Adapters out: PEFT safetensors (for PEFT and transformers) and GGUF LoRA (for llama.cpp).

The GGUF writer is ours, with the `gguf` package's `GGUFWriter`: llama.cpp's
`convert_lora_to_gguf.py` is not installed by any package and works only beside its own copy of
gguf-py (FACTS.md). What it does that matters, we do too: tensor names from gguf-py's name map
(`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q.weight.lora_a`), llama.cpp's rotary row
permutation of q/k for llama-family bases applied to `lora_b`, and the metadata llama.cpp reads
(`general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`). Only llama-family bases are
permuted; gemma3, qwen2 and qwen3 keep transformers' row order (tested against llama.cpp for each).
When the base is a GGUF, every tensor the adapter names must exist in it, checked before writing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .lora import AdapterError, AdapterTensors, adapter_tensors, unwrap

__all__ = ["save_peft", "save_gguf", "peft_to_gguf", "gguf_tensor_name", "read_gguf_adapter", "GGUF_PERMUTED_ARCHS"]

# Architectures whose q/k rows llama.cpp's HF converter permutes (LlamaModel's `undo_permute`).
GGUF_PERMUTED_ARCHS = ("llama",)
# transformers model_type -> GGUF architecture, for bases that were not loaded from a GGUF.
_ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
            "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "phi3": "phi3"}


def _check_uniform(ads: list[AdapterTensors]) -> None:
    if not ads:
        raise AdapterError("the model has no adapters to export")
    if len({a.r for a in ads}) != 1:
        raise AdapterError("adapters of different ranks per layer are not supported by this exporter")


def save_peft(model: nn.Module, out_dir: str | os.PathLike, base: Any = None,
              base_model_name_or_path: str | None = None, tensors: list[AdapterTensors] | None = None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` that `PeftModel.from_pretrained`
    loads, from either adapter implementation (and from FSDP shards, gathered)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ads = tensors if tensors is not None else adapter_tensors(model)
    _check_uniform(ads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for a in ads:
        k = f"base_model.model.{a.name}"
        tensors[f"{k}.lora_A.weight"] = a.A.contiguous()
        tensors[f"{k}.lora_B.weight"] = a.B.contiguous()
        if a.magnitude is not None:
            tensors[f"{k}.lora_magnitude_vector"] = a.magnitude.contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    r = ads[0].r
    rslora = abs(ads[0].scaling - ads[0].alpha / r) > 1e-9
    name = base_model_name_or_path or (str(base.path) if base is not None else None)
    inner = unwrap(model)
    cfg = LoraConfig(r=r, lora_alpha=ads[0].alpha, target_modules=sorted({a.name.rsplit(".", 1)[-1] for a in ads}),
                     use_dora=ads[0].magnitude is not None, use_rslora=rslora, bias="none",
                     task_type="CAUSAL_LM", base_model_name_or_path=name, inference_mode=True)
    cfg.save_pretrained(str(out))
    archs = getattr(getattr(inner, "config", None), "architectures", None)
    if archs:  # PEFT's auto-mapping wants to know the class; harmless when absent
        p = out / "adapter_config.json"
        d = json.loads(p.read_text())
        d.setdefault("auto_mapping", {"base_model_class": archs[0]})
        p.write_text(json.dumps(d, indent=2))
    return out


def _arch_of(base: Any, config: Any) -> str:
    if base is not None and getattr(base, "gguf_arch", None):
        return base.gguf_arch
    mt = getattr(config, "model_type", None)
    if mt not in _ARCH_OF:
        raise AdapterError(f"no GGUF architecture known for model type {mt!r}, so the adapter cannot be "
                           f"written for llama.cpp (known: {', '.join(sorted(_ARCH_OF))}); the PEFT "
                           "safetensors export (save_peft) still works")
    return _ARCH_OF[mt]


def _base_tensor_names(base: Any) -> set[str] | None:
    """Tensor names of the GGUF the adapter is for, when the base was loaded from one."""
    path = getattr(base, "path", None)
    if path is None or Path(path).suffix != ".gguf":
        return None
    from .quant import _gguf_tensors
    return set(_gguf_tensors(Path(path))[1])


def gguf_tensor_name(hf_module: str, arch: str, n_layers: int) -> str:
    """`model.layers.3.mlp.down_proj` -> `blk.3.ffn_down.weight` (gguf-py's name map)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    arch_enum = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise AdapterError(f"gguf-py does not know the architecture {arch!r}")
    g = get_tensor_name_map(arch_enum, n_layers).get_name(hf_module)
    if g is None:
        raise AdapterError(f"no GGUF tensor name for {hf_module} in {arch}")
    return f"{g}.weight"


def _permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation of q/k output rows (interleaved -> halves rotary)."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def save_gguf(model: nn.Module | None, path: str | os.PathLike, base: Any = None, dtype: str = "f16",
              meta: Mapping[str, str] | None = None, tensors: list[AdapterTensors] | None = None,
              config: Any = None) -> Path:
    """Write the LoRA adapter as a GGUF that llama.cpp applies to the base at run time.

    DoRA is refused: llama.cpp computes W + s·BA, while DoRA also rescales each output row by
    m / ||W + s·BA||, which the GGUF adapter format cannot express. Under FSDP, gather
    `tensors=adapter_tensors(model)` on every rank (it is collective) and write on one. Without a
    model, give `tensors` and the base's transformers `config` (see `peft_to_gguf`)."""
    from gguf import GGUFWriter

    if model is None and (tensors is None or config is None):
        raise AdapterError("save_gguf needs a model, or tensors and the base's config")
    ads = tensors if tensors is not None else adapter_tensors(model)
    _check_uniform(ads)
    if any(a.magnitude is not None for a in ads):
        raise AdapterError("DoRA adapters cannot be exported to GGUF: llama.cpp applies W + s·BA only, "
                           "and DoRA also rescales every output row by its magnitude vector. Export the "
                           "PEFT safetensors (save_peft) instead, or train with method='lora'.")
    if dtype not in ("f16", "f32"):
        raise AdapterError(f"GGUF adapter dtype must be f16 or f32, got {dtype!r}")
    cfg = config if config is not None else unwrap(model).config
    arch = _arch_of(base, cfg)
    n_layers = cfg.num_hidden_layers
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    r = ads[0].r
    alpha = ads[0].scaling * r  # llama.cpp scales by alpha / rank
    names = {a.name: gguf_tensor_name(a.name, arch, n_layers) for a in ads}
    # llama.cpp refuses an adapter naming a tensor its base lacks: say so now, by name, not at serving
    have = _base_tensor_names(base)
    missing = sorted(n for n in names.values() if have is not None and n not in have)
    if missing:
        raise AdapterError(f"the base GGUF {Path(base.path).name} has no tensor {missing[0]}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the adapter "
                           "was not trained on this base")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    if base is not None:
        w.add_string("dialogue.base", Path(base.path).name)
    w.add_uint32("dialogue.rank", r)
    w.add_string("dialogue.targets", ",".join(sorted({a.name.rsplit(".", 1)[-1] for a in ads})))
    for k, v in (meta or {}).items():
        w.add_string(f"dialogue.{k}", str(v))
    np_dt = np.float16 if dtype == "f16" else np.float32
    for a in ads:
        name = names[a.name]
        B = a.B * (a.scaling / (alpha / a.r))  # fold any per-layer scale difference into B
        if arch in GGUF_PERMUTED_ARCHS:
            if name.endswith("attn_q.weight"):
                B = _permute_rows(B, n_head)
            elif name.endswith("attn_k.weight"):
                B = _permute_rows(B, n_kv)
        w.add_tensor(f"{name}.lora_a", a.A.numpy().astype(np_dt))  # (r, in)  -> ggml ne [in, r]
        w.add_tensor(f"{name}.lora_b", B.numpy().astype(np_dt))    # (out, r) -> ggml ne [r, out]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def peft_to_gguf(adapter_dir: str | os.PathLike, out_path: str | os.PathLike, base_gguf: str | os.PathLike,
                 dtype: str = "f16", meta: Mapping[str, str] | None = None) -> Path:
    """Convert a PEFT LoRA adapter (safetensors + adapter_config.json) to a GGUF adapter for the
    GGUF base it was trained on, without loading any model weights."""
    from safetensors.torch import load_file

    from .quant import _gguf_arch, _gguf_config, _gguf_tensors
    d = Path(adapter_dir)
    cfg_path, st_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.exists() or not st_path.exists():
        raise AdapterError(f"{d} is not a PEFT adapter (adapter_config.json and adapter_model.safetensors)")
    pc = json.loads(cfg_path.read_text())
    if pc.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters convert to GGUF, not {pc.get('peft_type')}")
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise AdapterError("per-module rank or alpha patterns are not supported")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    scaling = alpha / (r ** 0.5 if pc.get("use_rslora") else r)
    sd = load_file(str(st_path))
    ads: list[AdapterTensors] = []
    for k in sorted(sd):
        if not k.endswith(".lora_A.weight"):
            if "lora_magnitude_vector" in k:
                raise AdapterError("DoRA adapters cannot be exported to GGUF: llama.cpp applies W + s·BA only")
            continue
        stem = k[: -len(".lora_A.weight")]
        name = stem.removeprefix("base_model.model.")
        ads.append(AdapterTensors(name, sd[k].float(), sd[f"{stem}.lora_B.weight"].float(), alpha, r, scaling))
    base_path = Path(base_gguf)
    reader, _ = _gguf_tensors(base_path)

    class _B:  # what save_gguf reads from a loaded base
        path = base_path
        gguf_arch = _gguf_arch(reader)
    return save_gguf(None, out_path, base=_B, dtype=dtype, meta=meta, tensors=ads, config=_gguf_config(base_path))


def read_gguf_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata and tensor shapes of a GGUF adapter (for checks and `adapters info`)."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return {"meta": meta, "tensors": {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}}
