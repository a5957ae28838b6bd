"""Numbers as pictures: small labelled SVG line charts (axes, ticks with values, a legend), the
training plot (loss with its smoothed curve, learning rate and data mix over progress), a
dialogue's tokens and cost over its answers, and one-line sparklines for the terminal.

Why our own SVG and not matplotlib: matplotlib is not a dependency (tens of MB, a font cache
built on first import), the charts here are a few polylines with ticks, and SVG is text that a
browser shows directly (`training.svg` opens from the run folder) and the web app puts inline
with no script and no request. Every number is formatted here and every word (a data source's
name can be a file name) goes through `xml_escape`, so the SVG is safe to inline in a page; the web
app still builds the pictures from the numbers (metrics.jsonl, stored usage), never by pasting a
file's markup. Nothing here imports beyond the standard library.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["Series", "Panel", "nice_ticks", "fmt", "ema", "svg", "training_svg", "usage_svg",
           "sparkline", "training_records", "training_summary", "PALETTE"]

# colour-blind-safe (Okabe-Ito), readable on white and on a dark page's light card
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]


def xml_escape(s: Any) -> str:
    return escape(str(s), {'"': "&quot;", "'": "&#39;"})


def fmt(v: float) -> str:
    """Compact tick and value text: 0, 0.25, 1.5e-4, 12, 1,024, 12.3k, 4.5M."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2g}".replace("e-0", "e-")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi] (Heckbert's nice numbers)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(round(t, 12))
    return ticks


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider): the
    first values are not pulled towards zero. Non-finite values are skipped (kept as NaN)."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        n += 1
        avg = smoothing * avg + (1 - smoothing) * v
        out.append(avg / (1 - smoothing ** n))
    return out


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]   # None or NaN: a gap
    color: str = ""
    width: float = 1.6
    opacity: float = 1.0
    dots: bool = False           # a marker at every point (few points: answers)
    label_last: bool = True      # the last value in the legend


@dataclass
class Panel:
    title: str
    series: list[Series]
    y_label: str = ""
    height: int = 170
    y_min: float | None = None   # force the axis to include this (0 for counts)
    note: str = ""               # a line under the title (what is missing, what is smoothed)
    legend: list[str] = field(default_factory=list)  # computed


def _finite(ys: Iterable[float | None]) -> list[float]:
    return [y for y in ys if y is not None and math.isfinite(y)]


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str) -> str:
    return f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="{stroke}"/>'


def _text(x: float, y: float, text: str, anchor: str, cls: str) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}">{xml_escape(text)}</text>'


