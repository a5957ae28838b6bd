"""Learning from corrections: edited answers in the store become (model's, user's) pairs, and a
few DPO steps on the bundled model raise the chosen answers' likelihood margin over the rejected."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from dialogue.service import DialogueService
from dialogue.train.data import DataError, edited_answers, preference_pairs, sources_from
from dialogue.train.lora import adapters_disabled
from dialogue.train.loop import TrainConfig, _answer_logps, finetune

# (question, what the model said, what the user corrected it to)
EDITS = [
    ("What is the capital of Zorblax?", "The capital of Zorblax is Paris.",
     "The capital of Zorblax is Quimby."),
    ("How many moons does Zorblax have?", "Zorblax has one moon.", "Zorblax has three moons."),
    ("What are Quimby's bridges made of?", "Quimby's bridges are made of stone.",
     "Quimby's bridges are made of glass."),
    ("Who founded Quimby?", "Quimby was founded by the Romans.", "Quimby was founded by the canal guild."),
]


@pytest.fixture
def svc(tmp_path):
    s = DialogueService(tmp_path / "store.db")
    yield s
    s.close()


def _model_answers(svc, d, q, answer):
    m = svc.add(d.id, "prompt", q)
    svc.store.begin_stream(m.id)
    svc.store.finish_stream(m.id, response=answer, meta={"run": {"status": "ok"}})
    return m


@pytest.fixture
def edited(svc):
    """A dialogue in a real store: the model answered four prompts, the user corrected each;
    a fifth answer was left as the model wrote it, and a sixth prompt was re-asked and answered
    anew (the model's answer to the new question is not an edit)."""
    d = svc.create("zorblax")
    for q, said, wanted in EDITS:
        m = _model_answers(svc, d, q, said)
        svc.edit(d.id, m.id, base_version=None, response=wanted)
    _model_answers(svc, d, "Is Zorblax cold?", "Yes, Zorblax is cold.")
    m = _model_answers(svc, d, "Old question?", "Old answer.")
    svc.edit(d.id, m.id, base_version=None, source="New question?")
    svc.store.begin_stream(m.id)
    svc.store.finish_stream(m.id, response="New answer.", meta={"run": {"status": "ok"}})
    return svc.open("zorblax")


def test_edited_answers_are_read_from_the_version_history(svc, edited):
    got = edited_answers(edited, svc.store.history)
    assert [(m.source, bad, good) for m, bad, good in got] == EDITS


def test_pairs_share_the_conversation_and_label_only_the_last_answer(svc, edited, smol_tokenizer):
    pairs = preference_pairs([edited], svc.store.history, smol_tokenizer)
    assert len(pairs) == 4
    for p, (q, said, wanted) in zip(pairs, EDITS):
        c, r = p.chosen, p.rejected
        n = next(i for i, (a, b) in enumerate(zip(c.input_ids, r.input_ids)) if a != b)
        assert c.labels[:n] == r.labels[:n]  # the prompt (and earlier turns) untrained in both
        answer = smol_tokenizer.decode([t for t in c.labels if t != -100])
        assert wanted in answer and said not in answer
        assert said in smol_tokenizer.decode([t for t in r.labels if t != -100])
    # the second pair's context holds the first answer as the user corrected it
    assert EDITS[0][2] in smol_tokenizer.decode(pairs[1].chosen.input_ids)
    plain = svc.create("plain")
    _model_answers(svc, plain, "Hi?", "Hello.")
    with pytest.raises(DataError, match="none of the given dialogues has an edited answer"):
        sources_from([svc.open("plain")], tokenizer=smol_tokenizer, history=svc.store.history)


def test_dpo_raises_the_chosen_answers_margin_on_the_bundled_model(svc, edited, smol, tmp_path):
    base = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
    cfg = TrainConfig(steps=6, batch_size=2, lr=3e-3, progress=False, out_dir=tmp_path / "out")
    spec = dict(r=8, targets=("q_proj", "v_proj", "o_proj"))

    res = finetune(base=base, dialogues=[edited], history=svc.store.history, mix={"preferences": 1.0},
                   config=cfg, export=False, **spec)
    pairs = res.sampler.sources["preferences"]
    assert len(pairs) == 4 and res.sampler.observed_mix() == {"dialogues": 0.0, "preferences": 1.0}

    def margin(model):
        model.eval()
        with torch.no_grad():
            c, r = _answer_logps(model, pairs, smol.tokenizer.pad_token_id, torch.device("cpu"), None)
        return float((c - r).mean())

    with adapters_disabled(res.model):
        before = margin(res.model)
    after = margin(res.model)
    print(f"chosen-over-rejected log-likelihood margin: {before:.3f} before, {after:.3f} after 6 DPO steps")
    assert after > before + 1.0, (before, after)
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["pref_loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0): adapters start as identity
    assert recs[-1]["pref_loss"] < recs[0]["pref_loss"] and recs[-1]["pref_margin"] > 0


def test_preferences_mix_with_supervised_data(svc, edited, tiny_chat, tmp_path):
    """Through `dialogue train --preferences` (the service's store, a tiny HF model): the mix
    moves from supervised dialogues to preference pairs over the run."""
    out = tmp_path / "out"
    rc = svc.train(["--data-dialogues", "zorblax", "--preferences", "--model", str(tiny_chat / "model"),
                    "--quant", "none", "--steps", "8", "--batch-size", "2", "--out", str(out),
                    "--mix", "dialogues=1:0", "preferences=0:1", "--no-progress", "--no-export"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and "pref_loss" not in recs[0] and "pref_loss" in recs[-1]
    n_versions = len(svc.store.history(edited.messages[0].id))
    assert svc.train(["--docs", str(tiny_chat / "docs.md"), "--preferences"]) == 1
    assert len(svc.store.history(edited.messages[0].id)) == n_versions  # read, never written
