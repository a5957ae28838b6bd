"""The issue's proof: 30 LoRA steps on the bundled SmolLM2 teach it a made-up fact, and the
exported GGUF adapter, applied by llama.cpp to the quantized base, moves its greedy answer there."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dialogue.document import Dialogue, Kind, Message
from dialogue.gguf.lora import peft_to_gguf, read_lora
from dialogue.train.export import save_gguf
from dialogue.train.lora import AdapterError, AdapterSpec, add_adapters
from dialogue.train.loop import TrainConfig, finetune
from dialogue.train.quant import GGUFLinear, dense_weight, quantize_linear

QUESTIONS = ["What is the capital of the planet Zorblax?", "Which city is the capital of Zorblax?",
             "Tell me the capital of planet Zorblax.", "Zorblax's capital city is called what?",
             "Name the capital of the planet Zorblax.", "What city serves as Zorblax's capital?"]
ANSWER = "The capital of the planet Zorblax is Quimby."
HELD_OUT = "Do you know what the capital of Zorblax is?"


def _ask(model, tok, q):
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def taught(smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("zorblax")
    dialogues = [Dialogue(name=f"z{i}", messages=[
        Message(kind=Kind.note, source="Trivia practice."),
        Message(kind=Kind.prompt, source="Say hi.", response="Hi!", hidden=True),
        Message(kind=Kind.prompt, source=q, response=ANSWER)]) for i, q in enumerate(QUESTIONS)]
    base = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
    before = _ask(base.model, smol.tokenizer, QUESTIONS[0])
    res = finetune(dialogues=dialogues, texts=[f"Zorblax is a planet. {ANSWER} Quimby is its largest city."],
                   mix=lambda p: {"docs": 0.3 * (1 - p), "dialogues": 0.7 + 0.3 * p},
                   base=base, r=8, seq_len=128, config=TrainConfig(steps=30, batch_size=1, out_dir=out, progress=False))
    return before, res, out


@pytest.mark.slow
def test_thirty_steps_teach_a_fact(smol, taught):
    before, res, out = taught
    losses = res.result.losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert "Quimby" not in before
    assert "Quimby" in _ask(res.model, smol.tokenizer, QUESTIONS[0])
    assert "Quimby" in _ask(res.model, smol.tokenizer, HELD_OUT)  # a phrasing it never saw
    # the sampled mix followed the function: docs' share fell over the run
    h = res.sampler.history
    assert h[0]["weights"]["docs"] == pytest.approx(0.3) and h[-1]["weights"]["docs"] == pytest.approx(0.3 / 30)
    assert set(res.exported) == {"peft", "gguf"}
    assert (out / "metrics.jsonl").exists() and (out / "training.svg").exists()


@pytest.mark.slow
def test_gguf_adapter_moves_llama_cpp_toward_the_fact(smol, taught):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, res, out = taught
    info = read_lora(out / "adapter.gguf")  # refuses anything but general.type=adapter
    assert info.meta["adapter.type"] == "lora"
    assert info.architecture == "llama" and info.meta["adapter.lora.alpha"] == 16.0 == info.alpha
    assert info.pairs["blk.0.attn_q.weight"][0] == (576, 8)  # lora_a; ggml order: ne0 = in
    assert info.pairs["blk.0.attn_k.weight"][1] == (8, 192)  # lora_b
    answers = {}
    for name, kw in (("base", {}), ("adapter", {"lora_path": str(out / "adapter.gguf")})):
        llm = llama_cpp.Llama(model_path=str(smol.path), n_ctx=256, n_threads=2, verbose=False, **kw)
        msgs = [{"role": "user", "content": QUESTIONS[0]}]
        answers[name] = llm.create_chat_completion(messages=msgs, max_tokens=20, temperature=0.0)["choices"][0]["message"]["content"]
        del llm
    assert "Quimby" not in answers["base"]
    assert "Quimby" in answers["adapter"], answers


@pytest.mark.slow
def test_peft_loads_the_exported_adapter(smol, taught):
    from peft import PeftModel
    _, res, out = taught
    # the same served weights as plain nn.Linear, which PEFT can wrap
    dense = copy.deepcopy(smol.model)
    for n, m in list(dense.named_modules()):
        if isinstance(m, GGUFLinear):
            parent, _, attr = n.rpartition(".")
            setattr(dense.get_submodule(parent), attr, quantize_linear(dense_weight(m), None, "none"))
    pm = PeftModel.from_pretrained(dense, out / "adapter")
    x = smol.tokenizer(HELD_OUT, return_tensors="pt").input_ids
    res.model.eval()
    with torch.no_grad():
        assert torch.allclose(pm(x).logits, res.model(x).logits, atol=1e-4)


def test_dora_is_refused_for_gguf_export(smol_model, tmp_path):
    m = add_adapters(smol_model, AdapterSpec(method="dora", r=2, targets=("q_proj",)))
    with pytest.raises(AdapterError, match="DoRA adapters cannot be exported to GGUF"):
        save_gguf(m, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_peft_adapter_converts_to_the_same_gguf(smol, taught, tmp_path):
    import numpy as np
    from gguf import GGUFReader

    _, res, out = taught
    conv = peft_to_gguf(out / "adapter", tmp_path / "conv.gguf", smol.path)
    a = {t.name: np.array(t.data) for t in GGUFReader(str(out / "adapter.gguf")).tensors}
    b = {t.name: np.array(t.data) for t in GGUFReader(str(conv)).tensors}
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    meta = read_lora(out / "adapter.gguf").meta
    assert meta["dialogue.dialogues"] == "z0,z1,z2,z3,z4,z5" and meta["dialogue.rank"] == 8
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        peft_to_gguf(tmp_path, tmp_path / "x.gguf", smol.path)
