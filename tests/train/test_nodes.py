"""Training across machines: two "nodes" as two torchrun launches on 127.0.0.1 (gloo), each
started by its own `dialogue train` command, against one process with the same total batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from dialogue.document import Dialogue, Kind, Message
from dialogue.train.main import dialogues_to_jsonl, train_main


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(args_of, n: int = 2, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start `n` machines' commands at once (as each machine's user would) and wait for all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "dialogue.train.main", *args_of(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def test_bad_node_combinations_are_refused_before_anything_starts(tmp_path, capsys):
    docs = tmp_path / "d.md"
    docs.write_text("text")
    base = ["--docs", str(docs), "--model", "/nowhere"]
    cases = [(["--nnodes", "2"], "needs --rdzv-endpoint"),
             (["--nnodes", "2", "--rdzv-endpoint", "host"], "HOST:PORT"),
             (["--nnodes", "2", "--rdzv-endpoint", "h:99999"], "HOST:PORT"),
             (["--nnodes", "2", "--rdzv-endpoint", "h:29500", "--node-rank", "2"], "--node-rank must be in 0..1"),
             (["--nnodes", "2", "--rdzv-endpoint", "h:29500", "--node-rank", "-1"], "--node-rank must be in 0..1"),
             (["--node-rank", "1"], "for --nnodes 2 or more"),
             (["--rdzv-endpoint", "h:1"], "for --nnodes 2 or more"),
             (["--nnodes", "0"], "--nnodes must be at least 1"),
             (["--nproc", "0"], "--nproc must be at least 1"),
             (["--steps", "4", "--stop-after", "5"], "--stop-after must be in 1..4"),
             # the served GGUF weights are buffers FSDP does not shard: nothing to broadcast in shards
             (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--model", "local:default"], "--load-on-rank0"),
             (["--nproc", "2", "--load-on-rank0", "--quant", "hqq"], "--load-on-rank0")]
    for extra, msg in cases:
        assert train_main([*base, *extra]) == 1, extra
        assert msg in capsys.readouterr().err, extra


@pytest.mark.slow
def test_two_nodes_match_one_process_and_resume_from_the_shared_folder(tiny_chat, tmp_path):
    """Each node runs the same command on the same data; rank 0 alone reads the nf4 base and
    broadcasts it (the default with --nnodes > 1); the run stops at step 2 with a checkpoint in the
    shared --out, and the same two commands go on from it to the losses of one uninterrupted
    process with the same total batch."""
    dialogues = [Dialogue(name=f"d{i}", messages=[
        Message(kind=Kind.prompt, source=f"How many moons has Quimby in year {i}?", response=f"{i % 5} moons.")])
        for i in range(4)]
    data = tmp_path / "dialogues.jsonl"
    dialogues_to_jsonl(dialogues, data)
    common = ["--model", str(tiny_chat / "model"), "--quant", "nf4", "--docs", str(tiny_chat / "docs.md"),
              "--dialogues-file", str(data), "--mix", "docs=0.8:0.2", "dialogues=0.2:0.8",
              "--seq-len", "64", "--steps", "4", "--lr", "1e-2", "--r", "4", "--no-progress"]
    assert train_main([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    shared = tmp_path / "shared"

    def node(stop: list[str], port: int):
        return lambda i: [*common, "--batch-size", "1", "--out", str(shared), "--nnodes", "2",
                          "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test-run", *stop]

    first = _nodes(node(["--stop-after", "2"], _port()))
    assert all(r.returncode == 0 for r in first), [r.stderr[-3000:] for r in first]
    assert len(_losses(shared)) == 2 and (shared / "checkpoint.pt").is_file()
    second = _nodes(node([], _port()))
    assert all(r.returncode == 0 for r in second), [r.stderr[-3000:] for r in second]
    assert "(from step 2)" in "".join(r.stdout for r in second)  # rank 0's node says so
    one, two = _losses(tmp_path / "one"), _losses(shared)
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-5)
    assert one[0] != one[-1]  # it trained
    cfg = json.loads((shared / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["fsdp"]["sharded"] == cfg["fsdp"]["params"] > 0
    from safetensors.torch import load_file
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(shared / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_nodes_with_different_data_or_separate_out_folders_stop_with_a_clear_error(tiny_chat, tmp_path):
    """Node ranks fixed with --node-rank (torchrun's static rendezvous). A node whose docs differ
    is caught before any training; so is an --out that is not one folder all nodes see (node 0
    has a checkpoint there, node 1 does not)."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "docs.md").write_text((tiny_chat / "docs.md").read_text() + " One more fact.")
    common = ["--model", str(tiny_chat / "model"), "--quant", "nf4", "--seq-len", "64", "--steps", "2",
              "--r", "4", "--no-progress", "--nnodes", "2"]
    port = _port()
    runs = _nodes(lambda i: [*common, "--docs", str(tiny_chat / "docs.md" if i == 0 else other / "docs.md"),
                             "--node-rank", str(i), "--rdzv-endpoint", f"127.0.0.1:{port}",
                             "--out", str(tmp_path / "out")])
    assert all(r.returncode != 0 for r in runs)
    assert all("the training data differs between processes: rank(s) [1]" in r.stderr for r in runs), \
        [r.stderr[-2000:] for r in runs]

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoint.pt").write_bytes(b"from an earlier run")
    port = _port()
    runs = _nodes(lambda i: [*common, "--docs", str(tiny_chat / "docs.md"), "--node-rank", str(i),
                             "--rdzv-endpoint", f"127.0.0.1:{port}", "--out", str(tmp_path / "ab"[i])])
    assert all(r.returncode != 0 for r in runs)
    assert all("is --out on a path all nodes share?" in r.stderr for r in runs), [r.stderr[-2000:] for r in runs]


def test_the_skeleton_other_ranks_receive_holds_no_weights(tiny_chat):
    """What rank 0 broadcasts to the others under --load-on-rank0: the module tree on the meta
    device with bitsandbytes' quant states (small, on the CPU), not the packed weights."""
    import pickle

    from dialogue.train.fsdp import is_meta, skeleton
    from dialogue.train.quant import load_base
    b = load_base(tiny_chat / "model", quant="nf4", quant_storage=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in b.model.parameters())
    blob = pickle.dumps(skeleton(b.model))
    assert len(blob) < weights / 20
    s = pickle.loads(blob)
    assert is_meta(s) and all(t.is_meta for t in [*s.parameters(), *s.buffers()])
    assert [n for n, _ in s.named_parameters()] == [n for n, _ in b.model.named_parameters()]
    four = [m for m in s.modules() if type(m).__name__ == "Linear4bit"]
    assert four and all(m.quant_state is m.weight.quant_state and m.quant_state.absmax.device.type == "cpu"
                        for m in four)
    assert not is_meta(b.model)  # rank 0's own model is untouched


def test_served_gguf_weights_are_not_broadcast_in_shards(smol):
    from dialogue.train.fsdp import skeleton
    with pytest.raises(ValueError, match="served GGUF weights are buffers"):
        skeleton(smol.model)
