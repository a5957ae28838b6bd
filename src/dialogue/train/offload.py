"""CPU offload of the frozen base during training: the base lives in host memory and each decoder
layer's frozen weights visit the compute device only while that layer runs.

This is what lets a model whose quantized base does not fit on the GPU train there anyway: only
`1 + prefetch` layers' frozen weights are on the device at any moment.

What stays where (single process, `offload(model, device)`):

- host (CPU, pinned when the device is CUDA): every frozen tensor of every decoder layer, in
  whatever form the base holds it: bitsandbytes' packed NF4 weight and its quantization state
  (absmax, code, nested state), HQQ's packed weight and its scale/zero tensors, the served GGUF
  blocks (or their kept dense copy), plain frozen weights, norms, biases. Weights already in
  CPU memory that can serve as the host copy (not needing pinning) are used in place, so nothing
  is duplicated; otherwise they are copied once into (pinned) host memory.
- device, always: the trainable adapter parameters (LoRA A/B, DoRA magnitudes), their gradients
  and optimizer state, the embeddings, the final norm, the LM head, the rotary tables, and the
  activations that gradient checkpointing keeps (one hidden state per layer).

How: each frozen tensor of a layer keeps its identity (modules, PEFT wrappers, bitsandbytes'
autograd context all hold the same tensor objects), but the storage under it on the device is
freed (`resize_(0)`) when the layer is not running and re-allocated and refilled from the host
copy just before it runs. Doing it at the storage level, rather than swapping tensors in the
modules, is what makes it correct for every kind of base: bitsandbytes' `MatMul4Bit` keeps the
weight in `ctx.tensors` (not in autograd's saved tensors), and `GGUFLinear` re-reads its blocks
in backward, so both see whatever storage the tensor has when backward runs: the refilled one.
(FSDP1 frees and refills its flat parameters the same way.)

When: forward pre-hook of a layer -> copy in (unless prefetched), prefetch the next `prefetch`
layers; forward post-hook -> free, and hook the layer's output so that when its gradient arrives
(backward is about to enter the layer) the layer is copied in again for gradient checkpointing's
recomputation and the previous layer is prefetched; the layer is freed when backward moves on to
the layer below, and everything left is freed when backward ends. On CUDA, prefetches run on a
side stream and the compute stream waits on an event; on CPU the same schedule runs with plain
copies (which is what the tests check).

`state_dict()` / `load_state_dict()` of an offloaded model work (each layer is brought in for the
call; the state dict holds views of the host copies). Reading a frozen weight directly outside a
forward pass needs `offloader.loaded(i)`: between uses its device storage is freed.

Gradient checkpointing is required, and `offload()` turns it on: without it autograd saves, for
every layer, tensors derived from the frozen weights (the dequantized NF4/HQQ/GGUF matrix, bf16
casts) until backward, so the device would hold a dense copy of every layer and nothing would be
saved.

Why not a library:
- accelerate's `cpu_offload` / `AlignDevicesHook` (1.15) targets inference: it swaps every
  parameter of every submodule for a meta tensor and reloads it from a state dict per call.
  Tried on our bases with adapters: on the served GGUF base the trainable LoRA parameters are
  reloaded too, so all 420 adapter gradients came back None (training would silently do nothing);
  on bitsandbytes NF4 the forward fails ("Cannot copy out of meta tensor; no data!"), on HQQ too
  ("Tensor on device cpu is not on the expected device meta!"). It also knows nothing of
  tensors that are not parameters or buffers (`GGUFLinear`'s kept dense weight, bitsandbytes'
  quant state, HQQ's scale/zero dict) and has no prefetch.
- FSDP2's `CPUOffloadPolicy` is the right tool with several processes and `fsdp.shard(...,
  offload=True)` uses it (it works on gloo/CPU here), but in one process FSDP2 still needs a
  process group, it moves parameters only (the GGUF blocks are buffers, bitsandbytes' quant state
  is neither) and it puts the trainable parameters and the optimizer step on the CPU as well.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["OffloadError", "OffloadStats", "Offloader", "offload", "get_offloader"]

_ATTR = "_dialogue_offloader"
# nn.Module's own bookkeeping attributes: everything else in a module's __dict__ may hold tensors
# (GGUFLinear._dense, HQQLinear.meta, Linear4bit.quant_state)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


class OffloadError(ValueError):
    """The model cannot be offloaded as asked (or a layer broke the offload's invariants)."""


@dataclass
class OffloadStats:
    """What the offload did, per decoder layer (index = layer number).

    `loads_forward` / `loads_backward`: host -> device copies of the layer's frozen weights made for
    the forward pass and for backward (gradient checkpointing's recomputation). `recomputed`: how
    many times the layer's forward was re-run inside backward (seen by hooks on the layer's
    submodules, which run inside the checkpoint). `peak_resident_layers` / `peak_resident_bytes`:
    the most layers (and bytes of frozen weights) allocated on the device at once, measured from
    the device storages themselves after every copy."""

    n_layers: int
    loads_forward: list[int] = field(default_factory=list)
    loads_backward: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)
    peak_resident_layers: int = 0
    peak_resident_bytes: int = 0
    bytes_copied: int = 0

    def __post_init__(self) -> None:
        for name in ("loads_forward", "loads_backward", "recomputed"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.n_layers)


