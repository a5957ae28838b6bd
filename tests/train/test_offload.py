"""CPU offload of the frozen base (`offload.py`), on the bundled SmolLM2 with the compute device
being the CPU: the host copy and the device copy are then two CPU storages, and the device one
is really freed (its storage resized to 0) between uses, so residency is measured, not counted."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dialogue.train.data import Example, MixSampler
from dialogue.train.fsdp import decoder_layers
from dialogue.train.lora import AdapterSpec, add_adapters, enable_checkpointing, trainable_parameters
from dialogue.train.loop import TrainConfig, _token_loss_sum, train
from dialogue.train.main import train_main
from dialogue.train.offload import OffloadError, get_offloader, offload
from dialogue.train.quant import GGUFLinear, dense_weight, frozen_linear_names, load_base, quantize_linear
from dialogue.train.schedule import cosine

BENCH = Path(__file__).resolve().parents[2] / "bench" / "offload_bench.py"
SHORT = 6  # layers kept by _short(): the bundled weights, a fifth of the depth, five times faster


def _short(model: nn.Module, n: int = SHORT) -> nn.Module:
    """A copy of the bundled model with only its first `n` decoder layers (the others are not
    copied: the memo hands them back uncopied, then they are dropped)."""
    layers = model.model.layers
    m = copy.deepcopy(model, memo={id(x): x for x in list(layers)[n:]})
    m.model.layers = nn.ModuleList(list(m.model.layers)[:n])
    m.config.num_hidden_layers = n
    return m


def _quantized(model: nn.Module, mode: str = "nf4") -> nn.Module:
    """The bundled model with NF4 (or HQQ) frozen linears, quantized from the served (dequantized
    GGUF) weights: what `load_base(quant=mode)` builds, without reading the GGUF again."""
    m = copy.deepcopy(model)
    for name in frozen_linear_names(m):
        lin = m.get_submodule(name)
        q = quantize_linear(dense_weight(lin).detach(), lin.bias, mode)
        parent, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent), attr, q)
    return m


@pytest.fixture(scope="module")
def bases(smol):
    """The three frozen bases the offload must handle, on the first layers of the bundled model:
    served weights kept dense, served blocks dequantized on the fly (their backward re-reads the
    blocks: the case where swapping tensors in the modules would be wrong), bitsandbytes NF4, HQQ."""
    short = _short(smol.model)
    blocks = load_base("local:default", quant="served", served_cache=False, tokenizer=smol.tokenizer).model
    return {"served": short, "served-blocks": _short(blocks), "nf4": _quantized(short, "nf4"),
            "hqq": _quantized(short, "hqq")}


def _batch(tok, n: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    texts = [f"Zorblax fact number {i}: Quimby has {i + 3} moons and a canal." for i in range(n)]
    ids = [tok(t)["input_ids"][:length] for t in texts]
    x = torch.tensor(ids)
    labels = x.clone()
    labels[0, :4] = -100  # answers-only style targets on one row
    return {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}


def _adapted(base: nn.Module, method: str = "lora") -> nn.Module:
    m = add_adapters(copy.deepcopy(base), AdapterSpec(method=method, r=4, seed=3))
    with torch.no_grad():  # B = 0 at init would make every A gradient zero: give B values
        for n, p in trainable_parameters(m).items():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    return m


def _loss_and_grads(m: nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    m.train()
    loss, n = _token_loss_sum(m, batch)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in trainable_parameters(m).items()}
    m.zero_grad(set_to_none=True)
    return float(loss.detach() / n), grads


def _check_same(ref: nn.Module, off_m: nn.Module, batch: dict) -> None:
    loss0, g0 = _loss_and_grads(ref, batch)
    loss1, g1 = _loss_and_grads(off_m, batch)
    assert math.isfinite(loss0) and loss1 == pytest.approx(loss0, rel=1e-6, abs=1e-7)
    assert set(g0) == set(g1) and len(g0) >= 2 * 7 * len(decoder_layers(ref))
    assert all(g1[k].abs().sum() > 0 for k in g1)  # every adapter got a gradient through the offload
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,method", [("served", "lora"), ("served-blocks", "lora"), ("nf4", "lora"),
                                         ("nf4", "dora"), ("hqq", "lora")])
def test_offload_gives_the_same_loss_and_gradients(bases, smol, kind, method, tmp_path):
    batch = _batch(smol.tokenizer)
    ref = _adapted(bases[kind], method)
    enable_checkpointing(ref)
    off_m = _adapted(bases[kind], method)
    off = offload(off_m, "cpu")
    _check_same(ref, off_m, batch)
    # every layer crossed once for forward and once for the recomputation, and nothing is left
    assert off.stats.loads_forward == [1] * SHORT
    assert off.stats.loads_backward == [1] * SHORT
    assert off.stats.recomputed == [1] * SHORT
    assert off.resident() == [] and off.resident_bytes() == 0
    # and optimizer steps through train() follow the same trajectory (checkpointing each step: the
    # checkpoint holds the adapters only, never a state_dict of the offloaded base)
    cfg = dict(steps=2, lr=1e-2, progress=False, batch_size=2, checkpoint_every=1)
    src = {"docs": [Example(r.tolist(), r.tolist(), "docs") for r in batch["input_ids"]]}
    a = train(ref, MixSampler(src, batch_size=2, total_steps=2, seed=1), TrainConfig(out_dir=tmp_path / "a", **cfg))
    b = train(off_m, MixSampler(src, batch_size=2, total_steps=2, seed=1), TrainConfig(out_dir=tmp_path / "b", **cfg))
    assert b.losses == pytest.approx(a.losses, rel=1e-6)
    ca, cb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab")
    assert set(ca["model"]) == set(cb["model"]) == set(trainable_parameters(off_m))
    pa, pb = trainable_parameters(ref), trainable_parameters(off_m)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-7)


def test_offload_on_the_whole_bundled_model(smol):
    """All 30 layers of SmolLM2 with its served GGUF weights (the default base): same loss and
    adapter gradients. (NF4 and the other bases are checked on the first layers above.)"""
    ref = _adapted(smol.model)
    enable_checkpointing(ref)
    off_m = _adapted(smol.model)
    off = offload(off_m, "cpu")
    _check_same(ref, off_m, _batch(smol.tokenizer, n=1))
    n = len(decoder_layers(off_m))
    assert n == 30 and off.stats.loads_forward == off.stats.loads_backward == off.stats.recomputed == [1] * n
    assert off.stats.peak_resident_layers == 2 and off.resident() == []


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_at_most_one_plus_prefetch_layers_are_resident(bases, smol, prefetch):
    """Residency is read from the device storages themselves at every moment a layer's submodule
    runs, in forward and in the checkpoint's recomputation during backward."""
    m = _adapted(bases["served"])
    n = SHORT
    off = offload(m, "cpu", prefetch=prefetch)
    layers = decoder_layers(m)
    seen: list[tuple[str, int, list[int]]] = []

    def probe(i):
        def hook(mod, args):
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            seen.append((phase, i, off.resident()))
        return hook
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(probe(i))
    _loss_and_grads(m, _batch(smol.tokenizer))
    fwd = [(i, r) for ph, i, r in seen if ph == "forward"]
    bwd = [(i, r) for ph, i, r in seen if ph == "backward"]
    assert [i for i, _ in fwd] == list(range(n))  # every layer ran once in forward ...
    assert [i for i, _ in bwd] == list(range(n))[::-1]  # ... and was recomputed top down
    for i, res in fwd:
        assert i in res and len(res) <= 1 + prefetch
        assert res == list(range(i, min(n, i + 1 + prefetch)))  # itself and the prefetched ones
    for i, res in bwd:
        assert i in res and len(res) <= 1 + prefetch
        assert max(res) == i  # the layers above were freed once backward left them
    assert off.stats.peak_resident_layers == min(n, 1 + prefetch)
    one_layer = off.layers[0].nbytes
    assert off.stats.peak_resident_bytes == pytest.approx((1 + prefetch) * one_layer, rel=0.01)
    # with no prefetch, forward copies each layer once and backward once again
    if prefetch == 0:
        assert off.stats.loads_forward == off.stats.loads_backward == [1] * n
    assert off.stats.bytes_copied == 2 * off.host_bytes
    assert off.resident() == []


