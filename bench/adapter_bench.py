"""Unmerged LoRA adapters on the quantized base vs a merged model, in one run.

Issue 8's goal: serving the base with adapters applied at run time (what `dialogue` does) should be
within 10% of the speed of a model with the same adapters merged into its weights, at a few MB
per adapter instead of a whole model per combination. The merged models here are built only for
this comparison: every adapted tensor of the base is dequantized, the adapters' deltas (scale *
alpha/r * B @ A) are added, and it is quantized again to the base's own type with the `gguf`
package (Q4_1 for the bundled SmolLM2), so merged and base run the same kernels; tensors no adapter
touches are copied byte for byte.

Contenders, each with the same prompt and greedy decoding, model loads not counted:
  base            the base alone
  base+1          base + adapter 1 at run time (llama.cpp's adapter API, no reload)
  base+2          base + adapters 1 and 2 at run time
  base+(1+2)      base + one adapter that is the linear merge of 1 and 2 at full rank
                  (`dialogue adapters merge`): the same function as base+2, one LoRA pass per tensor
  merged-1        a merged model holding adapter 1
  merged-2        a merged model holding adapters 1 and 2

Then a sweep of single adapters of other shapes (rank 4-32, f16/f32, all projections or
attention only) against merged-1: a merged model's speed does not depend on which adapter was
merged in (same tensors, same quantization types), so one merged model is the reference for all.

    python bench/adapter_bench.py [--tokens 64] [--reps 3] [--rank 16] [--threads 1] [--no-sweep]
                                  [--adapter A.gguf --adapter B.gguf]

Without --adapter, two random adapters of the trainer's default shape (rank 16 on all seven
linear projections of every block) are written: speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROMPT = ("Here is a list of animals: " + ", ".join(["cat", "dog", "horse", "cow", "goat", "sheep", "duck",
                                                     "goose", "hen", "pig"] * 12)
          + ". Write a long story about a farm with all of these animals.")


def random_adapter(base: Path, out: Path, rank: int, seed: int, kinds: tuple[str, ...] = KINDS,
                   dtype: str = "f16") -> Path:
    """A rank-r adapter on the given projections of every block of `base`, at a realistic size
    (B small, as after a short training run)."""
    from gguf import GGUFReader

    from dialogue.gguf.lora import write_lora
    r = GGUFReader(str(base))
    arch = r.fields["general.architecture"].contents()
    rng = np.random.default_rng(seed)
    factors = {}
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in kinds:
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            factors[t.name] = (rng.normal(0, 1 / np.sqrt(n_in), (rank, n_in)), rng.normal(0, 0.01, (n_out, rank)))
    return write_lora(out, arch, factors, alpha=float(rank), dtype=dtype)


def synthetic_model(base: Path, out: Path, hidden: int = 2048, ff: int = 5632, layers: int = 22,
                    heads: int = 32, kv_heads: int = 4) -> Path:
    """A llama model of TinyLlama-1.1B's shape with random Q4_1 weights and the bundled model's
    tokenizer, to see how the adapters' cost scales past a 135M model (the speed of a quantized
    matmul does not depend on the values). Written as raw Q4_1 blocks (f16 scale, f16 minimum, 32
    nibbles): quantizing a billion random floats with numpy would take minutes."""
    import gguf
    r = gguf.GGUFReader(str(base))
    dims = {"llama.embedding_length": hidden, "llama.feed_forward_length": ff, "llama.block_count": layers,
            "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
            "llama.rope.dimension_count": hidden // heads}
    w = gguf.GGUFWriter(str(out), "llama")
    for f in r.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vt = f.types[0]
        w.add_key_value(f.name, dims.get(f.name, f.contents()), vt,
                        sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(0)
    head = np.frombuffer(np.float16(0.01).tobytes() + np.float16(-0.075).tobytes(), np.uint8)

    def q4_1(n_out: int, n_in: int) -> np.ndarray:
        blocks = np.empty((n_out, n_in // 32, 20), np.uint8)
        blocks[..., :4] = head
        blocks[..., 4:] = rng.integers(0, 256, (n_out, n_in // 32, 16), dtype=np.uint8)
        return blocks.reshape(n_out, -1)

    Q = gguf.GGMLQuantizationType.Q4_1
    n_vocab = int(r.fields["llama.vocab_size"].contents())
    kv = hidden // heads * kv_heads
    w.add_tensor("token_embd.weight", q4_1(n_vocab, hidden), raw_dtype=Q)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, (o, n) in {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
                             "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
                             "ffn_down": (hidden, ff)}.items():
            w.add_tensor(f"blk.{i}.{name}.weight", q4_1(o, n), raw_dtype=Q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def merged_model(base: Path, adapters: dict[str, float], out: Path) -> tuple[Path, str]:
    """A GGUF model with the adapters' deltas merged in: the thing `dialogue` never ships, built
    here only to be measured against. Returns (path, what the adapted tensors were stored as)."""
    import gguf

    from dialogue.gguf.lora import load_factors
    deltas: dict[str, np.ndarray] = {}
    for path, scale in adapters.items():
        _, fac = load_factors(path)
        for n, (A, B) in fac.items():
            deltas[n] = deltas.get(n, 0) + scale * (B @ A)
    r = gguf.GGUFReader(str(base))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for f in r.fields.values():  # the copy loop of gguf's own scripts/gguf_new_metadata.py
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vt, sub_type=sub)
    stored: set[str] = set()
    for t in r.tensors:
        if t.name not in deltas:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        W = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) + deltas[t.name]
        try:
            q = gguf.quants.quantize(W.astype(np.float32), t.tensor_type)
            qt = t.tensor_type
        except NotImplementedError:  # K-quants: gguf-py dequantizes them but cannot quantize
            q, qt = W.astype(np.float16), gguf.GGMLQuantizationType.F16
        stored.add(qt.name)
        w.add_tensor(t.name, q, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out, ",".join(sorted(stored))


def measure(rt, prompt, adapters: dict[str, float], tokens: int) -> dict[str, float]:
    rt.reset()
    st = rt.generate(prompt, max_tokens=tokens, use_cache=False, adapters=adapters)
    decode_s = st.total_s - st.ttft_s
    return {"ttft": st.ttft_s, "tps": (st.generated - 1) / decode_s if st.generated > 1 and decode_s > 0 else 0.0,
            "n": st.generated, "tokens": st.tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: steadiest on a shared machine)")
    ap.add_argument("--adapter", action="append", default=[], help="use these two GGUF adapters instead of random ones")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sweep of adapter shapes")
    ap.add_argument("--big-tokens", type=int, default=32)
    ap.add_argument("--big", action="store_true",
                    help="also a TinyLlama-1.1B-shaped model with random weights (about 700 MB written to a temp dir)")
    a = ap.parse_args(argv)

    from dialogue.gguf.lora import read_lora
    from dialogue.gguf.models import ModelSpec, resolve
    from dialogue.local.kvcache import KVCache
    from dialogue.local.merge import merge_files
    from dialogue.local.runtime import Runtime

    base = resolve("default")
    tmp = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    if a.adapter:
        if len(a.adapter) != 2:
            ap.error("give --adapter twice (two adapters)")
        ads = [Path(p) for p in a.adapter]
    else:
        ads = [random_adapter(base.path, tmp / f"adapter{i + 1}.gguf", a.rank, seed=i) for i in range(2)]
    for p in ads:
        read_lora(p)
    one, two = {str(ads[0]): 1.0}, {str(ads[0]): 1.0, str(ads[1]): 1.0}
    t = time.perf_counter()
    both = merge_files([str(p) for p in ads], [1.0, 1.0], tmp / "adapter1+2.gguf", method="linear")
    merge_s = time.perf_counter() - t
    t = time.perf_counter()
    m1, q1 = merged_model(base.path, one, tmp / "merged-1.gguf")
    m2, q2 = merged_model(base.path, two, tmp / "merged-2.gguf")
    build_s = time.perf_counter() - t

    cache = KVCache(tmp / "kv")
    rt = Runtime(base, n_threads=a.threads, cache=cache)
    rts = {"merged-1": Runtime(ModelSpec("merged-1", m1, "path"), n_threads=a.threads, cache=cache),
           "merged-2": Runtime(ModelSpec("merged-2", m2, "path"), n_threads=a.threads, cache=cache)}
    prompt = rt.build_prompt([{"role": "user", "content": PROMPT}])
    contenders = {"base": (rt, {}), "base+1": (rt, one), "base+2": (rt, two),
                  "base+(1+2)": (rt, {str(both): 1.0}),
                  "merged-1": (rts["merged-1"], {}), "merged-2": (rts["merged-2"], {})}
    for r, ad in contenders.values():  # warm-up: page the weights in, load the adapters once
        measure(r, prompt, ad, 4)
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    for _ in range(a.reps):  # interleaved, so drift on a shared machine hits every contender alike
        for k, (r, ad) in contenders.items():
            runs[k].append(measure(r, prompt, ad, a.tokens))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("ttft", "tps", "n")} for k, v in runs.items()}

    print(f"adapter bench: SmolLM2-135M {base.path.name}, prompt {len(prompt.tokens)} tokens, "
          f"{a.tokens} generated, {a.threads} thread(s), median of {a.reps}")
    print(f"adapters: {', '.join(f'{p.name} (rank {read_lora(p).ranks}, {len(read_lora(p).pairs)} tensors)' for p in ads)}")
    print(f"merged models: adapted tensors stored as {q1} / {q2} (the base's own type), built in {build_s:.1f}s; "
          f"adapter merge 1+2 (linear, rank {read_lora(both).ranks[0]}) in {merge_s:.2f}s\n")
    print(f"{'contender':12} {'decode tok/s':>12} {'TTFT ms':>9} {'tokens':>7}")
    for k, v in med.items():
        print(f"{k:12} {v['tps']:12.1f} {v['ttft'] * 1000:9.0f} {v['n']:7.0f}")
    print("\nratios (unmerged / merged; decode speed > 0.90 meets the goal):")
    for un, mg in (("base+1", "merged-1"), ("base+2", "merged-2"), ("base+(1+2)", "merged-2")):
        s = med[un]["tps"] / med[mg]["tps"]
        tt = med[un]["ttft"] / med[mg]["ttft"]
        print(f"  {un:11} vs {mg:9}: decode speed x{s:.3f}, TTFT x{tt:.3f}  {'OK' if s >= 0.9 else 'MISSES the 10% goal'}")
    print(f"  {'merged-1':11} vs {'base':9}: decode speed x{med['merged-1']['tps'] / med['base']['tps']:.3f} "
          "(merging costs nothing at run time)")

    def agree(x: list[int], y: list[int]) -> int:
        n = 0
        for p, q in zip(x, y):
            if p != q:
                break
            n += 1
        return n
    print("\ngreedy agreement, unmerged vs merged (re-quantized) model: "
          f"{agree(runs['base+1'][0]['tokens'], runs['merged-1'][0]['tokens'])}/{len(runs['base+1'][0]['tokens'])} tokens "
          f"(1 adapter), {agree(runs['base+2'][0]['tokens'], runs['merged-2'][0]['tokens'])}/"
          f"{len(runs['base+2'][0]['tokens'])} (2 adapters); base+(1+2) vs base+2: "
          f"{agree(runs['base+(1+2)'][0]['tokens'], runs['base+2'][0]['tokens'])}/{len(runs['base+2'][0]['tokens'])}")
    mb = lambda p: Path(p).stat().st_size / 1e6  # noqa: E731
    print(f"\nbytes: base model {mb(base.path):.1f} MB; adapters {mb(ads[0]):.2f} + {mb(ads[1]):.2f} MB "
          f"({mb(ads[0]) / mb(base.path) * 100:.1f}% of the base each); merged models {mb(m1):.1f} / {mb(m2):.1f} MB "
          f"(a whole model per combination)")

    if not a.no_sweep:
        shapes = [(r, dt, "all") for r in (4, 8, 16, 32) for dt in ("f16", "f32")] + [(16, "f16", "attn"), (8, "f16", "attn")]
        sweep = {}
        for r, dt, which in shapes:
            kinds = KINDS if which == "all" else KINDS[:4]
            sweep[(r, dt, which)] = random_adapter(base.path, tmp / f"s-{r}-{dt}-{which}.gguf", r, 7, kinds, dt)
        res: dict = {k: [] for k in [*sweep, "merged-1"]}
        for r, ad in [*[(rt, {str(p): 1.0}) for p in sweep.values()], (rts["merged-1"], {})]:
            measure(r, prompt, ad, 4)
        for _ in range(a.reps):
            for k, p in sweep.items():
                res[k].append(measure(rt, prompt, {str(p): 1.0}, a.tokens)["tps"])
            res["merged-1"].append(measure(rts["merged-1"], prompt, {}, a.tokens)["tps"])
        ref = statistics.median(res["merged-1"])
        print(f"\nsweep: one adapter at run time vs merged-1 ({ref:.1f} tok/s), decode speed ratio")
        print(f"{'rank':>4} {'dtype':>5} {'targets':>8} {'MB':>6} {'% of base':>9} {'tok/s':>7} {'ratio':>6}")
        for (r, dt, which), p in sweep.items():
            m = statistics.median(res[(r, dt, which)])
            print(f"{r:4d} {dt:>5} {which:>8} {mb(p):6.2f} {mb(p) / mb(base.path) * 100:8.1f}% {m:7.1f} {m / ref:6.3f}"
                  f"{'' if m / ref >= 0.9 else '  (misses 10%)'}")
    for r in (rt, *rts.values()):
        r.close()
    if a.big:
        big_bench(tmp, base, a, mb)
    for p in tmp.iterdir():
        if p.is_file():
            p.unlink()
    return 0


def big_bench(tmp: Path, base, a: argparse.Namespace, mb) -> None:
    """The same question on a model 8x larger per layer: the adapters' cost is a fixed number of
    extra small ops per adapted tensor plus r*(in+out) multiply-adds against the base's in*out, so it
    shrinks as the base grows. No merged model is built here: a merged model has exactly the base's
    tensors and types, so its speed is the base's (merged-1 vs base above shows it)."""
    from dialogue.local.kvcache import KVCache
    from dialogue.gguf.models import ModelSpec
    from dialogue.local.runtime import Runtime
    t = time.perf_counter()
    big = synthetic_model(base.path, tmp / "big.gguf")
    ads = {"r16 all": random_adapter(big, tmp / "big-r16.gguf", 16, 1),
           "r16 all #2": random_adapter(big, tmp / "big-r16b.gguf", 16, 2),
           "r8 all": random_adapter(big, tmp / "big-r8.gguf", 8, 3),
           "r16 attn": random_adapter(big, tmp / "big-r16attn.gguf", 16, 4, KINDS[:4])}
    build_s = time.perf_counter() - t
    rt = Runtime(ModelSpec("big", big, "path"), n_threads=a.threads, cache=KVCache(tmp / "kv"))
    prompt = rt.build_prompt([{"role": "user", "content": "Write a long story about a farm."}])
    cs = {"base (= merged)": {}, "+ r16 all": {str(ads["r16 all"]): 1.0}, "+ r8 all": {str(ads["r8 all"]): 1.0},
          "+ r16 attn": {str(ads["r16 attn"]): 1.0},
          "+ 2 x r16 all": {str(ads["r16 all"]): 1.0, str(ads["r16 all #2"]): 1.0}}
    for ad in cs.values():
        measure(rt, prompt, ad, 2)
    res: dict[str, list[dict]] = {k: [] for k in cs}
    for _ in range(a.reps):
        for k, ad in cs.items():
            res[k].append(measure(rt, prompt, ad, a.big_tokens))
    ref = statistics.median(x["tps"] for x in res["base (= merged)"])
    print(f"\nbig: TinyLlama-1.1B-shaped random model ({mb(big):.0f} MB, Q4_1), written in {build_s:.0f}s; "
          f"{a.big_tokens} tokens, median of {a.reps}")
    print(f"{'contender':16} {'MB':>7} {'tok/s':>7} {'ratio':>6}")
    for k, ad in cs.items():
        m = statistics.median(x["tps"] for x in res[k])
        size = f"{sum(mb(p) for p in ad):7.2f}" if ad else f"{'-':>7}"
        print(f"{k:16} {size} {m:7.2f} {m / ref:6.3f}{'' if m / ref >= 0.9 else '  (misses 10%)'}")
    rt.close()


if __name__ == "__main__":
    sys.exit(main())