class _Block:
    """One storage of a layer's frozen tensors: its host copy and its device storage (allocated
    only while resident). Several tensors may view one storage; they are kept strongly, which is
    fine: they are the model's own tensors."""

    __slots__ = ("host", "dev", "nbytes", "tensors", "names")

    def __init__(self, host: torch.Tensor, dev: torch.UntypedStorage, nbytes: int,
                 tensors: list[torch.Tensor], names: list[str]) -> None:
        self.host, self.dev, self.nbytes, self.tensors, self.names = host, dev, nbytes, tensors, names


class _Layer:
    __slots__ = ("index", "module", "blocks", "nbytes", "event", "adhoc", "held")

    def __init__(self, index: int, module: nn.Module, blocks: list[_Block]) -> None:
        self.index, self.module, self.blocks = index, module, blocks
        self.nbytes = sum(b.nbytes for b in blocks)
        self.event: Any = None  # CUDA event of an in-flight prefetch
        self.adhoc = 0  # submodule calls outside the layer's own forward (see _guard_pre)
        self.held: list[bool] = []  # loaded() / state_dict calls in progress: was it resident before?

    @property
    def resident(self) -> bool:
        return any(b.dev.nbytes() > 0 for b in self.blocks)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (checkpoint recomputation
    and tensor hooks run there)."""
    return torch._C._current_graph_task_id() != -1


def _walk(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors reachable from a module attribute: plain tensors, dicts/lists of them (HQQ's meta),
    and bitsandbytes' QuantState (absmax, code, nested state2). Modules are not followed: each is
    visited on its own."""
    if depth > 4 or isinstance(obj, nn.Module):
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        qs = getattr(obj, "quant_state", None)  # bitsandbytes Params4bit
        if qs is not None:
            yield from _walk(qs, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, depth + 1)
    elif type(obj).__name__ == "QuantState":
        for v in vars(obj).values():
            yield from _walk(v, depth + 1)


