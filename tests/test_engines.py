"""Adapter sets on serving engines (llm/engines.py): GGUF -> PEFT export (checked by converting
back and by PEFT loading it), and vLLM's runtime-LoRA protocol against a local server that speaks
it (tests/vllm_server.py), through the service as a user runs a prompt."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dialogue.gguf.lora import gguf_to_peft, load_factors, peft_to_gguf
from dialogue.gguf.models import resolve
from dialogue.llm.base import ProviderError, UnknownModelError
from dialogue.llm.engines import VLLMProvider, parse_engine, set_name
from dialogue.local import adapters as A
from dialogue.service import DialogueService
from loras import SHAPES, random_factors


def small_lora(path: Path, seed: int, rank: int = 4) -> Path:
    """Every kind of matrix in three layers: all the naming and permutation cases, a tenth of
    the work of a whole adapter."""
    from dialogue.gguf.lora import write_lora
    return write_lora(path, "llama", random_factors(seed, rank, kinds=tuple(SHAPES), layers=(0, 7, 29),
                                                    std=0.5))
from vllm_server import VLLMServer

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    monkeypatch.setenv("DIALOGUE_ENGINE_ADAPTER_DIR", str(tmp_path / "engine-adapters"))
    return tmp_path


def _delta(path) -> dict[str, np.ndarray]:
    lora, fac = load_factors(path)
    return {n: (lora.alpha / A_.shape[0] if lora.alpha else 1.0) * (B @ A_) for n, (A_, B) in fac.items()}


def test_engine_names_are_read_or_refused_with_their_shape():
    assert parse_engine("llama-server:http://127.0.0.1:8080/") == ("llama-server:", "http://127.0.0.1:8080", "")
    assert parse_engine("llama-server:http://h:8080/v1") == ("llama-server:", "http://h:8080", "")
    assert parse_engine("vllm:http://gpu:8000/v1#meta-llama/Llama-3.1-8B") == \
        ("vllm:", "http://gpu:8000", "meta-llama/Llama-3.1-8B")
    with pytest.raises(UnknownModelError, match="vllm:http://gpu-box:8000#"):
        parse_engine("vllm:http://gpu:8000")  # vLLM needs the base model's id
    with pytest.raises(UnknownModelError, match="llama-server:http://127.0.0.1:8080"):
        parse_engine("llama-server:ftp://x")


def test_gguf_to_peft_is_the_exact_inverse_of_peft_to_gguf(home):
    base = resolve("local:default").path  # SmolLM2: llama, whose q/k rows llama.cpp permutes
    src = small_lora(home / "a.gguf", 3)
    out = gguf_to_peft(src, home / "peft", base, base_model=BASE)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4.0 and cfg["base_model_name_or_path"] == BASE
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"])
    back = peft_to_gguf(out, home / "back.gguf", base, dtype="f32")
    d0, d1 = _delta(src), _delta(back)
    assert d0.keys() == d1.keys() and len(d0) == 3 * 7
    for n in d0:
        np.testing.assert_allclose(d1[n], d0[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_peft_loads_the_export_with_every_tensor_in_place(home):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    model = LlamaForCausalLM(cfg)
    out = gguf_to_peft(small_lora(home / "a.gguf", 3), home / "peft", resolve("local:default").path)
    pm = peft.PeftModel.from_pretrained(model, str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    got = {k.replace(".default.", "."): v for k, v in pm.state_dict().items() if "lora_" in k}
    assert len(saved) == 3 * 7 * 2 and saved.keys() <= got.keys()  # every saved tensor found a home
    for k, v in saved.items():
        np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
    # PEFT adds the target modules to every layer; those the file does not name change nothing
    assert all(not torch.count_nonzero(v) for k, v in got.items() if k not in saved and "lora_B" in k)
    q = pm.base_model.model.model.layers[7].self_attn.q_proj
    np.testing.assert_array_equal(q.lora_B["default"].weight.detach().numpy(),
                                  saved["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"])
    assert q.scaling["default"] == 1.0 and torch.count_nonzero(q.lora_A["default"].weight) > 0


async def test_a_set_is_merged_once_loaded_by_name_and_asked_for_as_the_model(home, monkeypatch):
    sharp = A.add(small_lora(home / "sharp.gguf", 1), "sharp").path
    soft = A.add(small_lora(home / "soft.gguf", 2), "soft").path
    svc = DialogueService(home / "d.db")
    try:
        with VLLMServer(base=BASE) as srv:
            svc.create("d", model=f"vllm:{srv.url}#{BASE}")
            svc.set_adapters("d", {"sharp": 1.0, "soft": 0.5})
            p = svc.add("d", "prompt", "hello")
            m = await svc.run("d", p.id)
            name = set_name({sharp: 1.0, soft: 0.5})
            assert m.response.strip() == f"served by {name}", m.meta.get("error")
            loads = [b for meth, path, b in srv.requests if path == "/v1/load_lora_adapter"]
            assert len(loads) == 1 and loads[0]["lora_name"] == name
            exported = Path(loads[0]["lora_path"])
            assert exported == home / "engine-adapters" / name
            assert srv.adapters[name]["config"]["r"] == 8  # exact: the sum of the ranks
            # the merged adapter is the scaled sum of the two, exactly
            back = _delta(peft_to_gguf(exported, home / "back.gguf", resolve("local:default").path,
                                       dtype="f32"))
            d1, d2 = _delta(sharp), _delta(soft)
            for n in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
                np.testing.assert_allclose(back[n], d1[n] + 0.5 * d2[n], rtol=1e-3, atol=1e-3)
            # pushed once: a second prompt (and a fresh provider) only asks for it by name
            q = svc.add("d", "prompt", "again")
            assert (await svc.run("d", q.id)).response.strip() == f"served by {name}"
            assert len([1 for _, path, _ in srv.requests if path == "/v1/load_lora_adapter"]) == 1
            chats = [b for meth, path, b in srv.requests if path == "/v1/chat/completions"]
            assert [c["model"] for c in chats] == [name, name]
            # no set: the base model
            svc.set_adapters("d", None)
            r = svc.add("d", "prompt", "plain")
            assert (await svc.run("d", r.id)).response.strip() == f"served by {BASE}"
    finally:
        await svc.aclose()


async def test_a_rank_over_the_limit_is_refused_before_anything_is_sent(home, monkeypatch):
    A.add(small_lora(home / "sharp.gguf", 1), "sharp")
    A.add(small_lora(home / "soft.gguf", 2), "soft")
    svc = DialogueService(home / "d.db")
    try:
        with VLLMServer(base=BASE, max_lora_rank=4) as srv:
            svc.create("d", model=f"vllm:{srv.url}#{BASE}")
            svc.set_adapters("d", {"sharp": 1.0, "soft": 1.0})
            monkeypatch.setenv("DIALOGUE_VLLM_MAX_LORA_RANK", "4")
            m = await svc.run("d", svc.add("d", "prompt", "hello").id)
            assert "merges to rank 8" in m.meta["error"] and "--max-lora-rank 4" in m.meta["error"]
            assert not [1 for _, path, _ in srv.requests if path != "/v1/models"]
            assert not (home / "engine-adapters").exists() or not any((home / "engine-adapters").iterdir())
            # the user says the server takes more, but it does not: its own refusal is reported
            monkeypatch.setenv("DIALOGUE_VLLM_MAX_LORA_RANK", "64")
            m = await svc.run("d", svc.add("d", "prompt", "hello").id)
            assert "refused to load the adapter set" in m.meta["error"]
            assert "LoRA rank 8 is greater than max_lora_rank 4" in m.meta["error"]
    finally:
        await svc.aclose()


def test_an_adapter_given_by_path_alone_cannot_be_named_for_vllm(home):
    p = small_lora(home / "loose.gguf", 1)
    with pytest.raises(ProviderError, match="not a registered adapter"):
        VLLMProvider.base_gguf({str(p): 1.0})
