"""LoRA and DoRA adapters on a frozen (quantized) base.

PEFT wraps `nn.Linear`, bitsandbytes `Linear4bit` and `HQQLinear`, so those go through PEFT by
default (`impl="peft"`). PEFT cannot wrap `GGUFLinear` (the served-weights base), so there the
adapter is our own `AdapterLinear`, which computes exactly what PEFT's LoRA and DoRA compute
(tested to match PEFT numerically on the same weights) and can also be chosen on any base with
`impl="ours"` (the benchmark compares the two).

Everything downstream (the loop, export) sees adapters through `adapter_tensors()` and
`trainable_parameters()`, whichever implementation made them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..gguf.lora import AdapterError
from .quant import GGUFLinear, dense_weight

__all__ = [
    "AdapterSpec", "AdapterLinear", "AdapterTensors", "add_adapters", "remove_adapters",
    "adapter_tensors", "trainable_parameters", "enable_checkpointing", "is_peft", "DEFAULT_TARGETS",
    "AdapterError", "unwrap", "compile_adapters",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterSpec:
    """What to train. `alpha=None` means alpha = 2r (scale 2 whatever the rank, so a rank change
    does not silently change the effective learning rate of the update's scale)."""

    method: str = "lora"  # lora | dora
    r: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    impl: str = "auto"  # auto | peft | ours
    rslora: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("lora", "dora"):
            raise AdapterError(f"unknown adapter method {self.method!r}; choose lora or dora")
        if self.impl not in ("auto", "peft", "ours"):
            raise AdapterError(f"unknown adapter implementation {self.impl!r}; choose auto, peft or ours")
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"rank must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}")
        self.targets = tuple(self.targets)
        if not self.targets:
            raise AdapterError("no target modules given")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.r)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.rslora else self.r)


