"""Sharding a run across processes with PyTorch FSDP2 (`fully_shard`).

One code path from a laptop to a cluster: `dialogue train --nproc N` relaunches itself under
`torchrun`, each process joins the group (gloo on CPU, NCCL on GPUs), and the model is sharded
per decoder layer and then as a whole. The frozen 4-bit base shards too: bitsandbytes' packed
NF4 weight is stored in a float `quant_storage` dtype equal to the FSDP parameter dtype, so FSDP
treats it as an ordinary parameter (checked on CPU with bitsandbytes 0.50). The loop makes the loss a mean over every target
token of all ranks, so N processes compute the same update as one process with N times the batch.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import subprocess
import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .lora import unwrap

__all__ = ["is_distributed_launch", "setup", "teardown", "shard", "launch", "decoder_layers", "check_nodes",
           "same_everywhere", "skeleton", "load_base_on_rank0", "full_state", "materialize", "is_meta"]


def is_distributed_launch() -> bool:
    """True inside a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun described in the environment; returns rank, world, device."""
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def teardown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = unwrap(model)
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find decoder layers in {type(inner).__name__} (expected .model.layers)")
    return layers


def shard(model: nn.Module, device: torch.device | None = None, offload: bool = False) -> nn.Module:
    """`fully_shard` each decoder layer, then the whole model (the FSDP2 recipe): a layer's
    parameters are gathered just before it runs and freed after.

    `offload=True` adds FSDP2's `CPUOffloadPolicy`: every shard (the frozen base's and the
    adapters'), the gradients and the optimizer step live on the CPU, and each layer is copied to
    the device as it is gathered. It runs on gloo/CPU too (checked here), where it exercises the
    same code without saving anything. It moves parameters only, so it refuses bases whose frozen
    weights are not parameters (the served GGUF blocks are buffers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    from .quant import GGUFLinear

    dev = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    for m in model.modules():
        if type(m).__name__ == "HQQLinear":
            raise ValueError("HQQ layers cannot be sharded by FSDP; use quant='nf4' (with a float "
                             "quant_storage) for multi-process training")
        if offload and isinstance(m, GGUFLinear):
            raise ValueError("--offload with --nproc uses FSDP2's CPUOffloadPolicy, which offloads parameters "
                             "only; the served GGUF weights are buffers and would stay on the device. Use "
                             "--quant nf4 (or none) with --nproc, or --offload in one process")
    kw: dict = {}
    if offload:
        from torch.distributed.fsdp import CPUOffloadPolicy
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=dev.type == "cuda")
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    model._dialogue_compute_device = dev  # with CPU offload the shards' device is the CPU's
    return model


