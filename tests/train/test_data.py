"""Dialogues -> chat examples with loss on answers only; docs -> packed text; a mix per batch."""
from __future__ import annotations

import pytest
import torch

from dialogue.document import Dialogue, Kind, Message
from dialogue.train import data as D
from dialogue.train.schedule import linear_mix


def _dialogue():
    return Dialogue(name="d", system="Be terse.", messages=[
        Message(kind=Kind.note, source="Some notes about Zorblax."),
        Message(kind=Kind.code, source="x = 6 * 7\nprint(x)",
                outputs=[{"output_type": "stream", "name": "stdout", "text": "42\n"}]),
        Message(kind=Kind.prompt, source="What is x?", response="x is 42."),
        Message(kind=Kind.prompt, source="SECRET hidden question", response="SECRET hidden answer", hidden=True),
        Message(kind=Kind.prompt, source="Unanswered?"),
        Message(kind=Kind.prompt, source="Capital of Zorblax?", response="Quimby."),
        Message(kind=Kind.note, source="trailing note with no prompt after it"),
    ])


def test_dialogue_messages_skip_hidden_and_fold_context():
    msgs = D.dialogue_messages(_dialogue())
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert "Some notes" in msgs[1]["content"] and "```python\nx = 6 * 7" in msgs[1]["content"]
    assert "Output:\n42" in msgs[1]["content"] and msgs[1]["content"].endswith("What is x?")
    assert not any("SECRET" in m["content"] or "trailing" in m["content"] for m in msgs)


def test_loss_only_on_assistant_answers(smol):
    tok = smol.tokenizer
    ex = D.dialogue_examples([_dialogue()], tok, max_len=512)[0]
    assert len(ex.input_ids) == len(ex.labels)
    trained = tok.decode([t for t in ex.labels if t != D.IGNORE])
    # exactly the two answers, each with the template's end-of-turn
    assert trained.replace("<|im_end|>", "|").replace("\n", "") == "x is 42.|Quimby.|"
    full = tok.decode(ex.input_ids)
    assert "Be terse." in full and "What is x?" in full and "SECRET" not in full
    # the rendering is the tokenizer's own chat template
    assert full == tok.apply_chat_template(D.dialogue_messages(_dialogue()), tokenize=False)
    # truncation keeps the first tokens; a dialogue with nothing answered gives no example
    short = D.dialogue_examples([_dialogue()], tok, max_len=20)
    assert short == [] or len(short[0]) <= 20
    assert D.dialogue_examples([Dialogue(name="e", messages=[Message(kind=Kind.prompt, source="hi")])], tok) == []
    with pytest.raises(D.DataError):
        D.dialogue_examples(["not a dialogue"], tok)


def test_docs_pack_into_sequences(smol, tmp_path):
    tok = smol.tokenizer
    (tmp_path / "a.md").write_text("# Zorblax\n" + "Quimby is the capital. " * 40)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Second file. " * 30)
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    texts = D.read_docs([tmp_path])
    assert len(texts) == 2 and texts[0].startswith("# Zorblax")
    seqs = D.pack_text(texts, tok, seq_len=64)
    assert all(len(s) == 64 for s in seqs[:-1])
    # every token is trained except where a document (or a piece's part of one) starts
    for s in seqs:
        assert [lab == -100 for lab in s.labels] == [p == 0 for p in s.position_ids]
        assert all(lab == t for lab, t, p in zip(s.labels, s.input_ids, s.position_ids) if p)
    stream = [t for s in seqs for t in s.input_ids]
    assert stream.count(tok.eos_token_id) == 2
    with pytest.raises(FileNotFoundError):
        D.read_docs([tmp_path / "missing"])
    b = D.collate(seqs[-2:], pad_id=tok.pad_token_id)
    assert b["input_ids"].shape[0] == 2 and (b["labels"][b["attention_mask"] == 0] == D.IGNORE).all()


def _fake_sources():
    return {"docs": [D.Example([i, i + 1], [i, i + 1], "docs") for i in range(50)],
            "dialogues": [D.Example([i], [i], "dialogues") for i in range(7)]}


