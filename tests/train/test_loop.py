"""The loop: schedules per step, exact resume, non-finite loss, accumulation, metrics."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dialogue.train.data import Example, MixSampler
from dialogue.train.lora import AdapterSpec, add_adapters, trainable_parameters
from dialogue.train.loop import CHECKPOINT, NonFiniteLossError, TrainConfig, train
from dialogue.train.quant import load_base
from dialogue.train.schedule import cosine, linear, warmup


def _seqs(n=12, length=16, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Example(ids, list(ids), "docs"))
    return out


@pytest.fixture
def tiny(tiny_dir):
    base = load_base(tiny_dir, quant="none", tokenizer=object())
    return add_adapters(base.model, AdapterSpec(r=4, dropout=0.1, seed=1))


def test_every_hyperparameter_follows_its_schedule(tiny, tmp_path):
    lr = warmup(cosine(1e-2, 1e-3), 0.25)
    cfg = TrainConfig(steps=8, lr=lr, betas=(0.9, linear(0.95, 0.99)), weight_decay=lambda p: 0.01 * p,
                      out_dir=tmp_path, progress=False)
    res = train(tiny, MixSampler({"docs": _seqs()}, batch_size=2, total_steps=8), cfg)
    assert [h["lr"] for h in res.hyper] == pytest.approx([lr(s / 8) for s in range(8)])
    assert [h["betas"][1] for h in res.hyper] == pytest.approx([0.95 + 0.04 * s / 8 for s in range(8)])
    assert [h["weight_decay"] for h in res.hyper] == pytest.approx([0.01 * s / 8 for s in range(8)])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9)) and all(x["loss"] > 0 for x in lines)
    assert all(x["tokens_per_s"] > 0 and x["peak_mem_mb"] > 0 for x in lines)
    # the labelled plot: loss (and its smoothed curve), learning rate, the data mix, with values
    import xml.etree.ElementTree as ET
    root = ET.fromstring((tmp_path / "training.svg").read_text())
    words = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"loss", "learning rate", "data mix (weight per source)", "step (of 8)"} <= set(words)
    assert f"8 steps; first {lines[0]['loss']:.3g}, last {lines[-1]['loss']:.3g}" in words[1]


def test_gradient_accumulation_equals_one_big_batch(tiny_dir):
    def run(batch, accum):
        m = add_adapters(load_base(tiny_dir, quant="none", tokenizer=object()).model, AdapterSpec(r=4, seed=1))
        cfg = TrainConfig(steps=3, batch_size=batch, grad_accum=accum, lr=1e-2, progress=False)
        return train(m, MixSampler({"docs": _seqs(length=12)}, batch_size=batch, total_steps=3, seed=4), cfg).losses
    a, b = run(4, 1), run(2, 2)
    assert a == pytest.approx(b, rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    def poison(rec):
        if rec["step"] == 2:  # corrupt the adapter after step 2 was checkpointed
            with torch.no_grad():
                next(iter(trainable_parameters(tiny).values())).fill_(float("nan"))
    cfg = TrainConfig(steps=5, lr=1e-3, out_dir=tmp_path, checkpoint_every=1, progress=False)
    with pytest.raises(NonFiniteLossError, match="step 3.*intact"):
        train(tiny, MixSampler({"docs": _seqs()}, total_steps=5), cfg, on_step=poison)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["step"] == 2 and len(state["losses"]) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_no_trainable_parameters_is_an_error(tiny_dir):
    m = load_base(tiny_dir, quant="none", tokenizer=object()).model
    with pytest.raises(ValueError, match="no trainable"):
        train(m, MixSampler({"docs": _seqs()}), TrainConfig(steps=1, progress=False))


def test_resume_equals_uninterrupted(smol, smol_model, tmp_path):
    """On the bundled model, with dropout (RNG) and a mix of two sources: stop after 2 of 4
    steps, resume in a fresh model from the checkpoint, and get the same losses bit for bit."""
    tok = smol.tokenizer
    text = [Example(tok(f"Zorblax fact number {i}: Quimby has {i} moons.")["input_ids"], [], "docs") for i in range(6)]
    for e in text:
        e.labels = list(e.input_ids)
    chat = [Example(e.input_ids, [-100] * 5 + e.input_ids[5:], "dialogues") for e in text]
    sources = {"docs": text, "dialogues": chat}
    mix = lambda p: {"docs": 1 - p, "dialogues": p}  # noqa: E731
    spec = AdapterSpec(r=4, dropout=0.1, targets=("q_proj", "v_proj"), seed=7)
    cfg = dict(steps=4, batch_size=2, lr=cosine(5e-3, 1e-4), progress=False)

    def fresh():
        return add_adapters(copy.deepcopy(smol.model), spec), MixSampler(sources, mix=mix, batch_size=2, total_steps=4, seed=3)

    m, s = fresh()
    whole = train(m, s, TrainConfig(out_dir=tmp_path / "a", **cfg), pad_id=tok.pad_token_id).losses
    m, s = fresh()
    first = train(m, s, TrainConfig(out_dir=tmp_path / "b", **cfg), pad_id=tok.pad_token_id, stop_after=2)
    assert first.steps == 2
    m, s = fresh()  # a new process would start here
    torch.manual_seed(12345)  # whatever the global RNG was, the checkpoint's state wins
    second = train(m, s, TrainConfig(out_dir=tmp_path / "b", **cfg), pad_id=tok.pad_token_id)
    assert second.resumed_from == 2
    assert first.losses + second.losses[2:] == whole == second.losses
    assert all(math.isfinite(x) for x in whole)
    # a checkpoint made for other adapters is refused
    m2 = add_adapters(copy.deepcopy(smol.model), AdapterSpec(r=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="different adapters"):
        train(m2, MixSampler(sources, total_steps=4), TrainConfig(out_dir=tmp_path / "b", **cfg))


def test_bf16_autocast_trains(tiny):
    cfg = TrainConfig(steps=2, lr=1e-3, precision="bf16", progress=False)
    res = train(tiny, MixSampler({"docs": _seqs()}, total_steps=2), cfg)
    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_loss_over_answer_positions_only_equals_full_logits(tiny):
    """The LM head runs only where the next token is a target; the loss is unchanged."""
    import torch.nn.functional as F

    from dialogue.train.loop import _token_loss_sum
    tiny.eval()
    x = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[:, :6] = -100
    labels[1, 8:] = -100
    mask = torch.ones_like(x)
    mask[1, 9] = 0
    with torch.no_grad():
        loss, n = _token_loss_sum(tiny, {"input_ids": x, "labels": labels, "attention_mask": mask})
        full = tiny(input_ids=x, attention_mask=mask).logits[:, :-1]
    ref = F.cross_entropy(full.reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert n == 6 and torch.allclose(loss, ref, rtol=1e-5)


@pytest.mark.parametrize("chunk,cap,head_trained", [(1, None, False), (3, None, False), (7, None, False),
                                                   (None, None, False), (3, 2.0, False), (3, 2.0, True)])
def test_chunked_loss_equals_unchunked_loss_and_gradients(tiny, chunk, cap, head_trained):
    """The LM head and the loss run a few tokens at a time (a frozen head: gradients worked out in
    the forward pass; a trained one: checkpointed chunks), with and without a final logit
    soft-cap; the loss and every gradient equal those of the full logits (`chunk=0`)."""
    from dialogue.train.lora import unwrap
    from dialogue.train.loop import _token_loss_sum
    unwrap(tiny).config.final_logit_softcapping = cap
    unwrap(tiny).lm_head.weight.requires_grad_(head_trained)
    tiny.train()
    for m in tiny.modules():  # no dropout: both runs must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():  # a non-zero B, so the adapters' gradients are not all alike
        for n, p in trainable_parameters(tiny).items():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    x = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[:, :3] = -100
    labels[1, 10:] = -100
    batch = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}

    def run(c):
        tiny.zero_grad(set_to_none=True)
        loss, n = _token_loss_sum(tiny, batch, c)
        (loss / n).backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in trainable_parameters(tiny).items()}

    ref_loss, ref_n, ref_grads = run(0)
    loss, n, grads = run(chunk)
    assert n == ref_n == 16
    assert any("lm_head" in k for k in grads) == head_trained
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert ref_grads.keys() == grads.keys() and any(g.abs().sum() > 0 for g in ref_grads.values())
    for k in ref_grads:
        assert torch.allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.slow
def test_compiled_adapters_train_like_eager(tiny_dir):
    """`TrainConfig(compile=True)` torch.compiles the adapted linears: same losses as eager."""
    def run(compile_):
        m = add_adapters(load_base(tiny_dir, quant="none", tokenizer=object()).model, AdapterSpec(r=4, seed=1))
        cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, progress=False, compile=compile_)
        return train(m, MixSampler({"docs": _seqs(length=12)}, batch_size=2, total_steps=3, seed=4), cfg).losses
    eager, compiled = run(False), run(True)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_chunked_loss_on_served_weights_equals_unchunked(smol, smol_model):
    """The bundled model's head is a served GGUF tensor, dequantized once for all the chunks:
    loss and adapter gradients still equal the whole-sequence ones."""
    from dialogue.train.loop import _token_loss_sum
    m = add_adapters(smol_model, AdapterSpec(r=4, targets=("q_proj", "v_proj"), seed=2))
    with torch.no_grad():
        for n, p in trainable_parameters(m).items():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    ids = smol.tokenizer("Zorblax has three moons; its capital Quimby is built on canals.")["input_ids"]
    x = torch.tensor([ids])
    batch = {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    def run(c):
        m.zero_grad(set_to_none=True)
        loss, n = _token_loss_sum(m, batch, c)
        (loss / n).backward()
        return loss.detach(), {k: p.grad.clone() for k, p in trainable_parameters(m).items()}

    ref, ref_g = run(0)
    loss, g = run(5)
    assert torch.allclose(loss, ref, rtol=1e-5)
    for k in ref_g:  # 30 layers of float32 backward, summed in another order: relative to the norm
        assert ref_g[k].norm() > 0 and (g[k] - ref_g[k]).norm() / ref_g[k].norm() < 1e-3, k
