"""Training beyond Llama: Gemma 3 from its GGUF, Qwen2 and Qwen3 from HF directories and GGUFs.

Every family is held to the same three checks: the frozen base computes what the reference
computes (transformers' own GGUF dequantization, llama.cpp), LoRA steps on it lower the loss, and
the exported GGUF adapter is accepted by llama.cpp and moves its logits the way torch predicts.

No Qwen weights exist offline, so the Qwen models are tiny random ones written by transformers
(with the bundled SmolLM2 tokenizer, a real BPE), and their GGUFs are written here from the same
weights with gguf-py's writer and the tensor names llama.cpp's converter uses.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dialogue.document import Dialogue, Kind, Message
from dialogue.train import lora as L
from dialogue.train.data import DataError, chat_example, dialogue_messages
from dialogue.gguf import files as gguf_files
from dialogue.gguf.lora import AdapterError, gguf_tensor_name, read_lora
from dialogue.train.export import save_gguf
from dialogue.train.quant import (GGUFLinear, ModelLoadError, _fill_gguf_config,
                                  _serving_chat_format, bundled_model_path, dense_weight, describe, load_base,
                                  load_tokenizer, serving_chat_template)

llama_cpp = pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TEXT = ("Zorblax is a small planet. The capital of the planet Zorblax is Quimby, a city of canals "
        "and bridges. Quimby is famous for its glass towers.")


# ---------------------------------------------------------------- helpers

def _llama(path, n_ctx=64, n_batch=None, **kw):
    # Gemma's vocabulary is 262k: llama-cpp-python keeps an (n_batch or n_ctx) x vocab float array
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch or min(n_ctx, 512), n_threads=2,
                           verbose=False, **kw)


def _llama_logits(path, tokens, lora=None):
    """llama.cpp's logits at every position of `tokens` (with a GGUF adapter if given)."""
    llm = _llama(path, n_ctx=max(64, len(tokens)), logits_all=True, **({"lora_path": str(lora)} if lora else {}))
    llm.eval(list(tokens))
    out = np.array(llm.scores[: len(tokens)])
    del llm
    return out


