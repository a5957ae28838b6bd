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
