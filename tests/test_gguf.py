"""dialogue.gguf: the one reader of GGUF files, the one LoRA writer and PEFT converter, and the one
chat template rule, shared by serving and training. Real files: GGUFs written with gguf-py, the
bundled SmolLM2 base, a PEFT adapter directory written with safetensors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dialogue.gguf import files, lora, templates
from dialogue.gguf.lora import AdapterError, AdapterMismatchError
from dialogue.gguf.models import bundled_model_path
from loras import random_factors

# SmolLM2-135M: 9 query heads and 3 key/value heads of 64
N_HEAD, N_KV, HEAD = 9, 3, 64


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    return tmp_path


# ---------------------------------------------------------------- files

def test_a_base_is_parsed_once_and_again_when_replaced(tmp_path):
    p = tmp_path / "m.gguf"
    lora.write_lora(p, "llama", random_factors(0, 2, layers=[0]))
    first = files.read(p)
    assert files.read(p) is first  # cached: parsing a real base takes seconds
    assert first.kind == "adapter" and first.architecture == "llama"
    assert first.shapes()["blk.0.attn_q.weight.lora_a"] == (576, 2)
    lora.write_lora(p, "llama", random_factors(1, 3, layers=[0, 1]))  # replaced in place (atomically)
    again = files.read(p)
    assert again is not first and again.shapes()["blk.1.attn_v.weight.lora_b"] == (3, 192)
    assert files.read(p, cache=False) is not again


def test_what_is_not_a_gguf_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 7)
    assert files.is_gguf(junk) and not files.is_gguf(tmp_path / "missing.gguf")
    with pytest.raises(files.GGUFError, match="is not a readable GGUF file"):
        files.read(junk)
    with pytest.raises(files.GGUFError, match="no such GGUF file"):
        files.read(tmp_path / "missing.gguf")
    with pytest.raises(files.GGUFError, match="does not know the architecture 'nope'"):
        files.name_map("nope", 2)
    assert files.read(bundled_model_path()).kind == "model"


# ---------------------------------------------------------------- templates

def test_one_chat_template_rule():
    own = "{{ messages }}"
    assert templates.chat_template("gemma", own) == (templates.GEMMA_TEMPLATE, "builtin:gemma")
    assert templates.chat_template(None, own) == (own, "own")
    assert templates.chat_template(None, None) == (templates.CHATML_TEMPLATE, "fallback:chatml")
    assert templates.chat_template(None, "", is_gguf=False) == (None, "none")
    with pytest.raises(templates.UnknownChatFormatError, match="unknown chat format 'alpaca'"):
        templates.chat_template("alpaca", own)
    # the registry accepts exactly the formats the rule knows
    from dialogue.gguf import models
    assert models.CHAT_FORMATS == tuple(templates.BUILTIN_TEMPLATES) == ("chatml", "gemma")


# ---------------------------------------------------------------- writing LoRA files

def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path):
    p = tmp_path / "a.gguf"
    lora.write_lora(p, "llama", random_factors(2, 2, layers=[0]))
    before = p.read_bytes()
    bad = dict(random_factors(3, 1, layers=[0]))
    bad["blk.9.attn_v.weight"] = (np.array([["x"]]), np.zeros((192, 1)))  # fails after the first tensors
    with pytest.raises(ValueError):
        lora.write_lora(p, "llama", bad)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.gguf"]
    with pytest.raises(AdapterError, match="do not chain"):
        lora.write_lora(tmp_path / "b.gguf", "llama", {"blk.0.attn_q.weight": (np.zeros((2, 576)), np.zeros((576, 3)))})
    with pytest.raises(AdapterError, match="dtype must be f16 or f32"):
        lora.write_lora(tmp_path / "b.gguf", "llama", random_factors(2, 2, layers=[0]), dtype="q8_0")
    assert not (tmp_path / "b.gguf").exists()


# ---------------------------------------------------------------- PEFT -> GGUF

def _peft_dir(d: Path, *, dora: bool = False, drop_b: bool = False) -> dict[str, np.ndarray]:
    """A PEFT LoRA adapter of rank 2 on layer 0's q and k projections of SmolLM2."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(7)
    pre = "base_model.model.model.layers.0.self_attn"
    t = {f"{pre}.q_proj.lora_A.weight": rng.normal(size=(2, 576)).astype(np.float32),
         f"{pre}.q_proj.lora_B.weight": rng.normal(size=(N_HEAD * HEAD, 2)).astype(np.float32),
         f"{pre}.k_proj.lora_A.weight": rng.normal(size=(2, 576)).astype(np.float32),
         f"{pre}.k_proj.lora_B.weight": rng.normal(size=(N_KV * HEAD, 2)).astype(np.float32)}
    if drop_b:
        del t[f"{pre}.k_proj.lora_B.weight"]
    d.mkdir()
    save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "use_dora": dora}))
    return t