def _train(model, x, steps, lr):
    """A few AdamW steps on one fixed batch; the losses before each step."""
    opt = torch.optim.AdamW(list(L.trainable_parameters(model).values()), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _torch_delta(model, x):
    with torch.no_grad():
        with_ad = model(x).logits[0].numpy()
        with L.adapters_disabled(model):
            bare = model(x).logits[0].numpy()
    return bare, with_ad


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def write_gguf_base(model, out: Path, arch: str) -> Path:
    """A model's weights as an F32 GGUF llama.cpp can serve: the hyperparameters its loader reads,
    the bundled SmolLM2 GGUF's tokenizer, tensors named by gguf-py's map (as llama.cpp's
    convert_hf_to_gguf names them; no row permutation outside the llama family)."""
    from gguf import MODEL_ARCH_NAMES, GGUFReader, GGUFValueType, GGUFWriter, get_tensor_name_map
    c = model.config
    w = GGUFWriter(str(out), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(0)  # all F32
    for k, f in GGUFReader(str(bundled_model_path())).fields.items():
        if k.startswith("tokenizer."):
            if f.types[0] == GGUFValueType.ARRAY:
                w.add_key_value(k, f.contents(), GGUFValueType.ARRAY, sub_type=f.types[1])
            else:
                w.add_key_value(k, f.contents(), f.types[0])
    arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_enum, c.num_hidden_layers)
    for n, p in model.state_dict().items():
        mod, _, suffix = n.rpartition(".")
        g = names.get_name(mod)
        assert g is not None, n
        if g == "output" and c.tie_word_embeddings:
            continue
        w.add_tensor(f"{g}.{suffix}", p.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---------------------------------------------------------------- Qwen2 / Qwen3 (tiny, random)

def _tiny_qwen(kind: str, tok, root: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "qwen2":  # q/k/v biases; tied embeddings, as Qwen2-0.5B
        cfg, cls = Qwen2Config(tie_word_embeddings=True, **common), Qwen2ForCausalLM
    else:  # q/k norms, a head size that is not hidden/heads (as Qwen3-0.6B); untied
        cfg, cls = Qwen3Config(head_dim=32, tie_word_embeddings=False, **common), Qwen3ForCausalLM
    torch.manual_seed(0)
    m = cls(cfg).eval()
    with torch.no_grad():  # biases and norms off their zero/one init, so a loader that drops them shows
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
            elif "norm" in n:
                p.normal_(1, 0.3)
    d = root / kind
    m.save_pretrained(d)
    tok.save_pretrained(d)
    gguf = write_gguf_base(m, root / f"{kind}.gguf", kind)
    return SimpleNamespace(kind=kind, dir=d, gguf=gguf, ref=m)


@pytest.fixture(scope="module")
def qwen_models(smol_tokenizer, tmp_path_factory):
    return {k: _tiny_qwen(k, smol_tokenizer, tmp_path_factory.mktemp(k)) for k in ("qwen2", "qwen3")}


@pytest.fixture(params=["qwen2", "qwen3"])
def qwen(request, qwen_models):
    return qwen_models[request.param]


@pytest.fixture
def qwen2(qwen_models):
    return qwen_models["qwen2"]


@pytest.fixture(scope="module")
def qwen_batch(smol_tokenizer):
    return smol_tokenizer(TEXT, return_tensors="pt").input_ids[:, :32]


def test_qwen_hf_dir_loads_in_nf4_and_hqq(qwen, qwen_batch):
    x = qwen_batch
    with torch.no_grad():
        ref = qwen.ref(x).logits
    for quant, kind in (("nf4", "Linear4bit"), ("hqq", "HQQLinear")):
        b = load_base(qwen.dir, quant=quant, hqq_group_size=32)
        assert describe(b.model) == {kind: 14}
        assert b.info["chat_template"] == "tokenizer" and b.tokenizer.chat_template
        with torch.no_grad():
            err = float((b.model(x).logits - ref).abs().mean() / ref.abs().mean())
        assert 0 < err < 0.2, (quant, err)  # quantized: close to the reference, not equal
        attn = b.model.model.layers[1].self_attn
        ref_attn = qwen.ref.model.layers[1].self_attn
        if qwen.kind == "qwen2":  # the biases are kept exactly, beside the quantized weight
            for p in ("q_proj", "k_proj", "v_proj"):
                assert torch.equal(getattr(attn, p).bias.float(), getattr(ref_attn, p).bias)
            assert attn.o_proj.bias is None
        else:
            assert torch.equal(attn.q_norm.weight, ref_attn.q_norm.weight)
    assert b.info["n_params"] == sum(p.numel() for p in qwen.ref.parameters())


def test_qwen_gguf_served_matches_transformers_and_llama_cpp(qwen, qwen_batch):
    """Our GGUF loader on a qwen2/qwen3 file gives the HF model's logits exactly, and llama.cpp
    serving the same file agrees (so our GGUF is what llama.cpp expects, and so is our reading)."""
    b = load_base(qwen.gguf, quant="served", tokenizer=object())
    assert b.gguf_arch == qwen.kind and describe(b.model) == {"GGUFLinear": 14}
    # qwen3: 32 (not 64/4), from attention.key_length; qwen2 has no such field
    assert getattr(b.config, "head_dim", None) == getattr(qwen.ref.config, "head_dim", None)
    assert b.config.tie_word_embeddings == qwen.ref.config.tie_word_embeddings
    x = qwen_batch
    with torch.no_grad():
        ref = qwen.ref(x).logits[0]
        ours = b.model(x).logits[0]
    assert torch.allclose(ours, ref, atol=1e-5)
    lc = _llama_logits(qwen.gguf, x[0].tolist())
    assert np.abs(lc - ref.numpy()).max() < 5e-3 * np.abs(ref.numpy()).max()


@pytest.mark.parametrize("source,quant", [("dir", "nf4"), ("dir", "hqq"), ("gguf", "served")])
def test_qwen_lora_lowers_loss_and_llama_cpp_applies_the_export(qwen, qwen_batch, source, quant, tmp_path):
    b = load_base(qwen.dir if source == "dir" else qwen.gguf, quant=quant, tokenizer=object(), hqq_group_size=32)
    m = L.add_adapters(b.model, L.AdapterSpec(r=4, seed=0))
    x = qwen_batch
    losses = _train(m, x, steps=4, lr=1e-2)
    with torch.no_grad():
        after = float(m(x, labels=x).loss)
    assert after < losses[0] - 0.05, (losses, after)
    out = save_gguf(m, tmp_path / "adapter.gguf", base=b)
    assert read_lora(out).architecture == qwen.kind
    shapes = gguf_files.read(out, cache=False).shapes()
    want = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in LLAMA_CPP_NAMES for ab in "ab"}
    assert set(shapes) == want
    head_dim = getattr(qwen.ref.config, "head_dim", None) or 64 // 4
    assert shapes["blk.0.attn_k.weight.lora_b"] == (4, 2 * head_dim)  # ggml order: ne0 = r
    # llama.cpp refuses an adapter whose names its base lacks; this one it loads, and it moves the
    # logits as torch says it should
    bare, with_ad = _torch_delta(m, x)
    l0 = _llama_logits(qwen.gguf, x[0].tolist())
    l1 = _llama_logits(qwen.gguf, x[0].tolist(), lora=out)
    assert _corr(with_ad - bare, l1 - l0) > 0.95


def test_nf4_base_still_trains_after_an_eval_forward(qwen, qwen_batch):
    """bitsandbytes repacks a Linear4bit for a bf16 inference kernel without backward after an
    eval-mode, no-grad forward on AVX512-BF16 CPUs (this machine has them); our NF4 layers opt out,
    so evaluating a base before training it neither cuts its gradients nor changes its logits."""
    b = load_base(qwen.dir, quant="nf4", tokenizer=object())
    x = qwen_batch
    with torch.no_grad():
        before = b.model(x).logits
        again = b.model(x).logits
    assert torch.equal(before, again)
    m = L.add_adapters(b.model, L.AdapterSpec(r=4, seed=0))
    m.train()
    m(x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in L.trainable_parameters(m).items() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_lora_and_dora_on_biased_linears(qwen2, qwen_batch):
    """Qwen2's q/k/v carry biases: LoRA adds s·BA to the weight and leaves the bias as is, and our
    DoRA (which must not rescale the bias) equals PEFT's on the same weights, on both 4-bit bases."""
    qwen = qwen2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    for quant in ("nf4", "hqq"):
        base = load_base(qwen.dir, quant=quant, tokenizer=object(), hqq_group_size=32).model
        pm = L.add_adapters(copy.deepcopy(base), L.AdapterSpec(method="lora", r=4, impl="peft", seed=1))
        layer = pm.get_base_model().model.layers[0].self_attn.q_proj
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.1, generator=g)
            w = dense_weight(layer.base_layer).float()
            s = layer.scaling["default"]
            base_out = layer.base_layer(x)
            # the 4-bit layer's own matmul (bnb's CPU kernel) is close to, not bitwise, F.linear
            assert torch.allclose(base_out, F.linear(x, w, layer.base_layer.bias.float()), atol=3e-3)
            assert not torch.allclose(base_out, F.linear(x, w), atol=1e-2)  # the bias is applied
            delta = F.linear(x, s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
            assert delta.abs().max() > 0.05
            assert torch.allclose(layer(x), base_out + delta, atol=1e-5)
        dp = L.add_adapters(copy.deepcopy(base), L.AdapterSpec(method="dora", r=4, impl="peft", seed=1))
        do = L.add_adapters(copy.deepcopy(base), L.AdapterSpec(method="dora", r=4, impl="ours", seed=1))
        with torch.no_grad():
            for n, p in dp.named_parameters():
                if "lora_B" in n or "magnitude" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            theirs = {t.name: t for t in L.adapter_tensors(dp)}
            for n, mod in do.named_modules():
                if isinstance(mod, L.AdapterLinear):
                    mod.lora_A.weight.copy_(theirs[n].A)
                    mod.lora_B.weight.copy_(theirs[n].B)
                    mod.lora_magnitude_vector.copy_(theirs[n].magnitude)
        dp.train(); do.train()
        lp, lo = dp(qwen_batch, labels=qwen_batch).loss, do(qwen_batch, labels=qwen_batch).loss
        assert torch.allclose(lp, lo, rtol=1e-5), (quant, lp, lo)


# ---------------------------------------------------------------- unsupported architectures

def test_unsupported_architectures_are_refused_clearly(tmp_path, smol_model):
    from gguf import GGUFWriter
    from transformers import ViTConfig
    vit = tmp_path / "vit"
    ViTConfig().save_pretrained(vit)
    with pytest.raises(ModelLoadError, match="no causal LM class for model type 'vit'"):
        load_base(vit, tokenizer=object())
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "not-a-model", "hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="transformers cannot read the config"):
        load_base(odd, tokenizer=object())
    g = tmp_path / "rwkv.gguf"
    w = GGUFWriter(str(g), "rwkv7")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ModelLoadError, match="architecture 'rwkv7' is not one transformers can build"):
        load_base(g, tokenizer=object())
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 7)
        load_base(tmp_path / "junk.gguf", tokenizer=object())
    # the GGUF adapter export: an architecture llama.cpp's names are not known for ...
    with pytest.raises(AdapterError, match="does not know the architecture"):
        gguf_tensor_name("model.layers.0.self_attn.q_proj", "not-an-arch", 2)
    m = L.add_adapters(smol_model, L.AdapterSpec(r=2, targets=("q_proj",)))
    cfg = copy.deepcopy(m.config)
    cfg.model_type = "vit"
    with pytest.raises(AdapterError, match="no GGUF architecture known for model type 'vit'"):
        save_gguf(None, tmp_path / "a.gguf", tensors=L.adapter_tensors(m), config=cfg)
    # ... and a base GGUF that lacks a tensor the adapter names (another model's adapter)
    other = SimpleNamespace(path=g, gguf_arch="llama")
    with pytest.raises(AdapterError, match="has no tensor blk.0.attn_q.weight"):
        save_gguf(m, tmp_path / "b.gguf", base=other)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


# ---------------------------------------------------------------- chat templates for base models

def test_chat_template_follows_the_runtime(smol_tokenizer):
    from dialogue.gguf.templates import BUILTIN_TEMPLATES, CHATML_TEMPLATE
    bare = copy.deepcopy(smol_tokenizer)
    bare.chat_template = None
    assert serving_chat_template(bare, Path("m.gguf"), "gemma") == (BUILTIN_TEMPLATES["gemma"], "builtin:gemma")
    assert serving_chat_template(bare, Path("m.gguf")) == (CHATML_TEMPLATE, "fallback:chatml")
    assert serving_chat_template(bare, Path("hf-dir")) == (None, "none")
    own = smol_tokenizer.chat_template
    assert serving_chat_template(smol_tokenizer, Path("m.gguf")) == (own, "gguf")
    with pytest.raises(ModelLoadError, match="unknown chat format"):
        serving_chat_template(bare, Path("m.gguf"), "alpaca")
    assert _serving_chat_format("local:default") is None  # SmolLM2's GGUF carries its own
    # a HF directory without a template: dialogues are refused, saying why
    with pytest.raises(DataError, match="no chat template"):
        chat_example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], bare)