def test_sampler_follows_the_mix_function_per_batch():
    calls = []

    def mix(p):
        calls.append(p)
        return {"docs": 0.9 - 0.8 * p, "dialogues": 0.1 + 0.8 * p}

    steps = 400
    s = D.MixSampler(_fake_sources(), mix=mix, batch_size=16, total_steps=steps, seed=1)
    for step in range(steps):
        batch = s.draw(step)
        assert len(batch) == 16
    assert calls[1:] == [st / steps for st in range(steps)]  # evaluated at every batch
    # the sampled mix tracks mix(p): early batches mostly docs, late batches mostly dialogues
    early, late = s.observed_mix(0, 40)["docs"], s.observed_mix(360, 400)["docs"]
    assert abs(early - 0.86) < 0.05 and abs(late - 0.14) < 0.05
    for window in range(0, steps, 100):
        obs = s.observed_mix(window, window + 100)["dialogues"]
        mid = (window + 50) / steps
        assert abs(obs - (0.1 + 0.8 * mid)) < 0.05, (window, obs)
    # every dialogue example is used before any repeats
    s2 = D.MixSampler(_fake_sources(), mix={"dialogues": 1.0}, batch_size=7, total_steps=2)
    assert sorted(e.input_ids[0] for e in s2.draw(0)) == list(range(7))


def test_sampler_state_resumes_exactly_and_shards_by_rank():
    a = D.MixSampler(_fake_sources(), mix=linear_mix({"docs": 1}, {"dialogues": 1}), batch_size=3, total_steps=20, seed=5)
    seq = [[e.input_ids for e in a.draw(i)] for i in range(10)]
    b = D.MixSampler(_fake_sources(), mix=linear_mix({"docs": 1}, {"dialogues": 1}), batch_size=3, total_steps=20, seed=5)
    for i in range(4):
        b.draw(i)
    state = b.state_dict()
    c = D.MixSampler(_fake_sources(), mix=linear_mix({"docs": 1}, {"dialogues": 1}), batch_size=3, total_steps=20, seed=99)
    c.load_state_dict(state)
    assert [[e.input_ids for e in c.draw(i)] for i in range(4, 10)] == seq[4:]
    whole = D.MixSampler(_fake_sources(), batch_size=4, total_steps=5, seed=2).draw(0)
    r0 = D.MixSampler(_fake_sources(), batch_size=2, total_steps=5, seed=2, rank=0, world_size=2).draw(0)
    r1 = D.MixSampler(_fake_sources(), batch_size=2, total_steps=5, seed=2, rank=1, world_size=2).draw(0)
    assert r0 + r1 == whole
    with pytest.raises(D.DataError):
        D.MixSampler({"docs": []})
    with pytest.raises(KeyError):
        D.MixSampler(_fake_sources(), mix={"code": 1.0})


def test_packed_documents_do_not_see_each_other(smol, smol_model):
    """Three documents packed into one sequence: each one's loss in the pack equals its loss
    alone (per-document positions and a block-diagonal mask), where the old packing (one
    causal attention over the whole stream) gives the later documents a different loss."""
    from dialogue.train.loop import _token_loss_sum
    tok = smol.tokenizer
    docs = ["Zorblax is a planet with three moons and a ring of ice.",
            "def add(a, b):\n    return a + b\n",
            "Quimby, the capital, is built on canals; its bridges are made of glass."]
    [packed] = D.pack_text(docs, tok, seq_len=256)
    alone = [D.pack_text([d], tok, seq_len=256, min_tail=1)[0] for d in docs]
    assert len(packed) == sum(len(a) for a in alone)
    assert packed.position_ids == [p for a in alone for p in a.position_ids]
    smol_model.eval()
    batch = D.collate([packed], pad_id=tok.pad_token_id, pad_to=len(packed) + 5)  # with padding
    assert "position_ids" in batch
    leaky = {k: v for k, v in batch.items() if k != "position_ids"}  # the old packing
    start = 0
    with torch.no_grad():
        for a in alone:
            only = batch["labels"].clone()
            keep = torch.zeros_like(only, dtype=torch.bool)
            keep[0, start: start + len(a)] = True
            only[~keep] = -100
            in_pack, n = _token_loss_sum(smol_model, {**batch, "labels": only})
            ref, n_alone = _token_loss_sum(smol_model, D.collate([a], pad_id=tok.pad_token_id))
            assert n == n_alone == a.n_targets > 5
            assert torch.allclose(in_pack, ref, rtol=1e-4), (start, float(in_pack), float(ref))
            crossed, _ = _token_loss_sum(smol_model, {**leaky, "labels": only})
            if start:  # a later document, attending across the boundary, is not alone
                assert abs(float(crossed) - float(ref)) > 1e-3 * float(ref)
            start += len(a)
