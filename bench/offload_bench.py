"""CPU offload of the frozen base (`dialogue train --offload`): what it costs and what it saves.

CPU mode (default), on the bundled SmolLM2-135M GGUF: each base (served, nf4) trained without and
with offload, gradient checkpointing on in both (offload turns it on; the baseline has it too so
the ratio is the offload's alone). The compute device is then the CPU itself, so offload cannot
save memory here: its host copy replaces the model's weights and up to `1 + prefetch` layers are
copied next to it; what this mode shows is the price of the copies and the mechanism's overhead.

    python bench/offload_bench.py [--steps 3] [--batch 1] [--seq 128] [--r 16]

Step time: configurations interleaved step by step in one process, fastest step of each (a
shared machine's load hits them all alike). Peak RSS: one process per configuration, the peak
reset (/proc/self/clear_refs) once the model is built, so it is the training steps' peak, not the
loading's; measured twice, with glibc's default allocator and with `MALLOC_MMAP_THRESHOLD_` fixed.
The default raises its mmap threshold as large blocks are freed and then keeps freed buffers in
the heap, so the per-layer copies that offload allocates and frees show up as RSS that is free
memory to the allocator; with the threshold fixed every freed block goes back to the OS and the
difference is what offload really holds. Ratios are offload vs no offload on the same base, in
the same run.

GPU mode, a Llama-3-8B-shaped NF4 model with random weights built by `train_bench.py`'s own
`random_nf4_model` (nothing downloaded): trained without offload, then the same model offloaded
in place and trained again from the same adapter values; peak device memory
(`torch.cuda.max_memory_allocated`, reset before each), device memory once set up, tokens/s, and
the frozen layers resident on the device at once:

    python bench/offload_bench.py --gpu [--batch 1] [--seq 2048] [--steps 5] [--prefetch 1]
    python bench/offload_bench.py --gpu --dry-run   # same code, tiny shape (4 layers), on CPU
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import train_bench as tb  # noqa: E402  (also puts src/ on the path)
import torch  # noqa: E402

CPU_CONFIGS = {  # name: (quant, offload)
    "served": ("served", False),
    "served-offload": ("served", True),
    "nf4": ("nf4", False),
    "nf4-offload": ("nf4", True),
}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 resets VmHWM to the current RSS
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return tb._peak_rss_mb() / 1024


def _now_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _build_cpu(name: str, args: argparse.Namespace, base=None, tok=None):
    from dialogue.train.lora import AdapterSpec, add_adapters, enable_checkpointing
    from dialogue.train.offload import offload
    from dialogue.train.quant import load_base
    quant, off = CPU_CONFIGS[name]
    model = copy.deepcopy(base) if base is not None else load_base(args.model, quant=quant, tokenizer=tok).model
    m = add_adapters(model, AdapterSpec(r=args.r, seed=0))
    enable_checkpointing(m)
    offloader = offload(m, "cpu", prefetch=args.prefetch) if off else None
    return m, offloader


def run_one_cpu(name: str, args: argparse.Namespace) -> dict:
    """One configuration in this process, for its peak RSS during training steps."""
    from dialogue.train.quant import load_tokenizer, resolve_model
    tok = load_tokenizer(resolve_model(args.model))
    m, off = _build_cpu(name, args, tok=tok)
    cpu = torch.device("cpu")
    set_up = _now_gb(cpu)
    _reset_peak(cpu)
    st = tb._Stepper(m, tb._cpu_batch(tok, args.batch, args.seq), "fp32", cpu)
    for _ in range(2):
        st.step()
    return {"name": name, "peak_rss_mb": _peak_gb(cpu) * 1024, "rss_set_up_mb": set_up * 1024,
            "host_mb": off.host_bytes / 2**20 if off else 0.0}


def cpu_main(args: argparse.Namespace) -> None:
    from dialogue.train.quant import load_base, load_tokenizer, resolve_model
    names = list(CPU_CONFIGS)
    mem: dict[str, dict] = {}
    if not args.no_memory:
        import os
        for n in names:
            cmd = [sys.executable, __file__, "--one", n, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--r", str(args.r), "--model", args.model, "--prefetch", str(args.prefetch)]
            mem[n] = {}
            for key, env in (("peak_rss_mb", {}), ("peak_rss_mb_fixed_mmap", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
                if out.returncode:
                    print(f"{n}: memory run failed: {out.stderr[-500:]}", file=sys.stderr)
                    continue
                mem[n][key] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    tok = load_tokenizer(resolve_model(args.model))
    batch = tb._cpu_batch(tok, args.batch, args.seq)
    bases = {q: load_base(args.model, quant=q, tokenizer=tok).model for q in ("served", "nf4")}
    steppers, offs = {}, {}
    for n in names:
        m, offs[n] = _build_cpu(n, args, base=bases[CPU_CONFIGS[n][0]])
        steppers[n] = tb._Stepper(m, batch, "fp32", torch.device("cpu"))
    del bases
    for st in steppers.values():
        st.step(timed=False)  # warm-up; its loss is the first-batch loss
    for _ in range(args.steps):
        for st in steppers.values():
            st.step()
    tokens = int(batch["attention_mask"].sum())
    rows = {}
    for n, st in steppers.items():
        o = offs[n]
        rows[n] = {"s_per_step": min(st.times), "tokens_per_s": tokens / min(st.times),
                   "first_batch_loss": st.first, "peak_rss_mb": mem.get(n, {}).get("peak_rss_mb", float("nan")),
                   "peak_rss_mb_fixed_mmap": mem.get(n, {}).get("peak_rss_mb_fixed_mmap", float("nan")),
                   "host_mb": o.host_bytes / 2**20 if o else 0.0,
                   "frozen_layers_on_device_peak": o.stats.peak_resident_layers if o else None,
                   "copied_mb_per_step": (o.stats.bytes_copied / (1 + args.steps)) / 2**20 if o else 0.0}
    print(f"CPU, {args.model}, batch {args.batch} x seq {args.seq}, r={args.r}, prefetch {args.prefetch}, "
          f"gradient checkpointing in every row; fastest of {args.steps} interleaved steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'config':15s} {'s/step':>7s} {'tok/s':>7s} {'peak MB':>8s} {'(fixed mmap)':>12s} "
          f"{'copied MB/step':>15s} {'1st loss':>9s}")
    for n, r in rows.items():
        print(f"{n:15s} {r['s_per_step']:7.2f} {r['tokens_per_s']:7.1f} {r['peak_rss_mb']:8.0f} "
              f"{r['peak_rss_mb_fixed_mmap']:12.0f} {r['copied_mb_per_step']:15.0f} {r['first_batch_loss']:9.4f}")
    print("ratios, offload vs no offload on the same base (same run):")
    for q in ("served", "nf4"):
        a, b = rows[q], rows[f"{q}-offload"]
        print(f"  {q:7s} step time {b['s_per_step'] / a['s_per_step']:.2f}x  peak RSS "
              f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x ({b['peak_rss_mb_fixed_mmap'] / a['peak_rss_mb_fixed_mmap']:.2f}x "
              f"with the mmap threshold fixed)  first-batch loss diff "
              f"{abs(b['first_batch_loss'] - a['first_batch_loss']):.1e}")
    if args.json:
        print(json.dumps(rows))


# ---------------------------------------------------------------- GPU (Llama-3-8B shape)

def gpu_main(args: argparse.Namespace) -> None:
    from dialogue.train.lora import AdapterSpec, add_adapters, enable_checkpointing, trainable_parameters
    from dialogue.train.offload import offload
    device = torch.device("cuda") if (torch.cuda.is_available() and not args.dry_run) else torch.device("cpu")
    if not args.dry_run and device.type != "cuda":
        sys.exit("--gpu needs a CUDA device (use --dry-run to check the code path on CPU)")
    cfg = tb.llama3_8b_config(args.dry_run)
    if args.layers or args.dry_run:  # the dry run's 2 layers would not show offload's bound: use 4
        cfg.num_hidden_layers = args.layers or 4
    seq = min(args.seq, cfg.max_position_embeddings)
    t = time.perf_counter()
    model = tb.random_nf4_model(cfg, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    build_s = time.perf_counter() - t
    m = add_adapters(model, AdapterSpec(r=args.r, impl="peft", seed=0))
    enable_checkpointing(m)
    start = {k: v.detach().clone() for k, v in trainable_parameters(m).items()}
    x = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device,
                      generator=torch.Generator(device=device).manual_seed(1))
    batch = {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}
    precision = "bf16" if device.type == "cuda" else "fp32"
    peak_tflops, chip = tb.gpu_peak_tflops(args.peak_tflops)
    fpt = tb.model_flops_per_token(cfg, seq)
    print(f"Llama-3-8B shape{' (dry run: tiny)' if args.dry_run else ''}: {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}; NF4 base built in {build_s:.1f}s on {chip}; batch {args.batch} x seq {seq}; "
          f"PEFT LoRA r={args.r}, gradient checkpointing, prefetch {args.prefetch}")
    rows = {}
    off = None
    for name in ("no-offload", "offload"):
        if name == "offload":
            with torch.no_grad():  # the same adapter values as the first run started from
                for k, p in trainable_parameters(m).items():
                    p.copy_(start[k])
            off = offload(m, device, prefetch=args.prefetch)
        _reset_peak(device)
        set_up = _now_gb(device)
        r = tb._step_loop(m, batch, args.steps, precision, device)
        r["peak_mem_gb"] = _peak_gb(device)
        r["mem_set_up_gb"] = set_up
        r["n_layers"] = cfg.num_hidden_layers
        r["frozen_layers_on_device_peak"] = off.stats.peak_resident_layers if off else cfg.num_hidden_layers
        r["mfu"] = (r["tokens_per_s"] * fpt / (peak_tflops * 1e12)) if peak_tflops else None
        rows[name] = r
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"  {name:10s} {r['tokens_per_s']:9.1f} tok/s  peak {r['peak_mem_gb']:7.2f} GB  set up "
              f"{set_up:7.2f} GB  frozen layers on device {r['frozen_layers_on_device_peak']:3d}/{cfg.num_hidden_layers}  "
              f"MFU {mfu}  loss {r['first_batch_loss']:.4f}", flush=True)
    a, b = rows["no-offload"], rows["offload"]
    print(f"offload vs no offload (same model, same run): speed {b['tokens_per_s'] / a['tokens_per_s']:.2f}x, "
          f"peak memory {b['peak_mem_gb'] / a['peak_mem_gb']:.2f}x; frozen base in host memory "
          f"{off.host_bytes / 2**30:.2f} GB")
    if device.type == "cpu":
        print("  (dry run on CPU: memory is this process's RSS, where offload cannot save anything)")
    if args.json:
        print(json.dumps(rows))


def main(argv: list[str] | None = None) -> None:
    p = tb.bench_parser(__doc__)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="GPU mode: override the number of layers")
    tb.dispatch(p.parse_args(argv), gpu_main=gpu_main, one=run_one_cpu, cpu_main=cpu_main)

if __name__ == "__main__":
    main()
