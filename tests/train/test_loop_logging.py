"""The trainer logs on `dialogue.train.loop`: its span at info, every step at debug."""
from __future__ import annotations

import logging

import torch

from dialogue.train.data import Example, MixSampler
from dialogue.train.lora import AdapterSpec, add_adapters
from dialogue.train.loop import TrainConfig, train
from dialogue.train.quant import load_base


def test_the_trainer_logs_its_span_and_each_step(tiny_dir, tmp_path, caplog):
    base = load_base(tiny_dir, quant="none", tokenizer=object())
    model = add_adapters(base.model, AdapterSpec(r=4, seed=1))
    g = torch.Generator().manual_seed(0)
    seqs = [Example(ids, list(ids), "docs")
            for ids in (torch.randint(3, 256, (16,), generator=g).tolist() for _ in range(6))]
    with caplog.at_level(logging.DEBUG, logger="dialogue.train.loop"):
        res = train(model, MixSampler({"docs": seqs}, batch_size=2, total_steps=3),
                    TrainConfig(steps=3, out_dir=tmp_path, progress=False))
    recs = [r for r in caplog.records if r.name == "dialogue.train.loop"]
    info = [r.getMessage() for r in recs if r.levelno == logging.INFO]
    steps = [r.getMessage() for r in recs if r.levelno == logging.DEBUG]
    assert info and info[0].startswith("training steps 1 to 3 of 3")
    assert [s.split(":")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert f"loss {res.losses[-1]:.4f}" in steps[-1] and "tokens/s" in steps[-1]