def test_device_copies_are_separate_storages_and_really_freed(bases):
    m = _adapted(bases["served"])
    layers = decoder_layers(m)
    q = layers[5].self_attn.q_proj.base_layer
    before = q.weight.detach().clone()
    # what must go to the host: every frozen tensor of the blocks (kept dense weights, norms)
    frozen = sum(t.numel() * t.element_size() for layer in layers for mod in layer.modules()
                 for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False),
                           *([mod._dense] if isinstance(mod, GGUFLinear) else [])]
                 if not t.requires_grad)
    off = offload(m, "cpu")
    assert off.host_bytes == frozen
    block = next(b for b in off.layers[5].blocks if any(t is q._dense for t in b.tensors))
    assert q._dense.untyped_storage().nbytes() == 0  # freed: reading it now would be an error
    with off.loaded(5) as layer:
        assert layer is layers[5]
        w = q._dense
        assert w.untyped_storage().data_ptr() == block.dev.data_ptr() != block.host.data_ptr()
        torch.testing.assert_close(w, before, rtol=0, atol=0)
        assert off.resident() == [5]
    assert block.dev.nbytes() == 0 and off.resident() == []
    # a submodule called on its own loads its layer for the call; a failing forward frees it too
    x = torch.randn(1, 3, q.in_features, generator=torch.Generator().manual_seed(0))
    with off.loaded(2):
        want = layers[2].mlp(x)
        assert off.resident() == [2]  # still held for the block
    assert torch.equal(layers[2].mlp(x), want) and off.resident() == []
    with pytest.raises(RuntimeError):
        layers[1](torch.randn(1, 3, 7))  # wrong hidden size: fails inside the layer
    assert off.resident() == []
    # an evaluation pass without gradients: each layer in and out once, nothing for backward
    off.reset_stats()
    with torch.no_grad():
        m.eval()
        m(input_ids=torch.tensor([[1, 2, 3]]))
    assert off.stats.loads_forward == [1] * SHORT and off.stats.loads_backward == [0] * SHORT
    assert off.resident() == []
    # the non-layer parts and the adapters stay where the model computes
    assert m.model.embed_tokens.weight.untyped_storage().nbytes() > 0
    assert all(p.untyped_storage().nbytes() > 0 for p in trainable_parameters(m).values())