def launch(argv: Sequence[str], nproc: int, module: str = "dialogue.train.main", *, nnodes: int = 1,
           node_rank: int | None = None, rdzv_endpoint: str | None = None, rdzv_id: str = "dialogue-train") -> int:
    """Run `python -m module argv` under torchrun: `nproc` processes on this machine, times `nnodes`
    machines. One machine: `--standalone`. Several: torchrun's c10d rendezvous at `rdzv_endpoint`
    under the run id `rdzv_id` (ranks are assigned as the nodes join), or, with `node_rank`, the
    static rendezvous (this node's ranks are fixed; node 0 must be the endpoint's host)."""
    check_nodes(nproc, nnodes, node_rank, rdzv_endpoint)
    if nnodes == 1 and nproc < 2:
        raise ValueError("launch needs at least 2 processes")
    # torchrun's own parser matches abbreviations across the whole command line: spell `--r` out
    args = ["--rank" if a == "--r" else "--rank=" + a[4:] if a.startswith("--r=") else a for a in argv]
    if nnodes == 1:
        where = ["--standalone"]
    elif node_rank is None:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
    else:
        host, _, port = str(rdzv_endpoint).rpartition(":")
        where = [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                 f"--master-addr={host}", f"--master-port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", "-m", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    return subprocess.call(cmd, env=env)


def check_nodes(nproc: int, nnodes: int, node_rank: int | None, rdzv_endpoint: str | None) -> None:
    """A clear error for a combination torchrun would reject late (or hang on)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if nnodes < 1:
        raise ValueError(f"--nnodes must be at least 1, got {nnodes}")
    if nnodes == 1:
        if node_rank not in (None, 0) or rdzv_endpoint:
            raise ValueError("--node-rank and --rdzv-endpoint are for --nnodes 2 or more")
        return
    if not rdzv_endpoint:
        raise ValueError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (a machine every node reaches; "
                         "the same on every node)")
    host, sep, port = rdzv_endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {rdzv_endpoint!r}")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}")


def same_everywhere(what: str, fingerprint: str) -> None:
    """Every rank must hold the same `fingerprint` (of its data, say): otherwise a clear error on
    every rank naming the ranks that differ from rank 0, instead of a silently wrong run. Each
    node reads its own copy of the data, so this is what keeps a multi-node run honest."""
    import torch.distributed as dist
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, fingerprint)
    odd = [r for r, f in enumerate(got) if f != got[0]]
    if odd:
        raise ValueError(f"{what} differs between processes: rank(s) {odd} do not have what rank 0 has. Every "
                         "node must run the same command on the same data (the same files, or a shared path)")


# ---------------------------------------------------------------- one copy of the base: rank 0's

def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    if type(t).__name__ == "Params4bit":  # keep bitsandbytes' class; its quant state is small and travels
        import bitsandbytes as bnb
        qs = copy.deepcopy(t.quant_state)
        qs.to("cpu")  # pickled to the other ranks: a CUDA tensor would land on rank 0's GPU (`materialize` moves it)
        return bnb.nn.Params4bit(meta, requires_grad=False, quant_state=qs, blocksize=t.blocksize,
                                 compress_statistics=t.compress_statistics, quant_type=t.quant_type,
                                 quant_storage=t.quant_storage, module=None, bnb_quantized=True)
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no memory): the
    module tree, shapes, dtypes, ties and bitsandbytes' quant states, without the weights."""
    from .quant import GGUFLinear
    for m in model.modules():
        if isinstance(m, GGUFLinear):
            raise ValueError("the served GGUF weights are buffers FSDP does not shard, so every process would "
                             "hold them whole anyway: use --quant nf4 (or none) with --load-on-rank0")
        if type(m).__name__ == "HQQLinear":
            raise ValueError("HQQ layers cannot be sharded by FSDP; use --quant nf4")
    memo: dict[int, Any] = {id(t): _meta_like(t) for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo)
    for m in out.modules():
        w = getattr(m, "weight", None)
        if type(w).__name__ == "Params4bit":
            w.module = m
            m.quant_state = w.quant_state
    return out


def load_base_on_rank0(load: Callable[[], Any]) -> Any:
    """Rank 0 runs `load()` (a quantized `Base`); every other rank receives its skeleton (module
    tree on the meta device, tokenizer, info) and holds no weights until `materialize` fills its
    shards from rank 0's. Peak memory on those ranks: their shards, not the whole base."""
    import torch.distributed as dist
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        base = load()
        base.info["load_on_rank0"] = True  # finetune: materialize after sharding
        box[0] = dataclasses.replace(base, model=skeleton(base.model))
    dist.broadcast_object_list(box, src=0)
    return base if dist.get_rank() == 0 else box[0]


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's whole state (before `shard`): what `materialize` broadcasts; empty on the others."""
    import torch.distributed as dist
    if dist.get_rank() != 0:
        return {}
    return dict(model.named_parameters())


def materialize(model: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """After `shard`: the meta ranks allocate their shards and every rank receives rank 0's values
    (`set_model_state_dict` with `broadcast_from_rank0`: one whole tensor at a time travels, each
    rank keeps its shard). Buffers (rotary tables, which no state dict holds) follow by broadcast."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if is_meta(model):
        model.to_empty(device=device)
        for m in model.modules():  # bitsandbytes' quant states came as CPU tensors (`skeleton`)
            if getattr(m, "quant_state", None) is not None:
                m.quant_state.to(device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))
    with torch.no_grad():
        for _, b in model.named_buffers():
            dist.broadcast(b, src=0)
