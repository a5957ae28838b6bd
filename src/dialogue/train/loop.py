"""The training loop: schedules evaluated every step, the mix every batch, exact resume.

`train()` runs an already-built model and sampler; `finetune()` builds everything from plain
arguments (model, data, method, quantization) with defaults for whatever is not given, which is
what `dialogue train` calls.

Resume is exact: a checkpoint holds the adapter weights, the optimizer state, the sampler's
state (its RNG, per-source orders and cursors) and the torch/python RNG states, and is written
atomically (temp file + rename) so a crash or a non-finite loss leaves the last good one intact.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE, MixSampler, PreferencePair, collate
from .lora import trainable_parameters
from .schedule import MixLike, ScheduleLike, apply_hyperparameters, cosine, default_lr, warmup

log = logging.getLogger(__name__)  # dialogue.train.loop

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "train", "finetune", "default_lr_schedule",
           "CHECKPOINT", "PLOT", "write_plot", "peak_memory_bytes", "estimate_activations",
           "choose_checkpointing", "CheckpointingChoice", "ActivationEstimate"]

CHECKPOINT = "checkpoint.pt"
PLOT = "training.svg"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before the bad step touched anything."""


@dataclass
class TrainConfig:
    """How to train. Every optimizer hyperparameter may be a constant or a function of progress
    p in [0, 1]; `lr=None` means `default_lr_schedule` (see there)."""

    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    lr: ScheduleLike | None = None
    betas: ScheduleLike = (0.9, 0.999)
    eps: ScheduleLike = 1e-8
    weight_decay: ScheduleLike = 0.0
    schedules: dict[str, ScheduleLike] = field(default_factory=dict)  # any other hyperparameter
    max_grad_norm: float | None = 1.0
    seed: int = 0
    out_dir: str | Path | None = None
    checkpoint_every: int = 0  # 0: only at the end
    precision: str = "auto"  # auto | fp32 | bf16
    progress: bool = True
    # tokens per chunk of the LM head + loss (None: LOSS_CHUNK_ELEMENTS / vocabulary; 0: all
    # logits at once, as before chunking)
    loss_chunk: int | None = None
    compile: bool = False  # torch.compile the adapters' forward (lora.compile_adapters)
    dpo_beta: float = 0.1  # preference pairs: DPO's beta (how far from the base the adapter may go)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")
        if self.loss_chunk is not None and self.loss_chunk < 0:
            raise ValueError("loss_chunk must be >= 0 (0: no chunking) or None (automatic)")


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    tokens: int
    seconds: float
    out_dir: Path | None
    resumed_from: int = 0
    hyper: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def default_lr_schedule(n_params: int, rank: int) -> ScheduleLike:
    """5% linear warmup, then cosine from `default_lr(n_params, rank)` down to a tenth of it."""
    lr = default_lr(n_params, rank)
    return warmup(cosine(lr, lr / 10), 0.05)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, max RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # VmHWM: getrusage's ru_maxrss is carried over from the parent across fork+exec on Linux
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device(model: nn.Module) -> torch.device:
    # set by offload() and fsdp.shard(): with CPU offload the parameters' device is not where the
    # model computes
    dev = getattr(model, "_dialogue_compute_device", None)
    if dev is not None:
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _autocast(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # Full (unsharded) tensors of the trainable parameters only: the frozen base is never saved.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, strict=strict)


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sampler: MixSampler, step: int,
          losses: list[float], meta: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict
    rank, world = _dist()
    trained = trainable_parameters(model)
    if world > 1:
        msd, osd = get_state_dict(model, optimizers=opt, options=_state_options())  # collective under FSDP
        # buffers and tied frozen weights can slip through ignore_frozen_params: keep the trained ones
        msd = {k: v for k, v in msd.items() if k in trained}
    else:
        # One process: the adapter parameters themselves, without a state_dict() of the whole model,
        # which would serialise every frozen layer (loading each one back under CPU offload; and
        # HQQLinear's state_dict fails). Same keys and values as the FSDP path.
        msd = {k: p.detach().to("cpu", copy=True) for k, p in trained.items()}
        osd = get_optimizer_state_dict(model, opt, options=_state_options())
    if rank != 0:
        return
    state = {"step": step, "model": msd, "optimizer": osd, "sampler": sampler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
             "losses": list(losses), "meta": meta}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: the previous checkpoint stays until this one is complete


def _load(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sampler: MixSampler,
          meta: dict[str, Any]) -> tuple[int, list[float]]:
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["meta"].get("trainable") != meta["trainable"]:
        raise ValueError(f"checkpoint {path} was made for different adapters "
                         f"({state['meta'].get('trainable')} parameters, now {meta['trainable']}); "
                         "use another --out or start over with resume=False")
    if set(state["model"]) != set(trainable_parameters(model)):
        raise ValueError(f"checkpoint {path} holds other adapter parameters than the model's")
    if _dist()[1] > 1:
        set_state_dict(model, optimizers=opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=_state_options(strict=False))
    else:  # the mirror of _save: only the adapter parameters are touched
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        with torch.no_grad():
            for k, p in trainable_parameters(model).items():
                p.copy_(state["model"][k])
        set_optimizer_state_dict(model, opt, state["optimizer"], options=_state_options(strict=False))
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"]), list(state["losses"])


# ---------------------------------------------------------------- the loss, in chunks

# Logits per loss chunk (tokens x vocabulary). 2**25 fp32 values are 128 MiB: 128 tokens of
# Gemma 3's 262,144-entry vocabulary, 682 of SmolLM2's 49,152. Only one chunk's logits (and their
# gradient) exist at a time; the full-sequence logits (2 GiB at 2,048 Gemma tokens) never do.
LOSS_CHUNK_ELEMENTS = 2 ** 25


class _HiddenTap(nn.Module):
    """Stands in for the LM head during the forward pass: keeps the final hidden states and
    returns empty logits, so the model's own forward (FSDP hooks, offload hooks, logit slicing
    and all) runs unchanged while the vocabulary projection is left to `_token_nll`."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.hidden = h
        return h.new_zeros(*h.shape[:-1], 0)


def _head_of(model: nn.Module) -> tuple[nn.Module, str, nn.Module, float | None]:
    """The transformers model under any wrapper, the attribute name of its LM head, the head,
    and the final logit soft-cap (Gemma 2 style models) or None."""
    from .lora import unwrap
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    for name, child in inner.named_children():
        if child is head:
            cap = getattr(inner.config, "final_logit_softcapping", None)
            return inner, name, head, (float(cap) if cap else None)
    raise ValueError(f"cannot find the LM head of {type(inner).__name__}")


def _chunk_nll(head: nn.Module | torch.Tensor, cap: float | None, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits = (F.linear(h, head.to(h.dtype)) if isinstance(head, torch.Tensor) else head(h)).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, t, reduction="none")


def _frozen_head_weight(head: nn.Module) -> torch.Tensor | None:
    """The float weight of a frozen, bias-free LM head (a plain linear, or served GGUF blocks,
    dequantized once here rather than on every chunk); None for any other head."""
    from .quant import GGUFLinear
    if getattr(head, "bias", None) is not None:
        return None
    if isinstance(head, GGUFLinear):
        return head.dense()
    if type(head) is nn.Linear and not head.weight.requires_grad:
        return head.weight
    return None


class _ChunkedHeadNLL(torch.autograd.Function):
    """Per-token cross-entropy of `h @ weight.T` (optionally soft-capped), a chunk of tokens at a
    time, with the gradient for `h` worked out in the forward pass as each chunk's logits are at
    hand (softmax minus one-hot, times the weight): only that gradient (tokens x hidden) is kept
    for backward, which scales it by each token's incoming gradient. No chunk's logits outlive
    its iteration and none are recomputed, so it costs what the whole-sequence loss costs in
    FLOPs (Liger's fused linear + cross-entropy does the same on GPUs, in Triton). The weight
    must be frozen: its gradient would need every chunk again."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, cap: float | None,
                chunk: int) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(h.dtype)
            for i in range(0, h.shape[0], chunk):
                tc = t[i: i + chunk]
                logits = (h[i: i + chunk] @ w.T).float()
                th = None
                if cap:
                    th = torch.tanh(logits / cap)
                    logits = th * cap
                lse = torch.logsumexp(logits, -1)
                nll[i: i + chunk] = lse - logits.gather(1, tc[:, None]).squeeze(1)
                if need_grad:
                    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    g[torch.arange(len(tc), device=g.device), tc] -= 1
                    if th is not None:
                        g.mul_(1 - th * th)
                    grad_h[i: i + chunk] = (g.to(w.dtype) @ w).to(h.dtype)
                del logits
        ctx.save_for_backward(grad_h)
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_nll[:, None].to(grad_h.dtype), None, None, None, None


def _liger_loss_sum(head: nn.Module, cap: float | None, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """On CUDA with a plain linear head: Liger's fused linear + cross-entropy kernel (the `gpu`
    extra), which never materialises the logits either; None where it does not apply."""
    if h.device.type != "cuda" or type(head) is not nn.Linear:
        return None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", softcap=cap)
    return fn(head.weight, h.to(head.weight.dtype), t, head.bias)


def _forward_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The final hidden states at the positions `keep`, from the model's own forward. A packed
    batch (with `position_ids`) goes without the 2D mask: transformers then builds the
    block-diagonal mask from the position ids (each document sees only itself); its padding is
    on the right, which causal attention never lets a real token see."""
    inner, name, head, _ = _head_of(model)
    tap = _HiddenTap()
    kw: dict[str, Any] = {"input_ids": batch["input_ids"], "logits_to_keep": keep, "use_cache": False}
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"]
    else:
        kw["attention_mask"] = batch["attention_mask"]
    setattr(inner, name, tap)
    try:
        model(**kw)
    finally:
        setattr(inner, name, head)
    assert tap.hidden is not None
    return tap.hidden


def _nll_from_hidden(head: nn.Module, cap: float | None, hidden: torch.Tensor, tgt: torch.Tensor,
                     chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses of the targets in `tgt` (rows x kept positions, -100 = none) given the
    hidden states at those positions, flat in row-major order, and the batch row of each.

    The head and the loss run `chunk` tokens at a time (None: LOSS_CHUNK_ELEMENTS / vocabulary):
    for a frozen head by `_ChunkedHeadNLL` (the gradient for the hidden states computed in the
    forward pass, nothing recomputed), for any other head under non-reentrant activation
    checkpointing (each chunk's logits recomputed in backward). Plain chunking would not help,
    since autograd keeps every chunk's logits for backward. `chunk=0` materialises all logits at
    once (the reference the tests and the benchmark compare against)."""
    rows = torch.arange(tgt.shape[0], device=tgt.device)[:, None].expand_as(tgt)
    sel = tgt != IGNORE
    h, t, rows = hidden[sel], tgt[sel], rows[sel]
    if chunk is None:
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        chunk = max(1, LOSS_CHUNK_ELEMENTS // int(vocab))
    if chunk <= 0 or h.shape[0] <= chunk:
        return _chunk_nll(head, cap, h, t), rows
    weight = _frozen_head_weight(head)
    if weight is not None:
        return _ChunkedHeadNLL.apply(h, weight, t, cap, chunk), rows
    # any other head (a trained one, one with a bias): recompute each chunk in backward
    from torch.utils.checkpoint import checkpoint
    parts = [checkpoint(_chunk_nll, head, cap, h[i: i + chunk], t[i: i + chunk], use_reentrant=False)
             for i in range(0, h.shape[0], chunk)]
    return torch.cat(parts), rows


def _kept(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is a target in any row (transformers' `logits_to_keep` takes
    the indices), and the targets there. For chat data, where only the answers are trained,
    that skips most of the vocabulary projection, the largest single matmul of a small model."""
    tgt = batch["labels"][:, 1:]
    keep = (tgt != IGNORE).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=tgt.device)
    return keep, tgt[:, keep]


def _token_nll(model: nn.Module, batch: Mapping[str, torch.Tensor],
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses of every target token of the batch (flat) and the row of each, with the
    LM head and the loss in checkpointed chunks (`_nll_from_hidden`)."""
    keep, tgt = _kept(batch)
    hidden = _forward_hidden(model, batch, keep)
    _, _, head, cap = _head_of(model)
    return _nll_from_hidden(head, cap, hidden, tgt, chunk)


def _token_loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor],
                    chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the target tokens, and their count. On CUDA with Liger
    installed (the `gpu` extra) its fused linear + cross-entropy kernel computes the sum; else
    the checkpointed chunks of `_nll_from_hidden` (`chunk=0`: all logits at once)."""
    keep, tgt = _kept(batch)
    n = int((tgt != IGNORE).sum())
    hidden = _forward_hidden(model, batch, keep)
    _, _, head, cap = _head_of(model)
    if chunk != 0:
        fused = _liger_loss_sum(head, cap, hidden.reshape(-1, hidden.shape[-1]), tgt.reshape(-1))
        if fused is not None:
            return fused, n
    nll, _ = _nll_from_hidden(head, cap, hidden, tgt, chunk)
    return nll.sum(), n


def _split(drawn: list[Any], pad_id: int) -> tuple[dict[str, torch.Tensor] | None, list[PreferencePair]]:
    """A drawn micro-batch as a supervised batch (or None) and its preference pairs."""
    pairs = [e for e in drawn if isinstance(e, PreferencePair)]
    plain = [e for e in drawn if not isinstance(e, PreferencePair)]
    return (collate(plain, pad_id) if plain else None), pairs


def _answer_logps(model: nn.Module, pairs: list[PreferencePair], pad_id: int, device: torch.device,
                  chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of the chosen and of the rejected answer of each pair."""
    b = collate([x.chosen for x in pairs] + [x.rejected for x in pairs], pad_id)
    b = {k: v.to(device) for k, v in b.items()}
    nll, rows = _token_nll(model, b, chunk)
    logp = torch.zeros(2 * len(pairs), dtype=nll.dtype, device=nll.device).index_add(0, rows, -nll)
    return logp[: len(pairs)], logp[len(pairs):]


def _preference_loss_sum(model: nn.Module, pairs: list[PreferencePair], pad_id: int, device: torch.device,
                         cfg: TrainConfig, ref_cache: dict[int, tuple[float, float]]) -> tuple[torch.Tensor, float]:
    """DPO (Rafailov et al. 2023) summed over the pairs, and the summed reward margin.

    The reference model is the frozen base itself, i.e. the model with its adapters switched off
    (`lora.adapters_disabled`): no second copy. Its log-likelihoods never change, so each pair's
    are computed once per run and kept (`ref_cache`, by the pair's identity in the sampler)."""
    from .lora import adapters_disabled
    todo = [x for x in pairs if id(x) not in ref_cache]
    if todo:
        with torch.no_grad(), adapters_disabled(model):
            rc, rr = _answer_logps(model, todo, pad_id, device, cfg.loss_chunk)
        for x, c, r in zip(todo, rc.tolist(), rr.tolist()):
            ref_cache[id(x)] = (c, r)
    ref = torch.tensor([ref_cache[id(x)] for x in pairs], dtype=torch.float32, device=device)
    pc, pr = _answer_logps(model, pairs, pad_id, device, cfg.loss_chunk)
    margin = cfg.dpo_beta * ((pc - ref[:, 0]) - (pr - ref[:, 1]))
    return -F.logsigmoid(margin).sum(), float(margin.detach().sum())


def train(model: nn.Module, sampler: MixSampler, config: TrainConfig | None = None, *, pad_id: int = 0,
          resume: bool = True, n_params: int | None = None, rank_hint: int = 16,
          on_step: Callable[[dict[str, Any]], None] | None = None, stop_after: int | None = None) -> TrainResult:
    """Train the model's trainable parameters on batches from `sampler`.

    The loss of a step is the mean over every target token of the step (all micro-batches, all
    ranks), so gradient accumulation and data parallelism give the same update as one big
    batch. `stop_after` ends the run early at that step (as an interruption would) after
    checkpointing; the next call with the same out_dir resumes from it."""
    cfg = config or TrainConfig()
    rank, world = _dist()
    device = _device(model)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        from ..training_runs import record
        record(out)  # listed (the web's training page) while it trains
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters: add adapters first")
    if world > 1 and any(isinstance(e, PreferencePair) for v in sampler.sources.values() for e in v[:1]):
        # ranks would run different numbers of backward passes (FSDP's collectives must match)
        raise ValueError("preference pairs train in one process; run without --nproc")
    if n_params is None:
        from .quant import n_params as count
        n_params = count(model)
    lr = cfg.lr if cfg.lr is not None else default_lr_schedule(n_params, rank_hint)
    schedules: dict[str, ScheduleLike] = {"lr": lr, "betas": cfg.betas, "eps": cfg.eps,
                                          "weight_decay": cfg.weight_decay, **cfg.schedules}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    meta = {"trainable": sum(p.numel() for p in params.values()), "steps": cfg.steps}
    ckpt = out / CHECKPOINT if out else None

    start, losses = 0, []
    if world > 1 and resume and ckpt is not None:
        # every rank reads the checkpoint rank 0 wrote: --out must be one folder all nodes see
        from .fsdp import same_everywhere
        same_everywhere(f"the checkpoint in {out} (is --out on a path all nodes share?)",
                        f"{ckpt.stat().st_size}:{int(ckpt.stat().st_mtime)}" if ckpt.exists() else "none")
    if resume and ckpt is not None and ckpt.exists():
        start, losses = _load(ckpt, model, opt, sampler, meta)
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    metrics = open(out / "metrics.jsonl", "a" if start else "w") if out and rank == 0 else None
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True)
    if cfg.compile:
        from .lora import compile_adapters
        compile_adapters(model, dynamic=True)  # sequence lengths vary from batch to batch
    model.train()
    from .lora import checkpointing_enabled
    recompute = checkpointing_enabled(model)  # in every step's metrics, beside the peak memory
    ref_cache: dict[int, tuple[float, float]] = {}  # reference log-likelihoods per pair (frozen base)
    t0, tokens_seen, hyper = time.perf_counter(), 0, []
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    log.info("training steps %d to %d of %d (world %d)", start + 1, end, cfg.steps, world)
    try:
        for step in range(start, end):
            p = step / cfg.steps
            hp = apply_hyperparameters(opt, schedules, p)
            # the mix is evaluated for every micro-batch, at its own progress
            micro = [_split(sampler.draw(step, p=(step + k / cfg.grad_accum) / cfg.steps), pad_id)
                     for k in range(cfg.grad_accum)]
            counts = torch.tensor([float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b, _ in micro if b)),
                                   float(sum(len(pairs) for _, pairs in micro))], dtype=torch.float64)
            if world > 1:
                torch.distributed.all_reduce(counts)
            denom, n_pairs = max(1.0, float(counts[0])), max(1.0, float(counts[1]))
            # the step's loss: mean over target tokens (supervised) + mean over pairs (preference)
            total = torch.zeros(3, dtype=torch.float64)  # supervised sum, preference sum, margin sum
            for b, pairs in micro:
                if b is not None:
                    b = {k: v.to(device) for k, v in b.items()}
                    with _autocast(cfg.precision, device):
                        loss_sum, _ = _token_loss_sum(model, b, cfg.loss_chunk)
                    # FSDP averages gradients over ranks; scale by world so the result is sum/denom.
                    (loss_sum * world / denom).backward()
                    total[0] += loss_sum.detach().double().cpu()
                    tokens_seen += int(b["attention_mask"].sum())
                if pairs:
                    with _autocast(cfg.precision, device):
                        pref_sum, margin_sum = _preference_loss_sum(model, pairs, pad_id, device, cfg, ref_cache)
                    (pref_sum * world / n_pairs).backward()
                    total[1] += pref_sum.detach().double().cpu()
                    total[2] += margin_sum
                    tokens_seen += sum(len(x.chosen) + len(x.rejected) for x in pairs)
            if world > 1:
                torch.distributed.all_reduce(total)
            loss = float(total[0] / denom + total[1] / n_pairs)
            if not math.isfinite(loss):
                opt.zero_grad(set_to_none=True)
                where = f"; the last good checkpoint ({ckpt}) is intact" if ckpt and ckpt.exists() else ""
                raise NonFiniteLossError(f"loss is {loss} at step {step + 1} (lr={hp.get('lr'):.3g}){where}. "
                                         "Lower the learning rate or check the data.")
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            hyper.append(hp)
            elapsed = time.perf_counter() - t0
            rec = {"step": step + 1, "p": p, "loss": loss, **{k: v for k, v in hp.items()},
                   "tokens_per_s": tokens_seen * world / elapsed if elapsed else 0.0,
                   "peak_mem_mb": peak_memory_bytes(device) / 2**20, "checkpointing": recompute,
                   "mix": sampler.history[-1]["weights"] if sampler.history else {}}
            if counts[1]:  # preference pairs in this step: their loss and reward margin
                rec.update(sft_loss=float(total[0] / denom) if counts[0] else None,
                           pref_loss=float(total[1] / n_pairs), pref_margin=float(total[2] / n_pairs))
            log.debug("step %d/%d: loss %.4f, lr %.3g, %.0f tokens/s, peak %.0f MB", step + 1,
                      cfg.steps, loss, hp.get("lr", float("nan")), rec["tokens_per_s"],
                      rec["peak_mem_mb"])
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                mem=f"{rec['peak_mem_mb']:.0f}MB")
            done = step + 1
            if ckpt and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end):
                _save(ckpt, model, opt, sampler, done, losses, meta)
            if on_step:
                on_step(rec)
    finally:
        if bar:
            bar.close()
        if metrics:
            metrics.close()
    if out and rank == 0 and losses:
        write_plot(out)
    return TrainResult(losses=losses, steps=len(losses), tokens=tokens_seen * world,
                       seconds=time.perf_counter() - t0, out_dir=out, resumed_from=start, hyper=hyper)


