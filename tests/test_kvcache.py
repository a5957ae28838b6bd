"""The persistent prefix KV cache, with the real bundled model: save/restore, greedy equality with
and without a restored prefix (also in a new process), longest-prefix choice, LRU eviction at the
cap, damaged files ignored and replaced, adapter sets kept apart, stats and clear."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dialogue.local import kvcache
from dialogue.local.kvcache import KVCache, evaluated_tokens, namespace_key, prefix_hash
from dialogue.local.runtime import get_runtime, load_count

SYSTEM = ("You are a helpful assistant. Answer in one short sentence. Facts: the river Lune flows "
          "through Lancaster; the town of Kendal is known for mint cake; Morecambe Bay has quicksand; "
          "the Lake District has sixteen lakes.")


def chat(question: str, history: tuple[tuple[str, str], ...] = ()) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def rt():
    return get_runtime("default")


@pytest.fixture
def cache(tmp_path, monkeypatch, rt):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    monkeypatch.delenv("DIALOGUE_KV_CACHE_MAX_BYTES", raising=False)
    rt.reset()
    old, rt.cache = rt.cache, KVCache()
    yield rt.cache
    rt.cache = old
    rt.set_adapters({})
    rt.reset()


def test_keys():
    a = [1, 2, 3]
    assert prefix_hash(a) == prefix_hash(list(a)) != prefix_hash([1, 2, 4])
    base = namespace_key("m" * 64)
    assert base == namespace_key("m" * 64)
    assert base != namespace_key("n" * 64)
    assert base != namespace_key("m" * 64, [("adapter1", 1.0)])
    assert namespace_key("m" * 64, [("adapter1", 1.0)]) != namespace_key("m" * 64, [("adapter1", 0.5)])
    assert namespace_key("m" * 64, [("a", 1.0), ("b", 0.5)]) == namespace_key("m" * 64, [("b", 0.5), ("a", 1.0)])


def test_llama_state_accessors(rt, cache):
    """The one place that touches Llama's private attributes, checked against what the wrapper
    itself does: its eval appends after n_tokens."""
    llm = rt.llm
    kvcache.check_llama_internals(llm)
    toks = rt.tokenize("The quick brown fox jumps over the lazy dog.")
    kvcache.truncate_to(llm, 0)
    assert evaluated_tokens(llm) == []
    llm.eval(toks)
    assert evaluated_tokens(llm) == toks
    assert kvcache.truncate_to(llm, 4) == 4 and evaluated_tokens(llm) == toks[:4]
    llm.eval(toks[4:])
    assert evaluated_tokens(llm) == toks
    kvcache.set_evaluated_tokens(llm, toks[:3])
    assert llm.n_tokens == 3 and evaluated_tokens(llm) == toks[:3]
    assert kvcache.truncate_to(llm, 0) == 0 and llm.n_tokens == 0


def test_save_restore_same_process_gives_the_same_greedy_tokens(rt, cache):
    p = rt.build_prompt(chat("Where is mint cake from?"))
    assert p.save and p.save[0] == p.boundaries[0]  # the end of the system message is saved
    cold = rt.generate(p, max_tokens=12)
    assert cold.restored == 0 and cold.cached == 0 and cold.saved == p.save[0]
    assert len(cache.entries()) == 1
    rt.reset()
    warm = rt.generate(p, max_tokens=12)
    assert warm.restored == p.save[0] == warm.cached
    assert warm.tokens == cold.tokens and warm.text == cold.text and cold.generated > 0
    assert cache.hits == 1
    # and the same with the disk cache bypassed and a cold context
    rt.reset()
    assert rt.generate(p, max_tokens=12, use_cache=False).tokens == cold.tokens


def test_longest_prefix_wins_and_only_new_tokens_are_evaluated(rt, cache):
    # an answer long enough (> SAVE_END_MIN tokens past the system prefix) to be worth its own state
    hist = (("Where is Kendal?", "Kendal is in Cumbria, England. " * 40),)
    p1 = rt.build_prompt(chat("Where is Kendal?"))
    rt.generate(p1, max_tokens=4)
    p2 = rt.build_prompt(chat("What is Kendal known for?", hist))
    assert p2.tokens[:p1.save[0]] == p1.tokens[:p1.save[0]]  # the stable prefix is stable
    first = rt.generate(p2, max_tokens=8)
    assert first.saved == p2.save[-1] > p2.save[0]   # the end of the history got saved too
    rt.reset()
    again = rt.generate(p2, max_tokens=8)
    assert again.restored == p2.save[-1]  # not the shorter system-only prefix
    assert again.tokens == first.tokens
    cands = cache.find(rt.cache_namespace, p2.tokens)
    assert [c.n_tokens for c in cands] == sorted(p2.save, reverse=True)
    # only prefixes of the prompt match
    assert cache.find(rt.cache_namespace, rt.build_prompt(chat("Other?")).tokens)[0].n_tokens == p1.save[0]
    assert cache.find(rt.cache_namespace, rt.tokenize("unrelated text")) == []


def test_a_state_close_to_one_already_saved_is_not_saved_again(rt, cache):
    """A state file costs tens of MB and is written while the user waits for the first token: a
    boundary fewer than SAVE_END_MIN tokens past a saved prefix is not saved (a restart reads
    those few tokens instead)."""
    from dialogue.local.runtime import SAVE_END_MIN
    hist = (("Where is Kendal?", "Kendal is in Cumbria, England."),)
    p1 = rt.build_prompt(chat("Where is Kendal?"))
    rt.generate(p1, max_tokens=4)
    p2 = rt.build_prompt(chat("What is Kendal known for?", hist))
    assert 0 < p2.save[-1] - p1.save[0] < SAVE_END_MIN
    second = rt.generate(p2, max_tokens=8)
    assert second.saved == 0 and [e.n_tokens for e in cache.entries()] == [p1.save[0]]
    rt.reset()
    again = rt.generate(p2, max_tokens=8)  # after a restart: the system prefix, then the rest
    assert again.restored == p1.save[0] and again.tokens == second.tokens


RESTART = textwrap.dedent("""
    import json, sys
    from dialogue.local.runtime import get_runtime
    msgs, use_cache = json.loads(sys.argv[1]), sys.argv[2] == "1"
    rt = get_runtime("default")
    p = rt.build_prompt(msgs)
    st = rt.generate(p, max_tokens=16, use_cache=use_cache)
    print(json.dumps({"tokens": st.tokens, "text": st.text, "restored": st.restored,
                      "saved": st.saved, "n": len(p.tokens)}))