def test_state_dict_of_an_offloaded_model_reads_the_host_copies(bases):
    """bitsandbytes serialises its quant state in state_dict(); on freed storage that segfaulted.
    The offload loads each layer for it and hands back views of the host copy."""
    m = add_adapters(copy.deepcopy(bases["nf4"]), AdapterSpec(r=4, seed=0))
    want = {k: v.clone() for k, v in m.state_dict().items()}
    off = offload(m, "cpu")
    got = m.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert off.resident() == []
    # loading a state dict writes through to the host copy
    key = next(k for k in got if k.endswith("layers.3.input_layernorm.weight"))
    m.load_state_dict({key: torch.full_like(want[key], 0.5)}, strict=False)
    assert off.resident() == []
    with off.loaded(3) as layer:
        assert torch.all(layer.input_layernorm.weight == 0.5)


def test_resume_with_offload_is_exact(smol, bases, tmp_path):
    """Stop after 2 of 4 steps, resume into a fresh offloaded model: the same losses bit for bit as
    one uninterrupted offloaded run, which are the losses of the run without offload."""
    tok = smol.tokenizer
    text = [Example(tok(f"Zorblax fact number {i}: Quimby has {i} moons.")["input_ids"], [], "docs") for i in range(6)]
    for e in text:
        e.labels = list(e.input_ids)
    spec = AdapterSpec(r=4, dropout=0.1, targets=("q_proj", "v_proj"), seed=7)
    cfg = dict(steps=4, batch_size=2, lr=cosine(5e-3, 1e-4), progress=False)

    def fresh(with_offload=True):
        m = add_adapters(copy.deepcopy(bases["served"]), spec)
        if with_offload:
            offload(m, "cpu")
        else:
            enable_checkpointing(m)
        return m, MixSampler({"docs": text}, batch_size=2, total_steps=4, seed=3)

    m, s = fresh(False)
    plain = train(m, s, TrainConfig(out_dir=tmp_path / "p", **cfg), pad_id=tok.pad_token_id).losses
    m, s = fresh()
    whole = train(m, s, TrainConfig(out_dir=tmp_path / "a", **cfg), pad_id=tok.pad_token_id).losses
    m, s = fresh()
    first = train(m, s, TrainConfig(out_dir=tmp_path / "b", **cfg), pad_id=tok.pad_token_id, stop_after=2)
    m, s = fresh()
    torch.manual_seed(999)
    second = train(m, s, TrainConfig(out_dir=tmp_path / "b", **cfg), pad_id=tok.pad_token_id)
    assert second.resumed_from == 2
    assert first.losses + second.losses[2:] == whole == second.losses == plain
    assert get_offloader(m).resident() == []


