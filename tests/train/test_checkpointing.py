"""Gradient checkpointing chosen by default from the activations a run would store: the estimate
is measured on the model and extrapolates, the default turns it on past the model's weights (or a
share of the memory available), the choice is reported, and it changes memory, never the result."""
from __future__ import annotations

import json

import pytest
import torch

from dialogue.train.lora import AdapterSpec, add_adapters, checkpointing_enabled, enable_checkpointing
from dialogue.train.loop import TrainConfig, choose_checkpointing, estimate_activations, finetune
from dialogue.train.quant import load_base


def _saved_bytes(model, n: int) -> int:
    """What autograd keeps for backward in one training forward of n tokens, counted directly
    (each storage once, none of the model's own): the quantity the estimate extrapolates."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(7))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1, use_cache=False)
    return sum(seen.values())


@pytest.fixture
def adapted(tiny_chat):
    base = load_base(tiny_chat / "model", quant="none")
    m = add_adapters(base.model, AdapterSpec(r=2, seed=0))
    m.train()
    return m


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_estimate_from_two_short_forwards_predicts_a_long_one(adapted, attn):
    """Probed at 64 and 128 tokens, the estimate predicts what a 768-token forward stores (eager
    attention keeps its tokens x tokens weights: the quadratic term; SDPA's kernel does not), and
    it leaves the RNG where it was (a run's dropout draws do not move)."""
    adapted.config._attn_implementation = attn
    rng = torch.get_rng_state()
    est = estimate_activations(adapted)
    assert torch.equal(rng, torch.get_rng_state())
    assert (est.per_token2 > 0) == (attn == "eager")
    emb = adapted.get_input_embeddings().weight
    assert emb.nbytes < est.weight_bytes < 1.5 * emb.nbytes  # the tied LM head counted once
    actual = _saved_bytes(adapted, 768)
    assert est.bytes(1, 768) == pytest.approx(actual, rel=0.02)
    assert est.bytes(3, 768) == 3 * est.bytes(1, 768)
    enable_checkpointing(adapted)  # what checkpointing is for: a fraction of the activations stay
    assert estimate_activations(adapted).per_token < est.per_token / 3


def test_the_choice_follows_weights_memory_and_the_users_word(adapted):
    est = estimate_activations(adapted)
    past = int(est.weight_bytes / est.per_token) + 64  # the first lengths whose activations outweigh the model
    below = choose_checkpointing(adapted, 1, 256, available=2**40)
    above = choose_checkpointing(adapted, 1, past, available=2**40)
    assert not below.on and below.chosen_by == "auto" and "under the model's" in below.reason
    assert above.on and above.chosen_by == "auto" and "> the model's" in above.reason
    assert above.activation_mb == pytest.approx(est.bytes(1, past) / 2**20)
    tight = choose_checkpointing(adapted, 1, 256, available=est.bytes(1, 256) * 2)  # little memory left
    assert tight.on and "of the" in tight.reason and "available" in tight.reason
    assert choose_checkpointing(adapted, 1, past, requested=False).on is False
    assert choose_checkpointing(adapted, 1, 16, requested=True).chosen_by == "argument"
    assert choose_checkpointing(adapted, 1, 16, offload=True).chosen_by == "offload"
    assert not checkpointing_enabled(adapted)  # choosing changes nothing by itself


def test_default_turns_checkpointing_on_for_long_sequences_and_trains_the_same(tiny_chat, tmp_path):
    """`finetune()` with no word on checkpointing: off for short sequences, on past the threshold
    (reported in train_config.json and every step's metrics), and then its losses equal a run
    with checkpointing turned off."""
    docs = tmp_path / "long.md"
    docs.write_text(" ".join(f"Zorblax fact {i}: Quimby has {i * 7 % 13} moons and {i % 5} canals."
                             for i in range(400)))

    def run(name, seq_len, ckpt=None):
        base = load_base(tiny_chat / "model", quant="none")
        cfg = TrainConfig(steps=3, lr=1e-2, out_dir=tmp_path / name, progress=False)
        res = finetune(base=base, docs=[docs], quant="none", r=2, seq_len=seq_len, config=cfg,
                       gradient_checkpointing=ckpt, export=True)
        meta = json.loads((tmp_path / name / "train_config.json").read_text())["checkpointing"]
        steps = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return res, meta, steps

    short, short_meta, short_steps = run("short", 128)
    assert not short.checkpointing.on and short_meta["chosen_by"] == "auto" and short_meta["on"] is False
    assert not any(s["checkpointing"] for s in short_steps)

    auto, meta, steps = run("auto", 2048)
    assert auto.checkpointing.on and meta == auto.checkpointing.as_dict()
    assert meta["chosen_by"] == "auto" and "> the model's" in meta["reason"] and meta["activation_mb"] > 0
    assert checkpointing_enabled(auto.model) and all(s["checkpointing"] for s in steps)

    off, off_meta, off_steps = run("off", 2048, ckpt=False)
    assert off_meta == {"on": False, "chosen_by": "argument", "reason": "turned off", "activation_mb": None}
    assert not checkpointing_enabled(off.model) and not any(s["checkpointing"] for s in off_steps)
    assert auto.result.tokens == off.result.tokens > 3 * 1500
    assert auto.result.losses == pytest.approx(off.result.losses, rel=1e-5)
    for k, p in auto.model.named_parameters():
        if p.requires_grad:
            q = dict(off.model.named_parameters())[k]
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), k
