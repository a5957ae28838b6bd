"""Sharding a run across processes with PyTorch FSDP2 (`fully_shard`).

One code path from a laptop to a cluster: `dialogue train --nproc N` relaunches itself under
`torchrun`, each process joins the group (gloo on CPU, NCCL on GPUs), and the model is sharded
per decoder layer and then as a whole. The frozen 4-bit base shards too: bitsandbytes' packed
NF4 weight is stored in a float `quant_storage` dtype equal to the FSDP parameter dtype, so FSDP
treats it as an ordinary parameter (checked on CPU with bitsandbytes 0.50). The loop makes the loss a mean over every target
token of all ranks, so N processes compute the same update as one process with N times the batch.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from typing import Sequence

import torch
from torch import nn

from .lora import unwrap

__all__ = ["is_distributed_launch", "setup", "teardown", "shard", "launch", "decoder_layers"]


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


def launch(argv: Sequence[str], nproc: int, module: str = "dialogue.train.main") -> int:
    """Run `python -m module argv` under torchrun with `nproc` processes on this machine."""
    if nproc < 2:
        raise ValueError("launch needs at least 2 processes")
    # torchrun's own parser matches abbreviations across the whole command line: spell `--r` out
    args = ["--rank" if a == "--r" else "--rank=" + a[4:] if a.startswith("--r=") else a for a in argv]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    return subprocess.call(cmd, env=env)

