"""Schedules are plain functions of progress, applied to any optimizer hyperparameter."""
import math

import pytest
import torch

from dialogue.train import schedule as S


def test_shapes_hit_their_endpoints():
    assert S.cosine(1.0, 0.1)(0) == pytest.approx(1.0)
    assert S.cosine(1.0, 0.1)(1) == pytest.approx(0.1)
    assert S.cosine(1.0, 0.0)(0.5) == pytest.approx(0.5)
    assert S.linear(2.0, 4.0)(0.25) == pytest.approx(2.5)
    assert S.exponential(1e-3, 1e-5)(0.5) == pytest.approx(1e-4)
    oc = S.one_cycle(1.0, pct_start=0.25, div=10, final_div=100)
    assert oc(0) == pytest.approx(0.1) and oc(0.25) == pytest.approx(1.0) and oc(1) == pytest.approx(1e-3)
    assert oc(0.1) < oc(0.2) and oc(0.5) > oc(0.9)
    w = S.wsd(1.0, warmup=0.1, decay=0.2, floor=0.0)
    assert [w(p) for p in (0, 0.05, 0.1, 0.5, 0.8, 1.0)] == pytest.approx([0, 0.5, 1, 1, 1, 0])
    assert w(0.9) == pytest.approx(0.5)


def test_warmup_wraps_and_retimes():
    s = S.warmup(S.linear(1.0, 0.0), frac=0.2)
    assert s(0) == 0 and s(0.1) == pytest.approx(0.5) and s(0.2) == pytest.approx(1.0)
    assert s(0.6) == pytest.approx(0.5) and s(1.0) == pytest.approx(0.0)


def test_composition_sum_product_piecewise():
    a, b = S.linear(0.0, 1.0), S.constant(2.0)
    assert (a + b)(0.5) == pytest.approx(2.5)
    assert (a * b)(0.5) == pytest.approx(1.0)
    assert (3 * a)(0.5) == pytest.approx(1.5)
    assert (a + 1)(0.25) == pytest.approx(1.25)
    assert S.compose(a, lambda p: p * p)(0.5) == pytest.approx(0.25)
    assert a.at(lambda p: 1 - p)(0.2) == pytest.approx(0.8)
    pw = S.piecewise([(0.0, S.linear(0, 1)), (0.5, S.cosine(1, 0))])
    assert pw(0.25) == pytest.approx(0.5) and pw(0.5) == pytest.approx(1.0) and pw(1.0) == pytest.approx(0)
    # a plain function is a schedule too
    assert S.as_schedule(lambda p: 1 - p)(0.25) == 0.75


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="progress"):
        S.cosine(1.0)(1.5)
    with pytest.raises(ValueError):
        S.piecewise([(0.1, 1.0)])
    with pytest.raises(ValueError, match="outside"):
        S.compose(S.linear(0, 1), lambda p: p + 1)(0.5)
    with pytest.raises(TypeError):
        S.as_schedule("fast")
    with pytest.raises(ValueError):
        S.wsd(1.0, warmup=0.6, decay=0.6)


def test_every_hyperparameter_follows_its_schedule_each_step():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=1.0)
    scheds = {"lr": S.cosine(1e-3, 0.0), "betas": (0.9, S.linear(0.95, 0.99)),
              "eps": S.exponential(1e-6, 1e-8), "weight_decay": lambda p: 0.1 * p}
    for step in range(5):
        p = step / 4
        vals = S.apply_hyperparameters(opt, scheds, p)
        g = opt.param_groups[0]
        assert g["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * p)))
        assert g["betas"] == pytest.approx((0.9, 0.95 + 0.04 * p))
        assert g["eps"] == pytest.approx(1e-6 * (1e-2) ** p)
        assert g["weight_decay"] == pytest.approx(0.1 * p)
        assert vals["lr"] == g["lr"]
    with pytest.raises(KeyError, match="momentum"):
        S.apply_hyperparameters(opt, {"momentum": 0.9}, 0.0)
    with pytest.raises(ValueError, match="betas"):
        S.apply_hyperparameters(opt, {"betas": (0.9, 1.5)}, 0.0)


def test_mix_is_normalised_and_checked():
    mix = lambda p: {"docs": 0.75 - 0.5 * p, "dialogues": 0.25 + 0.5 * p}
    assert S.resolve_mix(mix, 0.0, ["docs", "dialogues"]) == pytest.approx({"docs": 0.75, "dialogues": 0.25})
    assert S.resolve_mix(None, 0.3, ["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert S.resolve_mix({"a": 2, "b": 6}, 0.3, ["a", "b"]) == {"a": 0.25, "b": 0.75}
    lm = S.linear_mix({"a": 1.0}, {"b": 1.0})
    assert S.resolve_mix(lm, 0.25, ["a", "b"]) == pytest.approx({"a": 0.75, "b": 0.25})
    with pytest.raises(KeyError, match="unknown source"):
        S.resolve_mix({"code": 1.0}, 0.0, ["docs"])
    with pytest.raises(ValueError, match="sum to zero"):
        S.resolve_mix({"docs": 0.0}, 0.0, ["docs"])
    with pytest.raises(ValueError, match=">= 0"):
        S.resolve_mix({"docs": -1.0}, 0.0, ["docs"])


def test_default_lr_rule():
    assert S.default_lr(7_000_000_000, 16) == pytest.approx(2e-4)
    small, big = S.default_lr(135_000_000, 16), S.default_lr(70_000_000_000, 16)
    assert big < 2e-4 < small <= 2e-3
    assert S.default_lr(135_000_000, 64) < small
    with pytest.raises(ValueError):
        S.default_lr(0, 8)
