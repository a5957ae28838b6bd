"""Adapters on the quantized base, never merged models.

Two parts. Fast tests use small GGUF LoRA files written here with random factors (the registry's
checks, resolve_set, the exact algebra of merging, the CLI): what they check does not depend on
what an adapter learned. The slow tests train two real adapters with `dialogue train`
(`train_main`, a few steps each on the bundled SmolLM2 with GGUF/PEFT export) and serve them with
the real llama.cpp runtime: switching, stacking, the KV cache, merged adapters' effects.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dialogue.llm.base import Request, TextDelta, Turn, Usage, get_provider
from dialogue.gguf import lora as G
from dialogue.gguf.lora import AdapterError, AdapterMismatchError
from dialogue.gguf.models import bundled_model_path
from dialogue.local import adapters as A
from dialogue.local import merge as M
from dialogue.local.adapters import UnknownAdapterError
from dialogue.cli.adapters import adapters_main
from dialogue.local.kvcache import KVCache

from loras import random_factors


def dense(factors) -> dict[str, np.ndarray]:
    return {n: B @ A_ for n, (A_, B) in factors.items()}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="session")
def base_shapes_cached(tmp_path_factory):
    """Read the base's tensor shapes once for the session (GGUFReader parses the whole vocabulary,
    seconds): later registries in other DIALOGUE_HOMEs reuse the in-process cache."""
    home = tmp_path_factory.mktemp("shapes-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIALOGUE_HOME", str(home))
        return A.check_against_base(G.read_lora(G.write_lora(home / "x.gguf", "llama", random_factors(0, 2, layers=[0]))))


# ---------------------------------------------------------------- reading and checking files

def _raw_lora(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF that declares itself a LoRA adapter with exactly these tensors: for broken files
    that `write_lora` refuses to write."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_non_adapters_are_refused_with_a_reason(home):
    junk = home / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(AdapterError, match="not a GGUF file"):
        G.read_lora(junk)
    with pytest.raises(AdapterError, match="is a model, not an adapter"):
        G.read_lora(bundled_model_path())
    with pytest.raises(AdapterError, match="no such adapter file"):
        G.read_lora(home / "missing.gguf")
    half = _raw_lora(home / "half.gguf", {"blk.0.attn_q.weight.lora_a": np.zeros((4, 576), np.float32)})
    with pytest.raises(AdapterError, match="'blk.0.attn_q.weight' has only its lora_a half"):
        G.read_lora(half)
    # lora_a must be ne [in, r], lora_b ne [r, out]: a file with A un-transposed is caught
    flip = _raw_lora(home / "flip.gguf", {"blk.0.attn_q.weight.lora_a": np.zeros((576, 4), np.float32),
                                          "blk.0.attn_q.weight.lora_b": np.zeros((576, 4), np.float32)})
    with pytest.raises(AdapterError, match="ranks differ"):
        G.read_lora(flip)


def test_mismatched_adapters_are_refused_and_nothing_is_registered(home, base_shapes_cached):
    other_arch = G.write_lora(home / "gemma.gguf", "gemma3", random_factors(1, 4))
    with pytest.raises(AdapterMismatchError, match="adapter for a 'gemma3' model, but smollm2 is 'llama'"):
        A.add(other_arch)
    bad = random_factors(2, 4)
    bad["blk.3.attn_q.weight"] = (np.zeros((4, 512)), np.zeros((576, 4)))  # hidden 512 is another model
    with pytest.raises(AdapterMismatchError) as e:
        A.add(G.write_lora(home / "shape.gguf", "llama", bad))
    assert "'blk.3.attn_q.weight' is [576, 576] in the base" in str(e.value)
    assert "lora_a is [512, 4]" in str(e.value)
    extra = random_factors(3, 4)
    extra["blk.30.attn_q.weight"] = extra["blk.0.attn_q.weight"]  # SmolLM2-135M has 30 blocks: 0..29
    with pytest.raises(AdapterMismatchError, match="'blk.30.attn_q.weight', which smollm2 does not have"):
        A.add(G.write_lora(home / "deeper.gguf", "llama", extra))
    assert A.list_adapters() == []
    # a path given straight to the service is checked too when the base is named
    with pytest.raises(AdapterMismatchError):
        A.resolve_set({str(home / "shape.gguf"): 1.0}, base="default")


# ---------------------------------------------------------------- the registry

def test_registry_add_list_info_rm(home, base_shapes_cached):
    f = G.write_lora(home / "style.gguf", "llama", random_factors(4, 8, kinds=("attn_q", "attn_k", "ffn_down")),
                     alpha=16.0, meta={"dialogue.dialogues": "notes-1,notes-2", "dialogue.trained_on": "dialogues"})
    (home / "style.gguf.json").write_text(json.dumps({"steps": 30, "final_loss": 0.5, "model": "local:default"}))
    got = A.add(f)
    assert got.name == "style" and got.base == "smollm2" and got.source == "gguf" and not got.managed
    assert (got.rank, got.alpha, got.tensors) == (8, 16.0, 90)
    assert got.targets == ["attn_k", "attn_q", "ffn_down"] and got.size == f.stat().st_size
    assert got.provenance["dialogues"] == "notes-1,notes-2"
    assert got.provenance["training"]["steps"] == 30 and got.provenance["training"]["final_loss"] == 0.5
    assert [x.name for x in A.list_adapters()] == ["style"] and A.info("style") == got
    with pytest.raises(AdapterError, match="already registered"):
        A.add(f)
    with pytest.raises(AdapterError, match="bad adapter name"):
        A.add(f, "no spaces please")
    copy = A.copy_into_registry(f, "style-copy")
    assert copy.managed and Path(copy.path).parent == A.adapters_dir() and Path(copy.path).is_file()
    assert copy.provenance["dialogues"] == "notes-1,notes-2"
    with pytest.raises(AdapterError, match="already registered"):
        A.copy_into_registry(f, "style-copy")
    assert Path(copy.path).is_file()  # a refused second copy leaves the first alone
    A.remove("style")
    assert f.exists()  # the user's own file stays
    A.remove("style-copy")
    assert not Path(copy.path).exists()  # the registry's copy goes
    with pytest.raises(UnknownAdapterError, match="no registered adapter named 'style'"):
        A.remove("style")
    with pytest.raises(AdapterError, match="no such adapter file or directory"):
        A.add(home / "nowhere.gguf")


def test_resolve_set(home, base_shapes_cached):
    a = A.add(G.write_lora(home / "a.gguf", "llama", random_factors(5, 4)), "a")
    b_path = G.write_lora(home / "b.gguf", "llama", random_factors(6, 4))
    assert A.resolve_set(None) == {} and A.resolve_set({}) == {}
    got = A.resolve_set({"a": 1, str(b_path): 0.5}, base="local:default")
    assert got == {a.path: 1.0, str(b_path.resolve()): 0.5}
    assert A.resolve_set({"a": 0.0}) == {}  # 0 is off, and shares the cache of the set without it
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'sql-style' \(registered: a\)"):
        A.resolve_set({"sql-style": 1.0})
    for bad in ("1.0", float("nan"), True, None):
        with pytest.raises(AdapterError, match="scale of adapter 'a' must be"):
            A.resolve_set({"a": bad})
    with pytest.raises(AdapterError, match="is a mapping"):
        A.resolve_set(["a"])  # type: ignore[arg-type]
    Path(a.path).unlink()
    with pytest.raises(AdapterError, match="points to .* which no longer exists"):
        A.resolve_set({"a": 1.0})


def test_hub_download_failure_is_a_clear_error(home, monkeypatch):
    if importlib.util.find_spec("huggingface_hub") is None:
        pytest.skip("huggingface_hub is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    with pytest.raises(AdapterError, match="could not download the adapter 'someone/sql-style-lora'"):
        A.add("someone/sql-style-lora")
    assert A.list_adapters() == []


# ---------------------------------------------------------------- merging: the algebra

def test_linear_merge_at_full_rank_is_the_weighted_sum_of_deltas(home):
    p1 = random_factors(7, 4, kinds=("attn_q", "ffn_up"), layers=range(3))
    p2 = random_factors(8, 6, kinds=("attn_q", "attn_v"), layers=range(3))  # attn_v only here, ffn_up only in p1
    f1 = G.write_lora(home / "p1.gguf", "llama", p1, alpha=8.0, dtype="f32")    # scale 8/4 = 2
    f2 = G.write_lora(home / "p2.gguf", "llama", p2, alpha=3.0, dtype="f32")    # scale 3/6 = 0.5
    out = M.merge_files([f1, f2], [0.7, -0.3], home / "m.gguf", method="linear", dtype="f32")
    lora, fac = G.load_factors(out)
    assert lora.ranks == [10] and lora.alpha == 10.0  # rank 4 + 6, alpha = rank: scale 1
    d1, d2, dm = dense(p1), dense(p2), dense(fac)
    assert set(dm) == set(d1) | set(d2)
    for n in dm:
        want = 0.7 * 2.0 * d1.get(n, 0) + -0.3 * 0.5 * d2.get(n, 0)
        assert np.linalg.norm(dm[n] - want) <= 1e-6 * np.linalg.norm(want), n
    # at a lower rank, the best approximation (Eckart-Young): the error is the dropped singular values
    low = M.merge_files([f1, f2], [0.7, -0.3], home / "m3.gguf", method="linear", rank=3, dtype="f32")
    _, fl = G.load_factors(low)
    n = "blk.1.attn_q.weight"
    want = 0.7 * 2.0 * d1[n] - 0.3 * 0.5 * d2[n]
    s = np.linalg.svd(want, compute_uv=False)
    assert np.linalg.norm(dense(fl)[n] - want) == pytest.approx(np.sqrt((s[3:] ** 2).sum()), rel=1e-4)


def test_ties_elects_a_sign_and_dare_is_seeded(home):
    p1 = random_factors(9, 4, layers=range(2))
    f1 = G.write_lora(home / "p1.gguf", "llama", p1, alpha=4.0, dtype="f32")
    # a parent pulling exactly the other way with half the strength: TIES elects p1's sign
    # everywhere and averages only the agreeing entries, i.e. p1 itself
    opp = {n: (A_, -0.5 * B) for n, (A_, B) in p1.items()}
    f2 = G.write_lora(home / "p2.gguf", "llama", opp, alpha=4.0, dtype="f32")
    t = M.merge_files([f1, f2], [1.0, 1.0], home / "t.gguf", method="ties", density=1.0, rank=4, dtype="f32")
    lin = M.merge_files([f1, f2], [1.0, 1.0], home / "l.gguf", method="linear", dtype="f32")
    d1, dt, dl = dense(p1), dense(G.load_factors(t)[1]), dense(G.load_factors(lin)[1])
    for n in d1:
        assert np.allclose(dt[n], d1[n], atol=1e-6 * np.abs(d1[n]).max())   # TIES: p1 survives whole
        assert np.allclose(dl[n], 0.5 * d1[n], atol=1e-6 * np.abs(d1[n]).max())  # linear: they cancel half
    # trimming keeps the largest entries: at density 0.2 the merge is closest to p1's top 20%
    t2 = dense(G.load_factors(M.merge_files([f1], [1.0], home / "t2.gguf", method="ties", density=0.2,
                                            rank=4, dtype="f32"))[1])
    n = "blk.0.attn_q.weight"
    assert np.corrcoef(t2[n].ravel(), d1[n].ravel())[0, 1] > 0.6
    # DARE: the same seed gives the same adapter, another seed another; density 1 is linear
    f3 = G.write_lora(home / "p3.gguf", "llama", random_factors(10, 4, layers=range(2)), alpha=4.0, dtype="f32")
    a = G.load_factors(M.merge_files([f1, f3], [0.5, 0.5], home / "d1.gguf", method="dare", seed=1))[1]
    b = G.load_factors(M.merge_files([f1, f3], [0.5, 0.5], home / "d2.gguf", method="dare", seed=1))[1]
    c = G.load_factors(M.merge_files([f1, f3], [0.5, 0.5], home / "d3.gguf", method="dare", seed=2))[1]
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)
    assert not all(np.array_equal(a[k][0], c[k][0]) for k in a)
    full = dense(G.load_factors(M.merge_files([f1, f3], [0.5, 0.5], home / "d4.gguf", method="dare",
                                              density=1.0, rank=8, dtype="f32"))[1])
    lin2 = dense(G.load_factors(M.merge_files([f1, f3], [0.5, 0.5], home / "l2.gguf", dtype="f32"))[1])
    assert all(np.allclose(full[k], lin2[k], atol=1e-5 * np.abs(lin2[k]).max()) for k in full)


def test_merge_refuses_what_does_not_fit(home):
    f1 = G.write_lora(home / "p1.gguf", "llama", random_factors(11, 4, layers=[0]))
    small = {"attn_q": (512, 512), "attn_v": (128, 512)}
    f2 = G.write_lora(home / "p2.gguf", "llama", random_factors(12, 4, layers=[0], shapes=small))
    f3 = G.write_lora(home / "p3.gguf", "gemma3", random_factors(13, 4, layers=[0]))
    with pytest.raises(AdapterMismatchError, match=r"tensor 'blk.0.attn_q.weight' is \(576, 576\)"):
        M.merge_files([f1, f2], [0.5, 0.5], home / "x.gguf")
    with pytest.raises(AdapterMismatchError, match="cannot merge a 'gemma3' adapter"):
        M.merge_files([f1, f3], [0.5, 0.5], home / "x.gguf")
    with pytest.raises(AdapterError, match="2 adapters but 1 weights"):
        M.merge_files([f1, f1], [0.5], home / "x.gguf")
    with pytest.raises(AdapterError, match="unknown merge method 'slerp'"):
        M.merge_files([f1, f1], [0.5, 0.5], home / "x.gguf", method="slerp")
    with pytest.raises(AdapterError, match="density applies to ties and dare only"):
        M.merge_files([f1, f1], [0.5, 0.5], home / "x.gguf", density=0.3)
    assert not (home / "x.gguf").exists()


def test_cli(home, base_shapes_cached, capsys):
    f1 = G.write_lora(home / "sql-style.gguf", "llama", random_factors(14, 4))
    f2 = G.write_lora(home / "house-docs.gguf", "llama", random_factors(15, 8))
    assert adapters_main(["add", str(f1)]) == 0
    assert adapters_main(["add", str(f2), "--name", "docs"]) == 0
    assert "added adapter docs" in capsys.readouterr().out
    assert adapters_main(["add", str(f1), "--name", "kept", "--copy"]) == 0
    assert A.info("kept").managed and Path(A.info("kept").path).parent == A.adapters_dir()
    assert adapters_main(["rm", "kept"]) == 0 and f1.exists()
    assert "removed adapter kept" in capsys.readouterr().out
    assert adapters_main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["name"], x["rank"]) for x in listed] == [("docs", 8), ("sql-style", 4)]
    assert adapters_main(["merge", "sql-style", "docs", "--weights", "0.5", "0.5", "--method", "ties",
                          "--rank", "6", "--out", "both"]) == 0
    assert "into adapter both: rank 6" in capsys.readouterr().out
    assert adapters_main(["info", "both", "--json"]) == 0
    i = json.loads(capsys.readouterr().out)
    assert i["source"] == "merge" and i["managed"] and i["base"] == "smollm2"
    assert i["provenance"]["merge"]["method"] == "ties" and i["provenance"]["merge"]["weights"] == [0.5, 0.5]
    assert i["provenance"]["parents"] == "sql-style,docs"
    assert adapters_main(["info", "both"]) == 0
    assert "rank:" in capsys.readouterr().out
    assert adapters_main(["merge", "sql-style", "nope", "--weights", "1", "1", "--out", "x"]) == 1
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert adapters_main(["rm", "both"]) == 0 and not Path(i["path"]).exists()
    assert adapters_main(["info", "both"]) == 1
    assert "unknown adapter 'both'" in capsys.readouterr().err
    assert adapters_main(["merge", "docs"]) == 2  # argparse: --weights and --out are required


# ---------------------------------------------------------------- real adapters on the real runtime

HAS_TRAIN = all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers", "safetensors"))
SYSTEM = "You are a helpful assistant."
ZORBLAX = [("What colour is the sky on Zorblax?", "The sky on Zorblax is bright green."),
           ("Tell me the colour of Zorblax's sky.", "The sky on Zorblax is bright green."),
           ("On planet Zorblax, what colour is the sky?", "The sky on Zorblax is bright green."),
           ("Describe the sky of Zorblax.", "The sky on Zorblax is bright green.")]
PIRATE = [("What is the capital of France?", "Arr matey! Paris be the capital, arr."),
          ("How many legs does a dog have?", "Arr matey! Four legs, arr."),
          ("What colour is grass?", "Arr matey! Grass be green, arr."),
          ("Name a fruit.", "Arr matey! An apple, arr.")]
HELD_OUT = ["What is the colour of the sky on Zorblax?", "What is two plus two?", "Name a large animal.",
            "Where is the Eiffel Tower?", "What do bees make?", "Say something about the sea."]


def _train(tmp: Path, name: str, pairs, rank: int) -> Path:
    from dialogue.document import Dialogue, Kind, Message
    from dialogue.train.main import dialogues_to_jsonl, train_main
    ds = [Dialogue(name=f"{name}-{i}", system=SYSTEM, messages=[Message(kind=Kind.prompt, source=q, response=a)])
          for i, (q, a) in enumerate(pairs)]
    dialogues_to_jsonl(ds, tmp / f"{name}.jsonl")
    out = tmp / name
    rc = train_main(["--dialogues-file", str(tmp / f"{name}.jsonl"), "--steps", "8", "--seq-len", "64",
                     "--r", str(rank), "--lr", "3e-3", "--warmup", "0", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters trained by `dialogue train` in this test: a fact (rank 8, registered from its
    GGUF export) and a style (rank 4, registered from its PEFT export, so converted on add)."""
    if not HAS_TRAIN:
        pytest.skip("the [train] extra (torch, transformers, peft) is not installed: no trainer to make adapters")
    tmp = tmp_path_factory.mktemp("adapters")
    zorblax = _train(tmp, "zorblax", ZORBLAX, 8)
    pirate = _train(tmp, "pirate", PIRATE, 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIALOGUE_HOME", str(tmp / "home"))
        z = A.add(zorblax / "adapter.gguf", "zorblax")
        p = A.add(pirate / "adapter", "pirate")
        yield {"dir": tmp, "zorblax": z, "pirate": p, "zorblax_out": zorblax, "pirate_out": pirate, "mp": mp}


@pytest.fixture(scope="module")
def rt(trained, tmp_path_factory):
    from dialogue.local.runtime import get_runtime
    r = get_runtime("default")
    old = r.cache
    r.cache = KVCache(tmp_path_factory.mktemp("kv"))
    r.set_adapters({})
    yield r
    r.set_adapters({})
    r.cache = old


def ask(rt, q: str, adapters, n: int = 16) -> list[int]:
    p = rt.build_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
    return rt.generate(p, max_tokens=n, adapters=adapters).tokens


def logits(rt, q: str, adapters) -> np.ndarray:
    """The next-token logits after the prompt under an adapter set (llama.cpp's own buffer)."""
    import llama_cpp
    p = rt.build_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
    rt.generate(p, max_tokens=1, adapters=adapters, use_cache=False)
    ptr = llama_cpp.llama_get_logits_ith(rt.llm.ctx, -1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rt.llm.n_vocab(),)).copy()