# ---------------------------------------------------------------- loss curve

def write_plot(out: Path) -> Path:
    """`training.svg` in the run folder, from its metrics.jsonl (resumed runs included): loss with
    its smoothed curve, learning rate and data mix over the steps, with axes and values
    (`dialogue.charts`: why SVG and not matplotlib is said there)."""
    from ..charts import training_records, training_svg
    records = training_records((out / "metrics.jsonl").read_text("utf-8").splitlines())
    path = out / PLOT
    tmp = path.with_suffix(".svg.tmp")
    tmp.write_text(training_svg(records, title=f"training: {out.name}"), "utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- activations and checkpointing

# The probe's two sequence lengths: short enough to cost a fraction of a second, long enough
# that an attention which stores its (tokens x tokens) scores shows a quadratic term.
PROBE_TOKENS = (64, 128)
# Checkpointing is chosen when the stored activations would exceed the model's own weights (from
# there on they, not the weights, set the peak) or this share of the memory available.
CHECKPOINT_AVAILABLE_SHARE = 0.25


@dataclass
class ActivationEstimate:
    """Bytes autograd would keep for backward in one training forward: `per_token * T +
    per_token2 * T**2` per sequence of T tokens (the second term: attention that stores its
    scores, e.g. eager; zero for SDPA's flash kernels), beside the model's own weights."""

    per_token: float
    per_token2: float
    weight_bytes: int

    def bytes(self, batch_size: int, seq_len: int) -> int:
        return int(batch_size * (self.per_token * seq_len + self.per_token2 * seq_len ** 2))


def _owned_storages(model: nn.Module) -> dict[int, int]:
    """Data pointer -> bytes of every storage the model holds (parameters, buffers, and the
    dequantized weights GGUFLinear keeps outside both)."""
    from .quant import GGUFLinear
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [m._dense for m in model.modules() if isinstance(m, GGUFLinear) and m._dense is not None]
    out: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "meta":
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def estimate_activations(model: nn.Module, precision: str = "auto",
                         device: torch.device | None = None) -> ActivationEstimate:
    """Measure, on the model itself, what its training forward stores for backward: two short
    forwards (PROBE_TOKENS) under `saved_tensors_hooks`, counting each saved storage once and
    none of the model's own, fitted to a linear plus a quadratic term in the sequence length.
    Measured rather than worked out from the config, so any family, attention implementation,
    adapter method or autocast is counted as it runs. The RNG state is left as it was."""
    from .lora import unwrap
    device = device or _device(model)
    owned = _owned_storages(model)
    vocab = int(getattr(unwrap(model).config.get_text_config(), "vocab_size", 0) or 1000)

    def saved(n: int) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in owned and t.device.type != "meta":
                seen[s.data_ptr()] = s.nbytes()
            return t

        x = torch.randint(min(3, vocab - 1), vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad(), \
                _autocast(precision, device):
            model(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1, use_cache=False)
        return sum(seen.values())

    was_training = model.training
    model.train()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):  # dropout draws must not move the run's RNG
            a, b = PROBE_TOKENS
            sa, sb = saved(a), saved(b)
    finally:
        model.train(was_training)
    # s(T) = p T + q T^2 through both points; q clamped at 0 (noise of a few bytes is not attention)
    q = max(0.0, (sb * a - sa * b) / (a * b * (b - a)))
    p = max(0.0, (sa - q * a * a) / a)
    return ActivationEstimate(p, q, sum(owned.values()))


def available_memory(device: torch.device) -> int:
    """Bytes this process could still allocate: free device memory on a GPU, MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return int(psutil.virtual_memory().available)


@dataclass
class CheckpointingChoice:
    """Whether decoder layers recompute their activations in backward, and why (for the log,
    `train_config.json` and the CLI)."""

    on: bool
    chosen_by: str  # "auto" | "argument" | "offload"
    reason: str
    activation_mb: float | None = None  # the estimate at the run's micro-batch, without checkpointing

    def as_dict(self) -> dict[str, Any]:
        return {"on": self.on, "chosen_by": self.chosen_by, "reason": self.reason,
                "activation_mb": None if self.activation_mb is None else round(self.activation_mb, 1)}


def choose_checkpointing(model: nn.Module, batch_size: int, seq_len: int, *, requested: bool | None = None,
                         offload: bool = False, precision: str = "auto", device: torch.device | None = None,
                         available: int | None = None) -> CheckpointingChoice:
    """Gradient checkpointing for a run of `batch_size` x `seq_len`-token micro-batches.

    `requested` True/False is the user's word; None decides: on when the activations the
    forward would store (`estimate_activations`) exceed the model's own weights or
    CHECKPOINT_AVAILABLE_SHARE of the memory available (`available`, measured when None). Then
    activations set the peak, and keeping one tensor per layer instead of all of them is worth
    the cost, one more forward of each layer in backward (bench/train_bench.py --logits measures
    it). Offload always needs it (offload.py)."""
    if offload:
        return CheckpointingChoice(True, "offload", "--offload recomputes each layer in backward")
    if requested is not None:
        return CheckpointingChoice(bool(requested), "argument", "asked for" if requested else "turned off")
    device = device or _device(model)
    est = estimate_activations(model, precision, device)
    act = est.bytes(batch_size, seq_len)
    avail = available_memory(device) if available is None else available
    mb = act / 2**20
    what = f"~{mb:,.0f} MB of stored activations at {batch_size} x {seq_len} tokens"
    if act > est.weight_bytes:
        return CheckpointingChoice(True, "auto", f"{what} > the model's {est.weight_bytes / 2**20:,.0f} MB of weights", mb)
    if act > CHECKPOINT_AVAILABLE_SHARE * avail:
        return CheckpointingChoice(True, "auto", f"{what} > {CHECKPOINT_AVAILABLE_SHARE:.0%} of the "
                                   f"{avail / 2**20:,.0f} MB available", mb)
    return CheckpointingChoice(False, "auto", f"{what}: under the model's {est.weight_bytes / 2**20:,.0f} MB of "
                               f"weights and {CHECKPOINT_AVAILABLE_SHARE:.0%} of the {avail / 2**20:,.0f} MB available", mb)


# ---------------------------------------------------------------- the whole recipe

def _provenance(dialogues: Any, docs: Any, sources: Mapping[str, Any]) -> dict[str, str]:
    """What the adapter was trained from, for the adapter registry (`adapters info`)."""
    names = [getattr(d, "name", "") for d in dialogues][:50]
    return {"trained_on": ",".join(sorted(sources)), "dialogues": ",".join(n for n in names if n),
            "docs": ",".join(str(p) for p in list(docs)[:50])}

@dataclass
class FinetuneResult:
    result: TrainResult
    base: Any
    model: nn.Module
    sampler: MixSampler
    exported: dict[str, str] = field(default_factory=dict)
    offloader: Any = None  # the offload.Offloader of a one-process offloaded run (its stats)
    checkpointing: CheckpointingChoice | None = None  # whether layers recompute in backward, and why


def finetune(model: str | Path = "local:default", *, dialogues: Iterable[Any] = (), docs: Iterable[str | Path] = (),
             texts: Iterable[str] = (), method: str = "lora", quant: str = "served", r: int = 16,
             alpha: float | None = None, dropout: float = 0.0, targets: Iterable[str] | None = None,
             seq_len: int = 512, mix: MixLike = None, config: TrainConfig | None = None,
             gradient_checkpointing: bool | None = None, export: bool = True, base: Any = None,
             resume: bool = True, dtype: torch.dtype = torch.float32, offload: bool = False,
             offload_prefetch: int = 1, history: Any = None, stop_after: int | None = None) -> FinetuneResult:
    """Load the base, build the data, put adapters on, train, and export the adapter (PEFT
    safetensors always; GGUF for LoRA on a GGUF base). Only the data is required.

    `offload=True` keeps the frozen base in host memory and brings one decoder layer at a time
    (plus `offload_prefetch` ahead) to the device (`offload.py`); it turns gradient checkpointing on,
    since offload needs it. With several processes it is FSDP2's CPUOffloadPolicy instead
    (`fsdp.shard(offload=True)`), which also keeps the adapter shards and the optimizer on the CPU.

    `gradient_checkpointing` None (the default) chooses it from the activations the largest
    micro-batch of the data would store (`choose_checkpointing`); True or False decides. The choice and its reason are logged, returned and written to train_config.json.

    `history` (a message id -> its stored versions, oldest first) adds a `preferences` source:
    the dialogues' edited answers as (model's answer, user's answer) pairs, trained with DPO
    against the adapter-off base and mixed with the other sources by `mix` like any of them."""
    from . import export as ex
    from .data import sources_from
    from .lora import DEFAULT_TARGETS, AdapterSpec, add_adapters, enable_checkpointing
    from .quant import load_base

    cfg = config or TrainConfig()
    rank, world = _dist()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if base is not None:
        b = base
    else:
        # FSDP shards bnb's packed weight only if it is stored in the FSDP parameter dtype. With
        # offload the base is loaded into host memory: it may not fit on the device.
        b = load_base(model, quant=quant, dtype=dtype, device="cpu" if offload else dev,
                      quant_storage=dtype if world > 1 else torch.uint8)
    dialogues, docs = list(dialogues), list(docs)
    sources = sources_from(dialogues, docs, texts, tokenizer=b.tokenizer, seq_len=seq_len, history=history)
    sampler = MixSampler(sources, mix=mix, batch_size=cfg.batch_size, total_steps=cfg.steps,
                         seed=cfg.seed, rank=rank, world_size=world)
    spec = AdapterSpec(method=method, r=r, alpha=alpha, dropout=dropout,
                       targets=tuple(targets) if targets else DEFAULT_TARGETS, seed=cfg.seed)
    n = b.info.get("n_params")
    m = add_adapters(b.model, spec)
    # the largest micro-batch the data can make: its longest sequence (seq_len bounds the docs, a
    # dialogue's examples may be shorter), times two rows per pair where preference pairs train
    seqs = [e for v in sources.values() for x in v
            for e in ((x.chosen, x.rejected) if isinstance(x, PreferencePair) else (x,))]
    longest = max((len(e.input_ids) for e in seqs), default=seq_len)
    rows = cfg.batch_size * (2 if any(isinstance(x, PreferencePair) for v in sources.values() for x in v) else 1)
    on_rank0 = world > 1 and bool(b.info.get("load_on_rank0"))  # fsdp.load_base_on_rank0: the others hold no weights
    if on_rank0 and rank != 0:
        ckpt = CheckpointingChoice(False, "auto", "rank 0's choice")  # replaced by rank 0's just below
    else:
        ckpt = choose_checkpointing(m, rows, longest, requested=gradient_checkpointing, offload=offload,
                                    precision=cfg.precision)
    if on_rank0:  # rank 0 measured on the real weights; every rank takes its choice
        box = [ckpt]
        torch.distributed.broadcast_object_list(box, src=0)
        ckpt = box[0]
    elif world > 1 and ckpt.chosen_by == "auto":  # FSDP's collectives need every rank to recompute alike
        on = torch.tensor([int(ckpt.on)], device=dev)
        torch.distributed.all_reduce(on, op=torch.distributed.ReduceOp.MAX)
        if bool(on.item()) != ckpt.on:
            ckpt = CheckpointingChoice(True, "auto", f"another process needs it ({ckpt.reason})", ckpt.activation_mb)
    log.info("gradient checkpointing %s (%s: %s)", "on" if ckpt.on else "off", ckpt.chosen_by, ckpt.reason)
    if ckpt.on:
        enable_checkpointing(m)
    fsdp_info: dict[str, Any] = {}
    offloader = None
    offload_info: dict[str, Any] = {}
    if world > 1:
        from .fsdp import full_state, materialize, shard
        full = full_state(m) if on_rank0 else None  # rank 0's weights and initial adapters
        shard(m, offload=offload)
        if full is not None:
            materialize(m, full, torch.device("cpu") if offload else dev)  # offloaded shards live on the CPU
            del full
        params = list(m.parameters())
        fsdp_info = {"params": len(params), "sharded": sum(1 for p in params if hasattr(p, "full_tensor")),
                     "cpu_offload": offload}
    elif offload:
        from .offload import offload as offload_model
        offloader = offload_model(m, dev, prefetch=offload_prefetch)
        offload_info = {"device": str(dev), "prefetch": offload_prefetch, "host_mb": offloader.host_bytes / 2**20}
    res = train(m, sampler, cfg, pad_id=b.tokenizer.pad_token_id or 0, resume=resume, n_params=n, rank_hint=r,
                stop_after=stop_after)
    if offloader is not None:
        offload_info.update(peak_resident_layers=offloader.stats.peak_resident_layers,
                            peak_resident_mb=offloader.stats.peak_resident_bytes / 2**20)
    exported: dict[str, str] = {}
    if export and cfg.out_dir:
        from .lora import adapter_tensors
        ads = adapter_tensors(m)  # collective under FSDP: every rank gathers, rank 0 writes
        if rank == 0:
            out = Path(cfg.out_dir)
            exported["peft"] = str(ex.save_peft(m, out / "adapter", base=b, tensors=ads))
            if method == "lora" and b.gguf_arch:
                exported["gguf"] = str(ex.save_gguf(m, out / "adapter.gguf", base=b, tensors=ads,
                                                    meta=_provenance(dialogues, docs, sources)))
            (out / "train_config.json").write_text(json.dumps(
                {"model": str(b.path), "method": method, "quant": quant, "r": r, "alpha": spec.lora_alpha,
                 "targets": list(spec.targets), "seq_len": seq_len, "steps": cfg.steps,
                 "batch_size": cfg.batch_size, "world_size": world, "fsdp": fsdp_info, "offload": offload_info,
                 "checkpointing": ckpt.as_dict(),
                 "sources": {k: len(v) for k, v in sources.items()},
                 "final_loss": res.losses[-1] if res.losses else None}, indent=2))
    return FinetuneResult(res, b, m, sampler, exported, offloader, ckpt)