def test_bad_combinations_are_refused(smol, bases):
    bare = copy.deepcopy(bases["served"])
    with pytest.raises(OffloadError, match="no trainable parameters"):
        offload(bare, "cpu")
    m = add_adapters(bare, AdapterSpec(r=2, targets=("q_proj",)))
    with pytest.raises(OffloadError, match="prefetch"):
        offload(m, "cpu", prefetch=-1)
    with pytest.raises(OffloadError, match="meta"):
        offload(m, "meta")
    if not torch.cuda.is_available():
        with pytest.raises(OffloadError, match="CUDA is not available"):
            offload(m, "cuda")
        with pytest.raises(OffloadError, match="pinned"):
            offload(m, "cpu", pin=True)
    assert get_offloader(m) is None  # nothing above changed the model
    off = offload(m, "cpu")
    assert get_offloader(m) is off
    with pytest.raises(OffloadError, match="already offloaded"):
        offload(m, "cpu")
    off.remove()  # back to a plain model: weights resident, hooks gone
    assert get_offloader(m) is None and off.resident() == list(range(SHORT))
    seq = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(OffloadError, match="decoder layer"):
        offload(seq, "cpu")
    # FSDP's offload moves parameters only: the served GGUF blocks (buffers) are refused
    from dialogue.train.fsdp import shard
    with pytest.raises(ValueError, match="buffers"):
        shard(smol.model, offload=True)
    assert any(isinstance(x, GGUFLinear) for x in smol.model.modules())


def test_cli_refuses_bad_offload_options(tmp_path, capsys):
    docs = tmp_path / "d.md"
    docs.write_text("Zorblax. " * 50)
    assert train_main(["--docs", str(docs), "--offload", "--nproc", "2"]) == 1
    assert "buffers" in capsys.readouterr().err
    assert train_main(["--docs", str(docs), "--offload", "--nproc", "2", "--quant", "hqq"]) == 1
    assert "hqq" in capsys.readouterr().err
    assert train_main(["--docs", str(docs), "--offload", "--offload-prefetch", "-1"]) == 1
    assert ">= 0" in capsys.readouterr().err
    assert train_main(["--docs", str(docs), "--offload-prefetch", "2"]) == 1
    assert "needs --offload" in capsys.readouterr().err
    assert "--offload" in build_help()


def build_help() -> str:
    from dialogue.train.main import build_parser
    return build_parser().format_help()


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _cli_common(d: Path) -> list[str]:
    return ["--model", str(d / "model"), "--quant", "nf4", "--docs", str(d / "docs.md"), "--seq-len", "48",
            "--steps", "3", "--lr", "1e-2", "--r", "4", "--no-progress"]


@pytest.fixture(scope="module")
def plain_run(tiny_chat, tmp_path_factory):
    """One process, no offload: the reference for the CLI runs below."""
    out = tmp_path_factory.mktemp("plain") / "one"
    assert train_main([*_cli_common(tiny_chat), "--batch-size", "2", "--no-export", "--out", str(out)]) == 0
    return _losses(out)


def test_cli_offload_trains_like_without(tiny_chat, plain_run, tmp_path, capsys):
    assert train_main([*_cli_common(tiny_chat), "--batch-size", "2", "--offload", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "offload:" in out and "at most 2 layers" in out
    assert len(plain_run) == 3 and plain_run[0] != plain_run[-1]
    assert _losses(tmp_path) == pytest.approx(plain_run, rel=1e-6)
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["offload"]["device"] == "cpu" and cfg["offload"]["peak_resident_layers"] == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0  # export reads only adapters


@pytest.mark.slow
def test_two_process_fsdp_cpu_offload_matches_one_process(tiny_chat, plain_run, tmp_path):
    """`--offload --nproc 2` is FSDP2 with CPUOffloadPolicy (on gloo here): the same losses as one
    process without offload."""
    assert train_main([*_cli_common(tiny_chat), "--batch-size", "1", "--nproc", "2", "--offload",
                       "--out", str(tmp_path)]) == 0
    assert _losses(tmp_path) == pytest.approx(plain_run, rel=1e-5)
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["fsdp"]["cpu_offload"] is True
    assert cfg["fsdp"]["sharded"] == cfg["fsdp"]["params"] > 0


@pytest.mark.slow
def test_offload_bench_gpu_mode_dry_run_on_cpu():
    out = subprocess.run([sys.executable, str(BENCH), "--gpu", "--dry-run", "--steps", "1", "--seq", "32", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(rows) == {"no-offload", "offload"}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    # same random base, same batch: the same loss with and without offload
    assert rows["offload"]["first_batch_loss"] == pytest.approx(rows["no-offload"]["first_batch_loss"], rel=1e-5)
    # the frozen layers on the device: all of them without offload, at most two with it
    assert rows["offload"]["frozen_layers_on_device_peak"] == 2
    assert rows["no-offload"]["frozen_layers_on_device_peak"] == rows["no-offload"]["n_layers"]