@pytest.mark.slow
def test_trained_adapters_are_registered_with_what_they_came_from(trained):
    z, p = trained["zorblax"], trained["pirate"]
    assert (z.rank, z.alpha, z.source, z.managed) == (8, 16.0, "gguf", False)
    assert (p.rank, p.alpha, p.source, p.managed) == (4, 8.0, "peft", True)
    assert set(z.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert z.tensors == 30 * 7 and 1e6 < z.size < 5e6  # a few MB, against a 98 MB base
    assert z.provenance["dialogues"] == ",".join(f"zorblax-{i}" for i in range(4))
    assert z.provenance["training"]["steps"] == 8
    assert p.provenance["training"]["steps"] == 8 and p.provenance["converted_from"].endswith("adapter")
    # the PEFT conversion on add gives the trainer's own GGUF export, tensor for tensor
    from gguf import GGUFReader
    mine = {t.name: np.array(t.data) for t in GGUFReader(p.path).tensors}
    theirs = {t.name: np.array(t.data) for t in GGUFReader(str(trained["pirate_out"] / "adapter.gguf")).tensors}
    assert set(mine) == set(theirs) and all(np.array_equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_switching_changes_output_and_back_restores_it_without_a_reload(trained, rt):
    from dialogue.local.runtime import load_count
    n, model = load_count(), rt.llm.model
    q = ZORBLAX[0][0]
    z = A.resolve_set({"zorblax": 1.0}, base="default")
    p = A.resolve_set({"pirate": 1.0}, base="default")
    base = ask(rt, q, {})
    with_z = ask(rt, q, z)
    assert with_z != base
    assert "green" in rt.detokenize(with_z) and "green" not in rt.detokenize(base)  # it learned the fact
    assert ask(rt, q, {}) == base  # back to none: exactly the base's answer
    with_p = ask(rt, "What is the capital of Spain?", p)
    assert rt.detokenize(with_p).startswith("Arr")  # the style, on a question it never saw
    assert ask(rt, q, z) == with_z  # and back again
    assert rt.adapters == z
    assert load_count() == n and rt.llm.model == model


@pytest.mark.slow
def test_stacked_adapters_with_scales(trained, rt):
    q = HELD_OUT[0]
    sets = {"none": {}, "z": {"zorblax": 1.0}, "p": {"pirate": 1.0}, "zp": {"zorblax": 1.0, "pirate": 1.0},
            "zp.5": {"zorblax": 1.0, "pirate": 0.5}}
    L = {k: logits(rt, q, A.resolve_set(v)) for k, v in sets.items()}
    for a in L:
        for b in L:
            if a < b:
                assert np.abs(L[a] - L[b]).max() > 0.05, (a, b)
    # two small adapters act nearly additively: the stack's effect is close to the sum of effects
    eff = lambda k: L[k] - L["none"]  # noqa: E731
    assert np.corrcoef(eff("zp"), eff("z") + eff("p"))[0, 1] > 0.9
    assert np.corrcoef(eff("zp.5"), eff("z") + 0.5 * eff("p"))[0, 1] > 0.9
    # and in greedy text: on held-out prompts the stack answers as neither adapter alone does,
    # and its scales matter
    outs = {k: [tuple(ask(rt, q, A.resolve_set(sets[k]))) for q in HELD_OUT[1:]] for k in ("z", "p", "zp")}
    outs["z.5p"] = [tuple(ask(rt, q, A.resolve_set({"zorblax": 0.5, "pirate": 1.0}))) for q in HELD_OUT[1:]]
    assert any(outs["z.5p"][i] not in (outs["z"][i], outs["p"][i]) for i in range(len(HELD_OUT) - 1))
    assert outs["z.5p"] != outs["zp"]


@pytest.mark.slow
async def test_kv_cache_never_crosses_adapter_sets(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))  # this test's states only
    prov = get_provider("local:default")
    rt = prov.runtime  # the model process the provider answers from
    sys_text = SYSTEM + " " + "Keep answers short and precise. " * 20  # a system prefix worth caching

    async def run(adapters: dict) -> tuple[Usage, str]:
        req = Request(model="local:default", system=sys_text, max_tokens=8,
                      messages=[Turn("user", "What colour is the sky on Zorblax?")],
                      meta={"adapters": A.resolve_set(adapters, base="default")})
        events = [e async for e in prov.stream(req)]
        return next(e for e in events if isinstance(e, Usage)), "".join(e.text for e in events if isinstance(e, TextDelta))

    rt.set_adapters({})
    rt.reset()
    u_z, t_z = await run({"zorblax": 1.0})
    assert u_z.cache_write > 0 and u_z.cache_read == 0
    u_p, _ = await run({"pirate": 1.0})           # straight after, same prompt: memory is not reused
    assert u_p.cache_read == 0 and u_p.cache_write > 0
    rt.reset()
    u_z5, _ = await run({"zorblax": 0.5})         # same adapter, other scale: its own namespace
    assert u_z5.cache_read == 0
    rt.reset()
    u_none, _ = await run({})
    assert u_none.cache_read == 0
    rt.reset()
    again, t_again = await run({"zorblax": 1.0})  # its own set again, after a reset: from disk
    assert again.cache_read == u_z.cache_write and t_again == t_z
    namespaces = {e.namespace for e in KVCache(tmp_path / "kv").entries()}
    assert len(namespaces) == 4  # z@1, p@1, z@0.5, none: one each, none shared


@pytest.mark.slow
def test_merged_adapters_load_and_act_like_their_weighted_parents(trained, rt):
    home = Path(os.environ["DIALOGUE_HOME"])
    w = (0.6, 0.4)
    infos = {m: A.merge(["zorblax", "pirate"], list(w), f"zp-{m}", method=m, rank=8 if m != "linear" else None)
             for m in ("linear", "ties", "dare")}
    assert infos["linear"].rank == 12 and infos["ties"].rank == 8
    assert all(Path(i.path).parent == home / "adapters" for i in infos.values())
    effects: dict[str, list[np.ndarray]] = {k: [] for k in ("z", "p", "stack", *infos)}
    for q in HELD_OUT:
        base = logits(rt, q, {})
        effects["z"].append(logits(rt, q, A.resolve_set({"zorblax": 1.0})) - base)
        effects["p"].append(logits(rt, q, A.resolve_set({"pirate": 1.0})) - base)
        effects["stack"].append(logits(rt, q, A.resolve_set({"zorblax": w[0], "pirate": w[1]})) - base)
        for m in infos:  # each merged file loads in llama.cpp and applies to the base
            effects[m].append(logits(rt, q, A.resolve_set({f"zp-{m}": 1.0}, base="default")) - base)
    E = {k: np.concatenate(v) for k, v in effects.items()}
    c = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    first_order = w[0] * E["z"] + w[1] * E["p"]
    report = {m: {"stack": c(E[m], E["stack"]), "first_order": c(E[m], first_order)} for m in infos}
    report["z"] = {"stack": c(E["z"], E["stack"]), "first_order": c(E["z"], first_order)}
    report["p"] = {"stack": c(E["p"], E["stack"]), "first_order": c(E["p"], first_order)}
    print("correlation of logit changes on held-out prompts:", json.dumps(report, indent=1))
    # linear at full rank is the weighted stack itself, in one adapter: the same up to llama.cpp's
    # own rounding, measured here as the change from storing one parent's exact values in f32
    # instead of f16 (the f16 LoRA path rounds activations; this overfit adapter amplifies that)
    lz, fz = G.load_factors(trained["zorblax"].path)
    z32 = G.write_lora(home / "z32.gguf", "llama", {n: (a, b * lz.ranks[0] / lz.alpha) for n, (a, b) in fz.items()},
                       alpha=lz.alpha, dtype="f32")
    E32 = np.concatenate([logits(rt, q, {str(z32): 1.0}) - logits(rt, q, {}) for q in HELD_OUT])
    noise = np.abs(E32 - E["z"]).max()
    assert report["linear"]["stack"] > 0.99, report
    assert np.abs(E["linear"] - E["stack"]).max() < 2 * noise, (np.abs(E["linear"] - E["stack"]).max(), noise)
    # ties and dare change the deltas on purpose, yet follow the weighted parents more closely than
    # either parent alone does
    for m in ("ties", "dare"):
        assert report[m]["stack"] > max(report["z"]["stack"], report["p"]["stack"]), report
        assert report[m]["stack"] > 0.8, report
