"""Fine-tuning adapters on a frozen, quantized base: `dialogue train` and its Python API.

Needs the `[train]` extra (torch, transformers, peft, bitsandbytes, hqq, gguf, safetensors).
Importing this package imports none of them; the names below load their module on first use,
so `dialogue` without the extra still starts.

    from dialogue.train import finetune, TrainConfig
    res = finetune(dialogues=[...], docs=["docs/"], config=TrainConfig(steps=200, out_dir="out"))

(`dialogue.train.offload` is the module of `offload(model, device)`; `finetune(..., offload=True)`
uses it.)
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "finetune": "loop", "train": "loop", "TrainConfig": "loop", "TrainResult": "loop",
    "NonFiniteLossError": "loop",
    "load_base": "quant", "Base": "quant", "ModelLoadError": "quant", "GGUFLinear": "quant",
    "AdapterSpec": "lora", "add_adapters": "lora", "remove_adapters": "lora", "adapter_tensors": "lora",
    "AdapterError": "lora", "compile_adapters": "lora",
    "save_peft": "export", "save_gguf": "export",
    "MixSampler": "data", "dialogue_examples": "data", "pack_text": "data", "read_docs": "data",
    "DataError": "data", "PreferencePair": "data", "preference_pairs": "data",
    "train_main": "main",
    "Offloader": "offload", "OffloadError": "offload", "get_offloader": "offload",
}
__all__ = sorted([*_EXPORTS, "schedule"])


def __getattr__(name: str) -> Any:
    if name == "schedule":
        return importlib.import_module(".schedule", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
