"""Schedules as functions of training progress.

A schedule is any callable `f(p) -> value` where `p` in [0, 1] is the fraction of training done.
There are no phases or step counts in a schedule: the loop evaluates every schedule at every step
(and the data mix at every batch), so a schedule written for 100 steps means the same thing for
100,000, and shapes compose as ordinary functions do.

The built-in shapes (`cosine`, `linear`, `one_cycle`, `wsd`, ...) return `Schedule`, a thin
callable that adds `+`, `*` and composition, but every place that accepts a schedule accepts any
plain function or a constant too.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

__all__ = [
    "Schedule", "ScheduleLike", "Mix", "MixLike", "as_schedule", "constant", "linear", "cosine",
    "exponential", "one_cycle", "wsd", "warmup", "piecewise", "compose", "linear_mix", "resolve_mix",
    "apply_hyperparameters", "default_lr", "HYPERPARAMETERS",
]


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"progress must be in [0, 1], got {p}")
    return p


class Schedule:
    """A function of progress with arithmetic: `(cosine(1e-3) + 1e-5) * warmup_factor`.

    Wrapping keeps schedules plain functions (call it with `p`), while letting shapes combine
    without the caller writing lambdas for sums and products."""

    def __init__(self, fn: Callable[[float], Any], name: str = "") -> None:
        if not callable(fn):
            raise TypeError(f"a schedule must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "schedule")

    def __call__(self, p: float) -> Any:
        return self.fn(_check_p(p))

    def __add__(self, other: "ScheduleLike") -> "Schedule":
        o = as_schedule(other)
        return Schedule(lambda p: self(p) + o(p), f"({self.name} + {o.name})")

    __radd__ = __add__

    def __mul__(self, other: "ScheduleLike") -> "Schedule":
        o = as_schedule(other)
        return Schedule(lambda p: self(p) * o(p), f"({self.name} * {o.name})")

    __rmul__ = __mul__

    def __sub__(self, other: "ScheduleLike") -> "Schedule":
        o = as_schedule(other)
        return Schedule(lambda p: self(p) - o(p), f"({self.name} - {o.name})")

    def at(self, warp: "ScheduleLike") -> "Schedule":
        """Composition `self(warp(p))`: `warp` re-times progress (it must map [0,1] into [0,1])."""
        return compose(self, warp)

    def __repr__(self) -> str:
        return f"Schedule({self.name})"


ScheduleLike = Union[Schedule, Callable[[float], Any], float, int, tuple]


def as_schedule(s: ScheduleLike) -> Schedule:
    """Any callable or constant (a number, or a tuple such as Adam's betas) as a Schedule."""
    if isinstance(s, Schedule):
        return s
    if callable(s):
        return Schedule(s)
    if isinstance(s, (int, float, tuple)) and not isinstance(s, bool):
        return constant(s)
    raise TypeError(f"expected a function of progress or a constant, got {type(s).__name__}: {s!r}")


def constant(value: Any) -> Schedule:
    return Schedule(lambda p: value, f"constant({value})")


def linear(start: float, end: float) -> Schedule:
    return Schedule(lambda p: start + (end - start) * p, f"linear({start}, {end})")


def cosine(start: float, end: float = 0.0) -> Schedule:
    """Half a cosine from `start` at p=0 to `end` at p=1."""
    return Schedule(lambda p: end + (start - end) * 0.5 * (1 + math.cos(math.pi * p)),
                    f"cosine({start}, {end})")


def exponential(start: float, end: float) -> Schedule:
    """Geometric interpolation: the natural shape for values that span decades (eps, lr sweeps)."""
    if start <= 0 or end <= 0:
        raise ValueError("exponential schedule needs positive start and end")
    return Schedule(lambda p: start * (end / start) ** p, f"exponential({start}, {end})")


def one_cycle(peak: float, pct_start: float = 0.3, div: float = 25.0,
              final_div: float = 1e4) -> Schedule:
    """Smith's one-cycle policy (same shape as torch's OneCycleLR with cosine annealing): cosine
    up from peak/div to peak over `pct_start`, then cosine down to peak/(div*final_div)."""
    if not 0 < pct_start < 1:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    lo, hi, end = peak / div, peak, peak / (div * final_div)
    up, down = cosine(hi, lo), cosine(hi, end)

    def f(p: float) -> float:
        if p < pct_start:
            return lo + hi - up(p / pct_start)  # mirror: lo -> hi
        return down((p - pct_start) / (1 - pct_start))
    return Schedule(f, f"one_cycle({peak})")


def wsd(peak: float, warmup: float = 0.05, decay: float = 0.2, floor: float = 0.0,
        shape: str = "cosine") -> Schedule:
    """Warmup-stable-decay: linear warmup over the first `warmup` of training, constant at
    `peak`, then a decay to `floor` over the last `decay`. Unlike cosine, a run can be extended
    from a stable-phase checkpoint without re-warming."""
    if warmup < 0 or decay < 0 or warmup + decay > 1:
        raise ValueError(f"warmup ({warmup}) and decay ({decay}) must be >= 0 and sum to <= 1")
    if shape not in ("cosine", "linear"):
        raise ValueError(f"decay shape must be 'cosine' or 'linear', got {shape!r}")
    tail = cosine(peak, floor) if shape == "cosine" else linear(peak, floor)

    def f(p: float) -> float:
        if warmup and p < warmup:
            return peak * p / warmup
        if decay and p > 1 - decay:
            return tail((p - (1 - decay)) / decay)
        return peak
    return Schedule(f, f"wsd({peak}, {warmup}, {decay})")


def warmup(schedule: ScheduleLike, frac: float = 0.05) -> Schedule:
    """Linear warmup from 0 to `schedule(0)` over the first `frac`; the wrapped schedule then
    runs over the remaining progress (re-timed to [0, 1])."""
    if not 0 <= frac < 1:
        raise ValueError(f"warmup fraction must be in [0, 1), got {frac}")
    s = as_schedule(schedule)

    def f(p: float) -> Any:
        if frac and p < frac:
            return s(0.0) * (p / frac)
        return s((p - frac) / (1 - frac) if frac else p)
    return Schedule(f, f"warmup({s.name}, {frac})")


def piecewise(pieces: Sequence[tuple[float, ScheduleLike]]) -> Schedule:
    """Pieces `[(0.0, s0), (0.3, s1), ...]`: piece i runs from its start to the next one's, and
    sees its own progress re-timed to [0, 1] (so any shape can be a piece)."""
    if not pieces:
        raise ValueError("piecewise needs at least one piece")
    starts = [float(a) for a, _ in pieces]
    if starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1:
        raise ValueError(f"piece starts must begin at 0, increase strictly and stay below 1: {starts}")
    scheds = [as_schedule(s) for _, s in pieces]
    ends = starts[1:] + [1.0]

    def f(p: float) -> Any:
        for a, b, s in zip(starts, ends, scheds):
            if p < b or b == 1.0:
                return s(min(1.0, (p - a) / (b - a)))
        raise AssertionError("unreachable")
    return Schedule(f, "piecewise(" + ", ".join(f"{a}:{s.name}" for a, s in zip(starts, scheds)) + ")")


def compose(outer: ScheduleLike, inner: ScheduleLike) -> Schedule:
    """`outer(inner(p))`: `inner` is a time warp of progress (e.g. `lambda p: p**2`)."""
    o, i = as_schedule(outer), as_schedule(inner)

    def f(p: float) -> Any:
        q = i(p)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{i.name} mapped progress {p} to {q}, outside [0, 1]")
        return o(q)
    return Schedule(f, f"{o.name}∘{i.name}")


# ------------------------------------------------------------------ hyperparameters

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "momentum")