def svg(panels: Sequence[Panel], *, title: str, x_label: str, width: int = 720,
        x_ticks: Sequence[float] | None = None, x_format: Any = fmt) -> str:
    """Panels stacked over one shared x axis, each with its own y axis, ticks with values, grid
    lines and a legend naming each series with its last value."""
    left, right, top_pad, gap = 64, 16, 30, 46
    plot_w = width - left - right
    xs_all = [x for p in panels for s in p.series for x, y in zip(s.xs, s.ys)
              if y is not None and math.isfinite(y)]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    xt = list(x_ticks) if x_ticks is not None else [t for t in nice_ticks(x_lo, x_hi, 7) if x_lo <= t <= x_hi]

    def X(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    parts: list[str] = []
    y = top_pad
    for p in panels:
        ys = [v for s in p.series for v in _finite(s.ys)]
        if p.y_min is not None:
            ys.append(p.y_min)
        lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        ticks = nice_ticks(lo, hi, 5)
        t_lo, t_hi = (ticks[0], ticks[-1]) if ticks else (lo, hi + 1)
        top, h = y + 34 + (14 if p.note else 0), p.height

        def Y(v: float) -> float:
            return top + h - (v - t_lo) / ((t_hi - t_lo) or 1) * h

        parts.append(f'<text x="{left}" y="{y + 14}" class="ttl" font-weight="600">{xml_escape(p.title)}</text>')
        if p.note:
            parts.append(f'<text x="{left}" y="{y + 28}" class="note" fill="#555">{xml_escape(p.note)}</text>')
        # legend, on the title's line at the right: name and last value
        lx = width - right
        for i, s in reversed(list(enumerate(p.series))):
            last = next((v for v in reversed(s.ys) if v is not None and math.isfinite(v)), None)
            text = s.name + (f" {fmt(last)}" if s.label_last and last is not None else "")
            color = s.color or PALETTE[i % len(PALETTE)]
            wtext = 6.2 * len(text) + 18
            lx -= wtext
            parts.append(f'<rect x="{lx:.1f}" y="{y + 6}" width="10" height="10" fill="{color}" '
                         f'opacity="{s.opacity}"/><text x="{lx + 14:.1f}" y="{y + 15}">{xml_escape(text)}</text>')
        # grid, y ticks with values, the y label, x ticks with values, the axes
        for t in ticks:
            parts += [_line(left, Y(t), left + plot_w, Y(t), "#e3e3e3"),
                      _text(left - 6, Y(t) + 4, fmt(t), "end", "tick")]
        if p.y_label:
            cy = top + h / 2
            parts.append(f'<text x="14" y="{cy:.1f}" transform="rotate(-90 14 {cy:.1f})" text-anchor="middle" '
                         f'class="axis">{xml_escape(p.y_label)}</text>')
        for t in xt:
            parts += [_line(X(t), top, X(t), top + h, "#f0f0f0"), _line(X(t), top + h, X(t), top + h + 4, "#333"),
                      _text(X(t), top + h + 16, x_format(t), "middle", "tick")]
        parts += [_line(left, top, left, top + h, "#333"), _line(left, top + h, left + plot_w, top + h, "#333")]
        for i, s in enumerate(p.series):
            color = s.color or PALETTE[i % len(PALETTE)]
            runs: list[list[str]] = [[]]
            for x, v in zip(s.xs, s.ys):
                if v is None or not math.isfinite(v):
                    runs.append([])
                    continue
                runs[-1].append(f"{X(x):.1f},{Y(v):.1f}")
                if s.dots:
                    parts.append(f'<circle cx="{X(x):.1f}" cy="{Y(v):.1f}" r="2.6" fill="{color}" '
                                 f'opacity="{s.opacity}"/>')
            for pts in runs:
                if len(pts) > 1:
                    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="{s.width}" '
                                 f'stroke-opacity="{s.opacity}" stroke-linejoin="round" points="{" ".join(pts)}"/>')
        y = top + h + gap
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{y - gap + 34}" text-anchor="middle" '
                 f'class="axis">{xml_escape(x_label)}</text>')
    height = int(y - gap + 44)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{xml_escape(title)}" font-family="system-ui, sans-serif" '
            f'font-size="11" class="chart"><title>{xml_escape(title)}</title>'
            f'<rect width="{width}" height="{height}" fill="#fff"/>')
    return head + "".join(parts) + "</svg>"


# ---------------------------------------------------------------- training

