"""Two processes with FSDP2 on gloo give the same losses (and adapter) as one process."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dialogue.document import Dialogue, Kind, Message
from dialogue.train.main import train_main


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tiny_chat, tmp_path):
    store = {f"d{i}": Dialogue(name=f"d{i}", messages=[
        Message(kind=Kind.prompt, source=f"How many moons has Quimby in year {i}?", response=f"{i % 5} moons.")])
        for i in range(4)}
    load = lambda names: [store[n] for n in names]  # noqa: E731  (what the CLI passes: a store lookup)
    common = ["--model", str(tiny_chat / "model"), "--quant", "nf4", "--docs", str(tiny_chat / "docs.md"),
              "--data-dialogues", *store, "--mix", "docs=0.8:0.2", "dialogues=0.2:0.8",
              "--seq-len", "64", "--steps", "3", "--lr", "1e-2", "--r", "4", "--no-progress"]
    assert train_main([*common, "--batch-size", "2", "--out", str(tmp_path / "one")], load) == 0
    # the workers cannot call `load`: the dialogues reach them as a file
    assert train_main([*common, "--batch-size", "1", "--nproc", "2", "--out", str(tmp_path / "two")], load) == 0
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, rel=1e-5)
    assert one[0] != one[-1]  # it trained
    cfg = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["sources"] == {"dialogues": 4, "docs": cfg["sources"]["docs"]}
    # every parameter, the packed NF4 base included, was a shard on each rank
    assert cfg["fsdp"]["sharded"] == cfg["fsdp"]["params"] > 0
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