def apply_hyperparameters(optimizer: torch.optim.Optimizer, schedules: Mapping[str, ScheduleLike],
                          p: float) -> dict[str, Any]:
    """Set every scheduled hyperparameter on every param group for progress `p`; returns the
    values set (for logging). `betas` may be one schedule returning a pair or a pair of
    schedules. A name the optimizer does not have is an error, not a silent no-op."""
    _check_p(p)
    values: dict[str, Any] = {}
    for name, sched in schedules.items():
        if sched is None:
            continue
        if name not in optimizer.param_groups[0]:
            raise KeyError(f"optimizer {type(optimizer).__name__} has no hyperparameter {name!r}; "
                           f"it has {sorted(k for k in optimizer.param_groups[0] if k != 'params')}")
        if name == "betas" and isinstance(sched, tuple) and any(callable(b) for b in sched):
            v: Any = tuple(float(as_schedule(b)(p)) for b in sched)
        else:
            v = as_schedule(sched)(p)
        if name == "betas":
            v = tuple(float(b) for b in v)
            if len(v) != 2 or not all(0 <= b < 1 for b in v):
                raise ValueError(f"betas must be two numbers in [0, 1), got {v} at p={p}")
        else:
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v} at p={p}")
        for g in optimizer.param_groups:
            g[name] = v
        values[name] = v
    return values