def training_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, as numbers only: a line that is not a JSON object
    with a numeric step and loss is skipped (a file cut short by a crash loses one line, not the
    picture). A resumed run appends: a step seen again replaces the earlier record."""
    import json
    by_step: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                continue
            step = int(r["step"])
            loss = float(r["loss"])
        except (ValueError, TypeError, KeyError):
            continue
        rec: dict[str, Any] = {"step": step, "loss": loss}
        for k in ("p", "lr", "tokens_per_s", "peak_mem_mb"):
            try:
                rec[k] = float(r[k])
            except (KeyError, TypeError, ValueError):
                pass
        mix = r.get("mix")
        if isinstance(mix, Mapping):
            rec["mix"] = {str(k): float(v) for k, v in mix.items() if isinstance(v, (int, float))}
        by_step[step] = rec
    return [by_step[k] for k in sorted(by_step)]


def training_svg(records: Sequence[Mapping[str, Any]], *, title: str = "training", smoothing: float = 0.9) -> str:
    """Loss (each step, faint, and its bias-corrected EMA), learning rate, and the data mix's
    weights per source, over the steps; the x axis says the step and the progress."""
    steps = [float(r["step"]) for r in records]
    loss = [float(r["loss"]) for r in records]
    smooth = ema(loss, smoothing)
    total = max(steps) if steps else 1.0
    if records and records[-1].get("p") is not None and records[-1]["p"] < 1:
        # p is the progress at the step's start: total steps = step / p where known
        p_last = float(records[-1]["p"])
        if p_last > 0:
            total = round((steps[-1] - 1) / p_last) or total
    panels = [Panel("loss", [Series("loss", steps, loss, PALETTE[5], width=1, opacity=0.55),
                             Series(f"EMA {smoothing:g}", steps, smooth, PALETTE[0], width=2.2)],
                    y_label="loss",
                    note=f"{len(loss)} steps; first {fmt(loss[0])}, last {fmt(loss[-1])}, "
                         f"lowest {fmt(min(_finite(loss) or [0]))}" if loss else "no steps yet")]
    lrs = [r.get("lr") for r in records]
    if any(v is not None for v in lrs):
        panels.append(Panel("learning rate", [Series("lr", steps, lrs, PALETTE[1])], y_label="lr",
                            y_min=0, height=110))
    sources = sorted({k for r in records for k in (r.get("mix") or {})})
    if sources:
        panels.append(Panel("data mix (weight per source)",
                            [Series(s, steps, [(r.get("mix") or {}).get(s) for r in records], PALETTE[(i + 2) % 8])
                             for i, s in enumerate(sources)], y_label="weight", y_min=0, height=110))
    return svg(panels, title=title, x_label=f"step (of {total:,.0f})", x_format=lambda x: f"{x:,.0f}")


# ---------------------------------------------------------------- a dialogue's usage

def usage_svg(points: Sequence[Mapping[str, Any]], *, title: str = "tokens and cost per answer") -> str:
    """`points`: one per answer, in order, {"input", "output", "cache_read", "cost"} (cost None:
    not known for that model). Tokens per answer, then the running total cost of the answers
    whose cost is known, saying how many were not."""
    xs = list(range(1, len(points) + 1))

    def num(p: Mapping[str, Any], k: str) -> float:
        v = p.get(k)
        return float(v) if isinstance(v, (int, float)) else 0.0
    panels = [Panel("tokens", [Series("new in", xs, [num(p, "input") for p in points], PALETTE[0], dots=True),
                               Series("from cache", xs, [num(p, "cache_read") for p in points], PALETTE[2], dots=True),
                               Series("out", xs, [num(p, "output") for p in points], PALETTE[1], dots=True)],
                    y_label="tokens", y_min=0, height=120)]
    costs = [p.get("cost") for p in points]
    unknown = sum(1 for c in costs if not isinstance(c, (int, float)))
    if unknown < len(costs):  # some answer has a known cost
        run, total = [], 0.0
        for c in costs:
            if isinstance(c, (int, float)):
                total += float(c)
            run.append(total)
        note = f"cost not known for {unknown} of {len(costs)} answers (not counted)" if unknown else ""
        panels.append(Panel("cost so far (USD)", [Series("total $", xs, run, PALETTE[3], dots=True)],
                            y_label="USD", y_min=0, height=90, note=note))
    elif unknown:
        panels[0].note = "cost: not known for this model"
    return svg(panels, title=title, x_label="answer", width=520,
               x_ticks=[t for t in nice_ticks(1, max(1, len(xs)), 6) if t == int(t) and 1 <= t <= max(1, len(xs))],
               x_format=lambda x: f"{x:.0f}")


# ---------------------------------------------------------------- terminal

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """Values as one line of block characters (averaged into `width` buckets when longer)."""
    vals = _finite(values)
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [sum(vals[i * n // width:(i + 1) * n // width]) / max(1, (i + 1) * n // width - i * n // width)
                for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_BLOCKS[min(7, int((v - lo) / span * 7.999))] for v in vals)


def training_summary(records: Sequence[Mapping[str, Any]], width: int = 32) -> list[str]:
    """The terminal's picture of a run: a sparkline per curve with its values beside it."""
    if not records:
        return []
    loss = [float(r["loss"]) for r in records]
    smooth = ema(loss)
    lines = [f"loss  {sparkline(loss, width):<{width}}  {fmt(loss[0])} -> {fmt(loss[-1])} "
             f"(smoothed {fmt(smooth[-1])}, lowest {fmt(min(_finite(loss) or [0]))})"]
    lrs = _finite(r.get("lr") for r in records)
    if lrs:
        lines.append(f"lr    {sparkline(lrs, width):<{width}}  peak {fmt(max(lrs))}, last {fmt(lrs[-1])}")
    sources = sorted({k for r in records for k in (r.get("mix") or {})})
    if len(sources) > 1:
        first, last = records[0].get("mix") or {}, records[-1].get("mix") or {}
        lines.append("mix   " + ", ".join(f"{s} {fmt(first.get(s, 0))} -> {fmt(last.get(s, 0))}" for s in sources))
    return lines
