"""The pictures of numbers (dialogue.charts): well-formed SVG with ticks that carry values, a
legend with the last values, smoothing, escaped words, and the terminal's sparklines."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest

from dialogue.charts import (ema, fmt, nice_ticks, sparkline, training_records, training_summary, training_svg,
                             usage_svg)

NS = "{http://www.w3.org/2000/svg}"


def texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    return ["".join(t.itertext()) for t in root.iter(f"{NS}text")]


def test_nice_ticks_cover_the_range_with_round_values():
    assert nice_ticks(0.83, 3.94) == [0, 1, 2, 3, 4]
    assert nice_ticks(0, 2e-4) == [0, 5e-5, 1e-4, 1.5e-4, 2e-4]
    assert nice_ticks(5, 5) == [4.5, 4.75, 5.0, 5.25, 5.5]  # one value: a band around it
    assert [fmt(v) for v in (0, 0.25, 1.5e-4, 12, 1024, 12345, 4.5e6)] == \
        ["0", "0.25", "0.00015", "12", "1,024", "12.3k", "4.5M"]


def test_ema_is_bias_corrected_and_skips_gaps():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0 at the start
    s = ema([4.0, math.nan, 0.0], 0.5)
    assert s[0] == 4.0 and math.isnan(s[1]) and s[2] == pytest.approx((0.5 * 4 * 0.5) / (1 - 0.25))


def _records(n=50):
    return [{"step": s, "p": (s - 1) / n, "loss": 3 - s / n, "lr": 1e-3 * (1 - (s - 1) / n),
             "mix": {"docs": 0.75 - 0.5 * (s - 1) / n, "<script>x</script>": 0.25 + 0.5 * (s - 1) / n}}
            for s in range(1, n + 1)]


def test_the_training_plot_has_labelled_axes_values_and_all_three_panels():
    svg = training_svg(_records(), title="training: run-1")
    t = texts(svg)
    for want in ("loss", "learning rate", "data mix (weight per source)", "step (of 50)", "lr", "weight"):
        assert want in t
    # y ticks with values on the loss panel, x ticks with step numbers
    assert {"2", "2.5", "3"} <= set(t) and {"10", "20", "30", "40", "50"} <= set(t)
    loss = [r["loss"] for r in _records()]
    assert f"EMA 0.9 {fmt(ema(loss)[-1])}" in t and "EMA 0.9 2.17" in t  # the last smoothed value
    assert "50 steps; first 2.98, last 2, lowest 2" in t
    assert "<script>" not in svg and "&lt;script&gt;x&lt;/script&gt; 0.74" in svg  # a source name is text
    assert svg.count("<polyline") == 5  # loss, EMA, lr, two sources


def test_training_records_tolerate_a_file_cut_short_and_a_resume():
    lines = [json.dumps(r) for r in _records(4)] + [json.dumps({"step": 3, "loss": 9.0}), '{"step": 5, "lo', "[]"]
    recs = training_records(lines)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[2]["loss"] == 9.0  # the resumed step wins
    lines = training_summary(recs)
    assert lines[0].startswith("loss  ") and "2.75 -> 2 (smoothed" in lines[0] and "lr" in lines[1] and "mix" in lines[2]


def test_usage_chart_counts_only_known_costs_and_says_so():
    pts = [{"input": 100, "output": 10, "cost": 0.01}, {"input": 200, "output": 20, "cost": None},
           {"input": 300, "output": 30, "cache_read": 150, "cost": 0.02}]
    t = texts(usage_svg(pts))
    assert "cost not known for 1 of 3 answers (not counted)" in t and "total $ 0.03" in t
    assert "new in 300" in t and "from cache 150" in t and {"1", "2", "3"} <= set(t)
    local = texts(usage_svg([{"input": 10, "output": 5, "cost": None}]))
    assert "cost: not known for this model" in local and "cost so far (USD)" not in local


def test_sparkline():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert len(sparkline(list(range(1000)), width=20)) == 20 and sparkline([]) == ""