def default_lr(n_params: int, rank: int) -> float:
    """The learning rate used when none is given, from the model size and the adapter rank.

    Rule: `2e-4 * (7e9 / n_params) ** 0.25 * (16 / rank) ** 0.5`, clamped to [1e-5, 2e-3].
    Anchored at the QLoRA recipe (2e-4 for a 7B model at r=16; the fourth-root size term gives
    ~1.1e-4 at 70B, which is what QLoRA used for 65B), larger for small models whose LoRA updates
    are relatively smaller, and smaller for larger ranks because with alpha = 2r the update has
    more directions at the same scale. It is a starting point, not a search: pass `lr=` to
    override."""
    if n_params <= 0 or rank <= 0:
        raise ValueError(f"n_params and rank must be positive, got {n_params}, {rank}")
    lr = 2e-4 * (7e9 / n_params) ** 0.25 * (16 / rank) ** 0.5
    return float(min(2e-3, max(1e-5, lr)))


# ------------------------------------------------------------------ data mix

Mix = Callable[[float], Mapping[str, float]]
MixLike = Union[Mix, Mapping[str, float], None]


def linear_mix(start: Mapping[str, float], end: Mapping[str, float]) -> Mix:
    """Interpolate source weights linearly from `start` (p=0) to `end` (p=1)."""
    keys = set(start) | set(end)

    def mix(p: float) -> dict[str, float]:
        return {k: start.get(k, 0.0) + (end.get(k, 0.0) - start.get(k, 0.0)) * p for k in keys}
    return mix


def resolve_mix(mix: MixLike, p: float, sources: Sequence[str]) -> dict[str, float]:
    """Evaluate the mix at `p` and normalise it to probabilities over `sources`.

    No mix means "proportional to nothing in particular": equal weights. Unknown source names,
    negative or non-finite weights, or an all-zero mix are errors, because silently renormalising
    them would train on a mix nobody asked for."""
    _check_p(p)
    if not sources:
        raise ValueError("no data sources to mix")
    if mix is None:
        raw: Mapping[str, float] = {s: 1.0 for s in sources}
    elif callable(mix):
        raw = mix(p)
        if not isinstance(raw, Mapping):
            raise TypeError(f"mix({p}) must return a mapping of source -> weight, got {type(raw).__name__}")
    elif isinstance(mix, Mapping):
        raw = mix
    else:
        raise TypeError(f"mix must be a function of progress or a mapping, got {type(mix).__name__}")
    unknown = set(raw) - set(sources)
    if unknown:
        raise KeyError(f"mix names unknown source(s) {sorted(unknown)}; sources are {sorted(sources)}")
    w = {s: float(raw.get(s, 0.0)) for s in sources}
    bad = {s: v for s, v in w.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"mix weights must be finite and >= 0, got {bad} at p={p}")
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"mix weights sum to zero at p={p}")
    return {s: v / total for s, v in w.items()}