""")


def _in_new_process(msgs, use_cache: bool, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", RESTART, json.dumps(msgs), "1" if use_cache else "0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cache_hit_after_a_restart_gives_identical_greedy_tokens(tmp_path):
    env = {**os.environ, "DIALOGUE_CACHE_DIR": str(tmp_path / "kv")}
    msgs = chat("What flows through Lancaster?", (("Is Morecambe Bay safe?", "It has quicksand."),))
    first = _in_new_process(msgs, True, env)            # computes and saves
    assert first["restored"] == 0 and first["saved"] > 0
    second = _in_new_process(msgs, True, env)           # a new process restores from disk
    assert second["restored"] == first["saved"]
    no_cache = _in_new_process(msgs, False, env)        # a new process without any cache
    assert no_cache["restored"] == 0
    assert second["tokens"] == first["tokens"] == no_cache["tokens"]
    assert len(second["tokens"]) > 0


def test_corrupt_file_is_ignored_deleted_and_replaced(rt, cache):
    p = rt.build_prompt(chat("What is in Morecambe Bay?"))
    ref = rt.generate(p, max_tokens=10)
    [entry] = cache.entries()
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle: same size, bad checksum
    entry.path.write_bytes(bytes(data))
    rt.reset()
    st = rt.generate(p, max_tokens=10)
    assert st.restored == 0 and cache.corrupt == 1
    assert st.tokens == ref.tokens  # recomputed, same answer
    [new] = cache.entries()        # and saved again, intact
    assert new.path.exists() and cache._valid(new)
    # a truncated file (a crash in the middle of a copy) is caught by its size
    new.path.write_bytes(new.path.read_bytes()[: new.size // 3])
    rt.reset()
    st = rt.generate(p, max_tokens=10)
    assert st.restored == 0 and cache.corrupt == 2 and st.tokens == ref.tokens
    rt.reset()
    assert rt.generate(p, max_tokens=10).restored == p.save[0]


def test_file_with_a_valid_checksum_but_other_tokens_is_refused(rt, cache):
    """A name whose hash matches but whose state holds other tokens (a collision, a renamed file)
    is caught by comparing the tokens stored in the file."""
    pa = rt.build_prompt(chat("One?"))
    rt.generate(pa, max_tokens=2)
    [ea] = cache.entries()
    other = rt.tokenize("Lorem ipsum dolor sit amet " * 6)[: ea.n_tokens]
    assert len(other) == ea.n_tokens
    rt.reset()
    rt.llm.eval(other)
    eb = cache.save(rt.llm, rt.cache_namespace, other)
    # give b's bytes the name a's prefix would have
    fake = ea.path.with_name(f"{ea.n_tokens:07d}-{ea.prefix}-{eb.size}-{eb.crc:08x}.kv")
    ea.path.unlink()
    eb.path.rename(fake)
    rt.reset()
    assert cache.restore(rt.llm, rt.cache_namespace, pa.tokens) == 0
    assert not fake.exists() and cache.corrupt == 1 and rt.llm.n_tokens == 0


def test_eviction_at_the_cap_is_least_recently_used(rt, cache):
    prompts = [rt.build_prompt([{"role": "system", "content": f"System number {i}. " + SYSTEM},
                                {"role": "user", "content": "Hi"}]) for i in range(4)]
    rt.generate(prompts[0], max_tokens=1)
    size = cache.entries()[0].size
    rt.cache = cache = KVCache(max_bytes=int(size * 3.5))  # room for three
    for p in prompts[1:3]:
        rt.generate(p, max_tokens=1)
    assert len(cache.entries()) == 3
    time.sleep(0.05)
    rt.reset()
    assert rt.generate(prompts[0], max_tokens=1).restored > 0  # prompt 0 is now the most recent
    time.sleep(0.05)
    rt.generate(prompts[3], max_tokens=1)                    # a fourth: one must go
    left = {e.prefix for e in cache.entries()}
    assert len(left) == 3
    gone = prefix_hash(prompts[1].tokens[: prompts[1].save[0]])
    assert gone not in left                                  # the least recently used one
    assert prefix_hash(prompts[0].tokens[: prompts[0].save[0]]) in left
    assert cache.stats().bytes <= cache.max_bytes
    assert cache.evicted == 1


def test_crash_leftovers_are_never_used_and_get_swept(rt, cache):
    p = rt.build_prompt(chat("Lakes?"))
    rt.generate(p, max_tokens=1)
    [e] = cache.entries()
    tmp = e.path.with_name(".tmp-999-1.kv")   # a writer died before its rename
    tmp.write_bytes(e.path.read_bytes()[:1000])
    old = time.time() - 2 * 3600
    os.utime(tmp, (old, old))
    assert [x.path for x in cache.entries()] == [e.path]
    cache.evict()
    assert not tmp.exists() and e.path.exists()


def test_adapter_set_changes_the_key_and_never_restores_across_sets(rt, cache, tmp_path):
    lora = make_lora(tmp_path / "a.gguf", seed=0)
    p = rt.build_prompt(chat("Name a lake."))
    base = rt.generate(p, max_tokens=10)
    ns_base = rt.cache_namespace
    loads = load_count()
    rt.set_adapters({lora: 1.0})
    assert load_count() == loads  # applied at run time, no reload of the base
    ns_a = rt.cache_namespace
    assert ns_a != ns_base
    with_a = rt.generate(p, max_tokens=10)
    assert with_a.restored == 0 and with_a.cached == 0   # the base's prefix is not reused
    rt.set_adapters({lora: 0.5})
    assert rt.cache_namespace not in (ns_a, ns_base)
    rt.set_adapters({})
    assert rt.cache_namespace == ns_base
    back = rt.generate(p, max_tokens=10)
    assert back.restored == p.save[0] and back.tokens == base.tokens
    assert {e.namespace for e in cache.entries()} == {ns_base, ns_a}
    assert with_a.tokens != base.tokens  # the adapter does change the model


def test_bad_adapter_is_refused_and_changes_nothing(rt, cache, tmp_path):
    from dialogue.gguf.lora import AdapterError
    with pytest.raises(AdapterError, match="no such LoRA adapter"):
        rt.set_adapters({tmp_path / "missing.gguf": 1.0})
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(AdapterError, match="not a GGUF LoRA adapter"):
        rt.set_adapters({junk: 1.0})
    assert rt.adapters == {}


def test_stats_and_clear(rt, cache):
    assert cache.stats().entries == 0
    rt.generate(rt.build_prompt(chat("A?")), max_tokens=1)
    rt.generate(rt.build_prompt([{"role": "system", "content": "Other system."},
                                 {"role": "user", "content": "B?"}]), max_tokens=1)
    s = cache.stats()
    assert s.entries == 2 and s.bytes == sum(e.size for e in cache.entries()) and s.saves == 2
    [ns] = s.namespaces
    assert ns["entries"] == 2 and ns["info"]["model"] == "smollm2" and ns["info"]["adapters"] == {}
    assert cache.clear() == 2
    assert cache.stats().entries == 0 and cache.entries() == []
    assert cache.clear() == 0


def test_unwritable_cache_dir_does_not_break_generation(rt, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(blocker / "kv"))  # under a file: cannot exist
    old, rt.cache = rt.cache, KVCache()
    try:
        rt.reset()
        p = rt.build_prompt(chat("C?"))
        st = rt.generate(p, max_tokens=4)
        assert st.generated > 0 and st.saved == 0 and rt.cache.entries() == []
        with pytest.raises(kvcache.CacheError, match="cannot create"):
            rt.cache.save(rt.llm, rt.cache_namespace, evaluated_tokens(rt.llm))
    finally:
        rt.cache = old
        rt.reset()


def test_one_model_load_for_the_whole_module(rt):
    assert load_count() >= 1
    n = load_count()
    assert get_runtime("local:smollm2") is rt and load_count() == n


# ---------------------------------------------------------------- a GGUF LoRA adapter

def make_lora(path: Path, seed: int, rank: int = 4, std: float = 0.3) -> str:
    """A small random LoRA on every attention query projection of SmolLM2-135M, written in the
    GGUF adapter format llama.cpp loads (tensors `<name>.lora_a` [rank x in], `.lora_b` [out x rank])."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(seed)
    for i in range(30):
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_a", rng.normal(0, std, (rank, 576)).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_b", rng.normal(0, std, (576, rank)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_hit_and_miss_counters_are_the_folders_across_processes(rt, cache, tmp_path):
    """Two generations in a new process each (the model's process is not the one reading the
    stats): the first finds nothing, the second restores the system prompt's state; the folder's
    counters add both, a clear starts them over."""
    msgs = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "Hi?"}]
    env = {**os.environ, "DIALOGUE_CACHE_DIR": str(cache.root)}
    _in_new_process(msgs, True, env)
    _in_new_process(msgs, True, env)
    st = KVCache(cache.root).stats()
    assert (st.hits, st.misses, st.lookups, st.hit_rate) == (1, 1, 2, 0.5) and st.saves >= 1
    assert st.since is not None and st.since <= time.time()
    KVCache(cache.root).clear()
    st = KVCache(cache.root).stats()
    assert (st.lookups, st.hit_rate, st.since) == (0, None, None)