def _module_tensors(mod: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for n, p in mod._parameters.items():
        if p is not None:
            yield n, p
            for t in _walk(getattr(p, "quant_state", None)):
                yield f"{n}.quant_state", t
    for n, b in mod._buffers.items():
        if b is not None:
            yield n, b
    for n, v in vars(mod).items():
        if n not in _MODULE_INTERNALS:
            for t in _walk(v):
                yield n, t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _u8(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over a whole storage. It has its own version counter, so copying through it
    does not bump the version of the model's tensors (autograd would then refuse saved tensors)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class Offloader:
    """Keeps the frozen weights of a model's decoder layers in host memory and brings each layer to
    the compute device while it runs. Made by `offload()`; see the module docstring."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, device: torch.device, prefetch: int,
                 pin: bool) -> None:
        self.model_ref = weakref.ref(model)
        self.device, self.prefetch, self.pin = device, prefetch, pin
        self.layers: list[_Layer] = []
        self.stats = OffloadStats(len(layers))
        self._handles: list[Any] = []
        self._active: int | None = None  # layer whose own forward is running (not in backward)
        self._bw_task: int | None = None  # graph task id of the backward in progress
        self._bw_recomputed: set[int] = set()
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._warned = False

    # ------------------------------------------------------------ setup

    def _prepare(self, layers: nn.ModuleList, outside: set[tuple[str, int]]) -> None:
        owner: dict[int, int] = {}  # id(tensor) -> the layer that holds it
        for i, layer in enumerate(layers):
            groups: dict[tuple[str, int], tuple[list[torch.Tensor], list[str]]] = {}
            trainable = {_storage_key(p) for p in layer.parameters() if p.requires_grad}
            seen: set[int] = set()
            for mod_name, mod in layer.named_modules():
                for name, t in _module_tensors(mod):
                    if id(t) in seen or t.requires_grad:
                        continue
                    seen.add(id(t))
                    full = f"layers.{i}.{mod_name}.{name}".replace("..", ".")
                    if owner.setdefault(id(t), i) != i:
                        raise OffloadError(f"{full} is shared with layer {owner[id(t)]}; offload moves each "
                                           "layer's frozen tensors on their own")
                    if t.is_meta:
                        raise OffloadError(f"{full} is on the meta device: load the weights before offloading")
                    if t.untyped_storage().nbytes() == 0:
                        continue
                    key = _storage_key(t)
                    if key in trainable:
                        raise OffloadError(f"{full} shares storage with a trainable parameter; cannot offload it")
                    if key in outside:
                        raise OffloadError(f"{full} shares storage with a tensor outside the decoder layers "
                                           "(tied weights?); offload cannot move it per layer")
                    ts, names = groups.setdefault(key, ([], []))
                    ts.append(t)
                    names.append(full)
            blocks = []
            for ts, names in groups.values():
                src = ts[0].untyped_storage()
                n = src.nbytes()
                if src.device.type == "cpu" and (not self.pin or src.is_pinned()):
                    host = _u8(src)  # the weights' own memory is the host copy: nothing duplicated
                else:
                    host = torch.empty(n, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
                    host.copy_(_u8(src))
                dev = torch.UntypedStorage(n, device=self.device)
                for t in ts:
                    # re-point the tensor (same object) at a storage we own: allocated by torch, so
                    # resizable (a numpy- or mmap-backed one is not), and on the compute device
                    new = torch.empty(0, dtype=t.dtype, device=self.device).set_(
                        dev, t.storage_offset(), t.size(), t.stride())
                    if type(t) is torch.Tensor and t._base is not None:
                        # a view keeps its base (and the old storage) alive through `.data =`;
                        # swapping the whole tensor drops it (GGUFLinear's dense weight is a view)
                        torch.utils.swap_tensors(t, new)
                    else:
                        t.data = new
                dev.resize_(0)
                blocks.append(_Block(host, dev, n, ts, names))
            if blocks:
                if _is_bnb4(layer):
                    _no_cpu_repack(layer)
                self.layers.append(_Layer(i, layer, blocks))
            else:
                self.layers.append(_Layer(i, layer, []))
        for L in self.layers:
            if not L.blocks:
                continue
            self._handles.append(L.module.register_forward_pre_hook(self._make(self._pre_forward, L)))
            # always_call: a forward that raises still frees the layer
            self._handles.append(L.module.register_forward_hook(self._make(self._post_forward, L), always_call=True))
            for child in L.module.children():
                self._handles.append(child.register_forward_pre_hook(self._make(self._guard_pre, L)))
                self._handles.append(child.register_forward_hook(self._make(self._guard_post, L)))
            # state_dict() and load_state_dict() read and write the frozen tensors: without these,
            # they would touch freed storage (bitsandbytes' quant-state serialisation segfaults)
            self._handles.append(L.module.register_state_dict_pre_hook(self._make(self._sd_pre, L)))
            self._handles.append(L.module.register_state_dict_post_hook(self._make(self._sd_post, L)))
            self._handles.append(L.module.register_load_state_dict_pre_hook(self._make(self._sd_pre, L)))
            self._handles.append(L.module.register_load_state_dict_post_hook(self._make(self._load_post, L)))

    def _make(self, fn: Any, L: _Layer) -> Any:
        ref = weakref.ref(self)

        def hook(module: nn.Module, *args: Any) -> Any:
            me = ref()
            return None if me is None else fn(L, *args)
        return hook

    # ------------------------------------------------------------ residency

    def resident(self) -> list[int]:
        """Indices of the layers whose frozen weights are allocated on the compute device now
        (read from the device storages, not from a counter)."""
        return [L.index for L in self.layers if L.resident]

    def resident_bytes(self) -> int:
        return sum(b.dev.nbytes() for L in self.layers for b in L.blocks)

    @property
    def host_bytes(self) -> int:
        return sum(L.nbytes for L in self.layers)

    def reset_stats(self) -> None:
        self.stats = OffloadStats(len(self.stats.loads_forward))

    def _copy_in(self, L: _Layer, phase: str | None, prefetch: bool) -> None:
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            stream = self._stream if prefetch else compute
            with torch.cuda.stream(stream):
                if prefetch:
                    stream.wait_stream(compute)  # the freed memory it may reuse is no longer read
                for b in L.blocks:
                    b.dev.resize_(b.nbytes)
                    dst = _u8(b.dev)
                    dst.copy_(b.host, non_blocking=True)
                    dst.record_stream(compute)  # freeing waits for the compute stream's use
                if prefetch:
                    L.event = stream.record_event()
        else:
            for b in L.blocks:
                b.dev.resize_(b.nbytes)
                _u8(b.dev).copy_(b.host)
        self.stats.bytes_copied += L.nbytes
        if phase is None:  # not for a pass (state_dict, loaded(), remove()): not part of the accounting
            return
        getattr(self.stats, f"loads_{phase}")[L.index] += 1
        n, nbytes = len(self.resident()), self.resident_bytes()
        self.stats.peak_resident_layers = max(self.stats.peak_resident_layers, n)
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, nbytes)
        if n > 2 + self.prefetch and not self._warned:
            import warnings
            self._warned = True
            warnings.warn(f"offload: {n} layers' frozen weights are on {self.device} at once "
                          f"(expected at most {1 + self.prefetch})", RuntimeWarning, stacklevel=3)

    def _ensure(self, L: _Layer, phase: str | None) -> None:
        if L.event is not None:
            torch.cuda.current_stream(self.device).wait_event(L.event)
            L.event = None
            return
        if not L.resident:
            self._copy_in(L, phase, prefetch=False)

    def _prefetch(self, index: int, phase: str) -> None:
        if 0 <= index < len(self.layers):
            L = self.layers[index]
            if L.blocks and not L.resident:
                self._copy_in(L, phase, prefetch=True)

    def _release(self, L: _Layer) -> None:
        if not L.resident or L.held:  # held: inside loaded() or a state_dict call
            return
        for b in L.blocks:
            ptr = b.dev.data_ptr()
            for t, name in zip(b.tensors, b.names):
                if t.untyped_storage().data_ptr() != ptr:
                    raise OffloadError(f"{name} was given a new storage while offloaded (something replaced "
                                       "its .data during forward); offload cannot track it")
            b.dev.resize_(0)
        L.event = None

    # ------------------------------------------------------------ hooks

    def _pre_forward(self, L: _Layer, args: Any) -> None:
        if _in_backward():  # a checkpoint that wraps __call__ re-runs the layer's hooks
            self._enter_backward(L)
            return
        self._active = L.index
        self._ensure(L, "forward")
        for k in range(1, self.prefetch + 1):
            self._prefetch(L.index + k, "forward")

    def _post_forward(self, L: _Layer, args: Any, output: Any) -> None:
        if _in_backward():
            return  # freed when backward moves on (its backward still reads the weights)
        self._active = None
        if output is None:  # the forward raised (always_call): free the prefetched layers too
            for k in range(1, self.prefetch + 1):
                if L.index + k < len(self.layers):
                    self._release(self.layers[L.index + k])
        elif torch.is_grad_enabled():
            for t in _walk(output):
                if t.requires_grad:
                    # pre-backward: fires when the gradient of the layer's output is ready, i.e. just
                    # before backward (and the checkpoint's recomputation) enters this layer
                    t.register_hook(self._make_pre_backward(L))
        self._release(L)

    def _stack_post(self, module: nn.Module, args: Any, output: Any) -> None:
        """After the decoder stack's forward (or its failure): nothing may stay on the device, e.g. a
        layer prefetched for a forward that stopped early."""
        if not _in_backward():
            self._active = None
            for L in self.layers:
                L.adhoc = 0
                self._release(L)

    def _make_pre_backward(self, L: _Layer) -> Any:
        ref = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            me = ref()
            if me is not None:
                me._enter_backward(L)
        return hook

    def _enter_backward(self, L: _Layer) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._bw_task:
            self._bw_task = task
            self._bw_recomputed = set()
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        # backward runs the layers top down: the ones above this one are done with their weights
        for other in self.layers:
            if other.index > L.index:
                self._release(other)
        self._ensure(L, "backward")
        for k in range(1, self.prefetch + 1):
            self._prefetch(L.index - k, "backward")

    def _end_backward(self) -> None:
        for L in self.layers:
            self._release(L)
        self._bw_task = None

    def _guard_pre(self, L: _Layer, args: Any) -> None:
        """On each submodule of a layer: inside checkpoint recomputation (which re-runs the layer's
        forward but, in transformers >= 5, not its own hooks) make sure the weights are there and
        count the recomputation; outside the layer's own forward (a submodule called directly),
        load the layer for that call."""
        if _in_backward():
            # normally a no-op (the layer's output hook loaded it); without that hook, this is where
            # backward enters the layer
            self._enter_backward(L)
            if L.index not in self._bw_recomputed:
                self._bw_recomputed.add(L.index)
                self.stats.recomputed[L.index] += 1
        elif self._active != L.index:
            L.adhoc += 1
            self._ensure(L, "forward")

    def _guard_post(self, L: _Layer, args: Any, output: Any) -> None:
        if L.adhoc and not _in_backward():
            L.adhoc -= 1
            if not L.adhoc:
                self._release(L)

    def _sd_pre(self, L: _Layer, *args: Any) -> None:
        L.held.append(L.resident)
        self._ensure(L, None)

    def _sd_post(self, L: _Layer, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        """Entries that alias the layer's device storage become views of the host copy: a state
        dict of an offloaded model holds the base where it lives, and stays valid after the
        device storage is freed."""
        by_ptr = {b.dev.data_ptr(): b for b in L.blocks if b.dev.nbytes()}
        for k, v in list(state_dict.items()):
            if k.startswith(prefix) and isinstance(v, torch.Tensor) and v.device == self.device:
                b = by_ptr.get(v.untyped_storage().data_ptr())
                if b is not None:
                    state_dict[k] = torch.empty(0, dtype=v.dtype).set_(
                        b.host.untyped_storage(), v.storage_offset(), v.size(), v.stride())
        if not L.held.pop():
            self._release(L)

    def _load_post(self, L: _Layer, incompatible_keys: Any) -> None:
        """Whatever was loaded into the frozen tensors becomes the host copy."""
        for b in L.blocks:
            b.host.copy_(_u8(b.dev))
        if not L.held.pop():
            self._release(L)

    # ------------------------------------------------------------ teardown

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Layer `index` with its frozen weights on the device, for code that reads them outside a
        forward pass (inspection, tests)."""
        L = self.layers[index]
        L.held.append(L.resident)
        self._ensure(L, None)
        try:
            yield L.module
        finally:
            if not L.held.pop():
                self._release(L)

    def remove(self) -> None:
        """Stop offloading: every layer's frozen weights go back to the device for good (the memory
        of the whole base is needed again) and the hooks come off."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for L in self.layers:
            self._ensure(L, None)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        for L in self.layers:
            for b in L.blocks:
                b.host = torch.empty(0, dtype=torch.uint8)  # the host copy is not needed any more
        m = self.model_ref()
        if m is not None and getattr(m, _ATTR, None) is self:
            delattr(m, _ATTR)
            m.__dict__.pop("_dialogue_compute_device", None)

    def __repr__(self) -> str:
        return (f"Offloader({len(self.layers)} layers, {self.host_bytes / 2**20:.1f} MiB on host, "
                f"device={self.device}, prefetch={self.prefetch}, resident={self.resident()})")


def _is_bnb4(layer: nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in layer.modules())


def _no_cpu_repack(layer: nn.Module) -> None:
    """bitsandbytes repacks an NF4 weight in place for CPU inference (eval, no grad, AVX512-BF16),
    replacing the weight's storage: the offload would lose track of it. Training never takes that
    path; turn it off so evaluation does not either."""
    for m in layer.modules():
        if type(m).__name__ == "Linear4bit" and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def get_offloader(model: nn.Module) -> Offloader | None:
    """The offloader attached to a model (or to the model under a PEFT wrapper), if any."""
    from .lora import unwrap
    for m in (model, unwrap(model)):
        off = getattr(m, _ATTR, None)
        if off is not None:
            return off
    return None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def offload(model: nn.Module, device: str | torch.device | None = None, *, prefetch: int = 1,
            pin: bool | None = None) -> Offloader:
    """Train `model` (adapters already added) with its frozen decoder-layer weights in host memory.

    Everything else (adapters, embeddings, final norm, LM head, rotary tables) is moved to
    `device` (default: the current CUDA device, else CPU); gradient checkpointing is turned on
    (offload needs it, see the module docstring). Build the optimizer after this call. `prefetch`
    is how many layers ahead are copied while the current one computes (0: none); `pin` defaults
    to pinning the host copies when the device is CUDA (needed for asynchronous copies)."""
    from .fsdp import decoder_layers
    from .lora import enable_checkpointing, unwrap

    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise OffloadError(f"prefetch must be a non-negative integer, got {prefetch!r}")
    dev = _default_device() if device is None else torch.device(device)
    if dev.type == "meta":
        raise OffloadError("cannot offload to the meta device: give the compute device (cuda or cpu)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OffloadError(f"offload device {dev} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    if get_offloader(model) is not None:
        raise OffloadError("this model is already offloaded (call .remove() on its offloader first)")
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        raise OffloadError("this model is sharded with FSDP; use fsdp.shard(model, offload=True), which "
                           "offloads through FSDP2's CPUOffloadPolicy")
    if not any(p.requires_grad for p in model.parameters()):
        raise OffloadError("the model has no trainable parameters: add adapters before offloading "
                           "(the adapters stay on the device, the frozen base goes to the host)")
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise OffloadError(f"offload works per decoder layer: {e}") from None
    inner = unwrap(model)
    if not (hasattr(inner, "gradient_checkpointing_enable") or hasattr(inner, "activation_checkpointing_enable")):
        raise OffloadError(f"{type(inner).__name__} does not support gradient checkpointing, which offload needs")
    if pin is None:
        pin = dev.type == "cuda"
    if pin and not torch.cuda.is_available():
        raise OffloadError("pinned host memory needs CUDA; pass pin=False")
    # everything above only checked: a refused call leaves the model as it was
    enable_checkpointing(model)
    if not all(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise OffloadError("gradient checkpointing could not be turned on for every decoder layer; offload "
                           "needs it (otherwise autograd keeps each layer's dequantized weights on the device)")

    layer_ids = {id(m) for layer in layers for m in layer.modules()}
    # storages of the non-layer parts, where they are now (the layers' tensors are still there too):
    # a layer tensor sharing one of them cannot be moved on its own
    outside = {_storage_key(t) for m in inner.modules() if id(m) not in layer_ids
               for _, t in _module_tensors(m) if t.untyped_storage().nbytes()}
    with torch.no_grad():
        # the non-layer parts and every trainable parameter go to the device, for good
        for m in inner.modules():
            if id(m) in layer_ids:
                for p in m._parameters.values():
                    if p is not None and p.requires_grad and p.device != dev:
                        p.data = p.data.to(dev)
            else:
                m._apply(lambda t: t.to(dev), recurse=False)
    off = Offloader(model, layers, dev, prefetch, pin)
    with torch.no_grad():
        off._prepare(layers, outside)
    stack = next((m for m in inner.modules() if any(c is layers for c in m.children())), None)
    if stack is not None:  # the module that runs the layers (LlamaModel), called through __call__
        ref = weakref.ref(off)
        off._handles.append(stack.register_forward_hook(
            lambda mod, args, out: None if ref() is None else ref()._stack_post(mod, args, out), always_call=True))
    setattr(model, _ATTR, off)
    model._dialogue_compute_device = dev  # the loop's device: the parameters' is not a guide any more
    return off