def _rotary_rows(n_out: int, heads: int) -> np.ndarray:
    """llama.cpp's converter order of q/k rows: within each head, interleaved pairs become halves."""
    return np.arange(n_out).reshape(heads, 2, -1).swapaxes(1, 2).reshape(-1)


def test_peft_converts_to_a_gguf_llama_cpp_names_and_rotary_order(home):
    pytest.importorskip("safetensors")
    t = _peft_dir(home / "peft")
    out = lora.peft_to_gguf(home / "peft", home / "conv.gguf", bundled_model_path(), dtype="f32",
                            meta={"run": "r1"})
    f, fac = lora.load_factors(out)
    assert set(f.pairs) == {"blk.0.attn_q.weight", "blk.0.attn_k.weight"}
    assert f.alpha == 8.0 and f.meta["dialogue.rank"] == 2 and f.meta["dialogue.run"] == "r1"
    assert f.meta["dialogue.targets"] == "k_proj,q_proj" and f.meta["dialogue.base"] == bundled_model_path().name
    pre = "base_model.model.model.layers.0.self_attn"
    for proj, gname, heads in (("q_proj", "blk.0.attn_q.weight", N_HEAD), ("k_proj", "blk.0.attn_k.weight", N_KV)):
        A, B = fac[gname]  # alpha/r = 4 folded into B
        assert np.array_equal(A, t[f"{pre}.{proj}.lora_A.weight"])
        want = 4.0 * t[f"{pre}.{proj}.lora_B.weight"][_rotary_rows(heads * HEAD, heads)]
        assert np.allclose(B, want, rtol=1e-6)
    # and it fits the base by llama.cpp's rules (names, shapes, architecture)
    base = files.read(bundled_model_path())
    lora.check_fits(f, base.architecture, base.shapes(), "smollm2")


def test_peft_conversion_refuses_what_gguf_cannot_hold(home):
    pytest.importorskip("safetensors")
    _peft_dir(home / "dora", dora=True)
    with pytest.raises(AdapterError, match="is a DoRA adapter. DoRA adapters cannot be exported to GGUF"):
        lora.peft_to_gguf(home / "dora", home / "x.gguf", bundled_model_path())
    _peft_dir(home / "half", drop_b=True)
    with pytest.raises(AdapterError, match="k_proj has a lora_A but no lora_B"):
        lora.peft_to_gguf(home / "half", home / "x.gguf", bundled_model_path())
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        lora.peft_to_gguf(home, home / "x.gguf", bundled_model_path())
    # a base that lacks a tensor the adapter names: refused by name before anything is written
    ad = lora.HFLora("model.layers.0.self_attn.q_proj", np.zeros((2, 576)), np.zeros((576, 2)), 2, 1.0)
    with pytest.raises(AdapterMismatchError, match="has no tensor blk.0.attn_q.weight"):
        lora.write_hf_lora(home / "x.gguf", [ad], arch="llama", n_layers=1, n_head=9, n_kv=3,
                           base_tensors={"token_embd.weight"}, base_name="other.gguf")
    assert not (home / "x.gguf").exists()
