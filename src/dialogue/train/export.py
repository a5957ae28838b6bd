"""Adapters out: PEFT safetensors (for PEFT and transformers) and GGUF LoRA (for llama.cpp).

The GGUF side is `dialogue.gguf.lora` (the one writer of GGUF adapters, shared with serving's
adapter registry): here the trained adapters are gathered from either implementation (and from
FSDP shards) and handed over as numpy factors with the base's GGUF architecture and head counts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..gguf import files as gguf_files
from ..gguf.lora import GGUF_ARCH_OF_MODEL_TYPE, AdapterError, HFLora, write_hf_lora
from .lora import AdapterTensors, adapter_tensors, unwrap

__all__ = ["save_peft", "save_gguf"]


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
    if mt not in GGUF_ARCH_OF_MODEL_TYPE:
        raise AdapterError(f"no GGUF architecture known for model type {mt!r}, so the adapter cannot be "
                           f"written for llama.cpp (known: {', '.join(sorted(GGUF_ARCH_OF_MODEL_TYPE))}); the PEFT "
                           "safetensors export (save_peft) still works")
    return GGUF_ARCH_OF_MODEL_TYPE[mt]


def _base_tensor_names(base: Any) -> set[str] | None:
    """Tensor names of the GGUF the adapter is for, when the base was loaded from one."""
    path = getattr(base, "path", None)
    if path is None or Path(path).suffix != ".gguf":
        return None
    try:
        return set(gguf_files.read(path).tensors)
    except gguf_files.GGUFError as e:
        raise AdapterError(str(e)) from e


def _numpy(t: torch.Tensor) -> Any:
    return t.detach().to("cpu", torch.float32).numpy()


def save_gguf(model: nn.Module | None, path: str | os.PathLike, base: Any = None, dtype: str = "f16",
              meta: Mapping[str, str] | None = None, tensors: list[AdapterTensors] | None = None,
              config: Any = None) -> Path:
    """Write the LoRA adapter as a GGUF that llama.cpp applies to the base at run time
    (`gguf.lora.write_hf_lora`: atomic, checked against the base GGUF's tensors).

    DoRA is refused (`gguf.lora.DORA_REFUSAL`): export the PEFT safetensors (save_peft) instead,
    or train with method='lora'. Under FSDP, gather `tensors=adapter_tensors(model)` on every rank
    (it is collective) and write on one. Without a model, give `tensors` and the base's
    transformers `config`."""
    if model is None and (tensors is None or config is None):
        raise AdapterError("save_gguf needs a model, or tensors and the base's config")
    ads = tensors if tensors is not None else adapter_tensors(model)
    if not ads:
        raise AdapterError("the model has no adapters to export")
    cfg = config if config is not None else unwrap(model).config
    n_head = cfg.num_attention_heads
    hf = [HFLora(a.name, _numpy(a.A), _numpy(a.B), a.r, a.scaling, dora=a.magnitude is not None) for a in ads]
    return write_hf_lora(path, hf, arch=_arch_of(base, cfg), n_layers=cfg.num_hidden_layers, n_head=n_head,
                         n_kv=getattr(cfg, "num_key_value_heads", None) or n_head,
                         base_tensors=_base_tensor_names(base),
                         base_name=Path(base.path).name if base is not None else None, dtype=dtype, meta=meta)
