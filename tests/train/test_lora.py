"""Quantized bases and adapters: loading equals the reference, DoRA equals PEFT's DoRA."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from dialogue.train import lora as L
from dialogue.train.quant import (GGUFLinear, ModelLoadError, dense_weight, dequantize_rows, describe,
                                  load_base, quantize_linear)


def _ids(n=12, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, n), generator=g)


def test_hf_dir_loads_layer_by_layer_and_matches(tiny_dir):
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    b = load_base(tiny_dir, quant="none", tokenizer=object())
    x = _ids()
    with torch.no_grad():
        assert torch.equal(ref(x).logits, b.model(x).logits)
    assert not any(p.requires_grad for p in b.model.parameters())
    for q, kind in (("nf4", "Linear4bit"), ("hqq", "HQQLinear")):
        bq = load_base(tiny_dir, quant=q, tokenizer=object(), hqq_group_size=32)
        assert describe(bq.model) == {kind: 14}
        with torch.no_grad():
            err = (bq.model(x).logits - ref(x).logits).abs().mean() / ref(x).logits.abs().mean()
        assert 0 < err < 0.2, err  # quantized: close to the reference, not equal


def test_bad_model_inputs(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_base(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_base("local:default", quant="int3")
    with pytest.raises(ModelLoadError, match="unknown local model"):
        load_base("local:giant")


def test_ggml_block_dequant_matches_gguf_reference():
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for qt in ("Q4_0", "Q8_0"):
        raw = quantize(w, T[qt])
        ref = dequantize(raw, T[qt])
        ours = dequantize_rows(torch.from_numpy(raw.view(np.uint8)), qt, 64)
        assert torch.equal(ours, torch.from_numpy(ref))


@pytest.mark.slow
def test_served_gguf_weights_equal_transformers_dequantized(smol):
    """Our tensor-by-tensor GGUF loader (raw blocks, rotary row permutation undone on the blocks)
    gives exactly the weights transformers' whole-model dequantization gives."""
    import os
    d, f = os.path.split(smol.path)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    otf = load_base(smol.path, quant="served", served_cache=False, tokenizer=smol.tokenizer)
    sd = dict(ref.named_parameters())
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        m = otf.model.get_submodule(n)
        assert isinstance(m, GGUFLinear) and m.qtype == "Q4_1" and m._dense is None
        assert torch.equal(dense_weight(m), sd[n + ".weight"])
        assert torch.equal(dense_weight(smol.model.get_submodule(n)), sd[n + ".weight"])
    x = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(otf.model(x).logits, ref(x).logits, atol=1e-4)
    # on-the-fly dequantization also backpropagates to the input
    lin = otf.model.get_submodule("model.layers.0.mlp.up_proj")
    xi = torch.randn(3, 576, requires_grad=True)
    lin(xi).sum().backward()
    assert torch.allclose(xi.grad, dense_weight(lin).sum(0).expand(3, -1), atol=1e-4)


def _tiny_model(tiny_dir, quant="none"):
    return load_base(tiny_dir, quant=quant, tokenizer=object(), hqq_group_size=32).model


def _copy_into_ours(peft_model, ours):
    """Give both implementations the same adapter weights (B non-zero so DoRA's norm matters)."""
    pt = {t.name: t for t in L.adapter_tensors(peft_model)}
    for n, m in ours.named_modules():
        if isinstance(m, L.AdapterLinear):
            t = pt[n]
            with torch.no_grad():
                m.lora_A.weight.copy_(t.A)
                m.lora_B.weight.copy_(t.B)
                if t.magnitude is not None and m.lora_magnitude_vector is not None:
                    m.lora_magnitude_vector.copy_(t.magnitude)


@pytest.mark.parametrize("quant", ["none", "nf4", "hqq"])
def test_our_dora_matches_peft_dora(tiny_dir, quant):
    base = _tiny_model(tiny_dir, quant)
    spec = L.AdapterSpec(method="dora", r=4, impl="peft", seed=3)
    pm = L.add_adapters(copy.deepcopy(base), spec)
    with torch.no_grad():  # move B off zero, and the magnitude off its init, in PEFT's model
        for n, p in pm.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(0.05 * torch.randn_like(p))
    ours = L.add_adapters(copy.deepcopy(base), L.AdapterSpec(method="dora", r=4, impl="ours", seed=3))
    # same init from the same seed
    init = {t.name: t for t in L.adapter_tensors(ours)}
    _copy_into_ours(pm, ours)
    assert set(init) == {t.name for t in L.adapter_tensors(pm)}
    assert all(isinstance(m.base_layer, type(base.model.layers[0].mlp.up_proj))
               for m in ours.modules() if isinstance(m, L.AdapterLinear))
    x = _ids()
    pm.train(); ours.train()
    lp = pm(x, labels=x).loss
    lo = ours(x, labels=x).loss
    assert torch.allclose(lp, lo, rtol=1e-5, atol=1e-6), (lp, lo)
    lp.backward(); lo.backward()
    gp = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
          for n, p in pm.named_parameters() if p.requires_grad}
    go = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    go = {k.replace("lora_magnitude_vector", "lora_magnitude_vector.weight"): v for k, v in go.items()}
    assert set(gp) == set(go)
    for k in gp:
        assert torch.allclose(gp[k], go[k], rtol=1e-4, atol=1e-6), k
    # DoRA with B != 0 really differs from plain LoRA with the same A, B
    lora = L.add_adapters(copy.deepcopy(base), L.AdapterSpec(method="lora", r=4, impl="ours"))
    _copy_into_ours(pm, lora)
    assert not torch.allclose(lora(x, labels=x).loss, lo)


def test_lora_on_served_gguf_layers_uses_ours_and_trains(smol_model):
    with pytest.raises(L.AdapterError, match="PEFT cannot wrap"):
        L.add_adapters(smol_model, L.AdapterSpec(impl="peft"))
    m = L.add_adapters(smol_model, L.AdapterSpec(r=4, targets=("q_proj", "v_proj")))
    adapters = L.adapter_tensors(m)
    assert len(adapters) == 60 and adapters[0].A.shape == (4, 576) and adapters[0].B.shape == (576, 4)
    assert set(L.trainable_parameters(m)) == {f"{a.name}.lora_{x}.weight" for a in adapters for x in "AB"}
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = m(x).logits
        with L.adapters_disabled(m):
            bare = m(x).logits
    assert torch.equal(before, bare)  # B = 0 at init: the adapter starts as the identity
    L.enable_checkpointing(m)
    m.train()
    m(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in L.trainable_parameters(m).values())
    bare_model = L.remove_adapters(m)
    assert not any(isinstance(mm, L.AdapterLinear) for mm in bare_model.modules())


def test_adapter_spec_validation():
    with pytest.raises(L.AdapterError):
        L.AdapterSpec(method="ia3")
    with pytest.raises(L.AdapterError):
        L.AdapterSpec(r=0)
    with pytest.raises(L.AdapterError):
        L.AdapterSpec(dropout=1.5)
    assert L.AdapterSpec(r=8).scaling == 2.0
    assert L.AdapterSpec(r=16, alpha=16, rslora=True).scaling == 4.0


def test_quantize_linear_rejects_unknown_mode():
    with pytest.raises(ModelLoadError):
        quantize_linear(torch.zeros(4, 4), None, "fp3")