@pytest.mark.slow
def test_bench_reports_first_batch_loss_per_mode(qwen2):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--model", str(qwen2.dir),
                          "--steps", "1", "--seq", "16", "--no-memory", "--json",
                          "--configs", "ours-lora-served", "peft-lora-hqq"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "first-batch loss by base mode" in out.stdout
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    by_mode = rows["first_batch_loss_by_mode"]
    assert set(by_mode) == {"served", "nf4", "hqq"}  # the baseline (peft-lora-nf4) is always run
    assert all(v > 0 for v in by_mode.values())
    assert by_mode["nf4"] != by_mode["served"]  # same batch, differently quantized bases


# ---------------------------------------------------------------- Gemma 3 270M (its own GGUF)

@pytest.fixture(scope="module")
def gemma_tok(gemma_gguf):
    return load_tokenizer(gemma_gguf, _serving_chat_format("local:gemma3-270m"))


@pytest.fixture(scope="module")
def gemma(gemma_gguf, gemma_tok):
    """Gemma 3 270M with its served weights (kept dequantized), loaded once for this module."""
    return load_base(gemma_gguf, quant="served", tokenizer=gemma_tok)


@pytest.fixture(scope="module")
def gemma_ids(gemma_tok):
    return gemma_tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids


def test_gemma3_config_fill_follows_llama_cpp(tmp_path):
    """What the GGUF lacks, set as llama.cpp sets it: checked on a 27B-shaped header (its own query
    scale) with no sliding window (all layers global) and linear rope scaling."""
    from gguf import GGUFWriter
    from transformers import Gemma3TextConfig
    g = tmp_path / "gemma-27b-header.gguf"
    w = GGUFWriter(str(g), "gemma3")
    w.add_block_count(62)
    w.add_key_length(128)
    w.add_rope_freq_base(1e6)
    w.add_string("gemma3.rope.scaling.type", "linear")
    w.add_float32("gemma3.rope.scaling.factor", 8.0)
    w.add_tensor("output.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    cfg = Gemma3TextConfig(num_hidden_layers=62, hidden_size=5376, num_attention_heads=32, head_dim=64)
    _fill_gguf_config(cfg, gguf_files.read(g, cache=False), "gemma3")
    assert cfg.head_dim == 128 and cfg.query_pre_attn_scalar == 5376 // 32
    assert cfg.sliding_window is None and set(cfg.layer_types) == {"full_attention"}
    assert cfg.rope_parameters["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert cfg.tie_word_embeddings is False  # the file has an output.weight


@pytest.mark.slow
def test_gemma_served_equals_transformers_dequantization(gemma, gemma_gguf, gemma_ids):
    """Embedding scale sqrt(640), tied head, (1+w) norms, q/k norms, post-norms, query scale: our
    tensor-by-tensor loader gives transformers' `from_pretrained(gguf_file=)` logits, and keeping the
    K-quant blocks packed (dequantized on the fly, in torch) changes nothing."""
    from transformers import AutoModelForCausalLM
    cfg = gemma.config
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and gemma.gguf_arch == "gemma3"
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3 and cfg.sliding_window == 512
    assert cfg.query_pre_attn_scalar == 256 and cfg.head_dim == 256 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert gemma.model.lm_head.weight is gemma.model.model.embed_tokens.weight
    assert float(gemma.model.model.embed_tokens.embed_scale) == pytest.approx(640 ** 0.5)
    ref = AutoModelForCausalLM.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name,
                                               dtype=torch.float32).eval()
    refp = dict(ref.named_parameters())
    for n, p in gemma.model.named_parameters():
        assert torch.equal(p, refp[n]), n
    otf = load_base(gemma_gguf, quant="served", served_cache=False, tokenizer=gemma.tokenizer)
    kinds = {}
    for n, m in otf.model.named_modules():
        if isinstance(m, GGUFLinear):
            assert m._dense is None  # blocks kept packed
            kinds[m.qtype] = kinds.get(m.qtype, 0) + 1
            assert torch.equal(dense_weight(m), refp[n + ".weight"]), n
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(kinds) and sum(kinds.values()) == 126
    down = otf.model.get_submodule("model.layers.0.mlp.down_proj")  # Q6_K, rebuilt again in backward
    assert down.qtype == "Q6_K"
    xi = torch.randn(2, down.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    down(xi).sum().backward()
    assert torch.allclose(xi.grad, refp["model.layers.0.mlp.down_proj.weight"].sum(0).expand(2, -1), atol=1e-4)
    with torch.no_grad():
        want = ref(gemma_ids).logits
        assert torch.allclose(gemma.model(gemma_ids).logits, want, atol=1e-4)
        assert torch.allclose(otf.model(gemma_ids).logits, want, atol=1e-4)


@pytest.mark.slow
def test_gemma_greedy_tokens_match_llama_cpp(gemma, gemma_gguf, gemma_ids):
    ids = gemma_ids[0].tolist()
    llm = _llama(gemma_gguf, n_ctx=64)
    assert llm.tokenize("The capital of France is Paris. The capital of Germany is".encode(), add_bos=True) == ids
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 6:
            break
    del llm
    with torch.no_grad():
        ours = gemma.model.generate(gemma_ids, max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs, (gemma.tokenizer.decode(ours), gemma.tokenizer.decode(theirs))
    assert "Berlin" in gemma.tokenizer.decode(ours)


@pytest.mark.slow
def test_gemma_sliding_window_layers_match_llama_cpp(gemma, gemma_gguf):
    """Past 512 tokens the local layers stop seeing the start: the last position's logits agree with
    llama.cpp's, and would not if every layer attended to everything."""
    llm = _llama(gemma_gguf, n_ctx=640, n_batch=64)
    text = (ROOT / "docs" / "architecture.md").read_text()
    toks = llm.tokenize(text.encode(), add_bos=True)[:560]
    assert len(toks) == 560
    llm.eval(toks)
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    del llm
    x = torch.tensor([toks])
    model, cfg = gemma.model, gemma.config
    with torch.no_grad():
        ours = model(x, logits_to_keep=1).logits[0, -1].numpy()
        saved = cfg.layer_types, [a.self_attn.sliding_window for a in model.model.layers]
        try:  # the same model with global attention everywhere
            cfg.layer_types = ["full_attention"] * len(saved[0])
            for a in model.model.layers:
                a.self_attn.sliding_window = None
            everywhere = model(x, logits_to_keep=1).logits[0, -1].numpy()
        finally:
            cfg.layer_types = saved[0]
            for a, sw in zip(model.model.layers, saved[1]):
                a.self_attn.sliding_window = sw
    err, err_full = np.abs(ours - theirs).mean(), np.abs(everywhere - theirs).mean()
    assert ours.argmax() == theirs.argmax()
    assert err < 0.3 and err_full > 5 * err, (err, err_full)


@pytest.mark.slow
def test_gemma_loads_in_nf4_and_hqq(gemma, gemma_gguf, gemma_tok):
    """Every mode loads and trains from the same file; re-quantizing the GGUF's weights moves the
    logits a little (not at all would mean nothing was quantized) and costs first-batch loss."""
    x = gemma_tok(TEXT, return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        served = gemma.model(x, labels=x)
    losses = {"served": float(served.loss)}
    for quant, kind in (("nf4", "Linear4bit"), ("hqq", "HQQLinear")):
        b = load_base(gemma_gguf, quant=quant, tokenizer=gemma_tok)
        assert describe(b.model) == {kind: 126}
        with torch.no_grad():
            out = b.model(x, labels=x)
        err = float((out.logits - served.logits).abs().mean() / served.logits.abs().mean())
        agree = float((out.logits.argmax(-1) == served.logits.argmax(-1)).float().mean())
        print(f"{quant}: relative logit error {err:.3f}, top-1 agreement with served {agree:.2f}")
        assert 0 < err < 0.5, (quant, err)
        assert agree > 0.6, (quant, agree)
        losses[quant] = float(out.loss)
        assert losses[quant] < losses["served"] + 1.0, losses  # a broken load is far off (~12 = ln 262k)
        if quant == "hqq":  # a backward pass through the 4-bit base (bnb's CPU backward costs ~15 s
            # here; NF4 training is covered on the tiny Qwen models)
            m = L.add_adapters(b.model, L.AdapterSpec(r=4, seed=0, targets=("q_proj", "v_proj")))
            m.train()
            m(x[:, :16], labels=x[:, :16]).loss.backward()
            grads = {n: p.grad for n, p in L.trainable_parameters(m).items() if "lora_B" in n}
            assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        del b
    print("first-batch loss by mode:", losses)
    assert losses["served"] < min(losses["nf4"], losses["hqq"]), losses


@pytest.mark.slow
def test_gemma_lora_export_moves_llama_cpp_like_torch(gemma, gemma_gguf, gemma_ids, tmp_path):
    base = copy.deepcopy(gemma.model)
    m = L.add_adapters(base, L.AdapterSpec(r=8, seed=0))
    x = gemma.tokenizer(TEXT, return_tensors="pt").input_ids[:, :40]
    losses = _train(m, x, steps=3, lr=2e-3)
    assert losses[-1] < losses[0], losses
    out = save_gguf(m, tmp_path / "gemma-lora.gguf", base=gemma)
    info = read_lora(out)
    assert info.architecture == "gemma3" and info.alpha == 16.0
    shapes = gguf_files.read(out, cache=False).shapes()
    base_names = set(gguf_files.read(gemma_gguf).tensors)
    assert {n.rsplit(".", 1)[0] for n in shapes} <= base_names
    assert len(shapes) == 2 * 126
    assert shapes["blk.0.attn_q.weight.lora_b"] == (8, 1024)
    bare, with_ad = _torch_delta(m, gemma_ids)
    ids = gemma_ids[0].tolist()
    l0 = _llama_logits(gemma_gguf, ids)
    l1 = _llama_logits(gemma_gguf, ids, lora=out)
    assert np.abs(l1 - l0).max() > 1.0  # the adapter really moves llama.cpp
    assert _corr(with_ad - bare, l1 - l0) > 0.9


@pytest.mark.slow
def test_gemma_dialogues_train_on_the_template_it_is_served_with(gemma_gguf, gemma_tok, tmp_path, monkeypatch):
    """Gemma 3 270M is a base model whose GGUF has no chat template. Named `local:gemma3-270m`, the
    runtime serves it with Gemma's turn format; training renders dialogues with the same template,
    and the tokens of a training example are the runtime's prompt tokens, then the answer."""
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path))
    from dialogue.gguf.models import resolve
    from dialogue.local.runtime import Runtime
    assert gemma_tok._dialogue_template_source == "builtin:gemma"
    d = Dialogue(name="g", messages=[Message(kind=Kind.note, source="We are doing sums."),
                                     Message(kind=Kind.prompt, source="What is 2+2?", response="4, of course.")])
    msgs = dialogue_messages(d)
    ex = chat_example(msgs, gemma_tok)
    rt = Runtime(resolve("local:gemma3-270m"), n_ctx=256)
    prompt = rt.build_prompt(msgs[:-1])
    first = next(i for i, t in enumerate(ex.labels) if t != -100)
    assert ex.input_ids[:first] == prompt.tokens
    assert prompt.text.startswith("<bos><start_of_turn>user\nWe are doing sums.")
    assert gemma_tok.decode(ex.input_ids[first:]) == "4, of course.<end_of_turn>\n"
