"""`dialogue train ...`: fine-tune an adapter from dialogues and docs.

The CLI owns no training logic: it parses arguments into `finetune()`'s. Dialogues are named;
the caller (the CLI, which owns the store) passes `load_dialogues` to turn names into
`Dialogue` objects. With `--nproc N` the command relaunches itself under torchrun; the
dialogues are then handed to the workers as a JSONL file, since a callable cannot cross
processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..document import ContextItem, Dialogue, Message

__all__ = ["train_main", "build_parser", "dialogues_to_jsonl", "dialogues_from_jsonl", "parse_mix"]

LoadDialogues = Callable[[list[str]], list[Dialogue]]
LoadHistory = Callable[[str], list[Any]]  # a message id -> its stored versions, oldest first


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dialogue train",
        description="Train a LoRA/DoRA adapter on a frozen, quantized base from your dialogues and docs. "
                    "Everything but the data has a default: the learning rate comes from the model size "
                    "and rank (2e-4 at 7B, r=16; see schedule.default_lr), with 5% warmup and cosine decay.")
    d = p.add_argument_group("data")
    d.add_argument("--data-dialogues", nargs="+", default=[], metavar="NAME", help="dialogues from the store")
    d.add_argument("--dialogues-file", type=Path, help="dialogues as JSONL (one Dialogue dict a line)")
    d.add_argument("--docs", nargs="+", default=[], metavar="PATH", help="text files or folders")
    d.add_argument("--mix", nargs="+", default=None, metavar="SOURCE=START[:END]",
                   help="source weights, constant or linear in progress, e.g. docs=0.75:0.25 dialogues=0.25:0.75")
    d.add_argument("--preferences", action="store_true",
                   help="also learn from your corrections: each answer you edited in the given dialogues is a "
                        "pair (the model's answer, yours), trained with DPO against the adapter-off base; a "
                        "source named 'preferences' for --mix (e.g. --mix preferences=1 for pairs only)")
    d.add_argument("--beta", type=float, default=0.1, help="DPO's beta for --preferences (default 0.1)")
    d.add_argument("--seq-len", type=int, default=512)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="local:default", help="local:default, a .gguf file or a HF model directory")
    m.add_argument("--quant", choices=("served", "nf4", "hqq", "none"), default="served",
                   help="served: the GGUF's own weights (default); nf4: bitsandbytes; hqq; none: unquantized")
    m.add_argument("--method", choices=("lora", "dora"), default="lora")
    m.add_argument("--r", "--rank", dest="r", type=int, default=16)
    m.add_argument("--alpha", type=float, default=None, help="default 2*r")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--targets", nargs="+", default=None, help="module names (default: all linears of the blocks)")
    m.add_argument("--gradient-checkpointing", "--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer's activations in backward (about one more forward per step, "
                        "far less memory). Default: on when the activations the longest micro-batch would store "
                        "exceed the model's weights or a quarter of the memory available; the choice and why are "
                        "printed and written to train_config.json")
    m.add_argument("--offload", action="store_true",
                   help="keep the frozen base in CPU memory and copy each decoder layer to the GPU only while "
                        "it runs (adapters, optimizer state, embeddings and LM head stay on the GPU); turns "
                        "gradient checkpointing on. With --nproc: FSDP2's CPU offload (nf4 or none bases)")
    m.add_argument("--offload-prefetch", type=int, default=1, metavar="N",
                   help="with --offload, layers copied ahead of the one computing (default 1)")
    m.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=1, help="per process")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: from model size and rank)")
    t.add_argument("--schedule", choices=("cosine", "linear", "constant", "wsd", "one-cycle"), default="cosine")
    t.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of training")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("adapter-out"))
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    t.add_argument("--no-export", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--nproc", type=int, default=1, help="processes on this machine (FSDP2 via torchrun)")
    t.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop at this step with a checkpoint (the schedule still spans --steps); run the same "
                        "command without it to go on")
    n = p.add_argument_group("several machines", "run the same command, with the same data, on every machine; "
                             "--out must be a folder all of them see (rank 0 writes it, all resume from it)")
    n.add_argument("--nnodes", type=int, default=1, help="machines, each running --nproc processes")
    n.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="where the machines meet (torchrun's c10d rendezvous); the same on every machine")
    n.add_argument("--rdzv-id", default="dialogue-train", help="the run's id at the rendezvous (default dialogue-train)")
    n.add_argument("--node-rank", type=int, default=None, metavar="R",
                   help="fix this machine's place (0..nnodes-1; torchrun's static rendezvous, node 0 being "
                        "HOST); without it ranks are assigned as the machines join")
    n.add_argument("--load-on-rank0", action=argparse.BooleanOptionalAction, default=None,
                   help="rank 0 alone reads the base and broadcasts it; the other processes build it on the meta "
                        "device and hold only their shards (nf4 or none). Default: on with --nnodes > 1")
    t.add_argument("--loss-chunk", type=int, default=None, metavar="TOKENS",
                   help="tokens per chunk of the LM head and loss (default: 128 MiB of logits; 0: no chunking)")
    t.add_argument("--compile", action="store_true", help="torch.compile the adapters' forward")
    return p


def parse_mix(items: Sequence[str] | None) -> Callable[[float], dict[str, float]] | None:
    """`["docs=0.75:0.25", "dialogues=0.25:0.75"]` -> p -> {docs: 0.75-0.5p, dialogues: 0.25+0.5p}."""
    if not items:
        return None
    ends: dict[str, tuple[float, float]] = {}
    for it in items:
        name, sep, val = it.partition("=")
        if not sep or not name:
            raise ValueError(f"bad --mix item {it!r}; expected SOURCE=START[:END]")
        a, _, b = val.partition(":")
        try:
            ends[name] = (float(a), float(b) if b else float(a))
        except ValueError:
            raise ValueError(f"bad --mix weights in {it!r}; expected numbers") from None
    return lambda p: {k: a + (b - a) * p for k, (a, b) in ends.items()}


def _lr_schedule(args: argparse.Namespace, n_params: int) -> Any:
    from . import schedule as S
    peak = args.lr if args.lr is not None else S.default_lr(n_params, args.r)
    shape = {"cosine": S.cosine(peak, peak / 10), "linear": S.linear(peak, 0.0), "constant": S.constant(peak),
             "wsd": S.wsd(peak, warmup=0.0, decay=0.2), "one-cycle": S.one_cycle(peak)}[args.schedule]
    if args.schedule == "one-cycle" or not args.warmup:
        return shape
    return S.warmup(shape, args.warmup)


def dialogues_to_jsonl(dialogues: Sequence[Dialogue], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in dialogues:
            f.write(json.dumps({**d.settings(), "id": d.id, "messages": [m.to_dict() for m in d.messages]}) + "\n")


def dialogues_from_jsonl(path: Path) -> list[Dialogue]:
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Dialogue(name=d["name"], id=d.get("id", f"d{i}"), system=d.get("system", ""),
                                model=d.get("model", ""), meta=d.get("meta", {}),
                                context=[ContextItem.from_dict(c) for c in d.get("context", [])],
                                messages=[Message.from_dict(m) for m in d.get("messages", [])]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i + 1}: not a dialogue ({e})") from e
    return out


def train_main(argv: list[str], load_dialogues: LoadDialogues | None = None,
               load_history: LoadHistory | None = None) -> int:
    """Entry point of `dialogue train`; returns the exit status. `load_history` reads a
    message's versions (for --preferences)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return int(e.code or 0)
    try:
        return _run(args, argv, load_dialogues, load_history)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, argv: list[str], load_dialogues: LoadDialogues | None,
         load_history: LoadHistory | None = None) -> int:
    if args.preferences:
        if not args.data_dialogues or load_history is None:
            raise ValueError("--preferences needs --data-dialogues from the dialogue store (run through "
                             "`dialogue train`): the edited answers are in its version history")
        if args.nproc > 1 or args.nnodes > 1:
            raise ValueError("--preferences trains in one process; leave out --nproc and --nnodes")
    dialogues: list[Dialogue] = []
    if args.data_dialogues:
        if load_dialogues is None:
            raise ValueError("--data-dialogues needs the dialogue store (run through `dialogue train`), "
                             "or pass --dialogues-file")
        dialogues = list(load_dialogues(list(args.data_dialogues)))
        if not dialogues:
            raise ValueError(f"no dialogues found for {args.data_dialogues}")
    if args.dialogues_file:
        dialogues += dialogues_from_jsonl(args.dialogues_file)
    if not dialogues and not args.docs:
        raise ValueError("nothing to train on: give --data-dialogues, --dialogues-file and/or --docs")
    for p in args.docs:
        if not Path(p).exists():
            raise FileNotFoundError(f"docs path not found: {p}")
    mix = parse_mix(args.mix)
    if args.offload_prefetch < 0:
        raise ValueError(f"--offload-prefetch must be >= 0, got {args.offload_prefetch}")
    if args.offload_prefetch != 1 and not args.offload:
        raise ValueError("--offload-prefetch needs --offload")
    if args.offload and (args.nproc > 1 or args.nnodes > 1):
        if args.quant == "hqq":
            raise ValueError("--quant hqq cannot be sharded by FSDP (--nproc); use --quant nf4")
        model = str(args.model)
        if args.quant == "served" and (model == "default" or model.startswith("local:") or model.endswith(".gguf")):
            raise ValueError("--offload with --nproc uses FSDP2's CPU offload, which moves parameters only; "
                             "the served GGUF weights are buffers. Use --quant nf4 with --nproc --offload, "
                             "or --offload in one process (which handles served weights)")

    from .fsdp import check_nodes, is_distributed_launch, launch, same_everywhere, setup, teardown
    check_nodes(args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
    if args.stop_after is not None and not 0 < args.stop_after <= args.steps:
        raise ValueError(f"--stop-after must be in 1..{args.steps} (--steps), got {args.stop_after}")
    load_on_rank0 = args.nnodes > 1 if args.load_on_rank0 is None else args.load_on_rank0
    if load_on_rank0 and args.nproc * args.nnodes > 1 and args.quant in ("served", "hqq"):
        model_name = str(args.model)
        if args.quant == "hqq" or model_name == "default" or model_name.startswith("local:") or model_name.endswith(".gguf"):
            raise ValueError(f"--load-on-rank0 (the default with --nnodes > 1) broadcasts sharded parameters; "
                             f"--quant {args.quant} keeps weights FSDP does not shard. Use --quant nf4 (or none), "
                             "or --no-load-on-rank0")
    if (args.nproc > 1 or args.nnodes > 1) and not is_distributed_launch():
        # Relaunch under torchrun; the store is not reachable from the workers, the file is. On
        # several machines each one's launcher writes its own file from its own store (or files):
        # the workers check that all ranks hold the same data before training.
        rest = _strip(argv, {"--nproc": 1, "--data-dialogues": "*", "--nnodes": 1, "--node-rank": 1,
                             "--rdzv-endpoint": 1, "--rdzv-id": 1})
        if args.load_on_rank0 is None and load_on_rank0:
            rest.append("--load-on-rank0")
        with tempfile.TemporaryDirectory() as tmp:
            if dialogues:
                f = Path(tmp) / "dialogues.jsonl"
                dialogues_to_jsonl(dialogues, f)
                rest = _strip(rest, {"--dialogues-file": 1}) + ["--dialogues-file", str(f)]
            return launch(rest, args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                          rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)

    import torch

    from .loop import PLOT, TrainConfig, finetune
    from .quant import load_base

    distributed = is_distributed_launch()
    if distributed:
        setup()
    try:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.offload and dev.type == "cpu" and int(os.environ.get("RANK", "0")) == 0:
            print("note: no GPU here, so --offload runs its copies between CPU buffers and saves no memory",
                  file=sys.stderr)
        if distributed:
            same_everywhere("the training data", _fingerprint(dialogues, args.docs))
        # with --offload the base is loaded into host memory (it may not fit on the device)
        load = lambda: load_base(args.model, quant=args.quant, device="cpu" if args.offload else dev,  # noqa: E731
                                 quant_storage=torch.float32 if world > 1 else torch.uint8)
        if distributed and load_on_rank0:
            from .fsdp import load_base_on_rank0
            base = load_base_on_rank0(load)
        else:
            base = load()
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          lr=_lr_schedule(args, base.info["n_params"]), weight_decay=args.weight_decay,
                          seed=args.seed, out_dir=args.out, checkpoint_every=args.checkpoint_every,
                          precision="bf16" if args.bf16 else "auto", progress=not args.no_progress,
                          loss_chunk=args.loss_chunk, compile=args.compile, dpo_beta=args.beta)
        res = finetune(base=base, dialogues=dialogues, docs=args.docs, method=args.method, quant=args.quant,
                       r=args.r, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
                       seq_len=args.seq_len, mix=mix, config=cfg, gradient_checkpointing=args.gradient_checkpointing,
                       export=not args.no_export, resume=not args.no_resume, offload=args.offload,
                       offload_prefetch=args.offload_prefetch,
                       history=load_history if args.preferences else None, stop_after=args.stop_after)
        rank = torch.distributed.get_rank() if distributed else 0
        if rank == 0:
            r = res.result
            first = f"{r.losses[0]:.4f}" if r.losses else "-"
            last = f"{r.losses[-1]:.4f}" if r.losses else "-"
            print(f"trained {r.steps} steps (from step {r.resumed_from}) in {r.seconds:.1f}s, "
                  f"{r.tokens_per_s:.0f} tokens/s; loss {first} -> {last}")
            if res.checkpointing is not None:
                c = res.checkpointing
                print(f"gradient checkpointing: {'on' if c.on else 'off'} ({c.chosen_by}: {c.reason})")
            plot = Path(args.out) / PLOT
            if plot.is_file():  # the curves at a glance, the labelled picture beside the adapter
                from ..charts import training_records, training_summary
                for line in training_summary(training_records(
                        (Path(args.out) / "metrics.jsonl").read_text("utf-8").splitlines())):
                    print(f"  {line}")
                print(f"plot: {plot}")
            if res.offloader is not None:
                st = res.offloader.stats
                print(f"offload: {res.offloader.host_bytes / 2**20:.0f} MiB of frozen layers in host memory; at most "
                      f"{st.peak_resident_layers} layers ({st.peak_resident_bytes / 2**20:.0f} MiB) on {res.offloader.device}")
            for kind, path in res.exported.items():
                print(f"{kind}: {path}")
            if args.method == "dora" and not args.no_export:
                print("note: DoRA adapters are exported as PEFT safetensors only (llama.cpp applies LoRA)")
        return 0
    finally:
        if distributed:
            teardown()


def _fingerprint(dialogues: Sequence[Dialogue], docs: Sequence[str]) -> str:
    """A hash of what this process trains on: the dialogues, and each docs file's relative path and bytes."""
    import hashlib
    h = hashlib.sha256()
    for d in dialogues:
        h.update(json.dumps({**d.settings(), "messages": [m.to_dict() for m in d.messages]}, sort_keys=True).encode())
    for p in map(Path, docs):
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _strip(argv: Sequence[str], opts: dict[str, Any]) -> list[str]:
    """argv without the given options and their values (`*`: all values up to the next option)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key in opts:
            if "=" in a:
                i += 1
                continue
            n = opts[key]
            i += 1
            if n == "*":
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += n
            continue
        out.append(a)
        i += 1
    return out


if __name__ == "__main__":  # the torchrun workers start here
    sys.exit(train_main(sys.argv[1:]))