class AdapterLinear(nn.Module):
    """A low-rank update (LoRA), optionally weight-decomposed (DoRA), on any frozen linear.

    Parameter names (`lora_A`, `lora_B`, `lora_magnitude_vector`) and initialisation follow PEFT,
    so `adapter_tensors()` and the PEFT safetensors export are the same for both implementations.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 dora: bool = False, rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base
        in_f, out_f = base.in_features, base.out_features
        self.in_features, self.out_features, self.r = in_f, out_f, r
        self.lora_alpha = float(alpha)
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        dev = _device_of(base)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=dev)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora = dora
        if dora:
            with torch.no_grad():
                w = dense_weight(base).float()
                # at init B = 0, so ||W + s·BA|| = ||W||, row-wise (PEFT's DoRA magnitude init)
                self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(w, dim=1).to(self.lora_A.weight.dtype))
        else:
            self.lora_magnitude_vector = None

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        xa = x.to(self.lora_A.weight.dtype)
        xd = self.lora_dropout(xa)
        lora = self.lora_B(self.lora_A(xd))
        if not self.use_dora:
            return (result + lora * self.scaling).to(dtype)
        # DoRA (Liu et al. 2024), as PEFT computes it: the column norm is detached (paper §4.3),
        # and the base output is reused unless dropout changed the input.
        weight = dense_weight(self.base_layer).to(xa.dtype)
        with torch.no_grad():
            norm = torch.linalg.norm(weight + self.scaling * self.delta_weight(), dim=1)
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result.to(xa.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias.to(base.dtype)
        else:
            base = F.linear(xd, weight)
        return (result + (scale - 1) * base + scale * lora * self.scaling).to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, dora={self.use_dora}"


def _device_of(m: nn.Module) -> torch.device:
    for t in [*m.parameters(), *m.buffers()]:
        return t.device
    return torch.device("cpu")


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if is_peft(model) else model


def _targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    t = tuple(targets)
    names = [n for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in t and hasattr(m, "in_features") and ".layers." in f".{n}"]
    if not names:
        raise AdapterError(f"no module of the model matches the targets {list(t)}")
    return names


def add_adapters(model: nn.Module, spec: AdapterSpec | None = None) -> nn.Module:
    """Put trainable adapters on the frozen model; returns the model to train (a PeftModel when
    PEFT made them). Initialisation is seeded by `spec.seed` without touching the global RNG."""
    spec = spec or AdapterSpec()
    names = _targets(model, spec.targets)
    kinds = {type(model.get_submodule(n)) for n in names}
    impl = spec.impl
    if impl == "auto":
        impl = "ours" if GGUFLinear in kinds else "peft"
    if impl == "peft" and GGUFLinear in kinds:
        raise AdapterError("PEFT cannot wrap GGUF served-weight layers; use impl='ours' (or auto)")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if impl == "peft":
            from peft import LoraConfig, get_peft_model
            cfg = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout,
                             target_modules=list(spec.targets), use_dora=spec.method == "dora",
                             use_rslora=spec.rslora, bias="none", task_type="CAUSAL_LM")
            return get_peft_model(model, cfg)
        for n in names:
            base = model.get_submodule(n)
            parent_name, _, attr = n.rpartition(".")
            setattr(model.get_submodule(parent_name), attr,
                    AdapterLinear(base, spec.r, spec.lora_alpha, spec.dropout, spec.method == "dora", spec.rslora))
    model._dialogue_adapter_spec = spec  # for export: what was trained
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take the adapters off and return the bare frozen model (unmerged: the base is untouched)."""
    if is_peft(model):
        return model.unload()
    for n, m in list(model.named_modules()):
        if isinstance(m, AdapterLinear):
            parent_name, _, attr = n.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, m.base_layer)
    if hasattr(model, "_dialogue_adapter_spec"):
        del model._dialogue_adapter_spec
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class AdapterTensors:
    """One adapted linear: `name` is the module's name in the transformers model
    (`model.layers.0.self_attn.q_proj`); A is (r, in), B is (out, r) as in PEFT."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    r: int
    scaling: float
    magnitude: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to a plain tensor; a plain tensor as is."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32).clone()


def adapter_tensors(model: nn.Module) -> list[AdapterTensors]:
    """The trained adapters of either implementation, in one shape."""
    out: list[AdapterTensors] = []
    if is_peft(model):
        base = model.get_base_model()
        prefix_len = 0
        for n, m in base.named_modules():
            if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict) and "default" in m.lora_A:
                mag = None
                if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
                    mag = _full_tensor(m.lora_magnitude_vector["default"].weight)
                alpha = float(m.lora_alpha["default"])
                r = int(m.r["default"])
                out.append(AdapterTensors(n[prefix_len:], _full_tensor(m.lora_A["default"].weight),
                                          _full_tensor(m.lora_B["default"].weight), alpha, r,
                                          float(m.scaling["default"]), mag))
        return out
    for n, m in model.named_modules():
        if isinstance(m, AdapterLinear):
            mag = None if m.lora_magnitude_vector is None else _full_tensor(m.lora_magnitude_vector)
            out.append(AdapterTensors(n, _full_tensor(m.lora_A.weight), _full_tensor(m.lora_B.weight),
                                      m.lora_alpha, m.r, m.scaling, mag))
    return out


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so frozen inputs
    need no `requires_grad` trick)."""
    inner = unwrap(model)
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5 name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.config.use_cache = False


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether `enable_checkpointing` (or transformers' own switch) is on for this model."""
    inner = unwrap(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 / 4 names
        if hasattr(type(inner), name):
            return bool(getattr(inner, name))
    return False


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the bare base (for before/after comparisons) without removing the adapters."""
    if is_peft(model):
        with model.disable_adapter():
            yield
        return
    layers = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    saved = [m.forward for m in layers]
    try:
        for m in layers:
            m.forward = m.base_layer.forward  # type: ignore[method-assign]
        yield
    finally:
        for m, f in zip(layers, saved):
            m.forward = f  # type: ignore[method-assign]


def compile_adapters(model: nn.Module, **options: Any) -> int:
    """`torch.compile` every adapted linear in place (its base layer and the LoRA/DoRA update
    together, so the update's small matmuls, scaling and DoRA's norm fuse); returns how many.
    `nn.Module.compile` keeps parameter names, so checkpoints and export are unchanged. The
    decoder layers are left alone: gradient checkpointing and offload hook them."""
    n = 0
    for m in model.modules():
        if isinstance(m, AdapterLinear) or (hasattr(m, "lora_A") and hasattr(m, "base_layer")
                                            and isinstance(getattr(m, "lora_A"), nn.ModuleDict)):
            m.compile(**options)
            n += 1
    if not n:
        raise AdapterError("no adapters to compile: add adapters first")
    return n
